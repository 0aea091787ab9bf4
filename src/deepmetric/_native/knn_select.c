/* Streaming exact top-k selection over blocks of similarity scores (deepmetric.metrics.knn).

   A caller computes a tile of scores S (rows = queries, columns = gallery items col0 .. col0 + w)
   with a GEMM, then calls dm_scan on it while the tile is still in cache. Every row keeps a buffer
   of packed 64-bit keys, one per candidate:

       key = (order-preserving bits of the score) << 32 | (0xFFFFFFFF - gallery id)

   so a larger key is a larger score, and among equal scores the smaller gallery id. Keys are
   distinct, so "the k largest keys" is exactly the documented order: nearest first, ties to the
   lower gallery index. A row's threshold is the score of its k-th best key: a new column can only
   enter if its score is strictly greater (an equal score has a larger id than every kept item, as
   columns arrive in increasing order, so it loses the tie). The scan tests 16 columns at a time
   with portable 4-wide vector compares; only blocks holding a candidate are looked at one by one.
   When a buffer is full it is cut back to its k best keys with a quickselect (no sort).

   Score of a column: S[r, j] - h[col0 + j] (h = |g|^2 / 2 for squared euclidean; NULL for inner
   product). A NaN score never enters. Gallery ids must be < 2^32. No allocation, no global state:
   rows may be split across threads. */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline uint64_t make_key(float v, int64_t id) {
    uint32_t u;
    memcpy(&u, &v, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)u << 32) | (uint64_t)(0xFFFFFFFFu - (uint32_t)id);
}

static inline float key_value(uint64_t key) {
    uint32_t u = (uint32_t)(key >> 32);
    u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

static inline int64_t key_id(uint64_t key) { return (int64_t)(0xFFFFFFFFu - (uint32_t)key); }

static inline void swap_keys(uint64_t* a, int64_t i, int64_t j) {
    uint64_t t = a[i];
    a[i] = a[j];
    a[j] = t;
}

/* Rearrange a[0:n] so its k largest keys (any order) occupy a[0:k); 1 <= k <= n. */
static void select_largest(uint64_t* a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] > a[lo]) swap_keys(a, mid, lo);
        if (a[hi] > a[lo]) swap_keys(a, hi, lo);
        if (a[mid] > a[hi]) swap_keys(a, mid, hi);  /* a[hi] = median of three */
        uint64_t pivot = a[hi];
        int64_t store = lo;
        for (int64_t i = lo; i < hi; i++) {  /* branch-free Lomuto partition */
            uint64_t x = a[i];
            a[i] = a[store];
            a[store] = x;
            store += x > pivot;
        }
        swap_keys(a, store, hi);  /* a[lo:store) > pivot = a[store] > a[store+1:hi] */
        if (store == k || store == k - 1) return;
        if (store < k) lo = store + 1; else hi = store - 1;
    }
}

static uint64_t min_key(const uint64_t* a, int64_t n) {
    uint64_t m = a[0];
    for (int64_t i = 1; i < n; i++) m = a[i] < m ? a[i] : m;
    return m;
}

/* Scan rows [r0, r1) of the tile S (row stride ld, w columns = gallery ids col0 ..).
   Row r: buf[r * cap ..] holds fill[r] keys (cap >= 2k), thr[r] its entry threshold (-inf while
   fewer than k keys are held). self_id (may be NULL): row r never takes gallery id self_id[r]. */
/* append column u with score x; keep the buffer within cap; refresh the threshold at k keys */
#define PUSH(x, u)                                        \
    do {                                                  \
        b[f++] = make_key((x), col0 + (u));               \
        if (f == cap) {                                   \
            select_largest(b, f, k);                      \
            f = k;                                        \
        }                                                 \
        if (f == k) {                                     \
            t = key_value(min_key(b, k));                 \
            tv = (v4f){t, t, t, t};                       \
        }                                                 \
    } while (0)

void dm_scan(const float* S, int64_t ld, int64_t w, int64_t col0, const float* h, int64_t r0, int64_t r1,
             int64_t k, int64_t cap, uint64_t* buf, int64_t* fill, float* thr, const int64_t* self_id) {
    const float* hh = h ? h + col0 : NULL;
    for (int64_t r = r0; r < r1; r++) {
        const float* s = S + r * ld;
        uint64_t* b = buf + r * cap;
        int64_t f = fill[r];
        float t = thr[r];
        int64_t self = self_id ? self_id[r] - col0 : -1;
        v4f tv = {t, t, t, t};
        for (int64_t j = 0; j < w; j += 16) {
            int64_t e = j + 16 < w ? j + 16 : w;
            if (e - j == 16) {
                v4f a0, a1, a2, a3;
                memcpy(&a0, s + j, 16);
                memcpy(&a1, s + j + 4, 16);
                memcpy(&a2, s + j + 8, 16);
                memcpy(&a3, s + j + 12, 16);
                if (hh) {
                    v4f h0, h1, h2, h3;
                    memcpy(&h0, hh + j, 16);
                    memcpy(&h1, hh + j + 4, 16);
                    memcpy(&h2, hh + j + 8, 16);
                    memcpy(&h3, hh + j + 12, 16);
                    a0 -= h0; a1 -= h1; a2 -= h2; a3 -= h3;
                }
                const v4i b0 = {1, 2, 4, 8}, b1 = {16, 32, 64, 128}, b2 = {256, 512, 1024, 2048},
                          b3 = {4096, 8192, 16384, 32768};
                v4i m = ((a0 > tv) & b0) | ((a1 > tv) & b1) | ((a2 > tv) & b2) | ((a3 > tv) & b3);
                uint32_t bits = (uint32_t)(m[0] | m[1] | m[2] | m[3]);
                while (bits) {  /* the columns of this block above the threshold, in order */
                    int64_t u = j + __builtin_ctz(bits);
                    bits &= bits - 1;
                    float x = hh ? s[u] - hh[u] : s[u];
                    if (!(x > t) || u == self) continue;  /* the threshold may have risen since */
                    PUSH(x, u);
                }
                continue;
            }
            for (int64_t u = j; u < e; u++) {  /* the last, partial block */
                float x = hh ? s[u] - hh[u] : s[u];
                if (!(x > t) || u == self) continue;
                PUSH(x, u);
            }
        }
        fill[r] = f;
        thr[r] = t;
    }
}

static void sort_desc(uint64_t* a, int64_t n) {
    while (n > 16) {
        int64_t mid = n / 2, hi = n - 1;
        if (a[mid] > a[0]) swap_keys(a, mid, 0);
        if (a[hi] > a[0]) swap_keys(a, hi, 0);
        if (a[mid] > a[hi]) swap_keys(a, mid, hi);
        uint64_t pivot = a[hi];
        int64_t store = 0;
        for (int64_t i = 0; i < hi; i++) {
            uint64_t x = a[i];
            a[i] = a[store];
            a[store] = x;
            store += x > pivot;
        }
        swap_keys(a, store, hi);
        /* recurse on the smaller side, loop on the larger */
        if (store < n - store - 1) {
            sort_desc(a, store);
            a += store + 1;
            n -= store + 1;
        } else {
            sort_desc(a + store + 1, n - store - 1);
            n = store;
        }
    }
    for (int64_t i = 1; i < n; i++) {
        uint64_t x = a[i];
        int64_t j = i - 1;
        while (j >= 0 && a[j] < x) { a[j + 1] = a[j]; j--; }
        a[j + 1] = x;
    }
}

/* Rows [r0, r1): the best min(k, fill) keys, best first, as scores out_v and ids out_i (row stride k);
   a row holding fewer than k keys is padded with -inf and id -1. */
void dm_finish(int64_t r0, int64_t r1, int64_t k, int64_t cap, uint64_t* buf, const int64_t* fill,
               float* out_v, int64_t* out_i) {
    for (int64_t r = r0; r < r1; r++) {
        uint64_t* b = buf + r * cap;
        int64_t f = fill[r];
        if (f > k) {
            select_largest(b, f, k);
            f = k;
        }
        sort_desc(b, f);
        for (int64_t i = 0; i < f; i++) {
            out_v[r * k + i] = key_value(b[i]);
            out_i[r * k + i] = key_id(b[i]);
        }
        for (int64_t i = f; i < k; i++) {
            out_v[r * k + i] = -INFINITY;
            out_i[r * k + i] = -1;
        }
    }
}
