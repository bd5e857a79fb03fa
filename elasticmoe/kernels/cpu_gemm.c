/* Skinny CPU GEMMs for decode: Y[r, n] = sum_k X[r, k] * W[e, n, k] for few rows r per weight.
 *
 * MKL's sgemm streams a [N, K] weight at 5-15 GB/s when the other operand has 1-16 rows, and its bf16/fp16
 * paths on AVX2 are slower still; this loop reads each weight row once, keeps the rows of X in L1 and gets
 * close to the memory bandwidth. Weights are fp32, bf16 or fp16 (widened to fp32 in registers: a 16-bit
 * shift for bf16, F16C for fp16); X and Y are always fp32 and every sum is accumulated in fp32.
 *
 * Every output element is summed in one fixed order (8 fp32 lanes over k in steps of 8, a fixed lane
 * reduction, then the k tail), whatever the number of rows, experts or threads: a row's result depends only
 * on that row and its weight. Built at first use by cpu_gemm.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp).
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS_PER_ITEM 16 /* weight rows per work item handed to one thread */
/* Below this many multiply-adds a call runs on the calling thread: waking OpenMP's team and joining it cost
 * more than the sums (a [1, 64] x [192, 64] product: ~5 us alone, ~0.5 ms of CPU with 2 threads on a busy host) */
#define MIN_PARALLEL_MACS (1 << 18)
#ifndef PF_ROWS
#define PF_ROWS 8 /* software prefetch distance in weight rows: measured best of 2, 4, 8, 16 */
#endif

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Widen 8 weights at p to fp32, and one weight (the k tail). */
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline float load1_f32(const float *p) { return *p; }
static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline float load1_bf16(const uint16_t *p) {
    union { uint32_t u; float f; } v = {(uint32_t)*p << 16};
    return v.f;
}
static inline __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline float load1_f16(const uint16_t *p) { return _cvtsh_ss(*p); }

/* One kernel per weight type WT (suffix S): tile (two weight rows against JC <= 4 rows of x), block (rows
 * [n0, n1) of one weight against c rows of x) and the exported seg_gemm_S. */
#define DEFINE_SEG_GEMM(S, WT)                                                                              \
static inline __attribute__((always_inline)) void tile_##S(const WT *w0, const WT *w1, const float *x,      \
        int64_t ldx, float *y, int64_t ldy, int64_t K, int two, const int JC, int64_t pf) {               \
    __m256 a0[4], a1[4];                                                                                    \
    for (int j = 0; j < JC; j++) { a0[j] = _mm256_setzero_ps(); a1[j] = _mm256_setzero_ps(); }            \
    int64_t k = 0;                                                                                          \
    for (; k + 8 <= K; k += 8) {                                                                            \
        if (pf) { /* first pass over these rows: fetch the rows PF_ROWS ahead */                           \
            _mm_prefetch((const char *)(w0 + pf + k), _MM_HINT_T0);                                         \
            _mm_prefetch((const char *)(w1 + pf + k), _MM_HINT_T0);                                         \
        }                                                                                                   \
        __m256 v0 = load8_##S(w0 + k), v1 = load8_##S(w1 + k);                                              \
        for (int j = 0; j < JC; j++) {                                                                      \
            __m256 xv = _mm256_loadu_ps(x + j * ldx + k);                                                   \
            a0[j] = _mm256_fmadd_ps(v0, xv, a0[j]);                                                         \
            a1[j] = _mm256_fmadd_ps(v1, xv, a1[j]);                                                         \
        }                                                                                                   \
    }                                                                                                       \
    for (int j = 0; j < JC; j++) {                                                                          \
        float s0 = hsum(a0[j]), s1 = hsum(a1[j]);                                                           \
        for (int64_t t = k; t < K; t++) {                                                                   \
            s0 += load1_##S(w0 + t) * x[j * ldx + t];                                                       \
            s1 += load1_##S(w1 + t) * x[j * ldx + t];                                                       \
        }                                                                                                   \
        y[j * ldy] = s0;                                                                                    \
        if (two) y[j * ldy + 1] = s1;                                                                       \
    }                                                                                                       \
}                                                                                                           \
static void block_##S(const WT *w, int64_t K, int64_t n0, int64_t n1, const float *x, int64_t ldx,          \
                      int64_t c, float *y, int64_t ldy) {                                                   \
    for (int64_t n = n0; n < n1; n += 2) {                                                                  \
        int two = n + 1 < n1;                                                                               \
        const WT *w0 = w + n * K, *w1 = two ? w0 + K : w0;                                                  \
        for (int64_t j = 0; j < c; j += 4) {                                                                \
            const float *xj = x + j * ldx;                                                                  \
            int64_t pf = j == 0 ? PF_ROWS * K : 0;                                                          \
            float *yj = y + j * ldy + n;                                                                    \
            switch (c - j < 4 ? c - j : 4) {                                                                \
                case 1: tile_##S(w0, w1, xj, ldx, yj, ldy, K, two, 1, pf); break;                           \
                case 2: tile_##S(w0, w1, xj, ldx, yj, ldy, K, two, 2, pf); break;                           \
                case 3: tile_##S(w0, w1, xj, ldx, yj, ldy, K, two, 3, pf); break;                           \
                default: tile_##S(w0, w1, xj, ldx, yj, ldy, K, two, 4, pf); break;                          \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
}                                                                                                           \
void seg_gemm_##S(const float *x, const WT *w, const int64_t *starts, const int64_t *counts, int64_t E,      \
                  int64_t N, int64_t K, float *y, int nthreads) {                                           \
    int64_t per = (N + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;                                                  \
    int64_t hit[E > 0 ? E : 1], nhit = 0, rows = 0;                                                         \
    for (int64_t e = 0; e < E; e++)                                                                         \
        if (counts[e] > 0) hit[nhit++] = e, rows += counts[e];                                              \
    int64_t items = nhit * per;                                                                             \
    int par = nthreads > 1 && items > 1 && rows * N * K >= MIN_PARALLEL_MACS;                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (par)")                            \
    for (int64_t it = 0; it < items; it++) {                                                                \
        int64_t e = hit[it / per], n0 = (it % per) * ROWS_PER_ITEM;                                         \
        int64_t n1 = n0 + ROWS_PER_ITEM < N ? n0 + ROWS_PER_ITEM : N;                                       \
        block_##S(w + e * N * K, K, n0, n1, x + starts[e] * K, K, counts[e], y + starts[e] * N, N);        \
    }                                                                                                       \
}

/* Segmented skinny GEMM, one per weight type. x [M, K] fp32 rows sorted by weight; w [E, N, K]; starts/counts
 * [E] give each weight's rows of x (count 0 = skip); y [M, N] fp32. Work items (weight, 16 output columns)
 * are spread over nthreads OpenMP threads. */
DEFINE_SEG_GEMM(f32, float)
DEFINE_SEG_GEMM(bf16, uint16_t)
DEFINE_SEG_GEMM(f16, uint16_t)
