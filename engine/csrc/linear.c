/* y = x W^T + b for fp32 on CPU, for the few rows of a decode step or a small chunk (M <= 64).
 *
 *   x: (M, K), W: (N, K), b: (N,) or NULL, y: (M, N), all contiguous
 *
 * At a handful of rows a linear layer is a matrix-vector product bound by reading W; torch's
 * path reads it at one core's bandwidth whatever the thread count (measured: 18 ms for the base
 * demo model's 226 MB of weights, 1 or 2 threads). Here the rows of W are split across the
 * threads, and each tile of 8 rows of W is read once for all M rows of x (x stays in cache),
 * 3 rows of x at a time (24 accumulators in registers).
 * Sums run over K in 16-wide fp32 lanes, then across lanes: the order differs from torch's, the
 * precision does not.
 */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LINEAR_TILE_N 8
#define LINEAR_TILE_M 3

#if defined(__AVX512F__)
/* rows n .. n+RN-1 of W against rows m .. m+MB-1 of x (RN <= 8, MB <= 3: 24 accumulators) */
static inline __attribute__((always_inline)) void linear_tile(const float *x, const float *W, const float *b, float *y,
                                                              int64_t K, int64_t N, int64_t n, int64_t m, const int RN,
                                                              const int MB) {
    __m512 acc[LINEAR_TILE_N][LINEAR_TILE_M];
    for (int r = 0; r < RN; ++r)
        for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 w[LINEAR_TILE_N];
        for (int r = 0; r < RN; ++r) w[r] = _mm512_loadu_ps(W + (n + r) * K + k);
        for (int i = 0; i < MB; ++i) {
            const __m512 xv = _mm512_loadu_ps(x + (m + i) * K + k);
            for (int r = 0; r < RN; ++r) acc[r][i] = _mm512_fmadd_ps(w[r], xv, acc[r][i]);
        }
    }
    if (k < K) {
        const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1u);
        __m512 w[LINEAR_TILE_N];
        for (int r = 0; r < RN; ++r) w[r] = _mm512_maskz_loadu_ps(mask, W + (n + r) * K + k);
        for (int i = 0; i < MB; ++i) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + (m + i) * K + k);
            for (int r = 0; r < RN; ++r) acc[r][i] = _mm512_fmadd_ps(w[r], xv, acc[r][i]);
        }
    }
    for (int r = 0; r < RN; ++r) {
        const float bias = b ? b[n + r] : 0.0f;
        for (int i = 0; i < MB; ++i) y[(m + i) * N + n + r] = _mm512_reduce_add_ps(acc[r][i]) + bias;
    }
}

/* the tile's row counts as compile-time constants, so its accumulators live in registers */
static void linear_tile_any(const float *x, const float *W, const float *b, float *y, int64_t K, int64_t N, int64_t n,
                            int64_t m, int rn, int mb) {
#define LINEAR_CASE_M(RN)                                                                                  \
    switch (mb) {                                                                                         \
    case 1: linear_tile(x, W, b, y, K, N, n, m, RN, 1); break;                                            \
    case 2: linear_tile(x, W, b, y, K, N, n, m, RN, 2); break;                                            \
    case 3: linear_tile(x, W, b, y, K, N, n, m, RN, 3); break;                                            \
    default: linear_tile(x, W, b, y, K, N, n, m, RN, 3); break;                                           \
    }
    switch (rn) {
    case 1: LINEAR_CASE_M(1); break;
    case 2: LINEAR_CASE_M(2); break;
    case 3: LINEAR_CASE_M(3); break;
    case 4: LINEAR_CASE_M(4); break;
    case 5: LINEAR_CASE_M(5); break;
    case 6: LINEAR_CASE_M(6); break;
    case 7: LINEAR_CASE_M(7); break;
    default: LINEAR_CASE_M(8); break;
    }
#undef LINEAR_CASE_M
}
#endif

/* y's columns n .. n+rn-1 (rn <= LINEAR_TILE_N) for all M rows of x */
static void linear_tile_rows(const float *x, const float *W, const float *b, float *y, int64_t M, int64_t K, int64_t N,
                             int64_t n, int rn) {
    for (int64_t m = 0; m < M; m += LINEAR_TILE_M) {
        const int mb = (int)(M - m < LINEAR_TILE_M ? M - m : LINEAR_TILE_M);
#if defined(__AVX512F__)
        linear_tile_any(x, W, b, y, K, N, n, m, rn, mb);
#else
        for (int r = 0; r < rn; ++r)
            for (int i = 0; i < mb; ++i) {
                float s = 0.0f;
                const float *wr = W + (n + r) * K, *xr = x + (m + i) * K;
#pragma omp simd reduction(+ : s)
                for (int64_t k = 0; k < K; ++k) s += wr[k] * xr[k];
                y[(m + i) * N + n + r] = s + (b ? b[n + r] : 0.0f);
            }
#endif
    }
}

void mace_linear_f32(const float *x, const float *W, const float *b, float *y, int64_t M, int64_t K, int64_t N,
                     int num_threads) {
    const int64_t tiles = (N + LINEAR_TILE_N - 1) / LINEAR_TILE_N;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n = t * LINEAR_TILE_N;
        linear_tile_rows(x, W, b, y, M, K, N, n, (int)(N - n < LINEAR_TILE_N ? N - n : LINEAR_TILE_N));
    }
}

/* SwiGLU's gate: out (M, I) = silu(gu[:, :I]) * gu[:, I:] for gu (M, 2I), the gate and up
 * projections computed as one (engine/cpu_kernels.py install_fused_mlp). */
void mace_silu_mul_f32(const float *gu, float *out, int64_t M, int64_t I, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *o = out + m * I;
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
