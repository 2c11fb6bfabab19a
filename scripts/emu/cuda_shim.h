// Host emulation of the CUDA subset the kernels in kernels/ use, shared by the drivers in
// this folder (one .cpp per kernel file, each including this header and then the .cu file).
// Each block's threads are fibers (ucontext) on one OS thread, run round-robin, blocks one
// after another; __syncthreads and the warp-level operations (shuffles, and a driver's own
// warp-wide emulation such as conv_igemm's mma.sync via emu::warp_wait) are barriers at
// which a fiber yields until its peers arrive. A thread that returns counts as arrived at
// every later barrier of its block and warp (as on the GPU). A round in which no fiber
// reaches a barrier or returns is a deadlock: reported, and the process aborts.
// Float intrinsics (__fadd_rn, ...) are the plain IEEE operations: build the drivers with
// -ffp-contract=off so that the host compiler does not fuse them either.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cassert>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>
#include <ucontext.h>
#define CONV_IGEMM_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx, blockIdx, gridDim, blockDim;
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
template <typename T> inline T __ldg(const T* p) { return *p; }
[[noreturn]] inline void __trap() {
    fprintf(stderr, "__trap() in block (%u, %u) thread (%u, %u)\n", blockIdx.x, blockIdx.y,
            threadIdx.x, threadIdx.y);
    abort();
}

namespace emu {
constexpr int MAX_THREADS = 1024;
inline ucontext_t sched_ctx, fib_ctx[MAX_THREADS];
inline std::vector<char> stacks[MAX_THREADS];
inline int cur = -1, nthreads = 0;
inline bool done[MAX_THREADS];
inline const std::function<void()>* body = nullptr;
inline long long swaps = 0, arrivals = 0, launches = 0, blocks_run = 0;

struct Barrier { int expected = 0, count = 0; unsigned gen = 0; };
inline Barrier block_bar, warp_bar[MAX_THREADS / 32];

inline void yield_() { swaps++; swapcontext(&fib_ctx[cur], &sched_ctx); }
inline void release_if_full(Barrier& b) {
    if (b.count > 0 && b.count == b.expected) { b.count = 0; b.gen++; }
}
inline void wait(Barrier& b) {
    arrivals++;
    const unsigned g = b.gen;
    ++b.count;
    release_if_full(b);
    while (b.gen == g) yield_();
}
inline int lane() { return cur % 32; }
inline int warp() { return cur / 32; }
// A barrier over the calling thread's warp (all its threads must call it: full masks only).
inline void warp_wait() { wait(warp_bar[warp()]); }

// The lanes' exchange slots of the shuffles (8 bytes a lane).
inline uint64_t xchg[MAX_THREADS / 32][32];
template <typename T> inline T shfl_from(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    xchg[warp()][lane()] = bits;
    warp_wait();
    T r = v;
    if (src >= 0 && src < 32 && warp() * 32 + src < nthreads)
        memcpy(&r, &xchg[warp()][src], sizeof(T));
    warp_wait();
    return r;
}

inline void trampoline(int i) {
    (*body)();
    done[i] = true;
    arrivals++;
    // An exited thread no longer holds back its block's and warp's barriers.
    block_bar.expected--;
    release_if_full(block_bar);
    Barrier& w = warp_bar[i / 32];
    w.expected--;
    release_if_full(w);
    swapcontext(&fib_ctx[i], &sched_ctx);
}

// Runs k() as every thread of every block of the grid (blocks in order, x fastest).
template <typename K> void launch(dim3 grid, dim3 block, K k) {
    const std::function<void()> f = k;
    body = &f;
    gridDim = grid;
    blockDim = block;
    nthreads = (int)(block.x * block.y * block.z);
    if (nthreads < 1 || nthreads > MAX_THREADS || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
        grid.y > 65535 || grid.z > 65535) {
        fprintf(stderr, "invalid launch: grid (%u, %u, %u) block (%u, %u, %u)\n", grid.x, grid.y,
                grid.z, block.x, block.y, block.z);
        abort();
    }
    launches++;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                blockIdx = dim3(bx, by, bz);
                blocks_run++;
                block_bar = Barrier{nthreads};
                for (int w = 0; w * 32 < nthreads; w++)
                    warp_bar[w] = Barrier{nthreads - w * 32 < 32 ? nthreads - w * 32 : 32};
                for (int i = 0; i < nthreads; i++) {
                    stacks[i].resize(1 << 16);
                    getcontext(&fib_ctx[i]);
                    fib_ctx[i].uc_stack.ss_sp = stacks[i].data();
                    fib_ctx[i].uc_stack.ss_size = stacks[i].size();
                    fib_ctx[i].uc_link = nullptr;
                    makecontext(&fib_ctx[i], (void (*)())trampoline, 1, i);
                    done[i] = false;
                }
                for (bool any = true; any;) {
                    any = false;
                    const long long before = arrivals;
                    for (int i = 0; i < nthreads; i++) {
                        if (done[i]) continue;
                        any = true;
                        cur = i;
                        threadIdx = dim3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
                        swapcontext(&sched_ctx, &fib_ctx[i]);
                    }
                    if (any && arrivals == before) {
                        fprintf(stderr, "deadlock in block (%u, %u, %u): threads wait at barriers "
                                        "their peers never reach\n", bx, by, bz);
                        abort();
                    }
                }
            }
    cur = -1;
    body = nullptr;
}
}  // namespace emu

inline void __syncthreads() { emu::wait(emu::block_bar); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { assert(mask == 0xffffffffu); emu::warp_wait(); }
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src) {
    assert(mask == 0xffffffffu);
    return emu::shfl_from(v, src & 31);
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int o) {
    assert(mask == 0xffffffffu);
    return emu::shfl_from(v, emu::lane() ^ o);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d) {
    assert(mask == 0xffffffffu);
    return emu::shfl_from(v, emu::lane() + (int)d);  // past lane 31: the caller's own value
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned d) {
    assert(mask == 0xffffffffu);
    return emu::shfl_from(v, emu::lane() - (int)d);  // before lane 0: the caller's own value
}

// Helpers for the drivers: 16-byte aligned buffers filled with a guard value, so that a view
// at any float offset can be placed in them and the values around it checked untouched.
namespace emu {
struct Buf {
    std::vector<float4> store;
    float* base;
    size_t cap;
    Buf(size_t n, float fill) : store(n / 4 + 2) {
        base = &store[0].x;
        cap = store.size() * 4;
        for (size_t i = 0; i < cap; i++) base[i] = fill;
    }
};
inline bool is_guard(float v, float guard) {
    return std::isnan(guard) ? std::isnan(v) : __float_as_uint(v) == __float_as_uint(guard);
}
}  // namespace emu

float to_tf32(float v);
void mma_tf32(float& d0, float& d1, float& d2, float& d3, const unsigned (&a)[4], const unsigned (&b)[2]);
