// XNOR-popcount convolution on NVIDIA GPUs (bnnctl kernels), compiled at run time by CuPy's
// RawModule and, in the tests, by nvcc for sm_80 and sm_90 wherever nvcc exists.
//
// Packing: bit (c % 32) of word c / 32 is 1 where the value is >= 0 (+1), 0 otherwise (-1); bits
// past the channel count are 0 in both operands. The packed input carries a border of zero words
// (pad on each side), so the inner loops have no bounds checks; a zero word stands for all -1, and
// the finishing step takes the padded taps out again, so that taps in the zero padding contribute
// 0, exactly as F.conv2d(sign(x), sign(w)) with zero padding. The integer sum times alpha[o] is
// computed in single precision, as the float emulation does.
//
// Two convolution kernels with the same inputs and the same result:
//   bnn_xnor_conv_popc  CUDA cores: sum_c x_c w_c = C - 2 popc(x ^ w) per tap inside the image.
//   bnn_xnor_conv_mma   1-bit tensor cores (sm_80+): mma.sync m8n8k128 b1 with AND + popc, since
//                       XOR on b1 is gone from sm_90. With a = popc(x & w), px = popc(x),
//                       pw = popc(w): sum_c x_c w_c = C - 2 px - 2 pw + 4 a per tap.
//
// Tests also compile this file as C++ on the host (BNN_HOST_EMULATION, tests/cuda_host_emulation.cpp)
// with each warp's 32 lanes as threads and the mma emulated from the fragment layout the PTX ISA
// gives for m8n8k128; that checks indexing and the finishing arithmetic, not the hardware.
//
// Layouts: input xq (N, HP, WP, CWP) uint32 with HP = H + 2 pad, WP = W + 2 pad, CWP words per
// pixel (CWP = 4 * ceil(C / 128) for the tensor-core kernel, so each 128-bit step is one pixel's
// channels); xpop (N, HP, WP) int32: popc of each padded pixel's words. Weights wq (OP, KH*KW, CWP)
// uint32 with OP = O rounded up to 32 (extra rows zero); wpop (KH*KW, OP) int32 per-tap popcounts.

extern "C" {

// src: (N, C, H, W) float -> xq: (N, HP, WP, CWP) uint32 with zero border, and, when want_pop,
// xpop (N, HP, WP). One thread per padded pixel.
__global__ void bnn_pack_padded(const float* __restrict__ src, unsigned int* __restrict__ xq,
                                int* __restrict__ xpop, long long n, long long c, long long h, long long w,
                                long long pad, long long cwp, int want_pop)
{
    const long long hp = h + 2 * pad, wp = w + 2 * pad;
    const long long total = n * hp * wp;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long col = idx % wp - pad, row = (idx / wp) % hp - pad, i = idx / (wp * hp);
        const bool inside = row >= 0 && row < h && col >= 0 && col < w;
        const float* base = src + (i * c * h * w + row * w + col);
        unsigned int* dst = xq + idx * cwp;
        int count = 0;
        for (long long k = 0; k < cwp; ++k) {
            unsigned int word = 0u;
            if (inside) {
                const long long c0 = k * 32;
                const long long cmax = (c - c0) < 32 ? (c - c0) : 32;
                for (long long b = 0; b < cmax; ++b)
                    word |= (base[(c0 + b) * h * w] >= 0.0f ? 1u : 0u) << b;
            }
            dst[k] = word;
            count += __popc(word);
        }
        if (want_pop) xpop[idx] = count;
    }
}

// w: (O, C, KH, KW) float -> wq: (OP, KH*KW, CWP) uint32 (rows past O zero), wpop: (KH*KW, OP).
// One thread per (output channel, tap).
__global__ void bnn_pack_weight(const float* __restrict__ w, unsigned int* __restrict__ wq,
                                int* __restrict__ wpop, long long o, long long op, long long c,
                                long long taps, long long cwp)
{
    const long long total = op * taps;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long oc = idx / taps, t = idx % taps;
        unsigned int* dst = wq + idx * cwp;
        int count = 0;
        for (long long k = 0; k < cwp; ++k) {
            unsigned int word = 0u;
            if (oc < o) {
                const long long c0 = k * 32;
                const long long cmax = (c - c0) < 32 ? (c - c0) : 32;
                for (long long b = 0; b < cmax; ++b)
                    word |= (w[(oc * c + c0 + b) * taps + t] >= 0.0f ? 1u : 0u) << b;
            }
            dst[k] = word;
            count += __popc(word);
        }
        wpop[t * op + oc] = count;
    }
}

// Output pixel m of the flattened (N, OH, OW) -> its top-left padded input pixel.
__device__ __forceinline__ long long bnn_origin(long long m, long long oh, long long ow, long long hp,
                                                long long wp, long long stride)
{
    const long long s = m % ow, r = (m / ow) % oh, i = m / (ow * oh);
    return (i * hp + r * stride) * wp + s * stride;
}

// The number of taps of output pixel m inside the image; *padded = the sum of wpop[t, oc] over its
// taps in the padding (what the zero words there added to a popcount over all taps).
__device__ __forceinline__ int bnn_taps_inside(long long m, long long oc, const int* __restrict__ wpop,
                                               long long op, long long oh, long long ow, long long h,
                                               long long w, long long kh, long long kw, long long stride,
                                               long long pad, int* padded)
{
    const long long s = m % ow, r = (m / ow) % oh;
    int valid = 0, sum = 0;
    for (long long a = 0; a < kh; ++a)
        for (long long b = 0; b < kw; ++b) {
            const long long ih = r * stride - pad + a, iw = s * stride - pad + b;
            if (ih >= 0 && ih < h && iw >= 0 && iw < w) ++valid;
            else sum += wpop[(a * kw + b) * op + oc];
        }
    *padded = sum;
    return valid;
}

__device__ __forceinline__ void bnn_store(float* __restrict__ y, const float* __restrict__ alpha, long long m,
                                          long long oc, long long o, long long ohw, int dot, int has_alpha)
{
    const long long i = m / ohw, p = m % ohw;
    const float v = (float)dot;
    y[(i * o + oc) * ohw + p] = has_alpha ? v * alpha[oc] : v;
}

// acc += popc(A & B) for one m8n8k128 b1 step of the warp (this lane's A and B registers).
#ifndef BNN_HOST_EMULATION
__device__ __forceinline__ void bnn_mma_and_popc(int acc[2], unsigned int a, unsigned int b)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc {%0, %1}, {%2}, {%3}, {%0, %1};\n"
                 : "+r"(acc[0]), "+r"(acc[1])
                 : "r"(a), "r"(b));
#endif
}
#endif

// CUDA cores. A block of 256 threads covers 32 output pixels x (8 warps x 8) output channels: lane
// = pixel, warp = a group of 8 output channels, so a warp's weight reads are broadcasts and each
// input word read feeds 8 popcounts.
#define POPC_OC 8
__global__ void bnn_xnor_conv_popc(const unsigned int* __restrict__ xq, const unsigned int* __restrict__ wq,
                                   const int* __restrict__ wpop, const float* __restrict__ alpha,
                                   float* __restrict__ y, long long n, long long c, long long h, long long w,
                                   long long cwp, long long o, long long op, long long kh, long long kw,
                                   long long stride, long long pad, long long oh, long long ow, int has_alpha)
{
    const long long hp = h + 2 * pad, wp = w + 2 * pad, taps = kh * kw;
    const long long total_m = n * oh * ow;
    const long long m = blockIdx.x * 32LL + (threadIdx.x & 31);
    const long long oc0 = (blockIdx.y * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5)) * POPC_OC;
    if (oc0 >= o) return;
    const long long mm = m < total_m ? m : total_m - 1;
    const unsigned int* xo = xq + bnn_origin(mm, oh, ow, hp, wp, stride) * cwp;
    int count[POPC_OC];
#pragma unroll
    for (int q = 0; q < POPC_OC; ++q) count[q] = 0;
    for (long long a = 0; a < kh; ++a)
        for (long long b = 0; b < kw; ++b) {
            const unsigned int* xt = xo + (a * wp + b) * cwp;
            const unsigned int* wt = wq + (oc0 * taps + a * kw + b) * cwp;
            for (long long k = 0; k < cwp; ++k) {
                const unsigned int xv = xt[k];
#pragma unroll
                for (int q = 0; q < POPC_OC; ++q) count[q] += __popc(xv ^ wt[q * taps * cwp + k]);
            }
        }
    if (m >= total_m) return;
#pragma unroll
    for (int q = 0; q < POPC_OC; ++q) {
        const long long oc = oc0 + q;
        if (oc >= o) break;
        int padded;
        const int valid = bnn_taps_inside(m, oc, wpop, op, oh, ow, h, w, kh, kw, stride, pad, &padded);
        bnn_store(y, alpha, m, oc, o, oh * ow, (int)(valid * c) - 2 * (count[q] - padded), has_alpha);
    }
}

// 1-bit tensor cores: one warp computes 32 output pixels x 32 output channels as 4 x 4 tiles of
// mma.m8n8k128 (lane = group g = lane / 4, thread-in-group t = lane % 4: A register = word t of the
// 128-bit step of row (pixel) g, B register = word t of column (channel) g, accumulator = row g,
// columns 2t and 2t + 1). Each step of 128 bits is one tap's channels (CWP is a multiple of 4).
// A block is 4 warps: 64 pixels x 64 channels.
__global__ void bnn_xnor_conv_mma(const unsigned int* __restrict__ xq, const int* __restrict__ xpop,
                                  const unsigned int* __restrict__ wq, const int* __restrict__ wpop,
                                  const float* __restrict__ alpha, float* __restrict__ y, long long n,
                                  long long c, long long h, long long w, long long cwp, long long o,
                                  long long op, long long kh, long long kw, long long stride, long long pad,
                                  long long oh, long long ow, int has_alpha)
{
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(BNN_HOST_EMULATION)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const long long hp = h + 2 * pad, wp = w + 2 * pad, taps = kh * kw;
    const long long total_m = n * oh * ow;
    const long long m0 = blockIdx.x * 64LL + (warp & 1) * 32;
    const long long oc0 = blockIdx.y * 64LL + (warp >> 1) * 32;
    if (oc0 >= op) return;
    const unsigned int* xrow[4];
    const unsigned int* wcol[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        long long m = m0 + 8 * i + g;
        m = m < total_m ? m : total_m - 1;  // past the end: computed, not stored
        xrow[i] = xq + bnn_origin(m, oh, ow, hp, wp, stride) * cwp + t;
        wcol[i] = wq + (oc0 + 8 * i + g) * taps * cwp + t;
    }
    int acc[4][4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = 0;
    for (long long a = 0; a < kh; ++a)
        for (long long b = 0; b < kw; ++b) {
            const long long xoff = (a * wp + b) * cwp, woff = (a * kw + b) * cwp;
            for (long long k = 0; k < cwp; k += 4) {
                unsigned int av[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    av[i] = xrow[i][xoff + k];
                    bv[i] = wcol[i][woff + k];
                }
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        bnn_mma_and_popc(acc[i][j], av[i], bv[j]);
            }
        }
    // finish: C - 2 px - 2 pw + 4 a per tap inside the image; padded taps have x = 0, so a = px = 0
    // there and only their pw must be taken out of the per-channel total
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long m = m0 + 8 * i + g;
        if (m >= total_m) continue;
        const long long origin = bnn_origin(m, oh, ow, hp, wp, stride);
        int px = 0;
        for (long long a = 0; a < kh; ++a)
            for (long long b = 0; b < kw; ++b) px += xpop[origin + a * wp + b];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const long long oc = oc0 + 8 * j + 2 * t + e;
                if (oc >= o) continue;
                int padded, pw = 0;
                const int valid = bnn_taps_inside(m, oc, wpop, op, oh, ow, h, w, kh, kw, stride, pad, &padded);
                for (long long tap = 0; tap < taps; ++tap) pw += wpop[tap * op + oc];
                pw -= padded;
                bnn_store(y, alpha, m, oc, o, oh * ow, (int)(valid * c) - 2 * px - 2 * pw + 4 * acc[i][j][e], has_alpha);
            }
    }
#endif
}

}  // extern "C"
