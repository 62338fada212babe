/* Few-row matrix-vector kernels for moetier's decode: y[m, n] = sum_k x[m, k] * w[n, k].
 *
 * Three weight kinds, each row-major [N, K] (N outputs, K inputs, as nn.Linear.weight):
 *   bf16  : w as bfloat16; products summed in float32 (AVX-512 BF16 dot products where the CPU
 *           has them, else widened to float32).
 *   int8  : w = scale[n, k / G] * codes[n, k], codes -127..127 (G = K: one scale per row).
 *   int4  : w = (q - 8) * scale + zero per (row, group of G); q in 0..15, two codes a byte, each
 *           32-weight block of a row in 16 bytes: byte j holds q[j] (low nibble) and q[j + 16]
 *           (high nibble) -- GGUF Q4_0's block order. scale/zero pairs [N, K / G, 2].
 *
 * The int kinds quantize the input rows to int8 per group of 32 values (scale max|x| / 127, as llama.cpp's
 * Q8_0 activations) and sum products of integers with AVX-512 VNNI. int4 groups are the weight's 32-blocks.
 * int8 groups are strided so that one dot-product lane sums a whole group: within each span of 512 inputs,
 * lane l's group is inputs 64 t + 4 l + i (t = 0..7, i = 0..3). A per-channel int8 row then costs one
 * integer dot product per 64 weights and one float scaling per 512 (see dot_int8_row).
 * Scales may be float32, bfloat16 or float16 (SK_*). Outputs are float32 or bfloat16 (rounded to
 * nearest even). Work is split over output rows among `threads` OpenMP threads (the runtime torch
 * itself uses, so one thread pool serves both).
 *
 * Every kernel has a plain-C twin (compiled on any CPU); mt_features() says which are vectorized.
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MT_AVX512 1
#endif
#if defined(MT_AVX512) && defined(__AVX512VNNI__)
#define MT_VNNI 1
#endif
#if defined(MT_AVX512) && defined(__AVX512BF16__)
#define MT_BF16DOT 1
#endif

enum { SK_F32 = 0, SK_BF16 = 1, SK_F16 = 2 };
/* A weight is read once, row after row, in address order: one stream per thread, which the hardware
 * prefetchers follow (several rows read side by side, a few KiB apart, read at half the rate on
 * some CPUs); each row is multiplied by every input row while it is in L1. Each load also
 * prefetches PF_AHEAD bytes further on in the same stream. */
#ifndef PF_AHEAD
#define PF_AHEAD 4096
#endif
#if PF_AHEAD
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PF_AHEAD, _MM_HINT_T0)
#else
#define PREFETCH(p) ((void)0)
#endif
/* The bf16 kernel reads one weight row at a time while the input rows it multiplies it by stay in L1 (up to X_L1
 * bytes of them): one stream, 64 bytes a dot product per input row, fastest with the hardware prefetchers alone
 * (1.2-1.3x over PF_AHEAD at two threads on a Zen 4 VM). With more input rows it reads 4 weight rows side by side
 * (tile_bf16), which loads each input vector once for 4 dot products, and prefetches the same place PF_TILE tiles
 * on: without that, its four short streams read at about half the rate (2-3 KiB rows). */
#ifndef X_L1
#define X_L1 16384
#endif
#ifndef PF_TILE
#define PF_TILE 1
#endif
enum { OUT_F32 = 0, OUT_BF16 = 1 };
enum { F_BF16 = 1, F_INT8 = 2, F_INT4 = 4, F_BF16DOT = 8 };

int mt_features(void) {
    int f = 0;
#ifdef MT_AVX512
    f |= F_BF16;
#endif
#ifdef MT_VNNI
    f |= F_INT8 | F_INT4;
#endif
#ifdef MT_BF16DOT
    f |= F_BF16DOT;
#endif
    return f;
}

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            e = 127 - 15 + 1;
            while (!(m & 0x400)) { m <<= 1; e--; }
            u = sign | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) {
        u = sign | 0x7f800000u | (m << 13);
    } else {
        u = sign | ((e + 127 - 15) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float scale_at(const void *s, int kind, int64_t i) {
    if (kind == SK_BF16) return bf16_f32(((const uint16_t *)s)[i]);
    if (kind == SK_F16) return f16_f32(((const uint16_t *)s)[i]);
    return ((const float *)s)[i];
}

static inline void store_out(void *y, int out_kind, int64_t i, float v) {
    if (out_kind == OUT_BF16) ((uint16_t *)y)[i] = f32_bf16(v);
    else ((float *)y)[i] = v;
}

static inline float x_at(const void *x, int x_kind, int64_t i) {
    return x_kind == OUT_BF16 ? bf16_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* ------------------------------------------------------------------ activations, int8 per 32 */

/* Quantize row `x` [K] (bf16 or f32) per block of 32: q = round(x / d), d = max|x| / 127. */
static void quantize_row_ref(const void *x, int x_kind, int64_t K, int8_t *q, float *d, int32_t *sum) {
    for (int64_t b = 0; b < K / 32; b++) {
        float v[32], amax = 0.f;
        for (int j = 0; j < 32; j++) {
            v[j] = x_at(x, x_kind, b * 32 + j);
            float a = fabsf(v[j]);
            amax = a > amax ? a : amax;
        }
        float db = amax / 127.f, id = db > 0.f ? 1.f / db : 0.f;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) {
            int32_t c = (int32_t)nearbyintf(v[j] * id);
            c = c > 127 ? 127 : (c < -127 ? -127 : c);
            q[b * 32 + j] = (int8_t)c;
            s += c;
        }
        d[b] = db;
        sum[b] = s;
    }
}

/* int4 byte order. A row's 32-weight blocks are taken 16 at a time (512 weights, 256 bytes; a last group may
 * have fewer, nbk); byte i of block b in GGUF Q4_0 order (q[i] | q[i + 16] << 4) is at
 * 256 * group + 4 * nbk * (i / 4) + 4 * (b % 16) + i % 4: one 64-byte load then holds 4 bytes of each of
 * 16 blocks, so a dot-product lane gathers one block's products and one scale multiplies each lane. */
static inline int64_t int4_pos(int64_t nb, int64_t b, int i) {
    int64_t g = b / 16, nbk = nb - 16 * g < 16 ? nb - 16 * g : 16;
    return 256 * g + 4 * nbk * (i / 4) + 4 * (b % 16) + i % 4;
}

/* int8 kernel: x [K] quantized per lane group (the header): q [K] in input order, d8 / c8 [16 per 512-span]. */
static void quantize_row_lanes_ref(const void *x, int x_kind, int64_t K, int8_t *q, float *d8, int32_t *c8) {
    for (int64_t s = 0; s * 512 < K; s++)
        for (int l = 0; l < 16; l++) {
            float amax = 0.f;
            for (int64_t k = s * 512 + 4 * l; k < K && k < s * 512 + 512; k += 64)
                for (int i = 0; i < 4 && k + i < K; i++) {
                    float a = fabsf(x_at(x, x_kind, k + i));
                    amax = a > amax ? a : amax;
                }
            float db = amax / 127.f, id = db > 0.f ? 1.f / db : 0.f;
            int32_t sum = 0;
            for (int64_t k = s * 512 + 4 * l; k < K && k < s * 512 + 512; k += 64)
                for (int i = 0; i < 4 && k + i < K; i++) {
                    int32_t c = (int32_t)nearbyintf(x_at(x, x_kind, k + i) * id);
                    c = c > 127 ? 127 : (c < -127 ? -127 : c);
                    q[k + i] = (int8_t)c;
                    sum += c;
                }
            d8[s * 16 + l] = db;
            c8[s * 16 + l] = 128 * sum;
        }
}

#ifdef MT_AVX512
static inline __m512 bf16x16(const uint16_t *p) {  /* 16 bf16 values as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 load_x16(const void *x, int x_kind, int64_t i) {
    return x_kind == OUT_BF16 ? bf16x16((const uint16_t *)x + i) : _mm512_loadu_ps((const float *)x + i);
}

/* 16 floats rounded to bf16 (to nearest even, NaN kept quiet: f32_bf16) and back. */
static inline __m512 rb16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

/* e^d in 16 lanes: d = q ln2 + s (q = rint(d / ln2), ln2 in two parts), e^s by its degree-7 Taylor-like
 * polynomial, times 2^q in two halves; 0 below -104, inf above 100. The same steps as the vectorized exp torch's CPU
 * kernels call (SLEEF's u10 expf), so silu here gives torch's bits (tests/test_native.py checks every bf16 input). */
static inline __m512 exp16(__m512 d) {
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(d, _mm512_set1_ps(1.442695040888963407359924681001892137f)));
    __m512 qf = _mm512_cvtepi32_ps(q);
    __m512 s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-0.693145751953125f), d);
    s = _mm512_fmadd_ps(qf, _mm512_set1_ps(-1.428606765330187045e-06f), s);
    __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_add_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    __m512i q1 = _mm512_srai_epi32(q, 1), q2 = _mm512_sub_epi32(q, q1);
    __m512 p1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q1, _mm512_set1_epi32(127)), 23));
    __m512 p2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q2, _mm512_set1_epi32(127)), 23));
    u = _mm512_mul_ps(_mm512_mul_ps(u, p1), p2);
    u = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.f), _CMP_NLT_UQ), u);
    return _mm512_mask_mov_ps(u, _mm512_cmp_ps_mask(_mm512_set1_ps(100.f), d, _CMP_LT_OQ), _mm512_set1_ps(INFINITY));
}

/* 16 floats as bf16 (f32_bf16 in each lane) */
static inline __m256i to_bf16x16(__m512 v) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rb16(v)), 16));
}

/* Each element of v replaced by the max / sum of its aligned group of 4 (one lane group's inputs of one load). */
static inline __m512 max4(__m512 v) {
    v = _mm512_max_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_max_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
}
static inline __m512i sum4(__m512i v) {
    v = _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_CDAB));
    return _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_BADC));
}

/* 16 int8 codes round(x * id) (nearest even, as nearbyintf), clamped to -127..127, stored at q; returned as int32 */
static inline __m512i codes16(__m512 x, __m512 id, int8_t *q) {
    __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(x, id));
    c = _mm512_max_epi32(_mm512_min_epi32(c, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(c));
    return c;
}

static inline __m512 abs16(__m512 v) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff))); }
#endif

/* quantize_row_lanes_ref vectorized (unless `vectorized` is 0: the plain-C twin), the same arithmetic (max, d = max / 127, codes round(x * (1 / d)) to
 * nearest even, clamped): the same codes and scales. Float vector j of a 64-input load holds lane groups
 * 4j..4j+3, four inputs each. K % 32 == 0, so a span's loads are whole vectors. */
static void quantize_row_lanes(const void *x, int x_kind, int64_t K, int8_t *q, float *d8, int32_t *c8, int vectorized) {
#ifdef MT_AVX512
    if (!vectorized) {
        quantize_row_lanes_ref(x, x_kind, K, q, d8, c8);
        return;
    }
    for (int64_t k0 = 0; k0 < K; k0 += 512) {
        int64_t n = K - k0 < 512 ? K - k0 : 512, sp = k0 / 512;
        __m512 mx[4], id[4];
        for (int j = 0; j < 4; j++) mx[j] = _mm512_setzero_ps();
        for (int64_t p = 0; p < n; p += 16)
            mx[(p / 16) & 3] = _mm512_max_ps(mx[(p / 16) & 3], abs16(load_x16(x, x_kind, k0 + p)));
        for (int j = 0; j < 4; j++) {
            __m512 d = _mm512_div_ps(max4(mx[j]), _mm512_set1_ps(127.f));
            __mmask16 pos = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GT_OQ);
            id[j] = _mm512_maskz_div_ps(pos, _mm512_set1_ps(1.f), d);
            float t[16];
            _mm512_storeu_ps(t, d);
            for (int g = 0; g < 4; g++) d8[sp * 16 + 4 * j + g] = t[4 * g];
        }
        __m512i sum[4];
        for (int j = 0; j < 4; j++) sum[j] = _mm512_setzero_si512();
        for (int64_t p = 0; p < n; p += 16) {
            int j = (p / 16) & 3;
            sum[j] = _mm512_add_epi32(sum[j], codes16(load_x16(x, x_kind, k0 + p), id[j], q + k0 + p));
        }
        for (int j = 0; j < 4; j++) {
            int32_t t[16];
            _mm512_storeu_si512(t, sum4(sum[j]));
            for (int g = 0; g < 4; g++) c8[sp * 16 + 4 * j + g] = 128 * t[4 * g];
        }
    }
#else
    (void)vectorized;
    quantize_row_lanes_ref(x, x_kind, K, q, d8, c8);
#endif
}

/* quantize_row_ref vectorized (unless `vectorized` is 0), the same arithmetic: the same codes, scales and sums. */
static void quantize_row(const void *x, int x_kind, int64_t K, int8_t *q, float *d, int32_t *sum, int vectorized) {
#ifdef MT_AVX512
    if (!vectorized) {
        quantize_row_ref(x, x_kind, K, q, d, sum);
        return;
    }
    for (int64_t b = 0; b < K / 32; b++) {
        __m512 v0 = load_x16(x, x_kind, b * 32), v1 = load_x16(x, x_kind, b * 32 + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(abs16(v0), abs16(v1)));
        float db = amax / 127.f, id = db > 0.f ? 1.f / db : 0.f;
        __m512i c0 = codes16(v0, _mm512_set1_ps(id), q + b * 32), c1 = codes16(v1, _mm512_set1_ps(id), q + b * 32 + 16);
        d[b] = db;
        sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
    }
#else
    (void)vectorized;
    quantize_row_ref(x, x_kind, K, q, d, sum);
#endif
}

typedef struct {
    int64_t K, nb;        /* inputs, 32-blocks */
    int8_t *q;            /* [K] codes, natural order */
    float *d;             /* [nb] block scales */
    int32_t *sum;         /* [nb] block sums of codes */
    float *d8;            /* int8 kernel: [nsc * 16] lane-group scales, 16 per 512-span */
    int32_t *c8;          /* int8 kernel: [nsc * 16] 128 * sum of each lane group's codes */
    uint8_t *absq;        /* int8 kernel, grouped weights: |q| */
    uint64_t *neg;        /* int8 kernel, grouped weights: sign masks, one bit per code, 64 per chunk */
    int8_t *q4a, *q4b;    /* int4 kernel: codes in the weights' byte order (int4_pos), low / high nibbles */
    float *xs;            /* int4 kernel: [nb] d * sum q of each block */
} qrow;

static void *xalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n < 64 ? 64 : (n + 63) / 64 * 64)) return NULL;
    memset(p, 0, n);
    return p;
}

static void qrow_free(qrow *r) {
    free(r->q); free(r->d); free(r->sum); free(r->absq); free(r->neg); free(r->q4a); free(r->q4b); free(r->xs); free(r->d8); free(r->c8);
}

/* kind: 8 or 4 (which grouping and reordered forms to build); signs: the int8 kernel's |q| and sign masks too (for
 * grouped weights). 0 on success. */
static int qrow_make(qrow *r, const void *x, int x_kind, int64_t K, int kind, int signs, int vectorized) {
    memset(r, 0, sizeof(*r));
    r->K = K;
    r->nb = K / 32;
    int64_t nsc = (K + 511) / 512;  /* 512-spans */
    r->q = xalloc((size_t)nsc * 512);
    if (!r->q) return -1;
    if (kind == 8) {
        r->d8 = xalloc((size_t)nsc * 16 * 4);
        r->c8 = xalloc((size_t)nsc * 16 * 4);
        if (!r->d8 || !r->c8) return -1;
        quantize_row_lanes(x, x_kind, K, r->q, r->d8, r->c8, vectorized);
        if (!signs) return 0;
        r->absq = xalloc((size_t)nsc * 512);
        r->neg = xalloc((size_t)nsc * 8 * 8);
        if (!r->absq || !r->neg) return -1;
        for (int64_t i = 0; i < K; i++) {
            int8_t c = r->q[i];
            r->absq[i] = (uint8_t)(c < 0 ? -c : c);
            if (c < 0) r->neg[i / 64] |= 1ull << (i % 64);
        }
        return 0;
    }
    r->d = xalloc((size_t)nsc * 16 * 4);
    r->sum = xalloc((size_t)nsc * 16 * 4);
    r->q4a = xalloc((size_t)K / 2 + 64);
    r->q4b = xalloc((size_t)K / 2 + 64);
    r->xs = xalloc((size_t)(r->nb + 16) * 4);
    if (!r->d || !r->sum || !r->q4a || !r->q4b || !r->xs) return -1;
    quantize_row(x, x_kind, K, r->q, r->d, r->sum, vectorized);
    for (int64_t b = 0; b < r->nb; b++) {
        for (int i = 0; i < 16; i++) {
            int64_t at = int4_pos(r->nb, b, i);
            r->q4a[at] = r->q[b * 32 + i];
            r->q4b[at] = r->q[b * 32 + 16 + i];
        }
        r->xs[b] = r->d[b] * (float)r->sum[b];
    }
    return 0;
}

#ifdef MT_AVX512
static inline __m512 load_scales16(const void *s, int kind, int64_t i, __mmask16 m) {
    if (kind == SK_F32) return _mm512_maskz_loadu_ps(m, (const float *)s + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)s + i);
    if (kind == SK_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void store_out16(void *y, int out_kind, int64_t i, __m512 v) {
    if (out_kind == OUT_F32) {
        _mm512_storeu_ps((float *)y + i, v);
    } else {
        float t[16];
        _mm512_storeu_ps(t, v);
        for (int j = 0; j < 16; j++) ((uint16_t *)y)[i + j] = f32_bf16(t[j]);
    }
}
#endif

/* ------------------------------------------------------------------ int8 */

/* One row of an int8 weight against one quantized input row: sum over k (not yet per-row scaled when G == K).
 * Each (lane group, weight group) piece is summed in integers, then scaled. */
static float dot_int8_ref(const int8_t *w, const void *s, int sk, int64_t G, int64_t K, const qrow *r) {
    float acc = 0.f;
    for (int64_t sp = 0; sp * 512 < K; sp++)
        for (int l = 0; l < 16; l++) {
            int32_t t = 0;
            int64_t g = -1;
            for (int64_t k = sp * 512 + 4 * l; k < K && k < sp * 512 + 512; k += 64)
                for (int i = 0; i < 4 && k + i < K; i++) {
                    if ((k + i) / G != g) {
                        if (g >= 0) acc += (float)t * r->d8[sp * 16 + l] * (G == K ? 1.f : scale_at(s, sk, g));
                        t = 0;
                        g = (k + i) / G;
                    }
                    t += (int32_t)w[k + i] * r->q[k + i];
                }
            if (g >= 0) acc += (float)t * r->d8[sp * 16 + l] * (G == K ? 1.f : scale_at(s, sk, g));
        }
    return acc;
}

#ifdef MT_VNNI

/* One int8 weight row against R (1..4) quantized input rows: out[r] = sum over k (not yet per-row scaled when
 * G == K). Lane l of a 64-weight load lies in lane group l of its 512-span, so the integer dot products of a
 * span's 8 loads add up in each lane before one conversion and one scaling by the lane groups' scales.
 * Weights are signed and VNNI multiplies unsigned by signed: w ^ 0x80 = w + 128 as unsigned, and
 * 128 * (the group's code sum) is taken off after. Grouped weights (G < 512) change scale within a span:
 * there the weight's sign goes onto |x| and each load is scaled by its weight scales. */
static inline __attribute__((always_inline)) void dot_int8_row(const int8_t *w, const void *s, int sk, int64_t G,
                                                               int64_t K, const qrow *const *x, const int R,
                                                               float *out) {
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512(), bias = _mm512_set1_epi8((char)0x80);
    const __m512i half = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);  /* lanes 8-15: block + 1 */
    const int wide = G == K || G % 512 == 0;
    for (int64_t k0 = 0; k0 < K; k0 += 512) {
        int64_t nl = (K - k0 + 63) / 64 < 8 ? (K - k0 + 63) / 64 : 8, sp = k0 / 512;
        if (wide) {
            __m512i A[4][2];
            for (int r = 0; r < 4; r++) A[r][0] = A[r][1] = zero;
            for (int64_t t = 0; t < nl; t++) {
                int64_t k = k0 + 64 * t;
                __mmask64 lm = k + 64 <= K ? ~0ull : ((1ull << (K - k)) - 1);
                PREFETCH(w + k);
                __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(lm, w + k), bias);
                for (int r = 0; r < R; r++)
                    A[r][t & 1] = _mm512_dpbusd_epi32(A[r][t & 1], wv, _mm512_loadu_si512(x[r]->q + k));
            }
            __m512 ws = _mm512_set1_ps(G == K ? 1.f : scale_at(s, sk, k0 / G));
            for (int r = 0; r < R; r++) {
                __m512i S = _mm512_sub_epi32(_mm512_add_epi32(A[r][0], A[r][1]), _mm512_loadu_si512(x[r]->c8 + 16 * sp));
                __m512 d = _mm512_mul_ps(_mm512_loadu_ps(x[r]->d8 + 16 * sp), ws);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), d, acc[r]);
            }
        } else {
            __m512 F[4], S32 = _mm512_setzero_ps();
            for (int r = 0; r < 4; r++) F[r] = _mm512_setzero_ps();
            if (G == 32) { /* the span's (up to) 16 block scales; load t takes blocks 2t (lanes 0-7) and 2t + 1 */
                int64_t nb = (K - k0) / 32 < 16 ? (K - k0) / 32 : 16;
                S32 = load_scales16(s, sk, k0 / 32, (__mmask16)((1u << nb) - 1));
            }
            for (int64_t t = 0; t < nl; t++) {
                int64_t k = k0 + 64 * t, c = k / 64;
                __mmask64 lm = k + 64 <= K ? ~0ull : ((1ull << (K - k)) - 1);
                PREFETCH(w + k);
                __m512i wv0 = _mm512_maskz_loadu_epi8(lm, w + k);
                __m512 ws = G == 32 ? _mm512_permutexvar_ps(_mm512_add_epi32(half, _mm512_set1_epi32(2 * (int)t)), S32)
                                    : _mm512_set1_ps(scale_at(s, sk, k / G));
                for (int r = 0; r < R; r++) {
                    __m512i wv = _mm512_mask_sub_epi8(wv0, x[r]->neg[c], zero, wv0);
                    __m512 f = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, _mm512_loadu_si512(x[r]->absq + k), wv));
                    F[r] = _mm512_fmadd_ps(f, ws, F[r]);
                }
            }
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(F[r], _mm512_loadu_ps(x[r]->d8 + 16 * sp), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

static int int8_group_ok(int64_t G, int64_t K) { return K % 32 == 0 && (G == K || G == 32 || G % 64 == 0); }

/* ------------------------------------------------------------------ int4 */

static float dot_int4_ref(const uint8_t *w, const void *sz, int sk, int64_t G, int64_t K, const qrow *r) {
    float acc = 0.f;
    for (int64_t b = 0; b < r->nb; b++) {
        int32_t t = 0;
        for (int i = 0; i < 16; i++) {
            uint8_t byte = w[int4_pos(r->nb, b, i)];
            t += (int32_t)(byte & 15) * r->q[b * 32 + i] + (int32_t)(byte >> 4) * r->q[b * 32 + 16 + i];
        }
        int64_t g = (b * 32) / G;
        float sc = scale_at(sz, sk, 2 * g), ze = scale_at(sz, sk, 2 * g + 1);
        acc += (float)t * r->d[b] * sc + (ze - 8.f * sc) * r->xs[b];
    }
    (void)K;
    return acc;
}

/* Per weight: where lane j (block j of 16) finds its (scale, zero) pair among a group of blocks' pairs. */
typedef struct {
    int32_t is[16], iz[16];
} int4_lanes;

static void int4_lanes_make(int4_lanes *c, int64_t G) {
    for (int j = 0; j < 16; j++) {
        c->is[j] = 2 * (int32_t)((j * 32) / (G < 512 ? G : 512));
        c->iz[j] = c->is[j] + 1;
    }
}

#ifdef MT_VNNI
/* One int4 weight row (int4_pos order) against R (1..4) quantized input rows. */
static inline __attribute__((always_inline)) void dot_int4_row(const uint8_t *w, const void *sz, int sk, int64_t G,
                                                               int64_t K, const qrow *const *x, const int R,
                                                               const int4_lanes *c4, float *out) {
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    const __m512i lo4 = _mm512_set1_epi8(0x0f), hi4 = _mm512_set1_epi8((char)0xf0), zero = _mm512_setzero_si512();
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i sidx = _mm512_loadu_si512(c4->is), zidx = _mm512_loadu_si512(c4->iz);
    const __m512 eight = _mm512_set1_ps(8.f);
    int64_t nb = K / 32;
    for (int64_t g = 0; g * 16 < nb; g++) {
        int64_t nbk = nb - 16 * g < 16 ? nb - 16 * g : 16, base = 256 * g, step = 4 * nbk;
        __mmask64 m = nbk == 16 ? ~0ull : ((1ull << (4 * nbk)) - 1);
        __mmask16 mb = (__mmask16)((1u << nbk) - 1);
        __m512i wl[4], wh[4];
        for (int t = 0; t < 4; t++) {
            PREFETCH(w + base + t * step);
            __m512i wv = _mm512_maskz_loadu_epi8(m, w + base + t * step);
            wl[t] = _mm512_and_si512(wv, lo4);
            wh[t] = _mm512_and_si512(wv, hi4);
        }
        int64_t p0 = 2 * ((16 * g * 32) / G);   /* first (scale, zero) of this group of blocks */
        int64_t npair = (nbk * 32 + G - 1) / G;  /* pairs it spans */
        const char *sr = (const char *)sz + p0 * (sk == SK_F32 ? 4 : 2);
        __m512 sc, ze;
        if (G == 32 && sk != SK_F32) {  /* 16-bit (scale, zero) pairs: one 32-bit lane each */
            __m512i pz = _mm512_maskz_loadu_epi32(mb, sr);
            if (sk == SK_BF16) {
                sc = _mm512_castsi512_ps(_mm512_slli_epi32(pz, 16));
                ze = _mm512_castsi512_ps(_mm512_and_si512(pz, _mm512_set1_epi32((int)0xffff0000u)));
            } else {
                sc = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(pz));
                ze = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(pz, 16)));
            }
        } else if (G == 32) {
            int64_t nh = 2 * npair;
            __m512 a = load_scales16(sr, sk, 0, (__mmask16)(nh >= 16 ? 0xffff : (1u << nh) - 1));
            __m512 b = load_scales16(sr, sk, 16, (__mmask16)(nh > 16 ? (1u << (nh - 16)) - 1 : 0));
            sc = _mm512_permutex2var_ps(a, ev, b);
            ze = _mm512_permutex2var_ps(a, od, b);
        } else {
            __m512 a = load_scales16(sr, sk, 0, (__mmask16)((1u << (2 * npair)) - 1));
            sc = _mm512_permutexvar_ps(sidx, a);
            ze = _mm512_permutexvar_ps(zidx, a);
        }
        __m512 zc = _mm512_fnmadd_ps(eight, sc, ze);
        for (int r = 0; r < R; r++) {
            const qrow *q = x[r];
            /* two independent chains each for the low and the high nibbles */
            __m512i L0 = _mm512_dpbusd_epi32(zero, wl[0], _mm512_maskz_loadu_epi8(m, q->q4a + base));
            __m512i L1 = _mm512_dpbusd_epi32(zero, wl[1], _mm512_maskz_loadu_epi8(m, q->q4a + base + step));
            __m512i H0 = _mm512_dpbusd_epi32(zero, wh[0], _mm512_maskz_loadu_epi8(m, q->q4b + base));
            __m512i H1 = _mm512_dpbusd_epi32(zero, wh[1], _mm512_maskz_loadu_epi8(m, q->q4b + base + step));
            L0 = _mm512_dpbusd_epi32(L0, wl[2], _mm512_maskz_loadu_epi8(m, q->q4a + base + 2 * step));
            L1 = _mm512_dpbusd_epi32(L1, wl[3], _mm512_maskz_loadu_epi8(m, q->q4a + base + 3 * step));
            H0 = _mm512_dpbusd_epi32(H0, wh[2], _mm512_maskz_loadu_epi8(m, q->q4b + base + 2 * step));
            H1 = _mm512_dpbusd_epi32(H1, wh[3], _mm512_maskz_loadu_epi8(m, q->q4b + base + 3 * step));
            __m512i Hh = _mm512_add_epi32(H0, H1);  /* 16 x the high nibbles' */
            __m512 S = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(L0, L1), _mm512_srai_epi32(Hh, 4)));
            __m512 xd = _mm512_maskz_loadu_ps(mb, q->d + 16 * g), xs = _mm512_maskz_loadu_ps(mb, q->xs + 16 * g);
            acc[r] = _mm512_fmadd_ps(S, _mm512_mul_ps(sc, xd), acc[r]);
            acc[r] = _mm512_fmadd_ps(zc, xs, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

/* ------------------------------------------------------------------ bf16 */

static float dot_bf16_ref(const uint16_t *w, const void *x, int x_kind, int64_t K) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; k++) acc += bf16_f32(w[k]) * x_at(x, x_kind, k);
    return acc;
}

#ifdef MT_AVX512
/* Each output sums its products in one float32 vector accumulator, 32 inputs at a time (16 without BF16 dot
 * products, and a scalar tail), then its 16 lanes by halves: lane i + lane i + 8, then + 4, + 2, + 1. hsum16 and
 * hsum16x16 both add in that order, so an output's value does not depend on which tile computed it, nor on the
 * number of rows in the call (a row decoded in a batch gets the bits it gets alone). */
static inline float hsum16(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

/* a[4 q + r] (q, r = 0..3) -> one vector whose lane 4 r + q is hsum16(a[4 q + r]): 15 adds for 16 sums. */
static inline __m512 hsum16x16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int p = 0; p < 8; p++)  /* lane i + i + 8 */
        b[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xEE));
    for (int p = 0; p < 4; p++)  /* + 4 */
        c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * p], b[2 * p + 1], 0xDD));
    for (int p = 0; p < 2; p++)  /* + 2 */
        d[p] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * p], c[2 * p + 1], 0x44),
                             _mm512_shuffle_ps(c[2 * p], c[2 * p + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));  /* + 1 */
}

/* The same place of each row PF_TILE tiles on (a prefetch past the weight's end is harmless: it never faults). */
#if PF_TILE
#define PREFETCH_TILE(w, K, k, NW)                                                                      \
    do {                                                                                                \
        if ((NW) > 1)                                                                                   \
            for (int q_ = 0; q_ < (NW); q_++)                                                           \
                _mm_prefetch((const char *)((w) + (q_ + PF_TILE * (NW)) * (K) + (k)), _MM_HINT_T0);   \
    } while (0)
#else
#define PREFETCH_TILE(w, K, k, NW) ((void)0)
#endif

/* A tile of bf16 outputs: weight rows w + q K (q < NW) against input rows r < R (NW, R <= 4; xb: bf16 copies, xf:
 * float32 copies), y[r * ys + q] = sum_k w[q K + k] x[r][k]. Per 32 inputs it loads NW + R vectors for NW R dot
 * products, so a few rows cost little more than one. */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *w, int64_t K, const uint16_t *const *xb,
                                                            const float *const *xf, const int NW, const int R,
                                                            float *y, int64_t ys) {
    __m512 acc[16];
    for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
    int64_t k = 0;
#ifdef MT_BF16DOT
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[4];
        for (int q = 0; q < NW; q++) wv[q] = (__m512bh)_mm512_loadu_si512(w + q * K + k);
        PREFETCH_TILE(w, K, k, NW);
        for (int r = 0; r < R; r++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xb[r] + k);
            for (int q = 0; q < NW; q++) acc[4 * q + r] = _mm512_dpbf16_ps(acc[4 * q + r], xv, wv[q]);
        }
    }
#else
    (void)xb;
#endif
    for (; k + 16 <= K; k += 16) {
        __m512 wv[4];
        for (int q = 0; q < NW; q++) wv[q] = bf16x16(w + q * K + k);
        PREFETCH_TILE(w, K, k, NW);
        for (int r = 0; r < R; r++) {
            __m512 xv = _mm512_loadu_ps(xf[r] + k);
            for (int q = 0; q < NW; q++) acc[4 * q + r] = _mm512_fmadd_ps(wv[q], xv, acc[4 * q + r]);
        }
    }
    float s[16];
    if (NW == 4 && R == 4) {
        _mm512_storeu_ps(s, hsum16x16(acc));
    } else {
        for (int q = 0; q < NW; q++)
            for (int r = 0; r < R; r++) s[4 * r + q] = hsum16(acc[4 * q + r]);
    }
    for (int q = 0; q < NW; q++)
        for (int r = 0; r < R; r++) {
            float t = s[4 * r + q];
            for (int64_t j = k; j < K; j++) t += bf16_f32(w[q * K + j]) * xf[r][j];
            y[r * ys + q] = t;
        }
}

/* Input rows m..m+R of p as tile_bf16 reads them. */
typedef struct {
    const uint16_t *xb[4];
    const float *xf[4];
} xrows4;
#endif


/* ------------------------------------------------------------------ one entry point per shape */

enum { W_BF16 = 0, W_INT8 = 1, W_INT4 = 2 };

typedef struct {
    int kind;            /* W_* */
    int sk;              /* scale kind (SK_*), int kinds */
    int64_t N, K, G;     /* G: inputs per scale, int kinds */
    const void *codes;   /* bf16 values or int codes */
    const void *scales;  /* int kinds */
} wdesc;

/* An input row made ready for one weight kind. */
typedef struct {
    qrow q;              /* int kinds */
    uint16_t *xb;        /* bf16 kind: the row in bf16 */
    float *xf;           /* bf16 kind: the row in float32 */
} xprep;

static void xprep_free(xprep *p) {
    qrow_free(&p->q);
    free(p->xb); free(p->xf);
    memset(p, 0, sizeof(*p));
}

static int xprep_make(xprep *p, const wdesc *w, const void *x, int x_kind, int vectorized) {
    memset(p, 0, sizeof(*p));
    int64_t K = w->K;
    if (w->kind == W_BF16) {
        p->xb = xalloc((size_t)(K + 32) * 2);
        p->xf = xalloc((size_t)(K + 16) * 4);
        if (!p->xb || !p->xf) return -1;
        int64_t i = 0;
#ifdef MT_AVX512
        for (; i + 16 <= K; i += 16) {
            __m512 v = load_x16(x, x_kind, i);
            _mm512_storeu_ps(p->xf + i, v);
            _mm256_storeu_si256((__m256i *)(p->xb + i), x_kind == OUT_BF16
                                ? _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i)) : to_bf16x16(v));
        }
#endif
        for (; i < K; i++) {
            p->xf[i] = x_at(x, x_kind, i);
            p->xb[i] = x_kind == OUT_BF16 ? ((const uint16_t *)x)[i] : f32_bf16(p->xf[i]);
        }
        return 0;
    }
    const int wide = w->G == K || w->G % 512 == 0;  /* dot_int8_row's two forms */
    return qrow_make(&p->q, x, x_kind, K, w->kind == W_INT8 ? 8 : 4, w->kind == W_INT8 && !wide, vectorized);
}

static int wdesc_ok(const wdesc *w) {
    if (w->kind == W_BF16) return w->K > 0;
    if (w->kind == W_INT8) return int8_group_ok(w->G, w->K) && w->K % w->G == 0;
    return w->K % 32 == 0 && w->G % 32 == 0 && w->K % w->G == 0;
}

/* Int weight row n against R (1..4) prepared rows, vectorized (the caller checked the kind runs so here). */
static inline __attribute__((always_inline)) void row_dot_vec(const wdesc *w, int64_t n, const xprep *p, const int R,
                                                              const int4_lanes *c4, float *o) {
#if defined(MT_AVX512)
    int64_t K = w->K, es = w->sk == SK_F32 ? 4 : 2;
    const qrow *q[4];
    for (int r = 0; r < R; r++) q[r] = &p[r].q;
    (void)q; (void)es;
    if (w->kind == W_INT8) {
#ifdef MT_VNNI
        dot_int8_row((const int8_t *)w->codes + n * K, (const char *)w->scales + n * (K / w->G) * es, w->sk, w->G, K,
                     q, R, o);
#endif
    } else {
#ifdef MT_VNNI
        dot_int4_row((const uint8_t *)w->codes + n * (K / 2), (const char *)w->scales + n * 2 * (K / w->G) * es, w->sk,
                     w->G, K, q, R, c4, o);
#endif
    }
#else
    (void)w; (void)n; (void)p; (void)R; (void)c4; (void)o;
#endif
}

static int kind_vectorized(int kind) {
#ifdef MT_VNNI
    if (kind != W_BF16) return 1;
#endif
#ifdef MT_AVX512
    if (kind == W_BF16) return 1;
#endif
    (void)kind;
    return 0;
}

/* Weight row n against R (1..4) prepared rows: o[r]. */
static inline void row_dot(const wdesc *w, int64_t n, const xprep *p, int R, const int4_lanes *c4, float *o,
                           int vectorized) {
    int64_t K = w->K, es = w->sk == SK_F32 ? 4 : 2;
    if (vectorized && kind_vectorized(w->kind)) {
        switch (R) {
            case 1: row_dot_vec(w, n, p, 1, c4, o); break;
            case 2: row_dot_vec(w, n, p, 2, c4, o); break;
            case 3: row_dot_vec(w, n, p, 3, c4, o); break;
            default: row_dot_vec(w, n, p, 4, c4, o); break;
        }
    } else if (w->kind == W_BF16) {
        for (int r = 0; r < R; r++) o[r] = dot_bf16_ref((const uint16_t *)w->codes + n * K, p[r].xf, OUT_F32, K);
    } else if (w->kind == W_INT8) {
        const char *sr = (const char *)w->scales + n * (K / w->G) * es;
        for (int r = 0; r < R; r++) o[r] = dot_int8_ref((const int8_t *)w->codes + n * K, sr, w->sk, w->G, K, &p[r].q);
    } else {
        const char *sr = (const char *)w->scales + n * 2 * (K / w->G) * es;
        for (int r = 0; r < R; r++)
            o[r] = dot_int4_ref((const uint8_t *)w->codes + n * (K / 2), sr, w->sk, w->G, K, &p[r].q);
    }
    if (w->kind == W_INT8 && w->G == K)
        for (int r = 0; r < R; r++) o[r] *= scale_at(w->scales, w->sk, n);
}

/* Outputs n0..n1 of M prepared rows into y[m * N + n] (float32): the weight rows in address order, each against
 * every input row, 4 at a time. */
static void rows_dot(const wdesc *w, const xprep *p, int64_t M, int64_t n0, int64_t n1, float *y, int vectorized) {
#ifdef MT_AVX512
    if (w->kind == W_BF16 && vectorized) {  /* 4 weight rows by up to 4 input rows a tile */
        const int64_t K = w->K, N = w->N;
        const uint16_t *codes = (const uint16_t *)w->codes;
        int64_t n = n0;
#define MT_TILE(NW, R) tile_bf16(codes + n * K, K, x4.xb, x4.xf, NW, R, y + m * N + n, N)
#define MT_TILES(NW)                                                                          \
    for (int64_t m = 0; m < M; m += 4) {                                                      \
        xrows4 x4;                                                                            \
        int R = M - m < 4 ? (int)(M - m) : 4;                                                 \
        for (int r = 0; r < R; r++) x4.xb[r] = p[m + r].xb, x4.xf[r] = p[m + r].xf;           \
        switch (R) {                                                                          \
            case 1: MT_TILE(NW, 1); break;                                                    \
            case 2: MT_TILE(NW, 2); break;                                                    \
            case 3: MT_TILE(NW, 3); break;                                                    \
            default: MT_TILE(NW, 4); break;                                                   \
        }                                                                                     \
    }
#ifdef MT_BF16DOT
        const int64_t x_bytes = M * K * 2;  /* the bf16 copies */
#else
        const int64_t x_bytes = M * K * 4;  /* the float32 copies */
#endif
        if (x_bytes >= X_L1)
            for (; n + 4 <= n1; n += 4) MT_TILES(4)
        for (; n < n1; n++) MT_TILES(1)
#undef MT_TILES
#undef MT_TILE
        return;
    }
#endif
    int4_lanes c4;
    if (w->kind == W_INT4) int4_lanes_make(&c4, w->G);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m += 4) {
            int R = M - m < 4 ? (int)(M - m) : 4;
            float o[4];
            row_dot(w, n, p + m, R, &c4, o, vectorized);
            for (int r = 0; r < R; r++) y[(m + r) * w->N + n] = o[r];
        }
}

/* Rows are handed out CHUNK_ROWS at a time from a shared counter, not split evenly up front: a thread whose core
 * is busy with another process takes fewer chunks instead of holding the others at the region's end. */
#ifndef CHUNK_ROWS
#define CHUNK_ROWS 64
#endif

static void rows_shared(const wdesc *w, const xprep *p, int64_t M, float *y, int vectorized, int64_t *next) {
    for (;;) {
        int64_t n0 = __atomic_fetch_add(next, CHUNK_ROWS, __ATOMIC_RELAXED);
        if (n0 >= w->N) return;
        rows_dot(w, p, M, n0, n0 + CHUNK_ROWS < w->N ? n0 + CHUNK_ROWS : w->N, y, vectorized);
    }
}

static int threads_for(int threads, int64_t N, int64_t K) {
    /* below ~64K weights a second thread costs more than it saves */
    return (threads > 1 && N * K >= 65536) ? threads : 1;
}

/* y[M, N] for M prepared rows, the outputs split over `threads` threads */
static void dot_rows(const wdesc *w, const xprep *p, int64_t M, float *y, int threads, int vectorized) {
    int64_t next = 0;
#pragma omp parallel num_threads(threads)
    rows_shared(w, p, M, y, vectorized, &next);
}

/* y[M, N] = x[M, K] @ w^T; x bf16 or f32 rows, y bf16 or f32. 0, or -1 (bad shape / out of memory:
 * nothing written). */
int mt_gemv(int kind, const void *codes, const void *scales, int sk, int64_t G, int64_t N, int64_t K,
            const void *x, int x_kind, int64_t M, void *y, int out_kind, int threads, int vectorized) {
    wdesc w = {kind, sk, N, K, G, codes, scales};
    if (!wdesc_ok(&w)) return -1;
    xprep *p = calloc((size_t)M, sizeof(xprep));
    float *acc = xalloc((size_t)(M * N) * 4);
    int bad = !p || !acc;
    for (int64_t m = 0; m < M && !bad; m++)
        bad |= xprep_make(&p[m], &w, (const char *)x + m * K * (x_kind == OUT_BF16 ? 2 : 4), x_kind, vectorized);
    if (!bad) {
        dot_rows(&w, p, M, acc, threads_for(threads, N, K), vectorized);
        for (int64_t i = 0; i < M * N; i++) store_out(y, out_kind, i, acc[i]);
    }
    if (p)
        for (int64_t m = 0; m < M; m++) xprep_free(&p[m]);
    free(p);
    free(acc);
    return bad ? -1 : 0;
}

/* ------------------------------------------------------------------ a token's routed experts */

typedef struct {
    wdesc gate_up;  /* [2I, H]: gate rows, then up rows */
    wdesc down;     /* [H, I] */
} expert;

static inline float rb(float v) { return bf16_f32(f32_bf16(v)); }  /* round through bf16 */

static inline float silu_bf16(float g) {
    return bf16_f32(f32_bf16(g / (1.f + expf(-g))));
}

/* a[c] = silu(g[c]) * up[c] for c < n, rounded where the unfused path rounds (round: bf16 weights), else in float32 */
static void silu_mul(const float *g, const float *up, float *a, int64_t n, int round) {
    int64_t c = 0;
#ifdef MT_AVX512
    if (round)
        for (; c + 16 <= n; c += 16) {
            __m512 gv = rb16(_mm512_loadu_ps(g + c));
            __m512 ng = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(gv), _mm512_set1_epi32((int)0x80000000u)));
            __m512 sv = rb16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(ng))));
            _mm512_storeu_ps(a + c, rb16(_mm512_mul_ps(sv, rb16(_mm512_loadu_ps(up + c)))));
        }
#endif
    for (; c < n; c++) a[c] = round ? rb(silu_bf16(rb(g[c])) * rb(up[c])) : g[c] / (1.f + expf(-g[c])) * up[c];
}

/* out[i] = bf16(silu(g[i])) for n bf16 values, as the fused experts compute it (for tests) */
void mt_silu_bf16(const uint16_t *g, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        float gf[16], one[16], a[16];
        int64_t m = n - i < 16 ? n - i : 16;
        for (int j = 0; j < 16; j++) gf[j] = j < m ? bf16_f32(g[i + j]) : 0.f, one[j] = 1.f;
        silu_mul(gf, one, a, 16, 1);
        for (int j = 0; j < m; j++) out[i + j] = f32_bf16(a[j]);
    }
}

static int expert_ok(const expert *e, int64_t H, int64_t I2) {
    return wdesc_ok(&e->gate_up) && wdesc_ok(&e->down) && e->gate_up.K == H && e->gate_up.N == I2 &&
           e->down.K == I2 / 2 && e->down.N == H;
}

/* The routed experts of T tokens x[T, H], each expert run once on all of its tokens:
 *   out[t] = sum_j weights[t k + j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = ex[slot[t k + j]] (0 <= slot < U),
 * rounding where the unfused path (models/moe.py) rounds: each matmul's output, silu and the product, to bf16 when
 * out_kind is bf16; a token's k weighted outputs summed in float32 in slot order. An expert's tokens go to it in
 * token order, as the unfused path hands them. 0, or -1 (bad shapes or slots, out of memory: nothing written). */
int mt_moe(const expert *ex, int U, const int32_t *slot, const float *weights, int64_t T, int k, const void *x,
           int x_kind, void *out, int out_kind, int threads, int vectorized) {
    if (U <= 0 || T <= 0 || k <= 0) return -1;
    const int64_t H = ex[0].gate_up.K, I2 = ex[0].gate_up.N, I = I2 / 2, S = T * k;
    for (int u = 0; u < U; u++)
        if (!expert_ok(&ex[u], H, I2)) return -1;
    for (int64_t s = 0; s < S; s++)
        if (slot[s] < 0 || slot[s] >= U) return -1;
    const int64_t xs = H * (x_kind == OUT_BF16 ? 2 : 4);
    int64_t *start = calloc((size_t)U + 1, sizeof(int64_t)), *order = malloc((size_t)S * sizeof(int64_t));
    xprep *px = calloc((size_t)T, sizeof(xprep)), *pe = NULL, *pa = NULL;
    int bad = !start || !order || !px;
    int64_t most = 0;
    if (!bad) {  /* token-slots grouped by expert, each group in slot order */
        for (int64_t s = 0; s < S; s++) start[slot[s] + 1]++;
        for (int u = 0; u < U; u++) {
            most = start[u + 1] > most ? start[u + 1] : most;
            start[u + 1] += start[u];
        }
        int64_t *fill = calloc((size_t)U, sizeof(int64_t));
        bad = !fill;
        for (int64_t s = 0; s < S && !bad; s++) order[start[slot[s]] + fill[slot[s]]++] = s;
        free(fill);
    }
    float *h = NULL, *a = NULL, *y = NULL, *v = NULL;
    if (!bad) {  /* an expert's rows at a time: at most `most` of them */
        pe = calloc((size_t)most, sizeof(xprep)), pa = calloc((size_t)most, sizeof(xprep));
        h = xalloc((size_t)(most * I2) * 4), a = xalloc((size_t)(most * I) * 4), y = xalloc((size_t)(most * H) * 4);
        v = xalloc((size_t)(S * H) * 4);
        bad = !pe || !pa || !h || !a || !y || !v;
    }
    const int round = out_kind == OUT_BF16, nt = threads_for(threads, I2, H);
    const wdesc *made = NULL;  /* the kind and grouping px is prepared for */
    for (int u = 0; u < U && !bad; u++) {
        const int64_t n = start[u + 1] - start[u], *rows = order + start[u];
        if (!n) continue;
        if (!made || ex[u].gate_up.kind != made->kind || ex[u].gate_up.G != made->G) {
            /* each token's input is prepared once for every expert of the same kind and grouping */
            made = &ex[u].gate_up;
            for (int64_t t = 0; t < T && !bad; t++) {
                xprep_free(&px[t]);
                bad |= xprep_make(&px[t], made, (const char *)x + t * xs, x_kind, vectorized);
            }
            if (bad) break;
        }
        for (int64_t i = 0; i < n; i++) pe[i] = px[rows[i] / k];  /* shallow copies: px owns the buffers */
        dot_rows(&ex[u].gate_up, pe, n, h, nt, vectorized);
        for (int64_t i = 0; i < n; i++) silu_mul(h + i * I2, h + i * I2 + I, a + i * I, I, round);
        for (int64_t i = 0; i < n && !bad; i++) {
            xprep_free(&pa[i]);
            bad |= xprep_make(&pa[i], &ex[u].down, a + i * I, OUT_F32, vectorized);
        }
        if (bad) break;
        dot_rows(&ex[u].down, pa, n, y, nt, vectorized);
        for (int64_t i = 0; i < n; i++) {
            float *dst = v + rows[i] * H;
            const float *src = y + i * H;
            int64_t c = 0;
#ifdef MT_AVX512
            if (round)
                for (; c + 16 <= H; c += 16) _mm512_storeu_ps(dst + c, rb16(_mm512_loadu_ps(src + c)));
#endif
            for (; c < H; c++) dst[c] = round ? rb(src[c]) : src[c];
        }
    }
    if (!bad)
        for (int64_t t = 0; t < T; t++) {
            int64_t c = 0;
#ifdef MT_AVX512
            for (; c + 16 <= H; c += 16) {  /* products then sums, as the scalar loop (no fused multiply-add) */
                __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(v + t * k * H + c), _mm512_set1_ps(weights[t * k]));
                for (int j = 1; j < k; j++)
                    sum = _mm512_add_ps(sum, _mm512_mul_ps(_mm512_loadu_ps(v + (t * k + j) * H + c),
                                                           _mm512_set1_ps(weights[t * k + j])));
                if (out_kind == OUT_BF16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + t * H + c), to_bf16x16(sum));
                else
                    _mm512_storeu_ps((float *)out + t * H + c, sum);
            }
#endif
            for (; c < H; c++) {
                float sum = v[t * k * H + c] * weights[t * k];
                for (int j = 1; j < k; j++) sum = sum + v[(t * k + j) * H + c] * weights[t * k + j];
                store_out(out, out_kind, t * H + c, sum);
            }
        }
    for (int64_t t = 0; px && t < T; t++) xprep_free(&px[t]);
    for (int64_t i = 0; pa && i < most; i++) xprep_free(&pa[i]);
    free(px); free(pe); free(pa); free(start); free(order);
    free(h); free(a); free(y); free(v);
    return bad ? -1 : 0;
}

/* mt_moe for one token x[H] and its k experts ex[0..k) */
int mt_moe1(const expert *ex, const float *weights, int k, const void *x, int x_kind, void *out, int out_kind,
            int threads, int vectorized) {
    if (k <= 0) return -1;
    int32_t *slot = malloc((size_t)k * sizeof(int32_t));
    if (!slot) return -1;
    for (int j = 0; j < k; j++) slot[j] = j;
    int rc = mt_moe(ex, k, slot, weights, 1, k, x, x_kind, out, out_kind, threads, vectorized);
    free(slot);
    return rc;
}

/* ------------------------------------------------------------------ a decode token's attention block */


typedef struct {
    wdesc q, k, v, o;
    const uint16_t *q_bias, *k_bias, *v_bias, *o_bias;  /* bf16 [N] or NULL */
    const uint16_t *norm;                               /* input RMSNorm weight, bf16 [H] */
    const uint16_t *q_norm, *k_norm;                    /* per-head RMSNorm weights, bf16 [d], or NULL */
    float eps, head_eps, scale;
    int64_t hq, hk, d, window;                          /* window 0: full attention */
} attn_desc;

/* x[n] (float32, bf16 values) <- the bf16 path's RMSNorm: bf16(w * bf16(x * rsqrt(mean(x^2) + eps))) */
static void rms_norm_bf16(float *x, int64_t n, const uint16_t *w, float eps) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)n + eps);
    int64_t i = 0;
#ifdef MT_AVX512
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, rb16(_mm512_mul_ps(bf16x16(w + i), rb16(_mm512_mul_ps(_mm512_loadu_ps(x + i),
                                                                                    _mm512_set1_ps(r))))));
#endif
    for (; i < n; i++) x[i] = rb(bf16_f32(w[i]) * rb(x[i] * r));
}

/* the projections of M prepared inputs: y[m N + n] rounded to bf16 (+ bias, rounded again, as linear + bias) */
static void project(const wdesc *w, const xprep *p, int64_t M, const uint16_t *bias, float *y, int threads) {
    dot_rows(w, p, M, y, threads_for(threads, w->N, w->K), 1);
    for (int64_t m = 0; m < M; m++) {
        int64_t i = 0;
#ifdef MT_AVX512
        for (; i + 16 <= w->N; i += 16) {
            float *v = y + m * w->N + i;
            __m512 t = rb16(_mm512_loadu_ps(v));
            _mm512_storeu_ps(v, bias ? rb16(_mm512_add_ps(t, bf16x16(bias + i))) : t);
        }
#endif
        for (; i < w->N; i++) {
            float *v = y + m * w->N + i;
            *v = bias ? rb(rb(*v) + bf16_f32(bias[i])) : rb(*v);
        }
    }
}

/* p[0..M) <- the rows x + m * K (float32) made ready for w's kind, kept when `made` (the weight they were made
 * for) has the same kind and grouping. 0 or -1. */
static int xprep_rows(xprep *p, int64_t M, const wdesc *w, const wdesc **made, const float *x) {
    if (*made && (*made)->kind == w->kind && (*made)->G == w->G) return 0;
    *made = w;
    for (int64_t m = 0; m < M; m++) {
        xprep_free(&p[m]);
        if (xprep_make(&p[m], w, x + m * w->K, OUT_F32, 1)) return -1;
    }
    return 0;
}

static void rope_bf16(float *h, int64_t d, const float *cosr, const float *sinr) {
    /* x * cos + roll(x, d/2) * sin with the first half of sin negated, each op rounded to bf16 */
    float t[512];
    int64_t half = d / 2;
    for (int64_t i = 0; i < d; i++) {
        float c = rb(cosr[i]), s = rb(sinr[i]);
        float rolled = i < half ? h[i + half] : h[i - half];
        t[i] = rb(rb(h[i] * c) + rb(rolled * (i < half ? -s : s)));
    }
    memcpy(h, t, (size_t)d * 4);
}

/* x[B, H] (bf16, in place): row b += o(attention(rope(q, k), v)) of one token at pos[b] of sequence b. Its k and v
 * are written to kb[b]/vb[b] ([hk, cap[b], d] bf16) at pos[b]; it attends to positions max(0, pos[b] - window + 1)
 * ..pos[b]; cosr[b]/sinr[b]: its rows of the rotary table. The projections run on all B rows at once. */
int mt_attn(const attn_desc *a, int64_t B, uint16_t *x, const int64_t *pos, const float *const *cosr,
            const float *const *sinr, uint16_t *const *kb, uint16_t *const *vb, const int64_t *cap, int threads) {
    const int64_t H = a->q.K, d = a->d, hq = a->hq, hk = a->hk;
    if (B <= 0 || d > 512 || d % 2 || hq % hk || a->q.N != hq * d || a->k.N != hk * d || a->v.N != hk * d ||
        a->o.K != hq * d || a->o.N != H || !wdesc_ok(&a->q) || !wdesc_ok(&a->k) || !wdesc_ok(&a->v) ||
        !wdesc_ok(&a->o))
        return -1;
    int64_t Lmax = 0, work = 0;
    for (int64_t b = 0; b < B; b++) {
        if (pos[b] < 0 || pos[b] >= cap[b]) return -1;
        int64_t lo = a->window > 0 && pos[b] - a->window + 1 > 0 ? pos[b] - a->window + 1 : 0;
        Lmax = pos[b] + 1 - lo > Lmax ? pos[b] + 1 - lo : Lmax;
        work += (pos[b] + 1 - lo) * hq * d;
    }
    float *xn = xalloc((size_t)(B * H) * 4), *q = xalloc((size_t)(B * hq * d) * 4),
          *k = xalloc((size_t)(B * hk * d) * 4), *v = xalloc((size_t)(B * hk * d) * 4),
          *att = xalloc((size_t)(B * hq * d) * 4), *o = xalloc((size_t)(B * H) * 4),
          *sc = xalloc((size_t)(B * hq * Lmax) * 4);
    xprep *p = calloc((size_t)B, sizeof(xprep));
    int bad = !xn || !q || !k || !v || !att || !o || !sc || !p;
    if (!bad)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < H; i++) xn[b * H + i] = bf16_f32(x[b * H + i]);
            rms_norm_bf16(xn + b * H, H, a->norm, a->eps);
        }
    const wdesc *proj[3] = {&a->q, &a->k, &a->v}, *made = NULL;
    const uint16_t *bias[3] = {a->q_bias, a->k_bias, a->v_bias};
    float *outs[3] = {q, k, v};
    for (int i = 0; i < 3 && !bad; i++) {
        /* the normed inputs are prepared again only when the weight kind or grouping changes */
        bad = xprep_rows(p, B, proj[i], &made, xn);
        if (!bad) project(proj[i], p, B, bias[i], outs[i], threads);
    }
    if (!bad) {
        for (int64_t b = 0; b < B; b++) {
            for (int64_t h = 0; h < hq; h++) {
                float *qh = q + (b * hq + h) * d;
                if (a->q_norm) rms_norm_bf16(qh, d, a->q_norm, a->head_eps);
                rope_bf16(qh, d, cosr[b], sinr[b]);
            }
            for (int64_t h = 0; h < hk; h++) {
                float *kh = k + (b * hk + h) * d, *vh = v + (b * hk + h) * d;
                if (a->k_norm) rms_norm_bf16(kh, d, a->k_norm, a->head_eps);
                rope_bf16(kh, d, cosr[b], sinr[b]);
                for (int64_t i = 0; i < d; i++) {
                    kb[b][(h * cap[b] + pos[b]) * d + i] = f32_bf16(kh[i]);
                    vb[b][(h * cap[b] + pos[b]) * d + i] = f32_bf16(vh[i]);
                }
            }
        }
        const int64_t group = hq / hk;
#pragma omp parallel for num_threads(threads > 1 && work >= 65536 ? threads : 1) schedule(static)
        for (int64_t bh = 0; bh < B * hq; bh++) {
            const int64_t b = bh / hq, h = bh % hq;
            const int64_t lo = a->window > 0 && pos[b] - a->window + 1 > 0 ? pos[b] - a->window + 1 : 0,
                          L = pos[b] + 1 - lo;
            const uint16_t *kh = kb[b] + ((h / group) * cap[b] + lo) * d, *vh = vb[b] + ((h / group) * cap[b] + lo) * d;
            const float *qh = q + bh * d;
            float *s = sc + bh * Lmax, mx = -INFINITY, tot = 0.f;
            for (int64_t t = 0; t < L; t++) {
                float acc = 0.f;
                int64_t i = 0;
#ifdef MT_AVX512
                __m512 av = _mm512_setzero_ps();
                for (; i + 16 <= d; i += 16) av = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), bf16x16(kh + t * d + i), av);
                acc = _mm512_reduce_add_ps(av);
#endif
                for (; i < d; i++) acc += qh[i] * bf16_f32(kh[t * d + i]);
                s[t] = acc * a->scale;
                mx = s[t] > mx ? s[t] : mx;
            }
#ifdef MT_AVX512
            for (int64_t t = 0; t < L; t += 16) {
                __mmask16 m = L - t >= 16 ? 0xffff : (__mmask16)((1u << (L - t)) - 1);
                _mm512_mask_storeu_ps(s + t, m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), _mm512_set1_ps(mx))));
            }
#else
            for (int64_t t = 0; t < L; t++) s[t] = expf(s[t] - mx);
#endif
            for (int64_t t = 0; t < L; t++) tot += s[t];
            float *out = att + bh * d, inv = 1.f / tot;
            for (int64_t i = 0; i < d; i++) out[i] = 0.f;
            for (int64_t t = 0; t < L; t++) {
                float pt = s[t] * inv;
                int64_t i = 0;
#ifdef MT_AVX512
                for (; i + 16 <= d; i += 16)
                    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(_mm512_set1_ps(pt), bf16x16(vh + t * d + i), _mm512_loadu_ps(out + i)));
#endif
                for (; i < d; i++) out[i] += pt * bf16_f32(vh[t * d + i]);
            }
            for (int64_t i = 0; i < d; i++) out[i] = rb(out[i]);
        }
        made = NULL;
        bad = xprep_rows(p, B, &a->o, &made, att);
    }
    if (!bad) {
        project(&a->o, p, B, a->o_bias, o, threads);
        int64_t i = 0;
#ifdef MT_AVX512
        for (; i + 16 <= B * H; i += 16)
            _mm256_storeu_si256((__m256i *)(x + i), to_bf16x16(_mm512_add_ps(bf16x16(x + i), _mm512_loadu_ps(o + i))));
#endif
        for (; i < B * H; i++) x[i] = f32_bf16(bf16_f32(x[i]) + o[i]);
    }
    for (int64_t b = 0; p && b < B; b++) xprep_free(&p[b]);
    free(p);
    free(xn); free(q); free(k); free(v); free(att); free(o); free(sc);
    return bad ? -1 : 0;
}

/* mt_attn for one token x[H] at `pos` of one sequence (cache kbuf/vbuf of cap positions) */
int mt_attn1(const attn_desc *a, uint16_t *x, int64_t pos, const float *cosr, const float *sinr, uint16_t *kbuf,
             uint16_t *vbuf, int64_t cap, int threads) {
    return mt_attn(a, 1, x, &pos, &cosr, &sinr, &kbuf, &vbuf, &cap, threads);
}

/* ------------------------------------------------------------------ a decode token's routing */

/* For each of B rows x[b, H]: xn[b] (bf16 out) = RMSNorm(x[b]); softmax over the router's logits (bf16-rounded, as
 * F.linear's output, then float32), the top k (ties: the lower expert id) -> ids[b k ..], weights[b k ..]
 * (renormalised if `normalize`). */
int mt_route(const uint16_t *x, int64_t B, int64_t H, const uint16_t *norm, float eps, const wdesc *router, int k,
             int normalize, uint16_t *xn_out, int64_t *ids, float *weights, int threads) {
    const int64_t E = router->N;
    if (B <= 0 || router->K != H || k <= 0 || k > E || !wdesc_ok(router)) return -1;
    float *xn = xalloc((size_t)(B * H) * 4), *lg = xalloc((size_t)(B * E + 16) * 4);
    xprep *p = calloc((size_t)B, sizeof(xprep));
    const wdesc *made = NULL;
    int bad = !xn || !lg || !p;
    if (!bad) {
        for (int64_t i = 0; i < B * H; i++) xn[i] = bf16_f32(x[i]);
        for (int64_t b = 0; b < B; b++) rms_norm_bf16(xn + b * H, H, norm, eps);
        for (int64_t i = 0; i < B * H; i++) xn_out[i] = f32_bf16(xn[i]);
        bad = xprep_rows(p, B, router, &made, xn);
    }
    if (!bad) {
        project(router, p, B, NULL, lg, threads);
        for (int64_t b = 0; b < B; b++) {
            float *l = lg + b * E, mx = -INFINITY, tot = 0.f, sum = 0.f;
            int64_t *id = ids + b * k;
            for (int64_t e = 0; e < E; e++) mx = l[e] > mx ? l[e] : mx;
            for (int64_t e = 0; e < E; e++) { l[e] = expf(l[e] - mx); tot += l[e]; }
            for (int64_t e = 0; e < E; e++) l[e] /= tot;
            for (int j = 0; j < k; j++) {
                int64_t best = -1;
                for (int64_t e = 0; e < E; e++) {
                    int taken = 0;
                    for (int i = 0; i < j; i++) taken |= id[i] == e;
                    if (!taken && (best < 0 || l[e] > l[best])) best = e;
                }
                id[j] = best;
                weights[b * k + j] = l[best];
                sum += l[best];
            }
            if (normalize)
                for (int j = 0; j < k; j++) weights[b * k + j] /= sum;
        }
    }
    for (int64_t i = 0; p && i < B; i++) xprep_free(&p[i]);
    free(p); free(xn); free(lg);
    return bad ? -1 : 0;
}

/* mt_route for one token x[H] */
int mt_route1(const uint16_t *x, int64_t H, const uint16_t *norm, float eps, const wdesc *router, int k, int normalize,
              uint16_t *xn_out, int64_t *ids, float *weights, int threads) {
    return mt_route(x, 1, H, norm, eps, router, k, normalize, xn_out, ids, weights, threads);
}

/* ------------------------------------------------------------------ a decode token through resident layers */

typedef struct {
    attn_desc attn;
    const uint16_t *post_norm;  /* the MoE block's RMSNorm weight, bf16 [H] */
    float post_eps;
    int32_t top_k, normalize;
    wdesc router;               /* [E, H] bf16 */
    const expert *experts;      /* [E], resident */
} layer_desc;

/* x[B, H] (bf16, in place) through layers [0, nl) for one token of each of B sequences, row b at pos[b], each layer
 * as mt_attn, mt_route and mt_moe over the chosen experts plus the residual add (the per-layer fused path, in one call).
 * kb[l B + b], vb[l B + b]: layer l's cache buffers of sequence b, of cap[l B + b] positions; cosr[b], sinr[b]: its
 * rows of the rotary table. A row gets the bits it gets decoded alone (B = 1): every kernel here computes each row
 * by itself. */
int mt_decode(const layer_desc *L, int nl, int64_t B, uint16_t *x, const int64_t *pos, const float *const *cosr,
              const float *const *sinr, uint16_t *const *kb, uint16_t *const *vb, const int64_t *cap, int threads) {
    if (nl <= 0 || B <= 0) return -1;
    int64_t H = L[0].attn.q.K;
    int kmax = 0;
    for (int l = 0; l < nl; l++) {
        if (L[l].attn.q.K != H || L[l].top_k <= 0 || L[l].router.N <= 0) return -1;
        kmax = L[l].top_k > kmax ? L[l].top_k : kmax;
    }
    uint16_t *xn = xalloc((size_t)(B * H) * 2), *out = xalloc((size_t)(B * H) * 2);
    float *w = xalloc((size_t)(B * kmax) * 4);
    int64_t *id = xalloc((size_t)(B * kmax) * 8);
    int32_t *slot = xalloc((size_t)(B * kmax) * 4);
    int bad = !xn || !out || !w || !id || !slot;
    for (int l = 0; l < nl && !bad; l++) {
        const layer_desc *d = &L[l];
        bad = mt_attn(&d->attn, B, x, pos, cosr, sinr, kb + l * B, vb + l * B, cap + l * B, threads) ||
              mt_route(x, B, H, d->post_norm, d->post_eps, &d->router, d->top_k, d->normalize, xn, id, w, threads);
        if (bad) break;
        for (int64_t i = 0; i < B * d->top_k; i++) slot[i] = (int32_t)id[i];
        bad = mt_moe(d->experts, (int)d->router.N, slot, w, B, d->top_k, xn, OUT_BF16, out, OUT_BF16, threads, 1);
        int64_t i = 0;
#ifdef MT_AVX512
        for (; !bad && i + 16 <= B * H; i += 16)
            _mm256_storeu_si256((__m256i *)(x + i), to_bf16x16(_mm512_add_ps(bf16x16(x + i), bf16x16(out + i))));
#endif
        for (; !bad && i < B * H; i++) x[i] = f32_bf16(bf16_f32(x[i]) + bf16_f32(out[i]));
    }
    free(xn); free(out); free(w); free(id); free(slot);
    return bad ? -1 : 0;
}

/* mt_decode for one token x[H] at `pos` (cosr, sinr: its rotary rows; kb[l], vb[l]: layer l's cache of cap[l]) */
int mt_decode1(const layer_desc *L, int nl, uint16_t *x, int64_t pos, const float *cosr, const float *sinr,
               uint16_t *const *kb, uint16_t *const *vb, const int64_t *cap, int threads) {
    return mt_decode(L, nl, 1, x, &pos, &cosr, &sinr, kb, vb, cap, threads);
}
