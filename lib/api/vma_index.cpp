// The VMA index's changes (core/vma_index.hpp): API world, under the arena's write lock.
#include "vma_index.hpp"

#include <algorithm>
#include <cstring>
#include <new>

#include "vma.hpp"

namespace usermm::detail {

namespace {

using Node = VmaIndexNode;
constexpr std::uint32_t kSlots = Node::kSlots;
constexpr std::align_val_t kNodeAlign{alignof(Node)};

Node* node_new() {
    void* mem = ::operator new(sizeof(Node), kNodeAlign, std::nothrow);
    if (!mem) return nullptr;
    Node* n = static_cast<Node*>(mem);
    std::fill(std::begin(n->keys), std::end(n->keys), Node::kNoKey);
    std::fill(std::begin(n->slots), std::end(n->slots), nullptr);
    n->count = 0;
    return n;
}

void node_free(Node* n) { ::operator delete(n, kNodeAlign); }

Node* child(const Node* n, std::uint32_t i) { return static_cast<Node*>(n->slots[i]); }
std::uintptr_t max_key(const Node* n) { return n->keys[n->count - 1]; }

void free_subtree(Node* n, std::uint32_t height) {
    if (height > 1)
        for (std::uint32_t i = 0; i < n->count; ++i) free_subtree(child(n, i), height - 1);
    node_free(n);
}

// Entry `at` and those after it move one place up; the node has room.
void put(Node* n, std::uint32_t at, std::uintptr_t key, void* slot) {
    std::memmove(n->keys + at + 1, n->keys + at, (n->count - at) * sizeof n->keys[0]);
    std::memmove(n->slots + at + 1, n->slots + at, (n->count - at) * sizeof n->slots[0]);
    n->keys[at] = key;
    n->slots[at] = slot;
    ++n->count;
}

void remove(Node* n, std::uint32_t at) {
    std::memmove(n->keys + at, n->keys + at + 1, (n->count - at - 1) * sizeof n->keys[0]);
    std::memmove(n->slots + at, n->slots + at + 1, (n->count - at - 1) * sizeof n->slots[0]);
    --n->count;
    n->keys[n->count] = Node::kNoKey;
    n->slots[n->count] = nullptr;
}

// Moves the entries from `from` on into the empty node `right`.
void move_tail(Node* n, std::uint32_t from, Node* right) {
    const std::uint32_t moved = n->count - from;
    std::memcpy(right->keys, n->keys + from, moved * sizeof n->keys[0]);
    std::memcpy(right->slots, n->slots + from, moved * sizeof n->slots[0]);
    right->count = moved;
    std::fill(n->keys + from, n->keys + n->count, Node::kNoKey);
    std::fill(n->slots + from, n->slots + n->count, nullptr);
    n->count = from;
}

// Appends all of `right`'s entries to `left`, which has room for them.
void append(Node* left, const Node* right) {
    std::memcpy(left->keys + left->count, right->keys, right->count * sizeof right->keys[0]);
    std::memcpy(left->slots + left->count, right->slots, right->count * sizeof right->slots[0]);
    left->count += right->count;
}

}  // namespace

VmaIndex::~VmaIndex() { clear(); }

void VmaIndex::clear() {
    last_leaf_.store(nullptr, std::memory_order_relaxed);
    if (root_) free_subtree(root_, height_);
    root_ = nullptr;
    height_ = 0;
    size_ = 0;
}

bool VmaIndex::insert(Vma& v) {
    const std::uintptr_t key = v.end;
    last_leaf_.store(nullptr, std::memory_order_relaxed);
    if (!root_) {
        Node* n = node_new();
        if (!n) return false;
        put(n, 0, key, &v);
        root_ = n;
        height_ = 1;
        size_ = 1;
        return true;
    }
    // The path to the leaf the key belongs in: below the first child whose largest key is above it
    // (ends are unique), or below the last child for a key above all.
    Node* path[kMaxHeight];
    std::uint32_t pos[kMaxHeight];
    Node* n = root_;
    for (std::uint32_t level = 0; level < height_; ++level) {
        std::uint32_t p = n->rank(key);
        if (level + 1 < height_) p = std::min(p, n->count - 1);
        path[level] = n;
        pos[level] = p;
        if (level + 1 < height_) n = child(n, p);
    }
    // Every full node from the leaf up splits, and a new root is needed if they all are: allocated
    // before anything changes.
    std::uint32_t full = 0;
    while (full < height_ && path[height_ - 1 - full]->count == kSlots) ++full;
    const std::uint32_t needed = full + (full == height_);
    if (full == height_ && height_ == kMaxHeight) return false;
    Node* spares[kMaxHeight + 1];
    for (std::uint32_t i = 0; i < needed; ++i) {
        spares[i] = node_new();
        if (!spares[i]) {
            while (i) node_free(spares[--i]);
            return false;
        }
    }
    std::uint32_t spare = 0;
    // Bottom up: the entry to insert at each level (the VMA in the leaf, a split's right half above),
    // and each node's key for the child on the path, whose largest key may have changed.
    std::uintptr_t entry_key = key;
    void* entry = &v;
    std::uint32_t at = pos[height_ - 1];
    bool carry = true;
    for (std::uint32_t level = height_; level-- > 0;) {
        Node* node = path[level];
        if (level + 1 < height_) {
            node->keys[pos[level]] = max_key(path[level + 1]);
            at = pos[level] + 1;
        }
        if (!carry) continue;
        if (node->count < kSlots) {
            put(node, at, entry_key, entry);
            carry = false;
            continue;
        }
        // A full node splits in halves, or, for an entry above all of it (maps in address order),
        // keeps its entries and gives the new one a node of its own: filled by the next maps.
        Node* right = spares[spare++];
        if (at == kSlots) {
            put(right, 0, entry_key, entry);
        } else {
            move_tail(node, kSlots / 2, right);
            if (at <= kSlots / 2)
                put(node, at, entry_key, entry);
            else
                put(right, at - kSlots / 2, entry_key, entry);
        }
        entry_key = max_key(right);
        entry = right;
    }
    if (carry) {
        Node* top = spares[spare++];
        put(top, 0, max_key(root_), root_);
        put(top, 1, entry_key, entry);
        root_ = top;
        ++height_;
    }
    ++size_;
    return true;
}

void VmaIndex::erase(const Vma& v) {
    const std::uintptr_t key = v.end;
    last_leaf_.store(nullptr, std::memory_order_relaxed);
    // Below the first child whose largest key is at or above the key: the one that holds it.
    Node* path[kMaxHeight];
    std::uint32_t pos[kMaxHeight];
    Node* n = root_;
    for (std::uint32_t level = 0; level < height_; ++level) {
        const std::uint32_t p = n->rank(key - 1);
        path[level] = n;
        pos[level] = p;
        if (level + 1 < height_) n = child(n, p);
    }
    remove(path[height_ - 1], pos[height_ - 1]);
    --size_;
    // Bottom up: an emptied node leaves its parent; one that fits in half a node with a neighbour
    // joins it, so that deletions do not leave a tree of near-empty nodes.
    for (std::uint32_t level = height_ - 1; level > 0; --level) {
        Node* node = path[level];
        Node* parent = path[level - 1];
        const std::uint32_t p = pos[level - 1];
        if (node->count == 0) {
            remove(parent, p);
            node_free(node);
            continue;
        }
        parent->keys[p] = max_key(node);
        if (p + 1 < parent->count && node->count + child(parent, p + 1)->count <= kSlots / 2) {
            Node* right = child(parent, p + 1);
            append(node, right);
            parent->keys[p] = max_key(node);
            remove(parent, p + 1);
            node_free(right);
        } else if (p > 0 && child(parent, p - 1)->count + node->count <= kSlots / 2) {
            Node* left = child(parent, p - 1);
            append(left, node);
            parent->keys[p - 1] = max_key(left);
            remove(parent, p);
            node_free(node);
        }
    }
    if (root_->count == 0) {
        node_free(root_);
        root_ = nullptr;
        height_ = 0;
        return;
    }
    while (height_ > 1 && root_->count == 1) {
        Node* old = root_;
        root_ = child(old, 0);
        node_free(old);
        --height_;
    }
}

}  // namespace usermm::detail
