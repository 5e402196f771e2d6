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
 * border pixels subtract it again (wpop), which keeps the inner loops free of bounds checks.
 *
 * Built at first use with the machine's C compiler (-O3 -march=native). With AVX-512 VPOPCNTDQ the
 * micro-kernel computes 16 output pixels x OR output channels per step (register blocking); without
 * it a portable scalar loop computes the same numbers.
 */
#define _ISOC11_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>
#define BNN_AVX512 1
#else
#define BNN_AVX512 0
#endif

#define PXB 16 /* output pixels per block (2 vectors of 8) */
#define OR 8   /* output channels per block */
#define MAX_TAPS 64 /* kernels up to 8x8 */

int bnn_has_avx512(void) { return BNN_AVX512; }
int bnn_out_block(void) { return OR; }
int bnn_pixel_block(void) { return PXB; }

/* x: (N, C, H, W) float32 -> xp: (N, HP, CW, WP), image at (pad, pad), zero words elsewhere. */
void bnn_pack_input(const float *x, int64_t n, int64_t c, int64_t h, int64_t w, int64_t cw,
                    int64_t pad, int64_t hp, int64_t wp, uint64_t *out)
{
    memset(out, 0, (size_t)(n * hp * cw * wp) * sizeof(uint64_t));
    for (int64_t i = 0; i < n; ++i)
        for (int64_t ch = 0; ch < c; ++ch) {
            const int bit = (int)(ch & 63);
            for (int64_t r = 0; r < h; ++r) {
                const float *src = x + ((i * c + ch) * h + r) * w;
                uint64_t *dst = out + ((i * hp + r + pad) * cw + (ch >> 6)) * wp + pad;
                for (int64_t s = 0; s < w; ++s) dst[s] |= (uint64_t)(src[s] >= 0.0f) << bit;
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

static inline int inside(const geom *g, int64_t r, int64_t s, int64_t a, int64_t b)
{
    const int64_t ih = r * g->stride - g->pad + a, iw = s * g->stride - g->pad + b;
    return ih >= 0 && ih < g->h && iw >= 0 && iw < g->w;
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
/* 8 words of pixels s0 .. s0+7 (output columns) for tap column b, from a row of words. */
static inline __attribute__((always_inline)) __m512i load_pixels(const uint64_t *row, int64_t col0, int64_t stride)
{
    if (stride == 1) return _mm512_loadu_si512((const void *)(row + col0));
    if (stride == 2) {
        const __m512i lo = _mm512_loadu_si512((const void *)(row + col0));
        const __m512i hi = _mm512_loadu_si512((const void *)(row + col0 + 8));
        return _mm512_permutex2var_epi64(lo, _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0), hi);
    }
    const __m512i idx = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(stride));
    return _mm512_i64gather_epi64(idx, (const void *)(row + col0), 8);
}

/* Which taps of the 16 pixels s0 .. s0+15 of output row r fall in the padding: one 8-lane mask per
 * tap and pixel vector. Returns 0 when no tap of any pixel does (the common, interior case). */
typedef struct {
    __mmask8 invalid[MAX_TAPS][2];
    __m512i valid_c[2]; /* (taps inside the image) x C, per lane */
    __mmask8 store[2];  /* lanes that are real output pixels */
    int any;
} border;

static void border_masks(const geom *g, int64_t r, int64_t s0, border *bd)
{
    const int64_t taps = g->kh * g->kw;
    int64_t count[2][8];
    bd->any = 0;
    for (int v = 0; v < 2; ++v) {
        const int64_t left_over = g->ow - (s0 + 8 * v);
        bd->store[v] = left_over >= 8 ? (__mmask8)0xFF : left_over <= 0 ? (__mmask8)0 : (__mmask8)((1u << left_over) - 1u);
    }
    /* interior fast path: every tap of every pixel of the block inside the image */
    const int64_t top = r * g->stride - g->pad, left = s0 * g->stride - g->pad;
    if (top >= 0 && top + g->kh <= g->h && left >= 0 && left + (PXB - 1) * g->stride + g->kw <= g->w) {
        bd->valid_c[0] = bd->valid_c[1] = _mm512_set1_epi64(taps * g->c);
        return;
    }
    for (int v = 0; v < 2; ++v)
        for (int p = 0; p < 8; ++p) count[v][p] = taps;
    for (int64_t a = 0; a < g->kh; ++a)
        for (int64_t b = 0; b < g->kw; ++b) {
            const int64_t t = a * g->kw + b;
            for (int v = 0; v < 2; ++v) {
                unsigned m = 0;
                for (int p = 0; p < 8; ++p)
                    if (!inside(g, r, s0 + 8 * v + p, a, b)) {
                        m |= 1u << p;
                        --count[v][p];
                    }
                bd->invalid[t][v] = (__mmask8)m;
                bd->any |= (int)m;
            }
        }
    for (int v = 0; v < 2; ++v)
        bd->valid_c[v] = _mm512_mullo_epi64(_mm512_loadu_si512((const void *)count[v]), _mm512_set1_epi64(g->c));
}

static inline __attribute__((always_inline)) void
counts_avx512(const geom *g, const uint64_t *xi, const uint64_t *w, int64_t r, int64_t s0, int64_t o0,
              const int64_t stride, __m512i acc[OR][2])
{
    for (int q = 0; q < OR; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_si512();
    const int64_t cw = g->cw, wp = g->wp, op = g->op;
    for (int64_t a = 0; a < g->kh; ++a) {
        const uint64_t *rows = xi + (r * stride + a) * cw * wp + s0 * stride;
        for (int64_t b = 0; b < g->kw; ++b) {
            const uint64_t *wt = w + (a * g->kw + b) * cw * op + o0;
            const uint64_t *row = rows + b;
            for (int64_t k = 0; k < cw; ++k, row += wp, wt += op) {
                const __m512i x0 = load_pixels(row, 0, stride);
                const __m512i x1 = load_pixels(row, 8 * stride, stride);
                for (int q = 0; q < OR; ++q) {
                    const __m512i wv = _mm512_set1_epi64((long long)wt[q]);
                    acc[q][0] = _mm512_add_epi64(acc[q][0], _mm512_popcnt_epi64(_mm512_xor_si512(x0, wv)));
                    acc[q][1] = _mm512_add_epi64(acc[q][1], _mm512_popcnt_epi64(_mm512_xor_si512(x1, wv)));
                }
            }
        }
    }
}

static void block_avx512(const geom *g, const uint64_t *xi, const uint64_t *w, const int64_t *wpop,
                         const float *alpha, float *y, int64_t i, int64_t r, int64_t s0, int64_t o0,
                         const border *bd)
{
    __m512i acc[OR][2];
    /* the stride is a compile-time constant in each specialization, so load_pixels folds */
    if (g->stride == 1) counts_avx512(g, xi, w, r, s0, o0, 1, acc);
    else if (g->stride == 2) counts_avx512(g, xi, w, r, s0, o0, 2, acc);
    else counts_avx512(g, xi, w, r, s0, o0, g->stride, acc);
    const int64_t ohw = g->oh * g->ow;
    const int64_t taps = g->kh * g->kw;
    for (int q = 0; q < OR; ++q) {
        const int64_t oc = o0 + q < g->o ? o0 + q : g->o - 1; /* padded channels: computed, not stored */
        const __mmask8 keep = o0 + q < g->o ? (__mmask8)0xFF : (__mmask8)0;
        float *dst = y + (i * g->o + oc) * ohw + r * g->ow + s0;
        const __m256 scale = _mm256_set1_ps(alpha ? alpha[oc] : 1.0f);
        for (int v = 0; v < 2; ++v) {
            __m512i count = acc[q][v];
            if (bd->any)  /* padded taps added popcount(w): take it out again, lane by lane */
                for (int64_t t = 0; t < taps; ++t)
                    if (bd->invalid[t][v])
                        count = _mm512_mask_sub_epi64(count, bd->invalid[t][v], count,
                                                      _mm512_set1_epi64(wpop[t * g->op + oc]));
            const __m512i dot = _mm512_sub_epi64(bd->valid_c[v], _mm512_slli_epi64(count, 1));
            _mm256_mask_storeu_ps(dst + 8 * v, bd->store[v] & keep, _mm256_mul_ps(_mm512_cvtepi64_ps(dot), scale));
        }
    }
}
#endif

static void block_scalar(const geom *g, const uint64_t *xi, const uint64_t *w, const int64_t *wpop,
                         const float *alpha, float *y, int64_t i, int64_t r, int64_t s0, int64_t o0)
{
    int64_t acc[OR][PXB];
    memset(acc, 0, sizeof(acc));
    for (int64_t a = 0; a < g->kh; ++a)
        for (int64_t b = 0; b < g->kw; ++b) {
            const uint64_t *wt = w + (a * g->kw + b) * g->cw * g->op + o0;
            for (int64_t k = 0; k < g->cw; ++k) {
                const uint64_t *row = xi + ((r * g->stride + a) * g->cw + k) * g->wp + s0 * g->stride + b;
                for (int q = 0; q < OR; ++q) {
                    const uint64_t wv = wt[k * g->op + q];
                    for (int p = 0; p < PXB; ++p) acc[q][p] += __builtin_popcountll(row[p * g->stride] ^ wv);
                }
            }
        }
    const int64_t ohw = g->oh * g->ow;
    for (int q = 0; q < OR && o0 + q < g->o; ++q)
        for (int p = 0; p < PXB && s0 + p < g->ow; ++p)
            y[(i * g->o + o0 + q) * ohw + r * g->ow + s0 + p] = finish(g, wpop, alpha, o0 + q, r, s0 + p, acc[q][p]);
}

/* y[n, o, oh, ow] = alpha[o] * sum over taps inside the image of (C - 2 popcount(x ^ w)).
 * xp must have WP >= ceil(OW / PXB) * PXB * stride + KW + 16 words per row. */
void bnn_xnor_conv(const uint64_t *xp, const uint64_t *w, const int64_t *wpop, const float *alpha, float *y,
                   int64_t n, int64_t c, int64_t h, int64_t wd, int64_t cw, int64_t o, int64_t op, int64_t kh,
                   int64_t kw, int64_t stride, int64_t pad, int64_t hp, int64_t wp, int64_t oh, int64_t ow)
{
    const geom g = {n, c, h, wd, cw, o, op, kh, kw, stride, pad, hp, wp, oh, ow};
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t *xi = xp + i * hp * cw * wp;
        for (int64_t r = 0; r < oh; ++r)
            for (int64_t s0 = 0; s0 < ow; s0 += PXB) {
#if BNN_AVX512
                border bd;
                border_masks(&g, r, s0, &bd);
                for (int64_t o0 = 0; o0 < o; o0 += OR) block_avx512(&g, xi, w, wpop, alpha, y, i, r, s0, o0, &bd);
#else
                for (int64_t o0 = 0; o0 < o; o0 += OR) block_scalar(&g, xi, w, wpop, alpha, y, i, r, s0, o0);
#endif
            }
    }
}

/* The portable kernel, also on AVX-512 machines (for testing both paths). */
void bnn_xnor_conv_scalar(const uint64_t *xp, const uint64_t *w, const int64_t *wpop, const float *alpha,
                          float *y, int64_t n, int64_t c, int64_t h, int64_t wd, int64_t cw, int64_t o,
                          int64_t op, int64_t kh, int64_t kw, int64_t stride, int64_t pad, int64_t hp,
                          int64_t wp, int64_t oh, int64_t ow)
{
    const geom g = {n, c, h, wd, cw, o, op, kh, kw, stride, pad, hp, wp, oh, ow};
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t *xi = xp + i * hp * cw * wp;
        for (int64_t r = 0; r < oh; ++r)
            for (int64_t o0 = 0; o0 < o; o0 += OR)
                for (int64_t s0 = 0; s0 < ow; s0 += PXB) block_scalar(&g, xi, w, wpop, alpha, y, i, r, s0, o0);
    }
}

/* Pack x (N, C, H, W) float32 into a scratch buffer and run the convolution: one call from Python.
 * Returns 0, or -1 when the scratch buffer cannot be allocated. */
int bnn_xnor_conv_nchw(const float *x, const uint64_t *w, const int64_t *wpop, const float *alpha, float *y,
                       int64_t n, int64_t c, int64_t h, int64_t wd, int64_t cw, int64_t o, int64_t op, int64_t kh,
                       int64_t kw, int64_t stride, int64_t pad, int64_t wp, int64_t oh, int64_t ow, int portable)
{
    const int64_t hp = h + 2 * pad;
    const size_t bytes = (size_t)(n * hp * cw * wp) * sizeof(uint64_t);
    uint64_t *xp = (uint64_t *)aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!xp) return -1;
    bnn_pack_input(x, n, c, h, wd, cw, pad, hp, wp, xp);
    if (portable)
        bnn_xnor_conv_scalar(xp, w, wpop, alpha, y, n, c, h, wd, cw, o, op, kh, kw, stride, pad, hp, wp, oh, ow);
    else
        bnn_xnor_conv(xp, w, wpop, alpha, y, n, c, h, wd, cw, o, op, kh, kw, stride, pad, hp, wp, oh, ow);
    free(xp);
    return 0;
}
