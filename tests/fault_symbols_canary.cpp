// Proof that check_fault_symbols.sh can fail: code that allocates, throws and locks, checked by the
// same script in a test that must fail.
#include <cstdlib>
#include <mutex>
#include <stdexcept>

int fault_symbols_canary(int n) {
    static std::mutex m;
    std::lock_guard lock(m);
    int* p = new int(n);
    void* q = std::malloc(16);
    if (!q) throw std::runtime_error("no memory");
    std::free(q);
    const int v = *p;
    delete p;
    return v;
}
