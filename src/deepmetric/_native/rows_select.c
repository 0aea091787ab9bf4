/* Batch-hard mining over a block of scores (deepmetric.miners.hard): per row, the arg-max over the
   same-label columns and the arg-min over the other-label columns.

   Row r of the block (global row row0 + r, dense label row_lab[r]) against columns j < cols (dense
   labels col_lab[j], all in [0, nclass)):
     p_out[r] = the lowest j holding the largest score among the columns with the row's label, the
                row's own column excluded when same_set (j == row0 + r);
     n_out[r] = the lowest j holding the smallest score among the columns with another label;
     ok_out[r] = 1 when both exist (else the missing index is 0).
   The columns of each label are listed once (a counting sort), so a row reads its few positives
   directly; then its same-label cells are overwritten with +inf IN THE BLOCK (the caller's scratch,
   not used afterwards) and one vector pass (four 4-wide accumulators) finds the first smallest cell
   of the row: each lane keeps its best value and the first column holding it, and the lanes are
   merged (best value, then lowest column). Scores must be finite (the caller checks its inputs). Returns 0, or -1 if
   the label lists could not be allocated (nothing is written then). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

int dm_batch_hard(float* S, int64_t ld, int64_t rows, int64_t cols, int64_t row0, const int32_t* row_lab,
                  const int32_t* col_lab, int64_t nclass, int64_t same_set, int64_t* p_out, int64_t* n_out,
                  uint8_t* ok_out) {
    int64_t* start = calloc((size_t)nclass + 1, sizeof(int64_t));
    int32_t* order = malloc((size_t)(cols > 0 ? cols : 1) * sizeof(int32_t));
    if (!start || !order) {
        free(start);
        free(order);
        return -1;
    }
    for (int64_t j = 0; j < cols; j++) start[col_lab[j] + 1]++;
    for (int64_t c = 0; c < nclass; c++) start[c + 1] += start[c];
    {
        int64_t* next = malloc((size_t)(nclass > 0 ? nclass : 1) * sizeof(int64_t));
        if (!next) {
            free(start);
            free(order);
            return -1;
        }
        memcpy(next, start, (size_t)nclass * sizeof(int64_t));
        for (int64_t j = 0; j < cols; j++) order[next[col_lab[j]]++] = (int32_t)j;  /* increasing j per label */
        free(next);
    }
    const v4f pinf = {INFINITY, INFINITY, INFINITY, INFINITY};
    const v4i four = {4, 4, 4, 4};
    const v4i sixteen = {16, 16, 16, 16};
    const int64_t vec_end16 = cols & ~(int64_t)15;
    for (int64_t r = 0; r < rows; r++) {
        float* s = S + r * ld;
        const int32_t rl = row_lab[r];
        const int64_t self = same_set ? row0 + r : -1;
        float bp = -INFINITY;
        int64_t p = -1;
        for (int64_t t = start[rl]; t < start[rl + 1]; t++) {
            int64_t j = order[t];
            if (j != self && (p < 0 || s[j] > bp)) {
                bp = s[j];
                p = j;
            }
        }
        for (int64_t t = start[rl]; t < start[rl + 1]; t++) s[order[t]] = INFINITY;
        /* four independent (min, first column) accumulators, so the compare-select chains overlap */
        v4f m0 = pinf, m1 = pinf, m2 = pinf, m3 = pinf;
        v4i i0 = {0, 1, 2, 3}, i1 = i0, i2 = i0, i3 = i0;
        v4i j0 = {0, 1, 2, 3}, j1 = j0 + four, j2 = j1 + four, j3 = j2 + four;
        int64_t j = 0;
        for (; j < vec_end16; j += 16, j0 += sixteen, j1 += sixteen, j2 += sixteen, j3 += sixteen) {
            v4f x0, x1, x2, x3;
            memcpy(&x0, s + j, 16);
            memcpy(&x1, s + j + 4, 16);
            memcpy(&x2, s + j + 8, 16);
            memcpy(&x3, s + j + 12, 16);
            v4i l0 = x0 < m0, l1 = x1 < m1, l2 = x2 < m2, l3 = x3 < m3;
            m0 = (v4f)((l0 & (v4i)x0) | (~l0 & (v4i)m0));
            m1 = (v4f)((l1 & (v4i)x1) | (~l1 & (v4i)m1));
            m2 = (v4f)((l2 & (v4i)x2) | (~l2 & (v4i)m2));
            m3 = (v4f)((l3 & (v4i)x3) | (~l3 & (v4i)m3));
            i0 = (l0 & j0) | (~l0 & i0);
            i1 = (l1 & j1) | (~l1 & i1);
            i2 = (l2 & j2) | (~l2 & i2);
            i3 = (l3 & j3) | (~l3 & i3);
        }
        float bn = INFINITY;
        int64_t n = -1;
        if (vec_end16 > 0) {  /* merge the 16 lanes: smallest value, then lowest column */
            const v4f* ms[4] = {&m0, &m1, &m2, &m3};
            const v4i* is[4] = {&i0, &i1, &i2, &i3};
            for (int a = 0; a < 4; a++) {
                for (int u = 0; u < 4; u++) {
                    float v = (*ms[a])[u];
                    int64_t c = (*is[a])[u];
                    if (v < bn || (v == bn && n >= 0 && c < n)) {
                        bn = v;
                        n = c;
                    }
                }
            }
        }
        for (; j < cols; j++) {  /* the tail: after every vector column, so a strict comparison */
            if (s[j] < bn) {
                bn = s[j];
                n = j;
            }
        }
        const int has_n = bn < INFINITY;  /* +inf only where every column shares the row's label */
        p_out[r] = p >= 0 ? p : 0;
        n_out[r] = has_n ? n : 0;
        ok_out[r] = (uint8_t)(p >= 0 && has_n);
    }
    free(start);
    free(order);
    return 0;
}

static inline float sq_diff(const float* u, const float* v, int64_t dim) {
    v4f acc0 = {0, 0, 0, 0}, acc1 = acc0;
    int64_t k = 0;
    for (; k + 8 <= dim; k += 8) {
        v4f a0, a1, b0, b1;
        memcpy(&a0, u + k, 16);
        memcpy(&a1, u + k + 4, 16);
        memcpy(&b0, v + k, 16);
        memcpy(&b1, v + k + 4, 16);
        a0 -= b0;
        a1 -= b1;
        acc0 += a0 * a0;
        acc1 += a1 * a1;
    }
    acc0 += acc1;
    float s = (acc0[0] + acc0[1]) + (acc0[2] + acc0[3]);
    for (; k < dim; k++) {
        float d = u[k] - v[k];
        s += d * d;
    }
    return s;
}

/* Hinge triplet terms of explicit triplets (a, p, n) of one embedding set x (rows x D, row-major):
     d = |x_a - x_q|^2 (squared) or sqrt(max(|x_a - x_q|^2, eps)),  term = max(d_ap - d_an + margin, 0).
   out[0] = sum of the terms, out[1] = number of positive terms. With gx (rows x D, zeroed by the
   caller) the gradient of the sum w.r.t. x is accumulated: for an active term, with
   c_q = 2 (squared) or 1 / d_aq (0 where |x_a - x_q|^2 < eps, the clamp's zero gradient),
     gx_a += c_p (x_a - x_p) - c_n (x_a - x_n),  gx_p -= c_p (x_a - x_p),  gx_n += c_n (x_a - x_n).
   a == NULL means a = 0 .. count-1. Sequential: no two triplets race on a row. */
void dm_triplet_terms(const float* x, int64_t dim, const int64_t* a, const int64_t* p, const int64_t* n,
                      int64_t count, float margin, int64_t squared, float eps, float* gx, double* out) {
    double total = 0.0;
    int64_t active = 0;
    for (int64_t t = 0; t < count; t++) {
        const int64_t ia = a ? a[t] : t, ip = p[t], in = n[t];
        const float* xa = x + ia * dim;
        const float* xp = x + ip * dim;
        const float* xn = x + in * dim;
        const float sp = sq_diff(xa, xp, dim), sn = sq_diff(xa, xn, dim);
        const float dp = squared ? sp : sqrtf(sp > eps ? sp : eps);
        const float dn = squared ? sn : sqrtf(sn > eps ? sn : eps);
        const float term = dp - dn + margin;
        if (!(term > 0.0f)) continue;
        total += term;
        active++;
        if (!gx) continue;
        const float cp = squared ? 2.0f : (sp >= eps ? 1.0f / dp : 0.0f);
        const float cn = squared ? 2.0f : (sn >= eps ? 1.0f / dn : 0.0f);
        float* ga = gx + ia * dim;
        float* gp = gx + ip * dim;
        float* gn = gx + in * dim;
        /* 4 columns at a time, each row's update stored before the next row's is loaded: the same
           result as the scalar loop below when rows coincide (a degenerate triplet) */
        const v4f vcp = {cp, cp, cp, cp}, vcn = {cn, cn, cn, cn};
        int64_t k = 0;
        for (; k + 4 <= dim; k += 4) {
            v4f va, vp, vn, g;
            memcpy(&va, xa + k, 16);
            memcpy(&vp, xp + k, 16);
            memcpy(&vn, xn + k, 16);
            const v4f up = vcp * (va - vp), un = vcn * (va - vn);
            memcpy(&g, ga + k, 16);
            g += up - un;
            memcpy(ga + k, &g, 16);
            memcpy(&g, gp + k, 16);
            g -= up;
            memcpy(gp + k, &g, 16);
            memcpy(&g, gn + k, 16);
            g += un;
            memcpy(gn + k, &g, 16);
        }
        for (; k < dim; k++) {
            const float up = cp * (xa[k] - xp[k]), un = cn * (xa[k] - xn[k]);
            ga[k] += up - un;
            gp[k] -= up;
            gn[k] += un;
        }
    }
    out[0] = total;
    out[1] = (double)active;
}
