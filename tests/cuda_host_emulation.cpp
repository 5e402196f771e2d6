// Host emulation of kernels/xnor_cuda.cu for the tests: the CUDA source compiled as C++20 with
// BNN_HOST_EMULATION, grids run block by block. Kernels without warp collectives run thread by
// thread; the tensor-core kernel runs each warp as 32 std::threads that meet at every mma step,
// where each lane takes its part of D = C + popc(A & B) by the m8n8k128 b1 fragment layout of the
// PTX ISA: lane = 4 g + t holds A row g bits [32 t, 32 t + 32), B column g bits [32 t, 32 t + 32)
// and D row g, columns 2 t and 2 t + 1. This checks the kernels' indexing and arithmetic on any
// machine; it cannot check the hardware (or the layout itself) -- that needs a GPU.
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

struct bnn_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
static thread_local bnn_dim3 threadIdx, blockIdx;
static bnn_dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
static inline int __popc(unsigned int v) { return __builtin_popcount(v); }

static std::barrier<>* warp_barrier = nullptr;
static unsigned int warp_a[32], warp_b[32];

static void bnn_mma_and_popc(int acc[2], unsigned int a, unsigned int b)
{
    const unsigned lane = threadIdx.x & 31u;
    warp_a[lane] = a;
    warp_b[lane] = b;
    warp_barrier->arrive_and_wait();
    const unsigned g = lane >> 2, t = lane & 3u;
    for (unsigned e = 0; e < 2; ++e) {
        const unsigned col = 2 * t + e;
        int sum = 0;
        for (unsigned k = 0; k < 4; ++k) sum += __popc(warp_a[4 * g + k] & warp_b[4 * col + k]);
        acc[e] += sum;
    }
    warp_barrier->arrive_and_wait();
}

#include "xnor_cuda.cu"

template <typename Kernel>
static void run_grid(unsigned gx, unsigned gy, unsigned block, bool warps, Kernel kernel)
{
    gridDim = {gx, gy, 1};
    blockDim = {block, 1, 1};
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
            if (!warps) {
                blockIdx = {bx, by, 0};
                for (unsigned tx = 0; tx < block; ++tx) {
                    threadIdx = {tx, 0, 0};
                    kernel();
                }
                continue;
            }
            for (unsigned w = 0; w < block / 32; ++w) {
                std::barrier<> barrier(32);
                warp_barrier = &barrier;
                std::vector<std::thread> lanes;
                for (unsigned lane = 0; lane < 32; ++lane)
                    lanes.emplace_back([=] {
                        blockIdx = {bx, by, 0};
                        threadIdx = {32 * w + lane, 0, 0};
                        kernel();
                    });
                for (auto& l : lanes) l.join();
                warp_barrier = nullptr;
            }
        }
}

using i64 = long long;
using u32 = unsigned int;

extern "C" {

void emu_bnn_pack_padded(unsigned gx, unsigned gy, unsigned block, const float* src, u32* xq, int* xpop, i64 n,
                         i64 c, i64 h, i64 w, i64 pad, i64 cwp, int want_pop)
{
    run_grid(gx, gy, block, false, [&] { bnn_pack_padded(src, xq, xpop, n, c, h, w, pad, cwp, want_pop); });
}

void emu_bnn_pack_weight(unsigned gx, unsigned gy, unsigned block, const float* w, u32* wq, int* wpop, i64 o,
                         i64 op, i64 c, i64 taps, i64 cwp)
{
    run_grid(gx, gy, block, false, [&] { bnn_pack_weight(w, wq, wpop, o, op, c, taps, cwp); });
}

void emu_bnn_xnor_conv_popc(unsigned gx, unsigned gy, unsigned block, const u32* xq, const u32* wq,
                            const int* wpop, const float* alpha, float* y, i64 n, i64 c, i64 h, i64 w, i64 cwp,
                            i64 o, i64 op, i64 kh, i64 kw, i64 stride, i64 pad, i64 oh, i64 ow, int has_alpha)
{
    run_grid(gx, gy, block, false, [&] {
        bnn_xnor_conv_popc(xq, wq, wpop, alpha, y, n, c, h, w, cwp, o, op, kh, kw, stride, pad, oh, ow, has_alpha);
    });
}

void emu_bnn_xnor_conv_mma(unsigned gx, unsigned gy, unsigned block, const u32* xq, const int* xpop,
                           const u32* wq, const int* wpop, const float* alpha, float* y, i64 n, i64 c, i64 h,
                           i64 w, i64 cwp, i64 o, i64 op, i64 kh, i64 kw, i64 stride, i64 pad, i64 oh, i64 ow,
                           int has_alpha)
{
    run_grid(gx, gy, block, true, [=] {
        bnn_xnor_conv_mma(xq, xpop, wq, wpop, alpha, y, n, c, h, w, cwp, o, op, kh, kw, stride, pad, oh, ow,
                          has_alpha);
    });
}

}  // extern "C"
