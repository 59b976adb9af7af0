/* Causal attention of one fresh prompt chunk (its keys are its own tokens), fp32, head dim 64,
 * AVX-512. torch's CPU flash kernel splits the keys in blocks of 512, so below that it does the
 * whole square, masked half included (a 512-token chunk: 6.6 ms a layer for the base demo
 * model's 12 heads, as long as without the causal mask). Here each work item is 16 query rows of
 * one head, against only the keys they see:
 *   scores (L, 16) = K Q^T: eight keys at a time, 64 FMAs each against the 16 queries laid out
 *   across one register (no horizontal sums); the mask, a softmax per query; then
 *   out (16, 64) = P^T V, four query rows' accumulators (16 registers) across the keys.
 *
 *   q:    (T, H, D) with strides (q_ts, q_hs, 1);  k, v: (T, HKV, D) with (kv_ts, kv_hs, 1)
 *   out:  (T, H, D) contiguous;  GQA: query head h reads kv head h / (H / HKV)
 * Returns 0; 1 when D is not 64 or AVX-512 is missing (the caller keeps SDPA); 2 when scratch
 * memory could not be allocated.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PREFILL_ROWS 16

int mace_prefill_attention_f32(const float *q, int64_t q_ts, int64_t q_hs, const float *k, const float *v,
                               int64_t kv_ts, int64_t kv_hs, float *out, int64_t T, int64_t H, int64_t HKV,
                               int64_t D, float scale, int num_threads) {
#if defined(__AVX512F__)
    if (D != 64 || H % HKV != 0) return 1;
    const int64_t G = H / HKV, blocks = (T + PREFILL_ROWS - 1) / PREFILL_ROWS;
    const int teams = num_threads > 0 ? num_threads : 1;
    /* per thread: Q^T (64 x 16) and the scores (T x 16) */
    float *scratch = aligned_alloc(64, sizeof(float) * (size_t)teams * (size_t)(64 * 16 + (T + 8) * 16));
    if (scratch == NULL) return 2;
#pragma omp parallel num_threads(teams)
    {
        float *qt = scratch + (size_t)omp_get_thread_num() * (size_t)(64 * 16 + (T + 8) * 16);
        float *s = qt + 64 * 16;
        /* the longest items (the last rows) first, so the dynamic schedule ends even */
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < H * blocks; ++w) {
            const int64_t h = w % H, b = blocks - 1 - w / H, j = h / G;
            const int64_t r0 = b * PREFILL_ROWS, rows = T - r0 < PREFILL_ROWS ? T - r0 : PREFILL_ROWS;
            const int64_t L = r0 + rows; /* keys 0 .. L-1 */
            for (int64_t d = 0; d < 64; ++d)
                for (int64_t i = 0; i < PREFILL_ROWS; ++i)
                    qt[d * 16 + i] = i < rows ? q[(r0 + i) * q_ts + h * q_hs + d] * scale : 0.0f;
            /* scores, eight keys at a time (independent accumulators) */
            int64_t t = 0;
            for (; t + 8 <= L; t += 8) {
                __m512 acc[8];
                for (int u = 0; u < 8; ++u) acc[u] = _mm512_setzero_ps();
                const float *kt = k + t * kv_ts + j * kv_hs;
                for (int64_t d = 0; d < 64; ++d) {
                    const __m512 qd = _mm512_load_ps(qt + d * 16);
                    for (int u = 0; u < 8; ++u) acc[u] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kt[u * kv_ts + d]), acc[u]);
                }
                for (int u = 0; u < 8; ++u) _mm512_store_ps(s + (t + u) * 16, acc[u]);
            }
            for (; t < L; ++t) {
                __m512 acc = _mm512_setzero_ps();
                const float *kt = k + t * kv_ts + j * kv_hs;
                for (int64_t d = 0; d < 64; ++d) acc = _mm512_fmadd_ps(_mm512_load_ps(qt + d * 16), _mm512_set1_ps(kt[d]), acc);
                _mm512_store_ps(s + t * 16, acc);
            }
            /* causal mask (query row r0+i sees keys up to r0+i), softmax down each column */
            for (int64_t tt = r0; tt < L; ++tt)
                for (int64_t i = 0; i < PREFILL_ROWS; ++i)
                    if (tt > r0 + i) s[tt * 16 + i] = -INFINITY;
            __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
            for (int64_t tt = 0; tt < L; ++tt) mx = _mm512_max_ps(mx, _mm512_load_ps(s + tt * 16));
            float mxs[16], sums[16];
            _mm512_storeu_ps(mxs, mx);
            for (int64_t tt = 0; tt < L; ++tt) {
                float *st = s + tt * 16;
#pragma omp simd
                for (int64_t i = 0; i < 16; ++i) st[i] = expf(st[i] - mxs[i]);
                sum = _mm512_add_ps(sum, _mm512_load_ps(st));
            }
            _mm512_storeu_ps(sums, sum);
            /* out rows, four at a time */
            for (int64_t i0 = 0; i0 < rows; i0 += 4) {
                const int64_t n = rows - i0 < 4 ? rows - i0 : 4;
                __m512 acc[4][4];
                for (int a = 0; a < 4; ++a)
                    for (int c = 0; c < 4; ++c) acc[a][c] = _mm512_setzero_ps();
                const int64_t last = r0 + i0 + n; /* these rows see no key past last - 1 */
                for (int64_t tt = 0; tt < last; ++tt) {
                    const float *vt = v + tt * kv_ts + j * kv_hs;
                    const __m512 v0 = _mm512_loadu_ps(vt), v1 = _mm512_loadu_ps(vt + 16);
                    const __m512 v2 = _mm512_loadu_ps(vt + 32), v3 = _mm512_loadu_ps(vt + 48);
                    for (int64_t a = 0; a < n; ++a) {
                        const __m512 p = _mm512_set1_ps(s[tt * 16 + i0 + a]);
                        acc[a][0] = _mm512_fmadd_ps(p, v0, acc[a][0]);
                        acc[a][1] = _mm512_fmadd_ps(p, v1, acc[a][1]);
                        acc[a][2] = _mm512_fmadd_ps(p, v2, acc[a][2]);
                        acc[a][3] = _mm512_fmadd_ps(p, v3, acc[a][3]);
                    }
                }
                for (int64_t a = 0; a < n; ++a) {
                    const __m512 inv = _mm512_set1_ps(1.0f / sums[i0 + a]);
                    float *o = out + ((r0 + i0 + a) * H + h) * 64;
                    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[a][c], inv));
                }
            }
        }
    }
    free(scratch);
    return 0;
#else
    (void)q; (void)q_ts; (void)q_hs; (void)k; (void)v; (void)kv_ts; (void)kv_hs; (void)out; (void)T; (void)H;
    (void)HKV; (void)D; (void)scale; (void)num_threads;
    return 1;
#endif
}
