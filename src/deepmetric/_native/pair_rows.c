/* Kernels of the pair-matrix losses of a batch against itself (deepmetric.losses._native_rows):
   contrastive, SupCon, multi-similarity and ranked list.

   Each loss kernel gets the batch's n x n matrix M = X X^T (row-major, from the caller's GEMM; for
   multi-similarity already exponentiated; for contrastive and SupCon the upper triangle only) and
   the batch's labels as int32 class ids. It adds the loss up and overwrites M with the gradient of
   the terms with respect to M, or with that gradient up to per-row factors it writes alongside
   (contrastive: on the upper triangle only, each unordered pair once). dm_pair_finalize turns the
   latter into the symmetric gradient of both sides of S = X X^T, W = g + g^T, so the caller's
   backward is one GEMM (dL/dX = W X) instead of two; dm_pair_list_grad is the backward from a list
   of the few pairs that have a gradient.

   Single-threaded: on the 2-vCPU machines this was measured on, a second thread gained nothing
   and slowed down while the BLAS threads spin after their GEMM. Vector code uses portable 4-wide
   GNU vector types (no -march flag needed), except SupCon's exponentials (exp_upper: 8 lanes, an
   AVX2 + FMA instance chosen at run time); exp is a polynomial (Cephes expf's coefficients,
   relative error ~2 ulp on [-87, 88]) whose lanes outside a row's set are masked to exactly 0.
   Inputs must be finite (the callers check). Self pairs (j == i) are never terms. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef float v4f_u __attribute__((vector_size(16), aligned(4)));     /* unaligned access */
typedef int32_t v4i_u __attribute__((vector_size(16), aligned(4)));

static inline v4f vset(float a) { return (v4f){a, a, a, a}; }
static inline v4f vload(const float* p) { return *(const v4f_u*)p; }
static inline void vstore(float* p, v4f v) { *(v4f_u*)p = v; }
static inline v4i iload(const int32_t* p) { return *(const v4i_u*)p; }
static inline v4f vsel(v4i mask, v4f a, v4f b) { /* mask lanes -1: a, 0: b */
    return (v4f)(((v4i)a & mask) | ((v4i)b & ~mask));
}
static inline v4f vmax(v4f a, v4f b) { return vsel(a > b, a, b); }
static inline v4f vmin(v4f a, v4f b) { return vsel(a < b, a, b); }
static inline v4f vsqrt(v4f x) {
    return (v4f){sqrtf(x[0]), sqrtf(x[1]), sqrtf(x[2]), sqrtf(x[3])};
}
static inline float hsum(v4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }
static inline float hmax(v4f v) {
    float a = v[0] > v[1] ? v[0] : v[1], b = v[2] > v[3] ? v[2] : v[3];
    return a > b ? a : b;
}
static inline float hmin(v4f v) {
    float a = v[0] < v[1] ? v[0] : v[1], b = v[2] < v[3] ? v[2] : v[3];
    return a < b ? a : b;
}

/* exp(x) without a clamp (for |x| <= 87), on vectors of float type VF and int type VI of any width
   (SET broadcasts a constant): x = n ln2 + r with n = round(x log2 e) (the 1.5 * 2^23 rounding
   trick: default rounding mode), e^r by a degree-6 polynomial (Cephes expf's coefficients), times 2^n.
   1 + r + r^2 (p5 + p4 r + ... + p0 r^5) is evaluated in Estrin's scheme (a shorter dependency chain
   than Horner's: the loops are latency-bound). Defines QUAL VF NAME(VF x). */
#define DEFINE_EXP(QUAL, NAME, VF, VI, SET)                                                        \
    QUAL VF NAME(VF x) {                                                                          \
        const VF magic = SET(12582912.0f);                                                         \
        VF v = x * SET(1.44269504088896341f) + magic;                                              \
        VF t = v - magic;                                                                          \
        VI k = (VI)v - (VI)magic;                                                                  \
        x = x - t * SET(0.693359375f) - t * SET(-2.12194440e-4f);                                  \
        VF x2 = x * x, x4 = x2 * x2;                                                               \
        VF lo = SET(5.0000001201e-1f) + SET(1.6666665459e-1f) * x;                                 \
        VF mid = SET(4.1665795894e-2f) + SET(8.3334519073e-3f) * x;                                \
        VF hi = SET(1.3981999507e-3f) + SET(1.9875691500e-4f) * x;                                 \
        VF y = ((lo + x2 * mid) + x4 * hi) * x2 + x + SET(1.0f);                                   \
        return y * (VF)((k + 127) << 23);                                                          \
    }
DEFINE_EXP(static inline, vexp_unclamped, v4f, v4i, vset)
/* exp(x), 4 lanes, clamped to [-87, 88]. */
static inline v4f vexp(v4f x) { return vexp_unclamped(vmin(vmax(x, vset(-87.0f)), vset(88.0f))); }

/* Lanes of the 4-block at columns j0..j0+3 that are candidate pairs of row i: j != i and j < n. */
static inline v4i lanes_ok(int64_t j0, int64_t i, int64_t n) {
    const v4i lane = {0, 1, 2, 3};
    v4i off = lane + (int32_t)(j0 - i), col = lane + (int32_t)(j0 - n);
    return (off != (v4i){0, 0, 0, 0}) & (col < (v4i){0, 0, 0, 0});
}

/* Lanes of the block j0..j0+3 right of the diagonal of row i and inside the row. */
static inline v4i lanes_upper(int64_t j0, int64_t i, int64_t n) {
    const v4i lane = {0, 1, 2, 3};
    v4i off = lane + (int32_t)(j0 - i), col = lane + (int32_t)(j0 - n);
    return (off > (v4i){0, 0, 0, 0}) & (col < (v4i){0, 0, 0, 0});
}
/* Loads and stores of the 4 columns j..j+3 of a row of n: `full` (a constant at each call site once
   inlined) says they are all inside the row; else the tail block is padded with 0 / label 0 and
   its lanes >= n are masked by lanes_ok. */
#define INLINE static inline __attribute__((always_inline))
INLINE v4f load4(const float* p, int64_t j, int64_t n, int full) {
    if (full || j + 4 <= n) return vload(p + j);
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    memcpy(t, p + j, (size_t)(n - j) * sizeof(float));
    return vload(t);
}
INLINE v4i iload4(const int32_t* p, int64_t j, int64_t n, int full) {
    if (full || j + 4 <= n) return iload(p + j);
    int32_t t[4] = {0, 0, 0, 0};
    memcpy(t, p + j, (size_t)(n - j) * sizeof(int32_t));
    return iload(t);
}
INLINE void store4(float* p, int64_t j, int64_t n, int full, v4f v) {
    if (full || j + 4 <= n) {
        vstore(p + j, v);
        return;
    }
    float t[4];
    vstore(t, v);
    memcpy(p + j, t, (size_t)(n - j) * sizeof(float));
}
/* The block j..j+3 of row i needs no mask: inside the row and not holding column i. */
static inline int plain_block(int64_t j, int64_t i, int64_t n) { return j + 4 <= n && (uint64_t)(i - j) >= 4; }
/* Calls BODY(j, ok, full) for every 4-block of row i: the plain blocks with an all-true mask and
   full = 1 (the compiler specialises the inlined body), two at a time where it can (two independent
   dependency chains in one loop body), the rest with lanes_ok. */
#define FOR_BLOCKS(i, n, BODY)                                                \
    for (int64_t j_ = 0; j_ < (n);) {                                          \
        if (plain_block(j_, (i), (n)) && plain_block(j_ + 4, (i), (n))) {     \
            BODY(j_, ((v4i){-1, -1, -1, -1}), 1);                             \
            BODY(j_ + 4, ((v4i){-1, -1, -1, -1}), 1);                         \
            j_ += 8;                                                          \
        } else {                                                              \
            if (plain_block(j_, (i), (n))) {                                  \
                BODY(j_, ((v4i){-1, -1, -1, -1}), 1);                         \
            } else {                                                          \
                BODY(j_, lanes_ok(j_, (i), (n)), 0);                          \
            }                                                                 \
            j_ += 4;                                                          \
        }                                                                     \
    }
static inline int any4(v4i m) { return (m[0] | m[1] | m[2] | m[3]) != 0; }

/* ---------------------------------------------------------------------------- row normalisation */
/* U = X / max(|x_i|, 1e-12) row by row (X, U: n x d row-major), den[i] = max(|x_i|, 1e-12),
   ok[i] = |x_i| > 1e-12 (the clamp passes the gradient). Returns the number of rows with ok, or -1
   when a norm is not finite (then U, den and ok are incomplete). */
int64_t dm_normalize_rows(const float* X, int64_t n, int64_t d, float* U, float* den, uint8_t* ok) {
    int64_t passed = 0;
    for (int64_t i = 0; i < n; i++) {
        const float* x = X + i * d;
        float* u = U + i * d;
        v4f acc = vset(0.0f);
        int64_t k = 0;
        for (; k + 4 <= d; k += 4) {
            v4f v = vload(x + k);
            acc += v * v;
        }
        float sq = hsum(acc);
        for (; k < d; k++) sq += x[k] * x[k];
        const float norm = sqrtf(sq);
        if (!isfinite(norm)) return -1;
        const float dn = norm > 1e-12f ? norm : 1e-12f;
        den[i] = dn;
        ok[i] = norm > 1e-12f;
        passed += ok[i];
        const float inv = 1.0f / dn;
        for (k = 0; k + 4 <= d; k += 4) vstore(u + k, vload(x + k) * vset(inv));
        for (; k < d; k++) u[k] = x[k] * inv;
    }
    return passed;
}

/* The backward of dm_normalize_rows, G = dL/dU in place (n x d): for each row
   G_i <- (G_i - U_i (U_i . G_i) [ok_i]) * scale / den_i. */
void dm_normalize_backward(float* G, const float* U, const float* den, const uint8_t* ok, int64_t n, int64_t d,
                           float scale) {
    for (int64_t i = 0; i < n; i++) {
        float* g = G + i * d;
        const float* u = U + i * d;
        float radial = 0.0f;
        if (ok[i]) {
            v4f acc = vset(0.0f);
            int64_t k = 0;
            for (; k + 4 <= d; k += 4) acc += vload(u + k) * vload(g + k);
            radial = hsum(acc);
            for (; k < d; k++) radial += u[k] * g[k];
        }
        const float f = scale / den[i];
        const v4f vr = vset(radial), vf = vset(f);
        int64_t k = 0;
        for (; k + 4 <= d; k += 4) vstore(g + k, (vload(g + k) - vload(u + k) * vr) * vf);
        for (; k < d; k++) g[k] = (g[k] - u[k] * radial) * f;
    }
}

/* ------------------------------------------------------------------------------ CPU features */
static int64_t generic_only = 0;
/* Whether the AVX2 + FMA instances (SupCon's exponentials, the upper-mode finalize) are used: compiled
   in (x86-64, GCC or clang), the CPU has both, and the tests have not turned them off. */
static int cpu_has_avx2(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return !generic_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}
/* Tests: 1 makes every kernel take its portable path on every CPU (0: AVX2 where the CPU has it).
   Returns 1 if the AVX2 path is compiled in and this CPU has AVX2 and FMA. */
int64_t dm_force_generic(int64_t on) {
    generic_only = 0;
    const int64_t available = cpu_has_avx2();
    generic_only = on;
    return available;
}

/* ------------------------------------------------------------------------------- symmetric step */
/* Turns the row kernels' output q (rows of the ordered-pair gradient up to per-row factors) into the
   symmetric gradient W = g + g^T, where g_ij = q_ij f_i + [lab_i = lab_j] c_i for j != i, with
   f_i = fp[i] on same-label columns, fn[i] on the others (NULL: 1), c_i = cpos[i] (NULL: 0):
     W_ij = W_ji = q_ij f_i + q_ji f_j + [same] (c_i + c_j),  W_ii = 0.
   With `upper` the row kernel wrote one value per unordered pair, q_ij for i < j (the lower triangle
   is ignored): W_ij = W_ji = q_ij (f_i + f_j) + [same] (c_i + c_j).
   With `diag_rows`, W_ii = -sum_{j != i} W_ij instead of 0 (so that W X = sum_j W_ij (x_j - x_i)).
   In place, in 4 x 4 blocks transposed in registers (a column walk of a 2^k-float-wide matrix would
   thrash a few cache sets). */
typedef struct {
    float* M;
    int64_t n, ld;
    const int32_t* lab;
    const float *fp, *fn, *cpos;
    int64_t upper, diag_rows;
} finalize_args;
/* The functions below take a's flags again as constants (`upper`, `has_f` = fp != NULL, `has_c` =
   cpos != NULL): finalize_rows calls one instance per combination, with the branches compiled out
   (measured: 2x faster than testing a's fields in the loops). */
/* One pair i < j, scalar (diagonal blocks and the edges of the matrix). */
INLINE void finalize_pair(const finalize_args* a, int64_t i, int64_t j, const int upper, const int has_f,
                          const int has_c) {
    float* M = a->M;
    const int64_t ld = a->ld;
    const int same = a->lab[j] == a->lab[i];
    const float fi = has_f ? (same ? a->fp[i] : a->fn[i]) : 1.0f;
    const float fj = has_f ? (same ? a->fp[j] : a->fn[j]) : 1.0f;
    const float qij = M[i * ld + j];
    float v = upper ? qij * (fi + fj) : qij * fi + M[j * ld + i] * fj;
    if (has_c && same) v += a->cpos[i] + a->cpos[j];
    M[i * ld + j] = v;
    M[j * ld + i] = v;
}
/* 4 x 4 transpose of rows r[0..3] in place. */
#if defined(__clang__)
#define SHUF(x, y, a, b, c, d) __builtin_shufflevector(x, y, a, b, c, d)
#else
#define SHUF(x, y, a, b, c, d) __builtin_shuffle(x, y, (v4i){a, b, c, d})
#endif
static inline void transpose4(v4f r[4]) {
    v4f t0 = SHUF(r[0], r[1], 0, 4, 1, 5), t1 = SHUF(r[0], r[1], 2, 6, 3, 7);
    v4f t2 = SHUF(r[2], r[3], 0, 4, 1, 5), t3 = SHUF(r[2], r[3], 2, 6, 3, 7);
    r[0] = SHUF(t0, t2, 0, 1, 4, 5);
    r[1] = SHUF(t0, t2, 2, 3, 6, 7);
    r[2] = SHUF(t1, t3, 0, 1, 4, 5);
    r[3] = SHUF(t1, t3, 2, 3, 6, 7);
}
/* The 4 x 4 block rows i0.., columns j0.. (j0 >= i0 + 4, inside the matrix) and its mirror image. */
INLINE void finalize_block4(const finalize_args* a, int64_t i0, int64_t j0, const int upper, const int has_f,
                            const int has_c) {
    float* M = a->M;
    const int64_t ld = a->ld;
    const v4i lj = iload(a->lab + j0);
    const v4f one = vset(1.0f), zero = vset(0.0f);
    const v4f fpj = has_f ? vload(a->fp + j0) : one, fnj = has_f ? vload(a->fn + j0) : one;
    const v4f cj = has_c ? vload(a->cpos + j0) : zero;
    v4f v[4], t[4] = {vset(0.0f), vset(0.0f), vset(0.0f), vset(0.0f)};
    if (!upper) {
        for (int c = 0; c < 4; c++) t[c] = vload(M + (j0 + c) * ld + i0);
        transpose4(t); /* t[r] = q_{j0.., i0 + r} */
    }
    for (int r = 0; r < 4; r++) {
        const int64_t i = i0 + r;
        const v4i same = lj == (v4i){a->lab[i], a->lab[i], a->lab[i], a->lab[i]};
        const v4f fi = has_f ? vsel(same, vset(a->fp[i]), vset(a->fn[i])) : one;
        const v4f fj = vsel(same, fpj, fnj);
        const v4f q = vload(M + i * ld + j0);
        v4f w = upper ? q * (fi + fj) : q * fi + t[r] * fj;
        if (has_c) w += vsel(same, vset(a->cpos[i]) + cj, zero);
        v[r] = w;
        vstore(M + i * ld + j0, w);
    }
    transpose4(v);
    for (int c = 0; c < 4; c++) vstore(M + (j0 + c) * ld + i0, v[c]);
}
/* The upper triangle and its mirror image, in 8 x 8 tiles of 4 x 4 blocks (the diagonal blocks and the
   columns past the last full block pair by pair). Measured at n = 512: 30 % faster than whole 4-row
   panels, whose mirror-image stores touch a new cache line per block; 16- and 32-wide tiles lie
   in between. */
#define FINALIZE_TILE 8
/* What the w x w blocks leave (w a power of 2): the diagonal blocks, the columns past the last
   multiple of w, and the zero diagonal, pair by pair. */
INLINE void finalize_edges(const finalize_args* a, const int64_t w, const int upper, const int has_f,
                           const int has_c) {
    const int64_t n = a->n, nw = n & ~(w - 1);
    for (int64_t i0 = 0; i0 < n; i0 += w) {
        const int64_t i1 = i0 + w < n ? i0 + w : n;
        for (int64_t i = i0; i < i1; i++) {
            a->M[i * a->ld + i] = 0.0f;
            for (int64_t j = i + 1; j < i1; j++) finalize_pair(a, i, j, upper, has_f, has_c);
            for (int64_t j = (nw > i1 ? nw : i1); j < n; j++) finalize_pair(a, i, j, upper, has_f, has_c);
        }
    }
}
INLINE void finalize_rows_body(const finalize_args* a, const int upper, const int has_f, const int has_c) {
    const int64_t n4 = a->n & ~(int64_t)3;
    finalize_edges(a, 4, upper, has_f, has_c);
    for (int64_t t0 = 0; t0 < n4; t0 += FINALIZE_TILE) {
        const int64_t t1 = t0 + FINALIZE_TILE < n4 ? t0 + FINALIZE_TILE : n4;
        for (int64_t u0 = t0; u0 < n4; u0 += FINALIZE_TILE) {
            const int64_t u1 = u0 + FINALIZE_TILE < n4 ? u0 + FINALIZE_TILE : n4;
            for (int64_t i0 = t0; i0 < t1; i0 += 4)
                for (int64_t j0 = (u0 > i0 + 4 ? u0 : i0 + 4); j0 < u1; j0 += 4)
                    finalize_block4(a, i0, j0, upper, has_f, has_c);
        }
    }
}
/* Every (upper, has_f, has_c) combination, in the order of finalize_rows' tables. */
#define FINALIZE_FLAGS(X) X(0, 0, 0) X(0, 0, 1) X(0, 1, 0) X(0, 1, 1) X(1, 0, 0) X(1, 0, 1) X(1, 1, 0) X(1, 1, 1)
#define FINALIZE_INSTANCE(U, F, C) \
    static void finalize_##U##F##C(const finalize_args* a) { finalize_rows_body(a, U, F, C); }
FINALIZE_FLAGS(FINALIZE_INSTANCE)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DM_AVX2 __attribute__((target("avx2,fma")))
/* AVX2: 8 x 8 blocks, transposed in registers (the 4 x 4 path's mirror-image loads and stores touch
   half as many bytes of a cache line each). Rows and columns past the last multiple of 8, and the
   diagonal blocks, pair by pair. */
static inline DM_AVX2 void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int k = 0; k < 4; k++) {
        t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; k++) {
        u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
        r[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
    }
}
static inline __attribute__((always_inline)) DM_AVX2 void finalize_block8(const finalize_args* a, int64_t i0,
                                                                          int64_t j0, const int upper,
                                                                          const int has_f, const int has_c) {
    float* M = a->M;
    const int64_t ld = a->ld;
    const __m256i lj = _mm256_loadu_si256((const __m256i*)(a->lab + j0));
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 fpj = has_f ? _mm256_loadu_ps(a->fp + j0) : one, fnj = has_f ? _mm256_loadu_ps(a->fn + j0) : one;
    const __m256 cj = has_c ? _mm256_loadu_ps(a->cpos + j0) : _mm256_setzero_ps();
    __m256 v[8], t[8];
    if (!upper) {
        for (int c = 0; c < 8; c++) t[c] = _mm256_loadu_ps(M + (j0 + c) * ld + i0);
        transpose8(t); /* t[r] = q_{j0.., i0 + r} */
    }
    for (int r = 0; r < 8; r++) {
        const int64_t i = i0 + r;
        const __m256 same = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lj, _mm256_set1_epi32(a->lab[i])));
        const __m256 fi = has_f ? _mm256_blendv_ps(_mm256_set1_ps(a->fn[i]), _mm256_set1_ps(a->fp[i]), same) : one;
        const __m256 fj = _mm256_blendv_ps(fnj, fpj, same);
        const __m256 q = _mm256_loadu_ps(M + i * ld + j0);
        __m256 w = upper ? _mm256_mul_ps(q, _mm256_add_ps(fi, fj)) : _mm256_fmadd_ps(q, fi, _mm256_mul_ps(t[r], fj));
        if (has_c) w = _mm256_add_ps(w, _mm256_and_ps(same, _mm256_add_ps(_mm256_set1_ps(a->cpos[i]), cj)));
        _mm256_storeu_ps(M + i * ld + j0, w);
        v[r] = w;
    }
    transpose8(v);
    for (int c = 0; c < 8; c++) _mm256_storeu_ps(M + (j0 + c) * ld + i0, v[c]);
}
static inline __attribute__((always_inline)) DM_AVX2 void finalize8_body(const finalize_args* a, const int upper,
                                                                        const int has_f, const int has_c) {
    const int64_t n8 = a->n & ~(int64_t)7;
    finalize_edges(a, 8, upper, has_f, has_c);
    for (int64_t i0 = 0; i0 < n8; i0 += 8)
        for (int64_t j0 = i0 + 8; j0 < n8; j0 += 8) finalize_block8(a, i0, j0, upper, has_f, has_c);
}
#define FINALIZE8_INSTANCE(U, F, C) \
    static DM_AVX2 void finalize8_##U##F##C(const finalize_args* a) { finalize8_body(a, U, F, C); }
FINALIZE_FLAGS(FINALIZE8_INSTANCE)
#endif
#define FINALIZE_NAME(U, F, C) finalize_##U##F##C,
#define FINALIZE8_NAME(U, F, C) finalize8_##U##F##C,
static void finalize_rows(const finalize_args* a) {
    static void (*const instance[8])(const finalize_args*) = {FINALIZE_FLAGS(FINALIZE_NAME)};
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    static void (*const instance8[8])(const finalize_args*) = {FINALIZE_FLAGS(FINALIZE8_NAME)};
    if (cpu_has_avx2()) {
        instance8[(a->upper ? 4 : 0) + (a->fp ? 2 : 0) + (a->cpos ? 1 : 0)](a);
        return;
    }
#endif
    instance[(a->upper ? 4 : 0) + (a->fp ? 2 : 0) + (a->cpos ? 1 : 0)](a);
}
void dm_pair_finalize(float* M, int64_t n, int64_t ld, const int32_t* lab, const float* fp, const float* fn,
                      const float* cpos, int64_t upper, int64_t diag_rows) {
    finalize_args a = {M, n, ld, lab, fp, fn, cpos, upper, diag_rows};
    finalize_rows(&a);
    if (!diag_rows) return;
    for (int64_t i = 0; i < n; i++) { /* W_ii is 0 here */
        float* row = M + i * ld;
        v4f acc = vset(0.0f);
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) acc += vload(row + j);
        float total = hsum(acc);
        for (; j < n; j++) total += row[j];
        row[i] = -total;
    }
}

/* The gradient of a loss from a list of pairs (i_k, j_k, c_k), each unordered pair once, with
   dL/dx_i = scale sum_j (c_ij + c_ji) (x_i - x_j) and c symmetric: for every entry, with
   w = 2 scale c: G_i += w (x_i - x_j), G_j += w (x_j - x_i), done as G_i -= w x_j, G_j -= w x_i and
   r_i += w, r_j += w, then G += r x row by row (two row updates per entry instead of four). G and
   X are n x D row-major; G is overwritten.
   With lab (not NULL), every unordered same-label pair {i, j} also has c_ij = cpos without being
   listed: with w = 2 scale cpos, G_i += w sum_{j in class(i)} (x_i - x_j) = w (K x_i - S) (K, S the
   size and the row sum of i's class), by class sums in O(n D) instead of a list entry per pair.
   Returns 0, or -1 if the scratch could not be allocated (G untouched). */
static int64_t dense_ids(const int64_t* lab64, const int32_t* lab32, int64_t n, int64_t* out);
/* The list's entries: G_i -= w x_j, G_j -= w x_i, r_i += w, r_j += w. A run of entries with the same
   i (the kernels list row by row) adds its G_i terms up in acc (D floats, stays in L1) and writes
   G_i once, so each entry reads x_j and updates G_j only. AVX2 + FMA where the CPU has them. */
INLINE void list_entries_body(const int32_t* ri, const int32_t* rj, const float* c, int64_t count,
                              const float* X, int64_t D, float* G, float* r, float scale, float* restrict acc) {
    for (int64_t k = 0; k < count;) {
        const int64_t i = ri[k];
        const float* restrict xi = X + i * D;
        memset(acc, 0, (size_t)D * sizeof(float));
        float rsum = 0.0f;
        for (; k < count && ri[k] == i; k++) {
            const float w = 2.0f * scale * c[k];
            const float* restrict xj = X + (int64_t)rj[k] * D;
            float* restrict gj = G + (int64_t)rj[k] * D;
            rsum += w;
            r[rj[k]] += w;
            for (int64_t t = 0; t < D; t++) {
                acc[t] -= w * xj[t];
                gj[t] -= w * xi[t];
            }
        }
        r[i] += rsum;
        float* restrict gi = G + i * D;
        for (int64_t t = 0; t < D; t++) gi[t] += acc[t];
    }
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) static void list_entries_avx2(const int32_t* ri, const int32_t* rj,
                                                                   const float* c, int64_t count, const float* X,
                                                                   int64_t D, float* G, float* r, float scale,
                                                                   float* acc) {
    list_entries_body(ri, rj, c, count, X, D, G, r, scale, acc);
}
#endif
static void list_entries(const int32_t* ri, const int32_t* rj, const float* c, int64_t count, const float* X,
                         int64_t D, float* G, float* r, float scale, float* acc) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (cpu_has_avx2()) {
        list_entries_avx2(ri, rj, c, count, X, D, G, r, scale, acc);
        return;
    }
#endif
    list_entries_body(ri, rj, c, count, X, D, G, r, scale, acc);
}
int dm_pair_list_grad(const int32_t* ri, const int32_t* rj, const float* c, int64_t count, const float* X,
                      int64_t n, int64_t D, float* G, float scale, const int32_t* lab, float cpos) {
    float* r = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    if (!r) return -1;
    float* sums = NULL;
    int64_t* group = NULL;
    if (lab) { /* the class sums S (classes x D) and the class sizes, folded into r */
        group = malloc((size_t)(2 * (n > 0 ? n : 1)) * sizeof(int64_t));
        const int64_t classes = group ? dense_ids(NULL, lab, n, group) : -1;
        sums = classes >= 0 ? calloc((size_t)(classes * D + 1), sizeof(float)) : NULL;
        if (!sums) {
            free(r), free(group);
            return -1;
        }
        int64_t* size = group + n;
        for (int64_t k = 0; k < classes; k++) size[k] = 0;
        for (int64_t i = 0; i < n; i++) {
            const float* restrict xi = X + i * D;
            float* restrict si = sums + group[i] * D;
            for (int64_t t = 0; t < D; t++) si[t] += xi[t];
            size[group[i]]++;
        }
        const float w = 2.0f * scale * cpos;
        for (int64_t i = 0; i < n; i++) r[i] = w * (float)size[group[i]];
    }
    float* acc = malloc((size_t)(D > 0 ? D : 1) * sizeof(float));
    if (!acc) {
        free(r), free(sums), free(group);
        return -1;
    }
    memset(G, 0, (size_t)(n * D) * sizeof(float));
    list_entries(ri, rj, c, count, X, D, G, r, scale, acc);
    free(acc);
    const float wpos = 2.0f * scale * cpos;
    for (int64_t i = 0; i < n; i++) {
        const float ri_ = r[i];
        const float* restrict xi = X + i * D;
        float* restrict gi = G + i * D;
        if (sums) {
            const float* restrict si = sums + group[i] * D;
            for (int64_t t = 0; t < D; t++) gi[t] += ri_ * xi[t] - wpos * si[t];
        } else if (ri_ != 0.0f) {
            for (int64_t t = 0; t < D; t++) gi[t] += ri_ * xi[t];
        }
    }
    free(r), free(sums), free(group);
    return 0;
}

/* --------------------------------------------------------------------------------------- SupCon */
/* SupCon (L^sup_out), M = S = Z Z^T of unit rows, t the temperature. Row i:
     A(i) = {j != i}, P(i) = {j != i : lab_j = lab_i},
     l_i = log sum_{A(i)} exp(S_ij/t) - (1/|P(i)|) sum_{P(i)} S_ij/t   (rows with |P(i)| > 0),
     dl_i/dS_ij = (1/t) (softmax_ij - [j in P(i)]/|P(i)|).
   The exponentials are shifted by the row's maximum m_i over A(i) (one more pass): this kernel is
   for small temperatures (t < 1/40), where exp(S/t) could overflow or underflow (dm_supcon_upper
   does t >= 1/40).
   Writes e_ij = exp((S_ij - m_i)/t) over the row and the factors of dm_pair_finalize:
   fp_i = fn_i = 1/(t den_i), cpos_i = -1/(t |P(i)|) (all 0 on rows without positives).
   stats[0] += sum_i l_i, stats[1] += #{i : |P(i)| > 0}. */
typedef struct {
    float* M;
    int64_t n, ld;
    const int32_t* lab;
    float inv_t;
    float *f, *cpos;
} supcon_args;
static void supcon_rows(const supcon_args* a, double* stats) {
    const int64_t n = a->n;
    const v4f zero = vset(0.0f), ninf = vset(-INFINITY), vit = vset(a->inv_t);
    for (int64_t i = 0; i < n; i++) {
        float* s = a->M + i * a->ld;
        const v4i li = {a->lab[i], a->lab[i], a->lab[i], a->lab[i]};
        v4f vm = ninf;
        for (int64_t j = 0; j < n; j += 4) vm = vmax(vm, vsel(lanes_ok(j, i, n), load4(s, j, n, 0), ninf));
        const float m = hmax(vm);
        const v4f vmx = vset(m);
        v4f vden = zero, vps = zero;
        v4i vnp = {0, 0, 0, 0};
#define SUPCON_BLOCK(j, ok, full)                                  \
    {                                                              \
        v4f v = load4(s, j, n, full);                              \
        v4i pos = (iload4(a->lab, j, n, full) == li) & (ok);       \
        v4f e = vsel((ok), vexp((v - vmx) * vit), zero);           \
        vden += e;                                                 \
        vps += vsel(pos, v, zero);                                 \
        vnp -= pos;                                                \
        store4(s, j, n, full, e);                                  \
    }
        FOR_BLOCKS(i, n, SUPCON_BLOCK)
#undef SUPCON_BLOCK
        const int64_t np = (int64_t)vnp[0] + vnp[1] + vnp[2] + vnp[3];
        const double den = hsum(vden);
        if (np == 0 || !(den > 0.0)) {
            a->f[i] = a->cpos[i] = 0.0f;
            continue;
        }
        stats[0] += (double)m * a->inv_t + log(den) - (double)hsum(vps) * a->inv_t / (double)np;
        stats[1] += 1.0;
        a->f[i] = (float)(a->inv_t / den);
        a->cpos[i] = (float)(-a->inv_t / (double)np);
    }
}
void dm_supcon_rows(float* M, int64_t n, int64_t ld, const int32_t* lab, float inv_t, float* f, float* cpos,
                    double* stats) {
    supcon_args a = {M, n, ld, lab, inv_t, f, cpos};
    supcon_rows(&a, stats);
}

/* Dense class ids of n labels (int64 lab64, or int32 lab32 when lab64 is NULL): out[i] == out[j] iff the
   labels are equal, ids 0, 1, ... in order of first appearance (open addressing in a table of at
   least 2n slots). Returns the number of classes, or -1 if the table could not be allocated. */
static int64_t dense_ids(const int64_t* lab64, const int32_t* lab32, int64_t n, int64_t* out) {
    int64_t size = 16, classes = 0;
    while (size < 2 * n) size *= 2;
    int64_t* keys = malloc((size_t)size * sizeof(int64_t));
    int64_t* ids = malloc((size_t)size * sizeof(int64_t));
    if (!keys || !ids) {
        free(keys), free(ids);
        return -1;
    }
    for (int64_t h = 0; h < size; h++) ids[h] = -1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t key = lab64 ? lab64[i] : (int64_t)lab32[i];
        const uint64_t k = (uint64_t)key;
        int64_t h = (int64_t)(((k ^ (k >> 32)) * 0x9E3779B97F4A7C15ull) >> 32) & (size - 1);
        while (ids[h] >= 0 && keys[h] != key) h = (h + 1) & (size - 1);
        if (ids[h] < 0) {
            keys[h] = key;
            ids[h] = classes++;
        }
        out[i] = ids[h];
    }
    free(keys), free(ids);
    return classes;
}
/* dense_ids of int64 labels as int32 (deepmetric._native.labels.dense_label_ids). */
int64_t dm_dense_labels(const int64_t* lab, int64_t n, int32_t* out) {
    int64_t* ids = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    const int64_t classes = ids ? dense_ids(lab, NULL, n, ids) : -1;
    for (int64_t i = 0; classes >= 0 && i < n; i++) out[i] = (int32_t)ids[i];
    free(ids);
    return classes;
}

/* The paper's N-pair batch in a labelled batch (deepmetric._native.labels.first_pair_rows): for each
   class with at least two samples, in order of first appearance, the batch indices of its first two
   samples: rows[0..m) the first ones (anchors), rows[m..2m) the second ones (positives), rows of
   length n. Returns m, or -1 if out of memory. */
int64_t dm_first_pairs(const int64_t* lab, int64_t n, int64_t* rows) {
    int64_t* block = malloc((size_t)(3 * (n > 0 ? n : 1)) * sizeof(int64_t));
    const int64_t classes = block ? dense_ids(lab, NULL, n, block) : -1;
    if (classes < 0) {
        free(block);
        return -1;
    }
    int64_t *a = block + n, *p = block + 2 * n, m = 0;
    for (int64_t c = 0; c < classes; c++) a[c] = p[c] = -1;
    for (int64_t i = 0; i < n; i++) {
        const int64_t c = block[i];
        if (a[c] < 0)
            a[c] = i;
        else if (p[c] < 0)
            p[c] = i;
    }
    for (int64_t c = 0; c < classes; c++)
        if (p[c] >= 0) a[m] = a[c], p[m++] = p[c];
    memcpy(rows, a, (size_t)m * sizeof(int64_t));
    memcpy(rows + m, p, (size_t)m * sizeof(int64_t));
    free(block);
    return m;
}

/* The N-pair batch's rows (deepmetric.losses.n_pair), from x (rows of d floats) and rows as written
   by dm_first_pairs (anchors rows[0..m), positives rows[m..2m)): pa = [P; A] (2m x d, P the
   positives' rows, A the anchors'), pt = P^T (d x m). And the scatter of the gradient's rows:
   out (n x d) = 0 except out[rows[r]] = src[r] (rows distinct, each in [0, n)). */
/* dst (c x r, row stride ldd) = src^T (src: r x c, row stride lds), in 8 x 8 tiles. */
static void transpose(const float* src, int64_t r, int64_t c, int64_t lds, float* dst, int64_t ldd) {
    for (int64_t i0 = 0; i0 < r; i0 += 8)
        for (int64_t j0 = 0; j0 < c; j0 += 8) {
            const int64_t i1 = i0 + 8 < r ? i0 + 8 : r, j1 = j0 + 8 < c ? j0 + 8 : c;
            for (int64_t j = j0; j < j1; j++)
                for (int64_t i = i0; i < i1; i++) dst[j * ldd + i] = src[i * lds + j];
        }
}
void dm_npair_gather(const float* x, const int64_t* rows, int64_t m, int64_t d, float* pa, float* pt) {
    for (int64_t r = 0; r < m; r++) {
        memcpy(pa + r * d, x + rows[m + r] * d, (size_t)d * sizeof(float));
        memcpy(pa + (m + r) * d, x + rows[r] * d, (size_t)d * sizeof(float));
    }
    transpose(pa, m, d, d, pt, m);
}
void dm_scatter_rows(const float* src, const int64_t* rows, int64_t k, int64_t d, float* out, int64_t n) {
    memset(out, 0, (size_t)(n * d) * sizeof(float));
    for (int64_t r = 0; r < k; r++) memcpy(out + rows[r] * d, src + r * d, (size_t)d * sizeof(float));
}

/* The batch's classes: group[i] in [0, G) (dense_ids), the members of class g are
   order[start[g] .. start[g+1]) (increasing), by a counting sort: O(n). One malloc'ed block holds the
   three arrays (int64: group n, start n + 1, order n); NULL if out of memory. */
static int64_t* label_groups(const int32_t* lab, int64_t n, int64_t** start, int64_t** order) {
    int64_t* block = calloc((size_t)(3 * n + 2), sizeof(int64_t));
    if (!block) return NULL;
    int64_t *group = block, *st = block + n, *ord = block + 2 * n + 1;
    const int64_t classes = dense_ids(NULL, lab, n, group);
    if (classes < 0) {
        free(block);
        return NULL;
    }
    for (int64_t i = 0; i < n; i++) st[group[i] + 1]++;
    for (int64_t g = 0; g < classes; g++) st[g + 1] += st[g];
    for (int64_t i = 0; i < n; i++) ord[st[group[i]]++] = i; /* st[g] now holds the end of class g */
    for (int64_t g = classes; g > 0; g--) st[g] = st[g - 1];
    st[0] = 0;
    *start = st;
    *order = ord;
    return group;
}

/* ------------------------------------------------------------ exponentials of the upper triangle */
/* 8-lane vectors: one AVX2 instruction each where the CPU has AVX2 and FMA (checked at run time on
   x86-64, see exp_upper), two SSE instructions (or the target's equivalent) elsewhere. Functions
   taking or returning them are always inlined (no 32-byte vector crosses a call: -Wpsabi's ABI note
   does not apply). */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
#define V8(a) ((v8f){a, a, a, a, a, a, a, a})
/* vexp on 8 lanes, without the clamp (the callers' arguments are at most 40 in size); with FMA the
   products and sums contract. */
DEFINE_EXP(INLINE, vexp8, v8f, v8i, V8)
/* Columns jb..jb+7 of row s (inside the row), lanes jb + q >= lo only: s_j <- exp(scale s_j), added to
   *acc and to col[j]; the other lanes are left as they are. */
INLINE void exp_block8(float* s, float* col, int64_t jb, int64_t lo, v8f vs, v8f* acc) {
    const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const v8i on = lane >= (v8i){0, 0, 0, 0, 0, 0, 0, 0} + (int32_t)(lo - jb);
    const v8f old = *(const v8f_u*)(s + jb);
    const v8f e = (v8f)((v8i)vexp8(old * vs) & on);
    *(v8f_u*)(s + jb) = (v8f)((v8i)e | ((v8i)old & ~on));
    *(v8f_u*)(col + jb) += e;
    *acc += e;
}
/* M_ij <- exp(scale M_ij) for j > i (nothing else is written; the masked lanes of a row's first and
   last blocks are read and discarded), row[i] = the sum of row i's new entries, col[j] = that of
   column j's. Row i starts at the 8-block holding column i + 1 (aligned when the rows are). */
INLINE void exp_upper_body(float* M, int64_t n, int64_t ld, float scale, float* row, float* col) {
    memset(col, 0, (size_t)n * sizeof(float));
    const v8f vs = V8(scale);
    for (int64_t i = 0; i < n; i++) {
        float* s = M + i * ld;
        v8f acc = V8(0.0f);
        int64_t j = (i + 1) & ~(int64_t)7;
        if (n < 8) { /* a tiny matrix */
            float total = 0.0f;
            for (int64_t q = i + 1; q < n; q++) {
                s[q] = expf(scale * s[q]);
                col[q] += s[q];
                total += s[q];
            }
            row[i] = total;
            continue;
        }
        if (j + 8 <= n) {
            exp_block8(s, col, j, i + 1, vs, &acc);
            for (j += 8; j + 8 <= n; j += 8) exp_block8(s, col, j, j, vs, &acc);
        } else {
            j = i + 1;
        }
        if (j < n) exp_block8(s, col, n - 8, j, vs, &acc); /* the last columns, in the row's last 8 */
        row[i] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) static void exp_upper_avx2(float* M, int64_t n, int64_t ld, float scale,
                                                                float* row, float* col) {
    exp_upper_body(M, n, ld, scale, row, col);
}
#endif
static void exp_upper(float* M, int64_t n, int64_t ld, float scale, float* row, float* col) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (cpu_has_avx2()) {
        exp_upper_avx2(M, n, ld, scale, row, col);
        return;
    }
#endif
    exp_upper_body(M, n, ld, scale, row, col);
}

/* ------------------------------------------------------------------ N-pair cross-entropy rows */
/* N-pair cross-entropy (deepmetric.losses.n_pair), S = A P^T (n x n, row stride ld):
     returns sum_i [log sum_k exp(S_ik) - S_ii]   (each row shifted by its maximum; NaN if S holds a
     NaN or an infinity, S then left partly rewritten),
     S <- scale (softmax(S) - I)   (row-wise softmax), the loss's gradient w.r.t. S for scale = 1/n,
     and its transpose in GT (n x n, contiguous) where GT is not NULL.
   8-lane blocks (AVX2 + FMA where the CPU has them, as exp_upper), the last n mod 8 columns scalar. */
INLINE double npair_rows_body(float* S, int64_t n, int64_t ld, float scale, float* GT) {
    double total = 0.0;
    const int64_t n8 = n & ~(int64_t)7;
    const v8f lowest = V8(-87.0f);
    for (int64_t i = 0; i < n; i++) {
        float* s = S + i * ld;
        v8f vm = V8(-INFINITY), vbad = V8(0.0f);
        float m = -INFINITY, bad = 0.0f;
        for (int64_t j = 0; j < n8; j += 8) {
            const v8f v = *(const v8f_u*)(s + j);
            vm = (v8f)(((v8i)v & (v > vm)) | ((v8i)vm & ~(v > vm)));
            vbad += v - v; /* NaN in a lane that met a NaN or an infinity */
        }
        for (int64_t j = n8; j < n; j++) {
            m = s[j] > m ? s[j] : m;
            bad += s[j] - s[j];
        }
        for (int q = 0; q < 8; q++) {
            m = vm[q] > m ? vm[q] : m;
            bad += vbad[q];
        }
        if (!(bad == 0.0f)) return NAN;
        const float sii = s[i];
        const v8f vmx = V8(m);
        v8f vden = V8(0.0f);
        for (int64_t j = 0; j < n8; j += 8) {
            v8f x = *(const v8f_u*)(s + j) - vmx;
            x = (v8f)(((v8i)x & (x > lowest)) | ((v8i)lowest & ~(x > lowest))); /* vexp8 takes >= -87 */
            const v8f e = vexp8(x);
            vden += e;
            *(v8f_u*)(s + j) = e;
        }
        double den = ((vden[0] + vden[1]) + (vden[2] + vden[3])) + ((vden[4] + vden[5]) + (vden[6] + vden[7]));
        for (int64_t j = n8; j < n; j++) {
            s[j] = expf(s[j] - m);
            den += s[j];
        }
        total += (double)m + log(den) - (double)sii;
        const float f = (float)(scale / den);
        const v8f vf = V8(f);
        for (int64_t j = 0; j < n8; j += 8) *(v8f_u*)(s + j) *= vf;
        for (int64_t j = n8; j < n; j++) s[j] *= f;
        s[i] -= scale;
    }
    if (GT) transpose(S, n, n, ld, GT, n);
    return total;
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) static double npair_rows_avx2(float* S, int64_t n, int64_t ld, float scale,
                                                                   float* GT) {
    return npair_rows_body(S, n, ld, scale, GT);
}
#endif
double dm_npair_rows(float* S, int64_t n, int64_t ld, float scale, float* GT) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (cpu_has_avx2()) return npair_rows_avx2(S, n, ld, scale, GT);
#endif
    return npair_rows_body(S, n, ld, scale, GT);
}

/* SupCon from the upper triangle of S = U U^T (U: the n x d unit rows; the lower triangle of M is not
   read), for |S/t| <= 40 (t >= 1/40: no shift needed, nothing overflows or underflows). With
   e_ij = exp(S_ij/t) computed once per unordered pair (exp_upper), row i with |P(i)| > 0 has
     den_i = sum_{j != i} e_ij,  l_i = log den_i - (1/(t |P(i)|)) sum_{P(i)} S_ij,
   and dl_i/dS_ij = f_i e_ij + [j in P(i)] c_i with f_i = 1/(t den_i), c_i = -1/(t |P(i)|) (both 0 for
   rows without positives). With `grad`, M is overwritten with the gradient of both sides,
     W_ij = W_ji = e_ij (f_i + f_j) + [lab_i = lab_j] (c_i + c_j),  W_ii = 0
   (dm_pair_finalize's upper mode). The positives' similarities are summed as u_i . (sum of i's class
   - u_i), O(n d), instead of reading |P(i)| scattered entries of M per row. stats[0] += sum_i l_i,
   stats[1] += #{i : |P(i)| > 0}; stats[2] = -1 if the scratch (class lists, row factors) could not be
   allocated (nothing else is done then). */
void dm_supcon_upper(float* M, int64_t n, int64_t ld, const int32_t* lab, const float* U, int64_t d, float inv_t,
                     int64_t grad, double* stats) {
    int64_t *start, *order;
    int64_t* group = label_groups(lab, n, &start, &order);
    float* f = malloc((size_t)(3 * n + d + 1) * sizeof(float));
    if (!group || !f) {
        free(group), free(f);
        stats[2] = -1.0;
        return;
    }
    float *c = f + n, *pos = f + 2 * n, *sum = f + 3 * n;
    for (int64_t t = 0; t < n;) { /* pos[i] = sum_{P(i)} S_ij, class by class */
        const int64_t t1 = start[group[order[t]] + 1];
        memset(sum, 0, (size_t)d * sizeof(float));
        for (int64_t q = t; q < t1; q++)
            for (int64_t k = 0; k < d; k++) sum[k] += U[order[q] * d + k];
        for (int64_t q = t; q < t1; q++) {
            const float* u = U + order[q] * d;
            v4f vacc = vset(0.0f);
            int64_t k = 0;
            for (; k + 4 <= d; k += 4) vacc += vload(u + k) * (vload(sum + k) - vload(u + k));
            float acc = hsum(vacc);
            for (; k < d; k++) acc += u[k] * (sum[k] - u[k]);
            pos[order[q]] = acc;
        }
        t = t1;
    }
    exp_upper(M, n, ld, inv_t, f, c); /* f: the sums right of the diagonal, c: those above it */
    for (int64_t i = 0; i < n; i++) {
        const int64_t np = start[group[i] + 1] - start[group[i]] - 1;
        const double den = (double)f[i] + (double)c[i];
        if (np == 0 || !(den > 0.0)) {
            f[i] = c[i] = 0.0f;
            continue;
        }
        stats[0] += log(den) - (double)inv_t * (double)pos[i] / (double)np;
        stats[1] += 1.0;
        f[i] = (float)(inv_t / den);
        c[i] = (float)(-inv_t / (double)np);
    }
    free(group);
    if (grad) {
        finalize_args a = {M, n, ld, lab, f, f, c, 1, 0};
        finalize_rows(&a);
    }
    free(f);
}

/* ----------------------------------------------------------------------------- multi-similarity */
/* Multi-similarity from E_ij = exp(beta S_ij) (the caller's GEMM scaled by beta and vectorised exp;
   beta <= 80, so E and its row sums stay finite), M = E in, the symmetric gradient of both sides out.
   Row i: s-_i = sum_{lab_j != lab_i} exp(beta (S_ij - base)) = e^{-beta base} sum E_ij,
   s+_i = sum_{j != i, lab_j = lab_i} exp(-alpha (S_ij - base)) with S_ij = log(E_ij) / beta,
     l_i = log(1 + s+_i) / alpha + log(1 + s-_i) / beta,
     dl_i/dS_ij = E_ij fn_i (negatives), -exp(-alpha (S_ij - base)) fp_i (positives),
   fn_i = e^{-beta base} / (1 + s-_i), fp_i = 1 / (1 + s+_i). The first pass replaces the positives'
   E_ij by their terms exp(-alpha (S_ij - base)); the second writes W_ij = g_ij + g_ji (E and the
   positive terms are symmetric), W_ii = 0. fp and fn are scratch (n floats). stats[0] += sum_i l_i,
   stats[1] += the number of positive (ordered) pairs. */
static inline float ms_positive(float e, float alpha, float beta, float base) {
    return expf(-alpha * (logf(e) / beta - base));
}
void dm_ms_rows(float* M, int64_t n, int64_t ld, const int32_t* lab, float alpha, float beta, float base, float* fp,
                float* fn, double* stats) {
    const v4f zero = vset(0.0f);
    const double shift = exp(-(double)beta * base);
    for (int64_t i = 0; i < n; i++) { /* the row sums and factors; positives' E replaced by their terms */
        float* s = M + i * ld;
        const v4i li = {lab[i], lab[i], lab[i], lab[i]};
        v4f vneg = zero;
        double sp = 0.0;
        int64_t np = 0;
#define MS_SUM_BLOCK(j, ok, full)                                                 \
    {                                                                             \
        v4f e = load4(s, j, n, full);                                             \
        v4i same = iload4(lab, j, n, full) == li;                                 \
        vneg += vsel(~same & (ok), e, zero);                                      \
        v4i pos = same & (ok);                                                    \
        if (any4(pos)) {                                                          \
            for (int q = 0; q < 4; q++)                                           \
                if (pos[q]) {                                                     \
                    e[q] = ms_positive(e[q], alpha, beta, base);                  \
                    sp += e[q];                                                   \
                    np++;                                                         \
                }                                                                 \
            store4(s, j, n, full, e);                                             \
        }                                                                         \
    }
        FOR_BLOCKS(i, n, MS_SUM_BLOCK)
#undef MS_SUM_BLOCK
        const double sn = shift * (double)hsum(vneg);
        fn[i] = (float)(shift / (1.0 + sn));
        fp[i] = (float)(1.0 / (1.0 + sp));
        stats[0] += log1p(sp) / alpha + log1p(sn) / beta;
        stats[1] += (double)np;
    }
    for (int64_t i = 0; i < n; i++) { /* the gradient, row by row */
        float* s = M + i * ld;
        const v4i li = {lab[i], lab[i], lab[i], lab[i]};
        const v4f fni = vset(fn[i]), fpi = vset(fp[i]);
#define MS_GRAD_BLOCK(j, ok, full)                                                \
    {                                                                             \
        v4f e = load4(s, j, n, full);                                             \
        v4i same = iload4(lab, j, n, full) == li;                                 \
        v4f w = vsel(~same, e * (fni + load4(fn, j, n, full)), -e * (fpi + load4(fp, j, n, full))); \
        store4(s, j, n, full, vsel((ok), w, zero));                               \
    }
        FOR_BLOCKS(i, n, MS_GRAD_BLOCK)
#undef MS_GRAD_BLOCK
    }
}

/* ---------------------------------------------------------------------------------- ranked list */
/* Ranked list (RLL-Simpler), M = S = Z Z^T of unit rows, d_ij = sqrt(max(2 - 2 S_ij, 1e-12)):
     P*(i) = {j != i : lab_j = lab_i, d_ij > alpha - margin},  N*(i) = {j : lab_j != lab_i, d_ij < alpha},
     w_ij = exp(T (alpha - d_ij)) (constants in the gradient),
     l_i = mean_{P*} (d_ij - alpha + margin) + lambda sum_{N*} w_ij (alpha - d_ij) / sum_{N*} w_ij,
     dl_i/dS_ij = -1/(|P*| d_ij) on P*, lambda w_ij / (W_i d_ij) on N*, 0 elsewhere and where
     2 - 2 S_ij < 1e-12 (the clamp passes no gradient). An empty P* or N* contributes 0.
   The weights are shifted by the row's largest exponent when T alpha > 60 (one more pass), else not
   (1 <= w <= e^60). Writes q_ij = 1/d on P*, w/d on N*, 0 elsewhere, and the factors of
   dm_pair_finalize: fp_i = -1/|P*|, fn_i = lambda/W_i (0 when the set is empty). A block of
   other-label columns all beyond alpha (d2 >= alpha^2 (1 + 1e-5)) is written as zeros without
   square roots. stats[0] += sum_i l_i, stats[1] += the number of positive (same-label, j != i) pairs. */
typedef struct {
    float* M;
    int64_t n, ld;
    const int32_t* lab;
    float alpha, margin, temperature, lambda;
    float *fp, *fn;
} ranked_args;
static void ranked_rows(const ranked_args* a, double* stats) {
    const int64_t n = a->n;
    const v4f zero = vset(0.0f), one = vset(1.0f), two = vset(2.0f), veps = vset(1e-12f);
    const v4f va = vset(a->alpha), vb = vset(a->alpha - a->margin), vT = vset(a->temperature), inf = vset(INFINITY);
    const int fixed = a->temperature * a->alpha <= 60.0f;
    /* d2 >= alpha^2 (1 + 1e-5): d > alpha for sure (no square root needed to know) */
    const v4f vfar = vset(a->alpha * a->alpha * (1.0f + 1e-5f));
    for (int64_t i = 0; i < n; i++) {
        float* s = a->M + i * a->ld;
        const v4i li = {a->lab[i], a->lab[i], a->lab[i], a->lab[i]};
        v4f shift = zero;
        if (!fixed) { /* the largest exponent T (alpha - min d) over N* */
            v4f vdmin = inf;
            for (int64_t j = 0; j < n; j += 4) {
                v4f d = vsqrt(vmax(two - two * load4(s, j, n, 0), veps));
                v4i star_n = ~(iload4(a->lab, j, n, 0) == li) & lanes_ok(j, i, n) & (d < va);
                vdmin = vmin(vdmin, vsel(star_n, d, inf));
            }
            const float dmin = hmin(vdmin);
            shift = vset(dmin < INFINITY ? a->temperature * (a->alpha - dmin) : 0.0f);
        }
        v4f vlp = zero, vw = zero, vwd = zero;
        v4i vcp = {0, 0, 0, 0}, vpos = {0, 0, 0, 0};
#define RANKED_BLOCK(j, ok, full)                                             \
    {                                                                         \
        v4f d2 = two - two * load4(s, j, n, full);                            \
        v4i same = iload4(a->lab, j, n, full) == li;                          \
        if (!any4((same | (d2 < vfar)) & (ok))) { /* negatives beyond alpha */ \
            store4(s, j, n, full, zero);                                      \
        } else {                                                              \
            v4f d = vsqrt(vmax(d2, veps));                                    \
            v4i star_p = same & (ok) & (d > vb), star_n = ~same & (ok) & (d < va); \
            vlp += vsel(star_p, d - vb, zero);                                \
            vcp -= star_p;                                                    \
            vpos -= same & (ok);                                              \
            v4f q = vsel(star_p, one, zero);                                  \
            if (any4(star_n)) {                                               \
                v4f w = vsel(star_n, vexp(vT * (va - d) - shift), zero);      \
                vw += w;                                                      \
                vwd += w * d;                                                 \
                q = vsel(star_n, w, q);                                       \
            }                                                                 \
            store4(s, j, n, full, vsel(d2 >= veps, q / d, zero));             \
        }                                                                     \
    }
        FOR_BLOCKS(i, n, RANKED_BLOCK)
#undef RANKED_BLOCK
        const int64_t cp = (int64_t)vcp[0] + vcp[1] + vcp[2] + vcp[3];
        const double wsum = hsum(vw), wd = hsum(vwd);
        double row = cp ? (double)hsum(vlp) / (double)cp : 0.0;
        if (wsum > 0.0) row += (double)a->lambda * ((double)a->alpha - wd / wsum);
        stats[0] += row;
        stats[1] += (double)((int64_t)vpos[0] + vpos[1] + vpos[2] + vpos[3]);
        a->fp[i] = cp ? (float)(-1.0 / (double)cp) : 0.0f;
        a->fn[i] = wsum > 0.0 ? (float)(a->lambda / wsum) : 0.0f;
    }
}
void dm_ranked_list_rows(float* M, int64_t n, int64_t ld, const int32_t* lab, float alpha, float margin,
                         float temperature, float lambda, float* fp, float* fn, double* stats) {
    ranked_args a = {M, n, ld, lab, alpha, margin, temperature, lambda, fp, fn};
    ranked_rows(&a, stats);
}

/* ---------------------------------------------------------------------------------- contrastive */
/* Contrastive, M = G = X X^T, sq[i] = |x_i|^2, raw_ij = sq_i + sq_j - 2 G_ij, d2 = max(raw, 0),
   d = sqrt(max(d2, 1e-12)) (kind 0, euclidean) or d = d2 (kind 1, squared euclidean). The pair
   {i, j} (i < j, read from the upper triangle) stands for both orders: h = [d - pos_margin]_+ (same
   label) or [margin - d]_+ (other label), term h^q (q = 2 if squared, else 1), counted twice.
   Writes, on the upper triangle, c_ij = (dterm/dd) / d (kind 0; 0 where raw < 1e-12) or
   2 dterm/dd (kind 1; 0 where raw < 0): with W = c + c^T over both triangles (dm_pair_finalize,
   upper = 1, no factors), dL/dx_i = sum_j W_ij (x_i - x_j) for L = the sum of the ordered terms.
   A block of other-label pairs that are all at least the margin apart (d2 >= margin^2 (1 + 1e-5):
   no term, no gradient) is written as zeros without square roots.
   stats[0] += sum of the ordered terms, stats[1] += number of non-zero ordered terms, stats[2] +=
   number of positive (same-label) ordered pairs, stats[3] += number of non-zero c_ij (i < j).
   Only the upper triangle of M is read (the rest may hold anything). With a list (li, lj, lc of capacity `cap`, else NULL) the non-zero c_ij are also listed there in
   row order, as long as they fit (stats[3] > cap says they did not).
   pos_sum (only for kind 0, squared, pos_margin 0, where every same-label pair with raw >= 1e-12 has
   c_ij = 2 exactly): the list leaves the same-label pairs out (dm_pair_list_grad adds them from
   class sums, each with c = 2) except those with raw < 1e-12, listed with c = -2 to cancel them;
   stats[3] then counts the list's entries. M is written as without pos_sum. */
typedef struct {
    float* M;
    int64_t n, ld;
    const float* sq;
    const int32_t* lab;
    float margin, pos_margin;
    int64_t squared, kind;
    int32_t *li, *lj;
    float* lc;
    int64_t cap, pos_sum;
} contrastive_args;
static void contrastive_rows(const contrastive_args* a, double* stats) {
    const int64_t n = a->n, kind = a->kind, squared = a->squared;
    const v4f zero = vset(0.0f), one = vset(1.0f), two = vset(2.0f), veps = vset(1e-12f);
    const v4f vm = vset(a->margin), vpm = vset(a->pos_margin);
    const float far = a->margin <= 0.0f ? 0.0f : kind == 0 ? a->margin * a->margin * (1.0f + 1e-5f) : a->margin * (1.0f + 1e-5f);
    const v4f vfar = vset(far), gscale = vset(kind == 0 ? 1.0f : 2.0f), vneg2 = vset(-2.0f);
    int64_t listed = 0;
    for (int64_t i = 0; i < n; i++) {
        float* g = a->M + i * a->ld;
        const v4i li = {a->lab[i], a->lab[i], a->lab[i], a->lab[i]};
        const v4f sqi = vset(a->sq[i]);
        v4f vtot = zero;
        v4i vnz = {0, 0, 0, 0}, vpos = {0, 0, 0, 0}, vgnz = {0, 0, 0, 0};
#define CONTRASTIVE_BLOCK(j, ok, full)                                        \
    {                                                                         \
        v4f raw = sqi + load4(a->sq, j, n, full) - two * load4(g, j, n, full); \
        v4i same = iload4(a->lab, j, n, full) == li;                          \
        if (!any4((same | (raw < vfar)) & (ok))) {                            \
            store4(g, j, n, full, zero);                                      \
        } else {                                                              \
            v4f d2 = vmax(raw, zero), d;                                      \
            v4i passes;                                                       \
            if (kind == 0) {                                                  \
                d = vsqrt(vmax(d2, veps));                                    \
                passes = raw >= veps;                                         \
            } else {                                                          \
                d = d2;                                                       \
                passes = raw >= zero;                                         \
            }                                                                 \
            vpos -= same & (ok);                                              \
            v4f h = vsel((ok), vmax(vsel(same, d - vpm, vm - d), zero), zero); \
            v4f term = squared ? h * h : h;                                   \
            vtot += term;                                                     \
            vnz -= term > zero;                                               \
            v4f dt = squared ? two * h : vsel(h > zero, one, zero);           \
            dt = vsel(same, dt, -dt) * gscale;                                \
            v4f c = vsel(passes & (ok), kind == 0 ? dt / d : dt, zero);       \
            v4i live = c != zero;                                             \
            v4f lc = c;                                                       \
            if (a->pos_sum) { /* same-label pairs: c = 2 unlisted, corrections */ \
                live = (live & ~same) | (same & (ok) & ~passes);              \
                lc = vsel(same, vneg2, c);                                    \
            }                                                                 \
            vgnz -= live;                                                     \
            store4(g, j, n, full, c);                                         \
            if (a->lc && any4(live)) {                                        \
                for (int q = 0; q < 4; q++) {                                 \
                    if (!live[q]) continue;                                   \
                    if (listed < a->cap) {                                    \
                        a->li[listed] = (int32_t)i;                           \
                        a->lj[listed] = (int32_t)(j + q);                     \
                        a->lc[listed] = lc[q];                                \
                    }                                                         \
                    listed++;                                                 \
                }                                                             \
            }                                                                 \
        }                                                                     \
    }
        int64_t j = (i + 1) & ~(int64_t)3;
        if (j < n) {
            CONTRASTIVE_BLOCK(j, lanes_upper(j, i, n), 0);
            j += 4;
        }
        for (; j + 8 <= n; j += 8) {
            CONTRASTIVE_BLOCK(j, ((v4i){-1, -1, -1, -1}), 1);
            CONTRASTIVE_BLOCK(j + 4, ((v4i){-1, -1, -1, -1}), 1);
        }
        for (; j < n; j += 4) CONTRASTIVE_BLOCK(j, lanes_upper(j, i, n), 0);
#undef CONTRASTIVE_BLOCK
        stats[0] += 2.0 * hsum(vtot);
        stats[1] += 2.0 * (double)((int64_t)vnz[0] + vnz[1] + vnz[2] + vnz[3]);
        stats[2] += 2.0 * (double)((int64_t)vpos[0] + vpos[1] + vpos[2] + vpos[3]);
        stats[3] += (double)((int64_t)vgnz[0] + vgnz[1] + vgnz[2] + vgnz[3]);
    }
}
void dm_contrastive_rows(float* M, int64_t n, int64_t ld, const float* sq, const int32_t* lab, float margin,
                         float pos_margin, int64_t squared, int64_t kind, int32_t* li, int32_t* lj, float* lc,
                         int64_t cap, int64_t pos_sum, double* stats) {
    contrastive_args a = {M, n, ld, sq, lab, margin, pos_margin, squared, kind, li, lj, lc, cap, pos_sum};
    contrastive_rows(&a, stats);
}
