/* Paged decode attention for fp32 on CPU: one query token per sequence, keys and values read
 * straight out of the block pool (no gather copy), GQA without repeating K/V.
 *
 *   q, out:           (B, H, D)                   contiguous
 *   k_cache, v_cache: (num_blocks, BS, HKV, D)    contiguous
 *   tables:           (B, max_blocks) int64 block ids
 *   lens:             (B,) int64 number of keys each sequence attends over
 *
 * One work item per sequence: each key/value slot is one contiguous (HKV, D) row, read once for
 * all H query heads. Scores, softmax and the weighted sum are fp32, as torch SDPA on CPU.
 * Returns 0, or 1 if a scores buffer could not be allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __attribute__((always_inline)) int
decode(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
       const int64_t *lens, float *out, int64_t B, int64_t H, int64_t HKV, const int64_t D,
       int64_t BS, int64_t max_blocks, float scale, int num_threads) {
    const int64_t G = H / HKV, row = HKV * D;
    int failed = 0;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
        const int64_t L = lens[b];
        const int64_t *table = tables + b * max_blocks;
        const float *qb = q + b * H * D;
        float *ob = out + b * H * D;
        float *scores = malloc(sizeof(float) * (size_t)(H * L));  /* (H, L) */
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        /* 1. scores[h][t] = q_h . k_t[h / G] * scale */
        for (int64_t t = 0; t < L; ++t) {
            const float *k = k_cache + (table[t / BS] * BS + t % BS) * row;
            for (int64_t h = 0; h < H; ++h) {
                const float *qh = qb + h * D, *kh = k + (h / G) * D;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < D; ++d) s += qh[d] * kh[d];
                scores[h * L + t] = s * scale;
            }
        }
        /* 2. softmax over t, per head (expf vectorized through libmvec: -fno-math-errno) */
        for (int64_t h = 0; h < H; ++h) {
            float *sh = scores + h * L, m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
            for (int64_t t = 0; t < L; ++t) m = sh[t] > m ? sh[t] : m;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < L; ++t) {
                sh[t] = expf(sh[t] - m);
                sum += sh[t];
            }
            const float inv = 1.f / sum;
#pragma omp simd
            for (int64_t t = 0; t < L; ++t) sh[t] *= inv;
        }
        /* 3. out_h = sum_t p[h][t] v_t[h / G], reading each value row once */
        memset(ob, 0, sizeof(float) * (size_t)(H * D));
        for (int64_t t = 0; t < L; ++t) {
            const float *v = v_cache + (table[t / BS] * BS + t % BS) * row;
            for (int64_t h = 0; h < H; ++h) {
                const float p = scores[h * L + t], *vh = v + (h / G) * D;
                float *oh = ob + h * D;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) oh[d] += p * vh[d];
            }
        }
        free(scores);
    }
    return failed;
}

/* Head dims known at compile time let the compiler unroll and vectorize the inner loops fully. */
int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int64_t *tables, const int64_t *lens, float *out,
                               int64_t B, int64_t H, int64_t HKV, int64_t D, int64_t BS,
                               int64_t max_blocks, float scale, int num_threads) {
    switch (D) {
    case 64:
        return decode(q, k_cache, v_cache, tables, lens, out, B, H, HKV, 64, BS, max_blocks, scale, num_threads);
    case 128:
        return decode(q, k_cache, v_cache, tables, lens, out, B, H, HKV, 128, BS, max_blocks, scale, num_threads);
    default:
        return decode(q, k_cache, v_cache, tables, lens, out, B, H, HKV, D, BS, max_blocks, scale, num_threads);
    }
}
