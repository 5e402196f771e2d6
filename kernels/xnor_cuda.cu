// XNOR-popcount convolution on NVIDIA GPUs (bnnctl kernels), compiled at run time by CuPy's
// RawModule and, in the tests, by nvcc for sm_80 and sm_90 wherever nvcc exists.
//
// Packing: bit (c % 32) of word c / 32 is 1 where the value is >= 0 (+1), 0 otherwise (-1); bits
// past the channel count are 0 in both operands. For a tap inside the image,
// sum_c x_c w_c = C - 2 popc(x ^ w); taps in the zero padding contribute 0, exactly as
// F.conv2d(sign(x), sign(w)) with zero padding. The integer sum times alpha[o] is computed in single
// precision, as the float emulation does.

extern "C" {

// src: (N, C, H, W) float -> dst: (N, H, W, CW) uint32. One thread per output word.
__global__ void bnn_pack_nchw(const float* __restrict__ src, unsigned int* __restrict__ dst,
                              long long n, long long c, long long h, long long w, long long cw)
{
    const long long total = n * h * w * cw;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long k = idx % cw;
        const long long p = (idx / cw) % (h * w);
        const long long i = idx / (cw * h * w);
        unsigned int word = 0u;
        const long long c0 = k * 32;
        const long long cmax = (c - c0) < 32 ? (c - c0) : 32;
        const float* base = src + (i * c + c0) * h * w + p;
        for (long long b = 0; b < cmax; ++b)
            word |= (base[b * h * w] >= 0.0f ? 1u : 0u) << b;
        dst[idx] = word;
    }
}

// x: (N, H, W, CW) packed input; wt: (O, KH, KW, CW) packed weight; alpha: (O,) or null;
// y: (N, O, OH, OW) float. One thread per output element; consecutive threads share (n, o, oh) and
// walk ow, so their input reads are close and the weight reads are broadcast.
__global__ void bnn_xnor_conv(const unsigned int* __restrict__ x, const unsigned int* __restrict__ wt,
                              const float* __restrict__ alpha, float* __restrict__ y,
                              long long n, long long c, long long h, long long w, long long cw,
                              long long o, long long kh, long long kw, long long stride, long long pad,
                              long long oh, long long ow, int has_alpha)
{
    const long long total = n * o * oh * ow;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long s = idx % ow;
        const long long r = (idx / ow) % oh;
        const long long oc = (idx / (ow * oh)) % o;
        const long long i = idx / (ow * oh * o);
        long long count = 0, valid = 0;
        for (long long a = 0; a < kh; ++a) {
            const long long ih = r * stride - pad + a;
            if (ih < 0 || ih >= h) continue;
            for (long long b = 0; b < kw; ++b) {
                const long long iw = s * stride - pad + b;
                if (iw < 0 || iw >= w) continue;
                ++valid;
                const unsigned int* xp = x + ((i * h + ih) * w + iw) * cw;
                const unsigned int* wp = wt + ((oc * kh + a) * kw + b) * cw;
                for (long long k = 0; k < cw; ++k) count += __popc(xp[k] ^ wp[k]);
            }
        }
        const float dot = (float)(valid * c - 2 * count);
        y[idx] = has_alpha ? dot * alpha[oc] : dot;
    }
}

}  // extern "C"
