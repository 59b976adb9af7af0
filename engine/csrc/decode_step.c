/* One whole decode step of a Llama-family model (Llama, Mistral, Qwen2, Qwen3) in fp32 on CPU:
 * embedding, every decoder layer (RMSNorm, Q/K/V with optional bias and per-head Q/K norm, RoPE,
 * the new K/V written into the block pool, paged attention, O, SwiGLU MLP, LoRA deltas on any
 * projection) and the LM head, for M <= 64 sequences of one new token each. Rows may read
 * different adapters: the step takes one copy of the model's fields per adapter group (the same
 * base weights, each group's LoRA factors) and each row's group.
 *
 * Why one call: a decode step at a few rows is bound by reading the weights (226 MB for the base
 * demo model), and the weights are read here as fast as by the small-linear kernel; what the
 * module-by-module path adds on top (about 150 torch ops and PEFT's Python per step, each a
 * dispatch and a wake-up of the thread team: 6-7 ms of a 17 ms step at batch 1) is gone. All the
 * step runs in one OpenMP parallel region; Q, K and V (and gate and up, and every LoRA A factor
 * reading the same input) are one work list, so a layer has seven barriers, not seven
 * parallel regions per projection.
 *
 * Layouts: weights as nn.Linear keeps them, (N, K) row-major; LoRA A (r, K), B (N, r), delta
 * scale * x A^T B^T; the pool per layer (num_blocks * block_size, HKV, D) for K and for V;
 * cos/sin (M, D) from the model's own rotary embedding (so every RoPE scaling the model knows
 * applies). Sums run in another order than torch's; the precision is the same (fp32 throughout).
 * Returns 0, or 1 when scratch memory could not be allocated.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *W; /* (N, K) */
    const float *b; /* (N,) or NULL */
    const float *A; /* LoRA (r, K) or NULL */
    const float *B; /* LoRA (N, r) */
    float scale;
    int64_t N, K, r;
} mace_lin;

typedef struct {
    const float *input_norm, *post_norm; /* (hidden,) */
    const float *q_norm, *k_norm;        /* (D,) or NULL: Qwen3's per-head norms */
    mace_lin q, k, v, o, gate, up, down;
    float *k_cache, *v_cache; /* (num_slots, HKV, D) */
} mace_layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float eps, attn_scale;
    const float *embed;      /* (vocab, hidden) */
    const float *final_norm; /* (hidden,) */
    mace_lin lm_head;        /* (vocab, hidden) */
    const mace_layer *layers;
} mace_model;

/* one linear of a work list: y (M, N) = x (M, K) W^T + b, tiles of LINEAR_TILE_N outputs */
typedef struct {
    const float *x, *W, *b;
    float *y;
    int64_t N, K;
} mace_job;

/* Adapter groups one step may serve (each row reads one group's LoRA deltas, or none). */
#define MAX_GROUPS 16
/* a work list: up to three projections, each with its LoRA A factor for every group */
#define MAX_JOBS (3 * (1 + MAX_GROUPS))

/* Every job's tiles as one static schedule (the jobs of a list share K, so tiles cost alike). */
static void run_jobs(const mace_job *jobs, int num_jobs, int64_t M) {
    int64_t first[MAX_JOBS + 1];
    first[0] = 0;
    for (int j = 0; j < num_jobs; ++j) first[j + 1] = first[j] + (jobs[j].N + LINEAR_TILE_N - 1) / LINEAR_TILE_N;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < first[num_jobs]; ++t) {
        int j = 0;
        while (t >= first[j + 1]) ++j;
        const mace_job *jb = &jobs[j];
        const int64_t n = (t - first[j]) * LINEAR_TILE_N;
        linear_tile_rows(jb->x, jb->W, jb->b, jb->y, M, jb->K, jb->N, n,
                         (int)(jb->N - n < LINEAR_TILE_N ? jb->N - n : LINEAR_TILE_N));
    }
}

/* One projection of every group: lins[g] is group g's view of it (the same base weights, its
 * own LoRA factors or none). */
typedef struct {
    const mace_lin *lins[MAX_GROUPS];
    int64_t num_groups;
} mace_proj;

/* The base projection on x into y, and each group's LoRA A factor into its slice of t
 * (num_groups, M, t_stride), as jobs. Every row goes through every group's A (r x K each, small
 * beside the base weights); lora_add reads only a row's own group. */
static int add_jobs(mace_job *jobs, int num_jobs, const mace_proj *p, const float *x, float *y, float *t, int64_t M,
                    int64_t t_stride) {
    const mace_lin *base = p->lins[0];
    jobs[num_jobs++] = (mace_job){x, base->W, base->b, y, base->N, base->K};
    for (int64_t g = 0; g < p->num_groups; ++g) {
        const mace_lin *lin = p->lins[g];
        if (lin->A != NULL) jobs[num_jobs++] = (mace_job){x, lin->A, NULL, t + g * M * t_stride, lin->r, lin->K};
    }
    return num_jobs;
}

#define LORA_MAX_RANK 256

/* y += scale * t B^T, the LoRA delta from its A factor t (M, r); no barrier at the end. With
 * AVX-512, sixteen outputs at a time: their B rows gathered once into r registers' worth (B^T's
 * 16-wide columns), then each row of t against them, with no horizontal sums. Against one
 * r-long dot product per output (base demo model, rank 8 on Q/K/V/O, two runs): batch 16
 * 23.4 -> 22.0 and 25.3 -> 23.9 ms a step, batch 1 8.23 -> 8.11 and 6.70 -> 6.61. */
static void lora_add_group(const mace_lin *lin, const float *t, float *y, int64_t M, const int64_t *row_group,
                           int64_t group) {
    if (lin->A == NULL) return;
    const int64_t N = lin->N, r = lin->r;
#if defined(__AVX512F__)
    if (r <= LORA_MAX_RANK) {
        const __m512i rows = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)r));
        const __m512 scale = _mm512_set1_ps(lin->scale);
        __m512 bt[LORA_MAX_RANK];
#pragma omp for schedule(static) nowait
        for (int64_t n0 = 0; n0 < N; n0 += 16) {
            const __mmask16 mask = N - n0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n0)) - 1u);
            const float *b = lin->B + n0 * r;
            for (int64_t k = 0; k < r; ++k) bt[k] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, rows, b + k, 4);
            for (int64_t m = 0; m < M; ++m) {
                if (row_group != NULL && row_group[m] != group) continue;
                const float *tm = t + m * r;
                __m512 acc = _mm512_setzero_ps();
                for (int64_t k = 0; k < r; ++k) acc = _mm512_fmadd_ps(_mm512_set1_ps(tm[k]), bt[k], acc);
                float *ym = y + m * N + n0;
                _mm512_mask_storeu_ps(ym, mask, _mm512_fmadd_ps(scale, acc, _mm512_maskz_loadu_ps(mask, ym)));
            }
        }
        return;
    }
#endif
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; ++n) {
        const float *bn = lin->B + n * r;
        for (int64_t m = 0; m < M; ++m) {
            if (row_group != NULL && row_group[m] != group) continue;
            const float *tm = t + m * r;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < r; ++k) s += tm[k] * bn[k];
            y[m * N + n] += lin->scale * s;
        }
    }
}

/* Every group's LoRA delta into its own rows of y; t as add_jobs filled it. No barrier at the
 * end (the groups write disjoint rows). */
static void lora_add(const mace_proj *p, const float *t, float *y, int64_t M, const int64_t *row_group,
                     int64_t t_stride) {
    for (int64_t g = 0; g < p->num_groups; ++g)
        lora_add_group(p->lins[g], t + g * M * t_stride, y, M, p->num_groups > 1 ? row_group : NULL, g);
}

static inline void rms_norm_row(const float *x, const float *w, float *y, int64_t H, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)H + eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) y[i] = w[i] * (x[i] * inv);
}

static void rms_norm_rows(const float *x, const float *w, float *y, int64_t M, int64_t H, float eps) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) rms_norm_row(x + m * H, w, y + m * H, H, eps);
}

/* x = x * cos + rotate_half(x) * sin, one head (D,) in place */
static inline void rope_head(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; ++d) {
        const float a = x[d], b = x[d + half];
        x[d] = a * cos[d] - b * sin[d];
        x[d + half] = b * cos[d + half] + a * sin[d + half];
    }
}

#if defined(__AVX512F__)
/* attend()'s two passes for head dim 64. Scores: a key row as four registers against each query
 * head (two accumulators, one horizontal sum). Values: up to four heads' accumulators held in
 * registers across the keys. */
static void scores_d64(const float *q, const float *k_cache, const int64_t *table, int64_t L, int64_t j, int64_t G,
                       int64_t HKV, int64_t BS, float *scores) {
    const int64_t row = HKV * 64;
    for (int64_t t = 0; t < L; ++t) {
        const float *k = k_cache + (table[t / BS] * BS + t % BS) * row + j * 64;
        const __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16);
        const __m512 k2 = _mm512_loadu_ps(k + 32), k3 = _mm512_loadu_ps(k + 48);
        for (int64_t g = 0; g < G; ++g) {
            const float *qh = q + (j * G + g) * 64;
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qh), k0);
            __m512 b = _mm512_mul_ps(_mm512_loadu_ps(qh + 16), k1);
            a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 32), k2, a);
            b = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 48), k3, b);
            scores[g * L + t] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        }
    }
}

static void values_d64(const float *scores, const float *v_cache, const int64_t *table, int64_t L, int64_t j,
                       int64_t G, int64_t HKV, int64_t BS, float *out) {
    const int64_t row = HKV * 64;
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int64_t gn = G - g0 < 4 ? G - g0 : 4;
        __m512 acc[4][4];
        for (int64_t g = 0; g < 4; ++g)
            for (int64_t c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < L; ++t) {
            const float *v = v_cache + (table[t / BS] * BS + t % BS) * row + j * 64;
            const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const __m512 v2 = _mm512_loadu_ps(v + 32), v3 = _mm512_loadu_ps(v + 48);
            for (int64_t g = 0; g < gn; ++g) {
                const __m512 p = _mm512_set1_ps(scores[(g0 + g) * L + t]);
                acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
                acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
                acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
            }
        }
        for (int64_t g = 0; g < gn; ++g)
            for (int64_t c = 0; c < 4; ++c) _mm512_storeu_ps(out + (j * G + g0 + g) * 64 + c * 16, acc[g][c]);
    }
}
#endif

/* softmax of each of the G rows of scores (G, L), scaled by ``scale`` first */
static void softmax_rows(float *scores, int64_t G, int64_t L, float scale) {
    for (int64_t g = 0; g < G; ++g) {
        float *sg = scores + g * L, mx = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < L; ++t) mx = sg[t] > mx ? sg[t] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < L; ++t) {
            sg[t] = expf((sg[t] - mx) * scale);
            sum += sg[t];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
    }
}

/* The G query heads of kv head j for sequence b over its L keys in the pool; scores (G, L). */
static void attend(const float *q, const float *k_cache, const float *v_cache, const int64_t *table, int64_t L,
                   int64_t j, int64_t G, int64_t HKV, int64_t D, int64_t BS, float scale, float *scores,
                   float *out) {
#if defined(__AVX512F__)
    if (D == 64) {
        scores_d64(q, k_cache, table, L, j, G, HKV, BS, scores);
        softmax_rows(scores, G, L, scale);
        values_d64(scores, v_cache, table, L, j, G, HKV, BS, out);
        return;
    }
#endif
    const int64_t row = HKV * D;
    for (int64_t t = 0; t < L; ++t) {
        const float *k = k_cache + (table[t / BS] * BS + t % BS) * row + j * D;
        for (int64_t g = 0; g < G; ++g) {
            const float *qh = q + (j * G + g) * D;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qh[d] * k[d];
            scores[g * L + t] = s;
        }
    }
    softmax_rows(scores, G, L, scale);
    for (int64_t g = 0; g < G; ++g) {
        float *oh = out + (j * G + g) * D;
        memset(oh, 0, sizeof(float) * (size_t)D);
        for (int64_t t = 0; t < L; ++t) {
            const float p = scores[g * L + t], *v = v_cache + (table[t / BS] * BS + t % BS) * row + j * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) oh[d] += p * v[d];
        }
    }
}

/* One projection of every group, for layer l (l < 0: the LM head). */
static mace_proj projection(const mace_model *const *models, int64_t num_groups, int64_t l, int which) {
    mace_proj p;
    p.num_groups = num_groups;
    for (int64_t g = 0; g < num_groups; ++g) {
        if (l < 0) {
            p.lins[g] = &models[g]->lm_head;
            continue;
        }
        const mace_layer *L = &models[g]->layers[l];
        const mace_lin *lins[7] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
        p.lins[g] = lins[which];
    }
    return p;
}

enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN };

/* models[g] (g < num_groups <= MAX_GROUPS) are the same model's fields but for the LoRA ones:
 * group g's adapter on each projection (or none); row m reads group row_group[m]'s deltas
 * (row_group may be NULL with one group). ids, positions' cos/sin (M, D), slots (M,) where
 * each new K/V goes, tables (M, max_blocks) and lens (M,) the keys each sequence attends over
 * (its new one included); logits (M, vocab). Returns 2 for a bad group count. */
int mace_decode_step_f32(const mace_model *const *models, int64_t num_groups, const int64_t *row_group,
                         const int64_t *ids, const float *cos, const float *sin, const int64_t *slots,
                         const int64_t *tables, const int64_t *lens, int64_t max_blocks, int64_t block_size, int64_t M,
                         float *logits, int num_threads) {
    if (num_groups < 1 || num_groups > MAX_GROUPS || (num_groups > 1 && row_group == NULL)) return 2;
    const mace_model *model = models[0];
    const int64_t H = model->hidden, NH = model->num_heads, HKV = model->num_kv_heads, D = model->head_dim;
    const int64_t I = model->intermediate, G = NH / HKV, QD = NH * D, KD = HKV * D;
    int64_t max_len = 0, r_max = 1;
    for (int64_t m = 0; m < M; ++m) max_len = lens[m] > max_len ? lens[m] : max_len;
    for (int64_t l = -1; l < model->num_layers; ++l)
        for (int which = 0; which < (l < 0 ? 1 : 7); ++which) {
            const mace_proj p = projection(models, num_groups, l, which);
            for (int64_t g = 0; g < num_groups; ++g)
                if (p.lins[g]->A != NULL && p.lins[g]->r > r_max) r_max = p.lins[g]->r;
        }
    const int64_t wide = QD > H ? QD : H, tg = num_groups * M * r_max;
    /* x, h, q, k, v, attn/out, gate, up, and three LoRA t buffers (every group's) */
    const size_t floats = (size_t)M * (2 * H + QD + 2 * KD + wide + 2 * I) + (size_t)(3 * tg);
    float *buf = malloc(sizeof(float) * floats);
    const int teams = num_threads > 0 ? num_threads : 1;
    float *scores = malloc(sizeof(float) * (size_t)(teams * G * (max_len > 0 ? max_len : 1)));
    if (buf == NULL || scores == NULL) {
        free(buf);
        free(scores);
        return 1;
    }
    float *x = buf, *h = x + M * H, *q = h + M * H, *k = q + M * QD, *v = k + M * KD, *out = v + M * KD;
    float *gate = out + M * wide, *up = gate + M * I, *t0 = up + M * I, *t1 = t0 + tg, *t2 = t1 + tg;

#pragma omp parallel num_threads(teams)
    {
        float *my_scores = scores + (size_t)omp_get_thread_num() * (size_t)(G * max_len);
        mace_job jobs[MAX_JOBS];
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; ++m) memcpy(x + m * H, model->embed + ids[m] * H, sizeof(float) * (size_t)H);

        for (int64_t l = 0; l < model->num_layers; ++l) {
            const mace_layer *L = &model->layers[l];
            const mace_proj pq = projection(models, num_groups, l, P_Q), pk = projection(models, num_groups, l, P_K);
            const mace_proj pv = projection(models, num_groups, l, P_V), po = projection(models, num_groups, l, P_O);
            const mace_proj pg = projection(models, num_groups, l, P_GATE);
            const mace_proj pu = projection(models, num_groups, l, P_UP);
            const mace_proj pd = projection(models, num_groups, l, P_DOWN);
            /* attention block */
            rms_norm_rows(x, L->input_norm, h, M, H, model->eps);
            int n = add_jobs(jobs, 0, &pq, h, q, t0, M, r_max);
            n = add_jobs(jobs, n, &pk, h, k, t1, M, r_max);
            n = add_jobs(jobs, n, &pv, h, v, t2, M, r_max);
            run_jobs(jobs, n, M);
            lora_add(&pq, t0, q, M, row_group, r_max);
            lora_add(&pk, t1, k, M, row_group, r_max);
            lora_add(&pv, t2, v, M, row_group, r_max);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; ++m) {
                const float *c = cos + m * D, *s = sin + m * D;
                for (int64_t hh = 0; hh < NH; ++hh) {
                    float *qh = q + m * QD + hh * D;
                    if (L->q_norm != NULL) rms_norm_row(qh, L->q_norm, qh, D, model->eps);
                    rope_head(qh, c, s, D);
                }
                for (int64_t hh = 0; hh < HKV; ++hh) {
                    float *kh = k + m * KD + hh * D;
                    if (L->k_norm != NULL) rms_norm_row(kh, L->k_norm, kh, D, model->eps);
                    rope_head(kh, c, s, D);
                }
                memcpy(L->k_cache + slots[m] * KD, k + m * KD, sizeof(float) * (size_t)KD);
                memcpy(L->v_cache + slots[m] * KD, v + m * KD, sizeof(float) * (size_t)KD);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t w = 0; w < M * HKV; ++w) {
                const int64_t m = w / HKV, j = w % HKV;
                attend(q + m * QD, L->k_cache, L->v_cache, tables + m * max_blocks, lens[m], j, G, HKV, D,
                       block_size, model->attn_scale, my_scores, out + m * QD);
            }
            n = add_jobs(jobs, 0, &po, out, h, t0, M, r_max);
            run_jobs(jobs, n, M);
            lora_add(&po, t0, h, M, row_group, r_max);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * H; ++i) x[i] += h[i];
            /* MLP block */
            rms_norm_rows(x, L->post_norm, h, M, H, model->eps);
            n = add_jobs(jobs, 0, &pg, h, gate, t0, M, r_max);
            n = add_jobs(jobs, n, &pu, h, up, t1, M, r_max);
            run_jobs(jobs, n, M);
            lora_add(&pg, t0, gate, M, row_group, r_max);
            lora_add(&pu, t1, up, M, row_group, r_max);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * I; ++i) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
            n = add_jobs(jobs, 0, &pd, gate, h, t0, M, r_max);
            run_jobs(jobs, n, M);
            lora_add(&pd, t0, h, M, row_group, r_max);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * H; ++i) x[i] += h[i];
        }
        rms_norm_rows(x, model->final_norm, h, M, H, model->eps);
        const mace_proj ph = projection(models, num_groups, -1, 0);
        int n = add_jobs(jobs, 0, &ph, h, logits, t0, M, r_max);
        run_jobs(jobs, n, M);
        lora_add(&ph, t0, logits, M, row_group, r_max);
    }
    free(buf);
    free(scores);
    return 0;
}
