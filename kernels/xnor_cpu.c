/* XNOR-popcount convolution for the CPU (bnnctl kernels).
 *
 * Binary tensors are bit-packed along the channel axis: bit (c % 64) of word c / 64 is 1 for +1
 * (x >= 0) and 0 for -1; bits past the channel count are 0 in both operands, so they never differ.
 * For a tap inside the image, sum_c x_c w_c = C - 2 popcount(x XOR w); taps in the zero padding
 * contribute 0, exactly as F.conv2d(sign(x), sign(w)) with zero padding. The integer sum is then
 * multiplied by alpha[o] in single precision, as the float emulation does.
 *
 * Layouts. Input: xp (N, HP, CW, WP) -- the image at offset (pad, pad) of a zero-word border, and
 * consecutive pixels of a row contiguous for each word, so 8 pixels load as one vector. Weights:
 * (KH * KW, CW, OP) with OP = O rounded up to OR, plus wpop (KH * KW, OP), each tap's popcount.
 * A zero word in the padding stands for all -1, so a padded tap adds popcount(w) to the XOR count;
 * border pixels subtract it again (wpop), which keeps the inner loop free of bounds checks.
 *
 * The taps and channel words of one output pixel form a single loop of K = KH * KW * CW steps
 * (an offset table maps step j to its input word), so narrow layers (64 channels: one word a tap)
 * do not pay a loop exit per tap.
 *
 * Built at first use with the machine's C compiler (-O3 -march=native). With AVX-512 VPOPCNTDQ the
 * micro-kernel computes 8 output pixels (one vector) x OR = 16 output channels per step, its 16
 * accumulators held in registers: per 64 input bits and 8 pixels one xor, one popcount and one add.
 * Without AVX-512 a portable scalar loop computes the same numbers. With OpenMP (when the compiler
 * has it) output rows are shared among threads; the caller sets their number.
 */
#define _ISOC11_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>
#define BNN_AVX512 1
#else
#define BNN_AVX512 0
#endif

#define PX 8        /* output pixels per block (one vector of 8 words) */
#define OR 16       /* output channels per block */
#define MAX_TAPS 64 /* kernels up to 8x8 */

int bnn_has_avx512(void) { return BNN_AVX512; }
int bnn_out_block(void) { return OR; }
int bnn_pixel_block(void) { return PX; }

int bnn_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline int bit_of(float v, const float *thresh, const uint8_t *flip, int64_t ch)
{
    if (!thresh) return v >= 0.0f;
    return flip[ch] ? v <= thresh[ch] : v >= thresh[ch];
}

/* x: (N, C, H, W) float32 -> xp: (N, HP, CW, WP), image at (pad, pad), zero words elsewhere.
 * The bit of channel ch is x >= thresh[ch], or x <= thresh[ch] where flip[ch] (thresh NULL: x >= 0):
 * a BatchNorm followed by sign, folded into one comparison per channel (see workers/fused.py). */
void bnn_pack_input(const float *x, int64_t n, int64_t c, int64_t h, int64_t w, int64_t cw,
                    int64_t pad, int64_t hp, int64_t wp, uint64_t *out, const float *thresh, const uint8_t *flip)
{
    const int64_t plane = h * w;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n * hp * cw * w > 32768)
#endif
    for (int64_t irow = 0; irow < n * hp; ++irow) {
        const int64_t i = irow / hp, row = irow % hp;
        for (int64_t k = 0; k < cw; ++k) {
            uint64_t *dst = out + ((i * hp + row) * cw + k) * wp;
            const int64_t r = row - pad;
            if (r < 0 || r >= h) {
                memset(dst, 0, (size_t)wp * sizeof(uint64_t));
                continue;
            }
            memset(dst, 0, (size_t)pad * sizeof(uint64_t));
            memset(dst + pad + w, 0, (size_t)(wp - pad - w) * sizeof(uint64_t));
            dst += pad;
            const int64_t c0 = 64 * k, c1 = c0 + 64 < c ? c0 + 64 : c;
            const float *src = x + (i * c + c0) * plane + r * w;
            int64_t s = 0;
#if BNN_AVX512
            /* 16 pixels at a time: one compare per channel gives their 16 sign bits, or-ed into
             * 32-bit halves (channels c0 .. c0+31 and c0+32 .. c0+63), joined into words at the end */
            for (; s < w; s += 16) {
                const int64_t left = w - s;
                const __mmask16 lanes = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
                __m512i half[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
                const float *p = src + s;
                for (int part = 0; part < 2; ++part) {
                    const int64_t lo = c0 + 32 * part, hi = lo + 32 < c1 ? lo + 32 : c1;
                    __m512i acc = _mm512_setzero_si512(), bit = _mm512_set1_epi32(1);
                    for (int64_t ch = lo; ch < hi; ++ch, p += plane) {
                        const __m512 v = _mm512_maskz_loadu_ps(lanes, p);
                        const __mmask16 m = !thresh ? _mm512_mask_cmp_ps_mask(lanes, v, _mm512_setzero_ps(), _CMP_GE_OQ)
                                          : flip[ch] ? _mm512_mask_cmp_ps_mask(lanes, v, _mm512_set1_ps(thresh[ch]), _CMP_LE_OQ)
                                                     : _mm512_mask_cmp_ps_mask(lanes, v, _mm512_set1_ps(thresh[ch]), _CMP_GE_OQ);
                        acc = _mm512_mask_or_epi32(acc, m, acc, bit);
                        bit = _mm512_slli_epi32(bit, 1);
                    }
                    half[part] = acc;
                }
                for (int v = 0; v < 2; ++v) {
                    const __m512i lo = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(half[0], v));
                    const __m512i hi = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(half[1], v));
                    _mm512_mask_storeu_epi64(dst + s + 8 * v, (__mmask8)(lanes >> (8 * v)),
                                             _mm512_or_si512(lo, _mm512_slli_epi64(hi, 32)));
                }
            }
#else
            memset(dst, 0, (size_t)w * sizeof(uint64_t));
            for (int64_t ch = c0; ch < c1; ++ch, src += plane)
                for (s = 0; s < w; ++s) dst[s] |= (uint64_t)bit_of(src[s], thresh, flip, ch) << (ch - c0);
#endif
        }
    }
}

/* w: (O, C, KH, KW) float32 -> (KH * KW, CW, OP) words and (KH * KW, OP) popcounts. */
void bnn_pack_weight(const float *w, int64_t o, int64_t c, int64_t kh, int64_t kw, int64_t cw,
                     int64_t op, uint64_t *out, int64_t *wpop)
{
    const int64_t taps = kh * kw;
    memset(out, 0, (size_t)(taps * cw * op) * sizeof(uint64_t));
    for (int64_t oc = 0; oc < o; ++oc)
        for (int64_t ch = 0; ch < c; ++ch)
            for (int64_t t = 0; t < taps; ++t)
                if (w[(oc * c + ch) * taps + t] >= 0.0f)
                    out[(t * cw + (ch >> 6)) * op + oc] |= (uint64_t)1 << (ch & 63);
    for (int64_t t = 0; t < taps; ++t)
        for (int64_t oc = 0; oc < op; ++oc) {
            int64_t sum = 0;
            for (int64_t k = 0; k < cw; ++k) sum += __builtin_popcountll(out[(t * cw + k) * op + oc]);
            wpop[t * op + oc] = sum;
        }
}

typedef struct {
    int64_t n, c, h, w, cw, o, op, kh, kw, stride, pad, hp, wp, oh, ow;
} geom;

/* What happens to each output value v = alpha[o] * (binary dot product), in the order of the float
 * emulation (BinaryConv2d -> activation -> the block's sum), so results are bit-identical:
 *   act 0: none; 1: v > 0 ? v : 0 (ReLU); 2: v > 0 ? v : slope[o] * v (LeakyReLU, PReLU);
 *   packed: the next binary conv's input bit, v >= pthresh[o] (v <= pthresh[o] where pflip[o]), set in
 *           that conv's packed input (N, p_hp, p_cw, p_wp), image at (p_pad, p_pad), which starts zeroed;
 *   y: v + res * gate[o] (res NULL: v; gate NULL: v + res) at y + i * y_stride + o * OH * OW, res alike.
 * The same struct is declared with ctypes in cpu.py. */
typedef struct {
    const float *alpha;
    const float *slope;
    int64_t act;
    float *y;
    int64_t y_stride;
    const float *res;
    const float *gate;
    uint64_t *packed;
    int64_t p_hp, p_cw, p_wp, p_pad;
    const float *pthresh;
    const uint8_t *pflip;
} epilogue;

static inline float activate(const epilogue *ep, int64_t oc, float v)
{
    if (ep->act == 1) return v > 0.0f ? v : 0.0f;
    if (ep->act == 2) return v > 0.0f ? v : ep->slope[oc] * v;
    return v;
}

/* The epilogue of one output value (scalar kernel); v already includes alpha. */
static inline void emit(const geom *g, const epilogue *ep, int64_t i, int64_t r, int64_t s, int64_t oc, float v)
{
    v = activate(ep, oc, v);
    if (ep->packed && (ep->pflip[oc] ? v <= ep->pthresh[oc] : v >= ep->pthresh[oc]))
        ep->packed[((i * ep->p_hp + r + ep->p_pad) * ep->p_cw + (oc >> 6)) * ep->p_wp + ep->p_pad + s] |=
            (uint64_t)1 << (oc & 63);
    if (ep->y) {
        const int64_t at = i * ep->y_stride + oc * g->oh * g->ow + r * g->ow + s;
        if (ep->res) v = v + (ep->gate ? ep->res[at] * ep->gate[oc] : ep->res[at]);
        ep->y[at] = v;
    }
}

static inline int inside(const geom *g, int64_t r, int64_t s, int64_t a, int64_t b)
{
    const int64_t ih = r * g->stride - g->pad + a, iw = s * g->stride - g->pad + b;
    return ih >= 0 && ih < g->h && iw >= 0 && iw < g->w;
}

/* Offsets of the K = KH * KW * CW input words of one output pixel, step j = (a * KW + b) * CW + k,
 * from the pixel's top-left word; weight row j of the packed weights belongs to the same step. */
static void step_offsets(const geom *g, int64_t *off)
{
    for (int64_t a = 0; a < g->kh; ++a)
        for (int64_t b = 0; b < g->kw; ++b)
            for (int64_t k = 0; k < g->cw; ++k) off[(a * g->kw + b) * g->cw + k] = (a * g->cw + k) * g->wp + b;
}

/* The finished value of output (o, r, s) from its raw XOR count over all KH x KW taps. */
static inline float finish(const geom *g, const int64_t *wpop, const float *alpha, int64_t oc, int64_t r,
                           int64_t s, int64_t count)
{
    int64_t valid = 0;
    for (int64_t a = 0; a < g->kh; ++a)
        for (int64_t b = 0; b < g->kw; ++b) {
            if (inside(g, r, s, a, b)) ++valid;
            else count -= wpop[(a * g->kw + b) * g->op + oc];
        }
    const float dot = (float)(valid * g->c - 2 * count);
    return alpha ? dot * alpha[oc] : dot;
}

#if BNN_AVX512
/* 8 words of pixels 0 .. 7 (output columns) of a row of words, `stride` words apart. */
static inline __attribute__((always_inline)) __m512i load_pixels(const uint64_t *p, const int64_t stride)
{
    if (stride == 1) return _mm512_loadu_si512((const void *)p);
    if (stride == 2) {
        const __m512i lo = _mm512_loadu_si512((const void *)p);
        const __m512i hi = _mm512_loadu_si512((const void *)(p + 8));
        return _mm512_permutex2var_epi64(lo, _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0), hi);
    }
    const __m512i idx = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(stride));
    return _mm512_i64gather_epi64(idx, (const void *)p, 8);
}

/* The finishing base of each output: y = (base - 2 count) * alpha with count the raw XOR count over all
 * taps, base = (taps inside the image) * C + 2 * (sum over padded taps of popcount(w)). Interior pixels
 * share one constant; the pixels of a vector touching the padding get their own base per output
 * channel. Which taps fall in the padding depends on the output row only through its row class (the
 * range of tap rows inside the image), so the tables are rebuilt only when that class changes
 * (top rows, the interior, bottom rows), not for every row. */
typedef struct {
    int64_t a_lo, a_hi;      /* tap rows inside the image for the cached class; a_lo = -1: none yet */
    int64_t nvec;            /* pixel vectors per output row */
    unsigned char *edge;     /* (nvec): 1 when some tap of some pixel of the vector is padding */
    float *base;             /* (nvec, OP, PX) bases of edge vectors */
    float interior[OR * PX] __attribute__((aligned(32))); /* taps * C everywhere */
} bases;

static int bases_init(const geom *g, bases *bs)
{
    bs->a_lo = bs->a_hi = -1;
    bs->nvec = (g->ow + PX - 1) / PX;
    bs->edge = (unsigned char *)malloc((size_t)bs->nvec);
    bs->base = (float *)aligned_alloc(64, (size_t)(bs->nvec * g->op * PX) * sizeof(float));
    for (int i = 0; i < OR * PX; ++i) bs->interior[i] = (float)(g->kh * g->kw * g->c);
    return bs->edge && bs->base;
}

static void bases_free(bases *bs)
{
    free(bs->edge);
    free(bs->base);
}

/* Make the tables right for output row r. */
static void bases_for_row(const geom *g, const int64_t *wpop, int64_t r, bases *bs)
{
    const int64_t top = r * g->stride - g->pad;
    const int64_t a_lo = top < 0 ? -top : 0, a_hi = g->h - top < g->kh ? g->h - top : g->kh;
    if (a_lo == bs->a_lo && a_hi == bs->a_hi) return;
    bs->a_lo = a_lo;
    bs->a_hi = a_hi;
    const int64_t taps = g->kh * g->kw;
    for (int64_t v = 0; v < bs->nvec; ++v) {
        const int64_t left = v * PX * g->stride - g->pad;
        bs->edge[v] = !(a_lo == 0 && a_hi == g->kh && left >= 0 && left + (PX - 1) * g->stride + g->kw <= g->w);
        if (!bs->edge[v]) continue;
        /* padded taps with one lane mask each; taps inside per lane */
        int n = 0;
        int64_t tap[MAX_TAPS], valid[PX];
        __mmask8 mask[MAX_TAPS];
        for (int p = 0; p < PX; ++p) valid[p] = taps;
        for (int64_t t = 0; t < taps; ++t) {
            const int64_t a = t / g->kw, b = t % g->kw;
            unsigned m = 0;
            for (int p = 0; p < PX; ++p) {
                const int64_t col = left + p * g->stride + b;
                if (a < a_lo || a >= a_hi || col < 0 || col >= g->w) {
                    m |= 1u << p;
                    --valid[p];
                }
            }
            if (m) {
                tap[n] = t;
                mask[n++] = (__mmask8)m;
            }
        }
        const __m512i vc = _mm512_mullo_epi64(_mm512_loadu_si512((const void *)valid), _mm512_set1_epi64(g->c));
        for (int64_t oc = 0; oc < g->op; ++oc) {
            __m512i corr = _mm512_setzero_si512();
            for (int i = 0; i < n; ++i)
                corr = _mm512_mask_add_epi64(corr, mask[i], corr, _mm512_set1_epi64(wpop[tap[i] * g->op + oc]));
            _mm256_store_ps(bs->base + (v * g->op + oc) * PX, _mm512_cvtepi64_ps(_mm512_add_epi64(vc, _mm512_slli_epi64(corr, 1))));
        }
    }
}

/* acc[q] = XOR counts of output channels o0 + q over the K steps, 8 pixels from x. */
static inline __attribute__((always_inline)) void
counts_avx512(const uint64_t *x, const int64_t *off, const uint64_t *w, int64_t op, int64_t steps,
              const int64_t stride, __m512i acc[OR])
{
    for (int q = 0; q < OR; ++q) acc[q] = _mm512_setzero_si512();
    for (int64_t j = 0; j < steps; ++j, w += op) {
        const __m512i xv = load_pixels(x + off[j], stride);
        for (int q = 0; q < OR; ++q)
            acc[q] = _mm512_add_epi64(acc[q], _mm512_popcnt_epi64(_mm512_xor_si512(xv, _mm512_set1_epi64((long long)w[q]))));
    }
}

/* The epilogue of one block (see `epilogue`), for one combination of its switches: ACT (0, 1, 2),
 * PACKED (0, 1) and YMODE (0: no float output, 1: stored, 2: stored with the residual) are
 * compile-time constants in each instantiation, so the loop over the 16 channels unrolls without
 * branches and acc[] stays in registers (a branchy generic loop cost 25% on 64-channel layers). */
static inline __attribute__((always_inline)) void
finish_avx512(const geom *g, const epilogue *ep, const __m512i acc[OR], int64_t i, int64_t r, int64_t s0,
              int64_t o0, const float *base, __mmask8 store, const int ACT, const int PACKED, const int YMODE)
{
    const int64_t ohw = g->oh * g->ow, pix = r * g->ow + s0;
    const __m256 zero = _mm256_setzero_ps();
    const float *alpha = ep->alpha, *gate = ep->gate;
    float *y = YMODE ? ep->y + i * ep->y_stride + pix : NULL;
    const float *rs = YMODE == 2 ? ep->res + i * ep->y_stride + pix : NULL;
    __m512i bits = _mm512_setzero_si512();
    for (int q = 0; q < OR; ++q) {
        const int64_t oc = o0 + q < g->o ? o0 + q : g->o - 1; /* padded channels: computed, not stored */
        const __mmask8 keep = o0 + q < g->o ? store : (__mmask8)0;
        /* base - 2 count in single precision: integers below 2^24, so exact, as in the emulation */
        __m256 v = _mm256_fnmadd_ps(_mm512_cvtepi64_ps(acc[q]), _mm256_set1_ps(2.0f), _mm256_load_ps(base + q * PX));
        if (alpha) v = _mm256_mul_ps(v, _mm256_set1_ps(alpha[oc]));
        if (ACT == 1) v = _mm256_mask_blend_ps(_mm256_cmp_ps_mask(v, zero, _CMP_GT_OQ), zero, v);
        if (ACT == 2)
            v = _mm256_mask_blend_ps(_mm256_cmp_ps_mask(v, zero, _CMP_GT_OQ),
                                     _mm256_mul_ps(v, _mm256_set1_ps(ep->slope[oc])), v);
        if (PACKED) {
            const __m256 t = _mm256_set1_ps(ep->pthresh[oc]);
            const __mmask8 m = ep->pflip[oc] ? _mm256_cmp_ps_mask(v, t, _CMP_LE_OQ) : _mm256_cmp_ps_mask(v, t, _CMP_GE_OQ);
            bits = _mm512_mask_or_epi64(bits, m & keep, bits, _mm512_set1_epi64((long long)(1ull << (oc & 63))));
        }
        if (YMODE == 2) {
            __m256 rv = _mm256_maskz_loadu_ps(keep, rs + oc * ohw);
            if (gate) rv = _mm256_mul_ps(rv, _mm256_set1_ps(gate[oc]));
            v = _mm256_add_ps(v, rv);
        }
        if (YMODE) _mm256_mask_storeu_ps(y + oc * ohw, keep, v);
    }
    if (PACKED) { /* one thread owns the output row: no other block writes these words now */
        uint64_t *dst = ep->packed + ((i * ep->p_hp + r + ep->p_pad) * ep->p_cw + (o0 >> 6)) * ep->p_wp + ep->p_pad + s0;
        _mm512_mask_storeu_epi64(dst, store, _mm512_or_si512(_mm512_maskz_loadu_epi64(store, dst), bits));
    }
}

/* One block: 8 pixels (s0 ..) of output row r of sample i x 16 output channels (o0 ..). base: OR x PX
 * finishing bases (see `bases`); store: the lanes that are real output pixels. */
static void block_avx512(const geom *g, const uint64_t *x, const int64_t *off, const uint64_t *w,
                         const epilogue *ep, int64_t i, int64_t r, int64_t s0, int64_t o0, const float *base,
                         __mmask8 store)
{
    __m512i acc[OR];
    const int64_t steps = g->kh * g->kw * g->cw;
    /* the stride is a compile-time constant in each specialization, so load_pixels folds */
    if (g->stride == 1) counts_avx512(x, off, w, g->op, steps, 1, acc);
    else if (g->stride == 2) counts_avx512(x, off, w, g->op, steps, 2, acc);
    else counts_avx512(x, off, w, g->op, steps, g->stride, acc);
    const int ymode = !ep->y ? 0 : ep->res ? 2 : 1;
#define BNN_FINISH(A, P, Y) \
    case (A) * 6 + (P) * 3 + (Y): finish_avx512(g, ep, acc, i, r, s0, o0, base, store, A, P, Y); break;
    switch ((int)ep->act * 6 + (ep->packed != NULL) * 3 + ymode) {
        BNN_FINISH(0, 0, 0) BNN_FINISH(0, 0, 1) BNN_FINISH(0, 0, 2) BNN_FINISH(0, 1, 0) BNN_FINISH(0, 1, 1) BNN_FINISH(0, 1, 2)
        BNN_FINISH(1, 0, 0) BNN_FINISH(1, 0, 1) BNN_FINISH(1, 0, 2) BNN_FINISH(1, 1, 0) BNN_FINISH(1, 1, 1) BNN_FINISH(1, 1, 2)
        BNN_FINISH(2, 0, 0) BNN_FINISH(2, 0, 1) BNN_FINISH(2, 0, 2) BNN_FINISH(2, 1, 0) BNN_FINISH(2, 1, 1) BNN_FINISH(2, 1, 2)
    }
#undef BNN_FINISH
}
#endif

static void block_scalar(const geom *g, const uint64_t *x, const int64_t *off, const uint64_t *w,
                         const int64_t *wpop, const epilogue *ep, int64_t i, int64_t r, int64_t s0, int64_t o0)
{
    int64_t acc[OR][PX];
    memset(acc, 0, sizeof(acc));
    const int64_t steps = g->kh * g->kw * g->cw;
    for (int64_t j = 0; j < steps; ++j, w += g->op) {
        const uint64_t *row = x + off[j];
        for (int q = 0; q < OR; ++q)
            for (int p = 0; p < PX; ++p) acc[q][p] += __builtin_popcountll(row[p * g->stride] ^ w[q]);
    }
    for (int q = 0; q < OR && o0 + q < g->o; ++q)
        for (int p = 0; p < PX && s0 + p < g->ow; ++p)
            emit(g, ep, i, r, s0 + p, o0 + q, finish(g, wpop, ep->alpha, o0 + q, r, s0 + p, acc[q][p]));
}

/* alpha[o] * sum over taps inside the image of (C - 2 popcount(x ^ w)) for every output (n, o, oh, ow),
 * handed to the epilogue. xp must have WP >= ceil(OW / PX) * PX * stride + KW + 16 words per row.
 * `portable` picks the scalar kernel even where the vector one exists. Returns 0, or -1 when scratch
 * memory cannot be had. */
int bnn_xnor_conv(const uint64_t *xp, const uint64_t *w, const int64_t *wpop, const epilogue *ep,
                  int64_t n, int64_t c, int64_t h, int64_t wd, int64_t cw, int64_t o, int64_t op, int64_t kh,
                  int64_t kw, int64_t stride, int64_t pad, int64_t hp, int64_t wp, int64_t oh, int64_t ow,
                  int portable)
{
    const geom g = {n, c, h, wd, cw, o, op, kh, kw, stride, pad, hp, wp, oh, ow};
    int64_t *off = (int64_t *)malloc((size_t)(kh * kw * cw) * sizeof(int64_t));
    if (!off) return -1;
    step_offsets(&g, off);
#if BNN_AVX512
    const int64_t nvec = (ow + PX - 1) / PX;
#else
    (void)portable; /* the scalar kernel is the only one */
#endif
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel if (n * oh > 1 && n * oh * o * ow * kh * kw * cw > 65536)
#endif
    {
#if BNN_AVX512
        bases bs = {0};
        const int ready = portable || bases_init(&g, &bs);
        if (!ready) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
        const __mmask8 tail = ow % PX ? (__mmask8)((1u << (ow % PX)) - 1u) : (__mmask8)0xFF;
#endif
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t ir = 0; ir < n * oh; ++ir) {
            const int64_t i = ir / oh, r = ir % oh;
            const uint64_t *xrow = xp + (i * hp + r * stride) * cw * wp;
#if BNN_AVX512
            if (!portable) {
                if (!ready) continue; /* reported as a failure after the loop */
                bases_for_row(&g, wpop, r, &bs);
                for (int64_t o0 = 0; o0 < o; o0 += OR)
                    for (int64_t v = 0; v < nvec; ++v)
                        block_avx512(&g, xrow + v * PX * stride, off, w + o0, ep, i, r, v * PX, o0,
                                     bs.edge[v] ? bs.base + (v * op + o0) * PX : bs.interior,
                                     v == nvec - 1 ? tail : (__mmask8)0xFF);
                continue;
            }
#endif
            for (int64_t o0 = 0; o0 < o; o0 += OR)
                for (int64_t s0 = 0; s0 < ow; s0 += PX)
                    block_scalar(&g, xrow + s0 * stride, off, w + o0, wpop, ep, i, r, s0, o0);
        }
#if BNN_AVX512
        bases_free(&bs);
#endif
    }
    free(off);
    return failed ? -1 : 0;
}

/* One binary convolution from Python in one foreign call.
 * Input: x (N, C, H, W) float32, packed here with its per-channel thresholds (thresh NULL: x >= 0),
 * or, when xp is not NULL, an input another call's epilogue packed already (N, H + 2 pad, CW, WP).
 * g: n, c, h, w, cw, o, op, kh, kw, stride, pad, wp, oh, ow (one array keeps the foreign call cheap).
 * threads: how many OpenMP threads to use (ignored without OpenMP). Returns 0, or -1 when scratch
 * memory cannot be allocated. */
int bnn_fused_conv(const float *x, const float *thresh, const uint8_t *flip, const uint64_t *xp,
                   const uint64_t *w, const int64_t *wpop, const epilogue *ep, const int64_t *g, int portable,
                   int threads)
{
    const int64_t n = g[0], c = g[1], h = g[2], wd = g[3], cw = g[4], o = g[5], op = g[6], kh = g[7], kw = g[8],
                  stride = g[9], pad = g[10], wp = g[11], oh = g[12], ow = g[13];
    const int64_t hp = h + 2 * pad;
    uint64_t *scratch = NULL;
    if (!xp) {
        const size_t bytes = (size_t)(n * hp * cw * wp) * sizeof(uint64_t);
        scratch = (uint64_t *)aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!scratch) return -1;
    }
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads > 0 ? threads : 1);
#else
    (void)threads;
#endif
    if (scratch) bnn_pack_input(x, n, c, h, wd, cw, pad, hp, wp, scratch, thresh, flip);
    const int status = bnn_xnor_conv(scratch ? scratch : xp, w, wpop, ep, n, c, h, wd, cw, o, op, kh, kw, stride,
                                     pad, hp, wp, oh, ow, portable);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    free(scratch);
    return status;
}

/* y = conv(sign(x), sign(w)) * alpha: the plain convolution (kernels.xnor_conv2d). */
int bnn_xnor_conv_nchw(const float *x, const uint64_t *w, const int64_t *wpop, const float *alpha, float *y,
                       const int64_t *g, int portable, int threads)
{
    const epilogue ep = {alpha, NULL, 0, y, g[5] * g[12] * g[13], NULL, NULL, NULL, 0, 0, 0, 0, NULL, NULL};
    return bnn_fused_conv(x, NULL, NULL, NULL, w, wpop, &ep, g, portable, threads);
}

/* ---------------------------------------------------------------- float operations between binary layers */

#if BNN_AVX512
/* max with NaN propagated (PyTorch's pooling: a NaN in the window gives NaN) */
static inline __m512 max_nan(__m512 a, __m512 b)
{
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q), _mm512_max_ps(a, b), _mm512_add_ps(a, b));
}
#endif

static inline float max_nan1(float m, float v) { return (v > m || v != v) ? v : m; }

/* y = max_pool2d(x, k, stride s, padding p) over `planes` (N * C) contiguous H x W planes: the maximum
 * of each window's taps inside the image (padding never wins), NaN propagated as in PyTorch. Per
 * output row: the window's rows reduced into one padded row (vectors along the row), then each
 * output the maximum of k neighbours of that row, 8 at a time for stride 2 (even/odd shuffles).
 * Returns 0, or -1 when scratch memory cannot be had. */
int bnn_max_pool2d(const float *x, float *y, int64_t planes, int64_t h, int64_t w, int64_t k, int64_t s,
                   int64_t p, int64_t oh, int64_t ow, int threads)
{
    const int64_t rw = (ow - 1) * s + k + 32; /* the reduced row, from column -p, -inf outside the image */
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1) if (planes * oh * ow > 65536)
#else
    (void)threads;
#endif
    {
        float *row = (float *)malloc((size_t)rw * sizeof(float));
        if (!row) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t pl = 0; pl < planes; ++pl) {
            if (!row) continue;
            const float *src = x + pl * h * w;
            float *dst = y + pl * oh * ow;
            for (int64_t i = 0; i < oh; ++i) {
                const int64_t r0 = i * s - p < 0 ? 0 : i * s - p, r1 = i * s - p + k < h ? i * s - p + k : h;
                for (int64_t c = 0; c < rw; ++c) row[c] = -__builtin_inff();
                for (int64_t r = r0; r < r1; ++r) {
                    const float *in = src + r * w;
                    float *out = row + p; /* column c of the image at row[p + c] */
                    int64_t c = 0;
#if BNN_AVX512
                    for (; c + 16 <= w; c += 16)
                        _mm512_storeu_ps(out + c, max_nan(_mm512_loadu_ps(out + c), _mm512_loadu_ps(in + c)));
#endif
                    for (; c < w && p + c < rw; ++c) out[c] = max_nan1(out[c], in[c]);
                }
                int64_t j = 0;
#if BNN_AVX512
                if (s == 2 && k <= 3) {
                    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
                    const __m512i one = _mm512_set1_epi32(1);
                    for (; j + 8 <= ow && 2 * j + 32 <= rw; j += 8) {
                        const __m512 a = _mm512_loadu_ps(row + 2 * j), b = _mm512_loadu_ps(row + 2 * j + 16);
                        __m512 m = _mm512_permutex2var_ps(a, even, b);
                        m = max_nan(m, _mm512_permutex2var_ps(a, _mm512_add_epi32(even, one), b));
                        if (k == 3) m = max_nan(m, _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_add_epi32(one, one)), b));
                        _mm256_storeu_ps(dst + i * ow + j, _mm512_castps512_ps256(m));
                    }
                }
#endif
                for (; j < ow; ++j) {
                    float m = -__builtin_inff();
                    for (int64_t t = 0; t < k; ++t) m = max_nan1(m, row[j * s + t]);
                    dst[i * ow + j] = m;
                }
            }
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* y = nearest 2x upsampling of x (planes of H x W) + skip (planes of 2H x 2W): one pass, the same sums. */
void bnn_upsample2x_add(const float *x, const float *skip, float *y, int64_t planes, int64_t h, int64_t w,
                        int threads)
{
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (planes * h * w > 16384)
#else
    (void)threads;
#endif
    for (int64_t pl = 0; pl < planes; ++pl)
        for (int64_t i = 0; i < 2 * h; ++i) {
            const float *src = x + (pl * h + i / 2) * w;
            const float *sk = skip + (pl * 2 * h + i) * 2 * w;
            float *dst = y + (pl * 2 * h + i) * 2 * w;
            int64_t j = 0;
#if BNN_AVX512
            const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
            for (; j + 8 <= w; j += 8) {
                const __m512 v = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_loadu_ps(src + j)));
                _mm512_storeu_ps(dst + 2 * j, _mm512_add_ps(v, _mm512_loadu_ps(sk + 2 * j)));
            }
#endif
            for (; j < w; ++j) {
                dst[2 * j] = src[j] + sk[2 * j];
                dst[2 * j + 1] = src[j] + sk[2 * j + 1];
            }
        }
}
