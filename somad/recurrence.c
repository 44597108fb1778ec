/* soma's exact per-byte recurrence for a chunk's pre-activations (see somad/native.py).
 *
 * The carried state P (K x C) is the trace bank read through the mixed weights U~ = M U:
 * P_j = sum_v T[v, j] U~[v, j, :]. Byte x moves it exactly:
 *     P_j <- alpha_j P_j + (1 - alpha_j) U~[x, j, :]
 * and the pre-activations predicting the next byte are z = sum_j P_j. This is O(K * C) per
 * byte, against O(m * r * C) for the lag-mode GEMM of the torch path (m distinct byte values
 * per chunk, r lag modes). Columns are done in blocks of CB so a block's state (K x CB floats)
 * stays in L1 while the chunk streams through it; the chunk's own weight rows are first
 * mixed and scaled, g_j U~[v, j, :] with g_j = 1 - alpha_j, into a scratch block.
 *
 * Precision. The per-byte state is float32, written P += g U~ - g P: the decay enters through
 * g_j, which float32 holds to 6e-8 of itself, not through alpha_j (for slow bands alpha_j is
 * 1 - 1e-5, which float32 holds only to 0.6 % of 1 - alpha_j: a biased decay). The state
 * carried to the next chunk is computed apart as alpha^n P + sum_v c[v, j] g_j U~[v, j] with
 * c[v, j] = sum over the chunk's bytes s equal to v of alpha_j^(n-1-s) (summed in float64):
 * one rounding per chunk, as in the torch path, so it does not drift over many chunks.
 *
 * Plain C99, no dependencies: it is compiled on the device at first use (native.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CB 64          /* output columns per block */
#define MAX_BANDS 64   /* SomaConfig allows n_bands 1..64 */
#define V 256

int soma_abi_version(void) { return 6; }

/* The chunk's distinct byte values in order of first appearance; slot[v] = index, -1 if absent. */
static int chunk_values(int n, const int64_t *bytes, int *slot, int *values) {
    int m = 0;
    for (int v = 0; v < V; v++) slot[v] = -1;
    for (int t = 0; t < n; t++) {
        int x = (int)bytes[t];
        if (slot[x] < 0) { slot[x] = m; values[m++] = x; }
    }
    return m;
}

/* rows[i, j, :] = (1 - alpha_j) U~[values[i], j, c0 : c0 + w], zero past w. */
static void mix_rows(int m, int K, int C, int bandpass, int c0, int w, const int *values,
                     const float *ucat, const float *gain, float *rows) {
    for (int i = 0; i < m; i++) {
        const float *u = ucat + (size_t)values[i] * K * C + c0;
        float *out = rows + (size_t)i * K * CB;
        for (int j = 0; j < K; j++) {
            const float *uj = u + (size_t)j * C;
            float *o = out + j * CB;
            if (bandpass && j > 0) {
                const float *prev = uj - C; /* U~_j = U_j - U_{j-1} */
                for (int c = 0; c < w; c++) o[c] = gain[j] * (uj[c] - prev[c]);
            } else {
                for (int c = 0; c < w; c++) o[c] = gain[j] * uj[c];
            }
            for (int c = w; c < CB; c++) o[c] = 0.0f;
        }
    }
}

/* sums[i, j] = sum over bytes s of the chunk equal to values[i] of alpha_j^(n-1-s), in
 * float64, and coef the same rounded to float32; decay_n[j] = alpha_j^n (decay64 in float64,
 * if not NULL, and decay_n rounded). */
static void chunk_coefficients(int n, int m, int K, const int64_t *bytes, const int *slot,
                               const double *alpha, double *sums, float *coef, double *decay64,
                               float *decay_n) {
    double power[MAX_BANDS];
    memset(sums, 0, (size_t)m * K * sizeof(double));
    for (int j = 0; j < K; j++) power[j] = 1.0;
    for (int s = n - 1; s >= 0; s--) {
        double *c = sums + (size_t)slot[bytes[s]] * K;
        for (int j = 0; j < K; j++) {
            c[j] += power[j];
            power[j] *= alpha[j];
        }
    }
    for (int i = 0; i < m * K; i++) coef[i] = (float)sums[i];
    for (int j = 0; j < K; j++) decay_n[j] = (float)power[j];
    if (decay64)
        for (int j = 0; j < K; j++) decay64[j] = power[j];
}

/* carry_out[:, c0 : c0 + w] = alpha^n carry + sum_i coef[i, j] rows[i, j], rows holding
 * g_j U~[values[i], j] (mix_rows). Reads each element of carry before writing it: carry_out
 * may be carry. */
static void advance_state(int m, int K, int C, int c0, int w, const float *rows,
                          const float *coef, const float *decay_n, const float *carry,
                          float *carry_out) {
    float acc[CB];
    for (int j = 0; j < K; j++) {
        const float *in = carry + (size_t)j * C + c0;
        for (int c = 0; c < w; c++) acc[c] = decay_n[j] * in[c];
        for (int c = w; c < CB; c++) acc[c] = 0.0f;
        for (int i = 0; i < m; i++) {
            const float *restrict u = rows + ((size_t)i * K + j) * CB;
            float k = coef[(size_t)i * K + j];
            for (int c = 0; c < CB; c++) acc[c] += k * u[c];
        }
        memcpy(carry_out + (size_t)j * C + c0, acc, (size_t)w * sizeof(float));
    }
}

/* zc[t, :] (n x C) = sum_j P_j before byte t of the chunk, P entering as carry (K x C).
 * Optional outputs (NULL: not wanted), for moving the trace bank and P past the chunk:
 *   carry_out (K x C, may be carry itself): P after the chunk's last byte;
 *   values_out (256): the chunk's m distinct byte values, in order of first appearance;
 *   increment_out (256 x K): row i = what the chunk adds to the traces of values_out[i],
 *     sum over its bytes s equal to that value of (1 - alpha_j) alpha_j^(n-1-s);
 *   decay_out (K): alpha_j^n, the decay of the traces over the chunk.
 * ucat: (256 * K, C) rows (v, k); alpha: (K,) decays.
 * Returns m, or -1 for bad arguments, -2 when out of memory. */
int soma_chunk_preactivations(int n, int K, int C, int bandpass, const int64_t *bytes,
                              const float *ucat, const double *alpha, const float *carry,
                              float *zc, float *carry_out, int64_t *values_out,
                              double *increment_out, double *decay_out) {
    if (n < 1 || K < 1 || K > MAX_BANDS || C < 1) return -1;
    for (int t = 0; t < n; t++)
        if (bytes[t] < 0 || bytes[t] >= V) return -1;
    int slot[V], values[V];
    int m = chunk_values(n, bytes, slot, values);
    float gain[MAX_BANDS];
    for (int j = 0; j < K; j++) gain[j] = (float)(1.0 - alpha[j]);
    float decay_n[MAX_BANDS];
    double *sums = malloc((size_t)m * K * sizeof(double));
    float *coef = malloc((size_t)m * K * sizeof(float));
    if (!sums || !coef) {
        free(sums);
        free(coef);
        return -2;
    }
    chunk_coefficients(n, m, K, bytes, slot, alpha, sums, coef, decay_out, decay_n);
    if (values_out)
        for (int i = 0; i < m; i++) values_out[i] = values[i];
    if (increment_out)
        for (int i = 0; i < m; i++)
            for (int j = 0; j < K; j++) increment_out[(size_t)i * K + j] = (1.0 - alpha[j]) * sums[(size_t)i * K + j];
    free(sums);
    float *rows = malloc((size_t)m * K * CB * sizeof(float));
    if (!rows) {
        free(coef);
        return -2;
    }
    float state[MAX_BANDS * CB];
    float sum[CB];
    for (int c0 = 0; c0 < C; c0 += CB) {
        int w = C - c0 < CB ? C - c0 : CB;
        mix_rows(m, K, C, bandpass, c0, w, values, ucat, gain, rows);
        for (int c = 0; c < CB; c++) sum[c] = 0.0f;
        for (int j = 0; j < K; j++) {
            float *p = state + j * CB;
            memcpy(p, carry + (size_t)j * C + c0, (size_t)w * sizeof(float));
            for (int c = w; c < CB; c++) p[c] = 0.0f;
            for (int c = 0; c < CB; c++) sum[c] += p[c];
        }
        for (int t = 0; t < n; t++) {
            memcpy(zc + (size_t)t * C + c0, sum, (size_t)w * sizeof(float));
            if (t + 1 == n) break; /* the last byte only moves the state: advance_state below */
            const float *row = rows + (size_t)slot[bytes[t]] * K * CB;
            for (int c = 0; c < CB; c++) sum[c] = 0.0f;
            for (int j = 0; j < K; j++) {
                float *restrict p = state + j * CB;
                const float *restrict u = row + j * CB;
                float g = gain[j];
                for (int c = 0; c < CB; c++) {
                    float v = p[c] + (u[c] - g * p[c]);
                    p[c] = v;
                    sum[c] += v;
                }
            }
        }
        if (carry_out)
            advance_state(m, K, C, c0, w, rows, coef, decay_n, carry, carry_out);
    }
    free(rows);
    free(coef);
    return m;
}

/* sum_c x[c]^2 in 8 float lanes (a loop the compiler vectorizes; one float64 accumulator
 * would chain every add on the last), the lanes summed in float64. */
static double sum_of_squares(int n, const float *x) {
    float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int c = 0;
    for (; c + 8 <= n; c += 8)
        for (int l = 0; l < 8; l++) lane[l] += x[c + l] * x[c + l];
    double total = 0.0;
    for (int l = 0; l < 8; l++) total += lane[l];
    for (; c < n; c++) total += (double)x[c] * x[c];
    return total;
}

/* The window's distinct byte values: slot[v] their index in order of first appearance, -1
 * for the others. Returns their number u. */
static int window_values(int L, const uint8_t *bytes, int *slot) {
    int u = 0;
    for (int v = 0; v < V; v++) slot[v] = -1;
    for (int t = 0; t < L; t++)
        if (slot[bytes[t]] < 0) slot[bytes[t]] = u++;
    return u;
}

/* The window's own traces at each observation, o x u x K float32:
 * feats[i, q, j] = sum over bytes s < obs[i] equal to value q of (1 - alpha_j) alpha_j^(obs[i]-1-s),
 * and decay_at[i, j] = alpha_j^obs[i] (how the traces the window opened with reach obs[i]).
 * The sums run in float64 (acc, u x K), every seen value's decayed at each byte: u K
 * multiplies a byte, against the forward's 2 K C, and no table that grows with L.
 * first_obs[q]: the first observation after value q first occurs; its features before that are
 * zero and are not written. */
static void window_feats(int L, int K, const uint8_t *bytes, int o, const int64_t *obs,
                         const double *alpha, const int *slot, int u, double *acc, float *feats,
                         float *decay_at, int *first_obs) {
    double power[MAX_BANDS];
    for (int j = 0; j < K; j++) power[j] = 1.0;
    int seen = 0, i = 0;
    for (int t = 0; t < L; t++) {
        for (; i < o && obs[i] == t; i++) {
            float *f = feats + (size_t)i * u * K;
            for (int x = 0; x < seen * K; x++) f[x] = (float)acc[x];
            for (int j = 0; j < K; j++) decay_at[(size_t)i * K + j] = (float)power[j];
        }
        for (int x = 0; x < seen; x++) {
            double *a = acc + (size_t)x * K;
            for (int j = 0; j < K; j++) a[j] *= alpha[j];
        }
        for (int j = 0; j < K; j++) power[j] *= alpha[j];
        int q = slot[bytes[t]];
        double *a = acc + (size_t)q * K;
        if (q == seen) { /* first occurrence (slots are numbered in that order) */
            seen++;
            first_obs[q] = i;
            for (int j = 0; j < K; j++) a[j] = 1.0 - alpha[j];
        } else {
            for (int j = 0; j < K; j++) a[j] += 1.0 - alpha[j];
        }
    }
}

/* out[j, :] = sum over observations i >= from of coef[i * stride + j] * dzc[i, :], j < K:
 * a (K x o) by (o x C) product, in column blocks whose sums stay in registers. */
static void weighted_sum(int K, int C, int o, int from, const float *coef, size_t stride,
                         const float *dzc, float *out) {
    for (int j = 0; j < K; j++) {
        for (int c0 = 0; c0 < C; c0 += CB) {
            int w = C - c0 < CB ? C - c0 : CB;
            float acc[CB];
            for (int c = 0; c < CB; c++) acc[c] = 0.0f;
            if (w == CB) {
                for (int i = from; i < o; i++) {
                    const float *restrict z = dzc + (size_t)i * C + c0;
                    float f = coef[(size_t)i * stride + j];
                    for (int c = 0; c < CB; c++) acc[c] += f * z[c];
                }
            } else {
                for (int i = from; i < o; i++) {
                    const float *restrict z = dzc + (size_t)i * C + c0;
                    float f = coef[(size_t)i * stride + j];
                    for (int c = 0; c < w; c++) acc[c] += f * z[c];
                }
            }
            memcpy(out + (size_t)j * C + c0, acc, (size_t)w * sizeof(float));
        }
    }
}

/* One SGD step from a window of observations, in one pass over the rows of U and Wd (ucat) of
 * the s byte values seen so far (learner._apply_window; the torch path does the same with
 * tensor operations, learner.GradientWindow).
 *
 * The window opened when the trace bank was T_ref; since then it read L bytes, and made o
 * observations at positions obs[i] (increasing, < L), each with dZ_i = dzc[i] (C floats), the
 * loss gradient at the pre-activations that predicted byte obs[i]. The traces before byte t
 * are alpha^t T_ref plus the window's own, so the trace-space gradient of row (v, j) is
 *   G[v, j] = T_ref[v, j] D_j + O[v, j],  D_j = sum_i alpha_j^obs[i] dZ_i,
 *   O[v, j] = sum_i feats[i, v, j] dZ_i   (window_feats; only for the window's own values)
 * and the step, with the band mixing M (bandpass B_k = T_k - T_{k+1}):
 *   delta[v, k] = coef_k (G[v, k] - G[v, k+1])     (traces: coef_k G[v, k])
 *   ucat[v, k] += delta[v, k]                                       (if apply)
 *   P_j        += sum_v T_now[v, j] (delta[v, j] - delta[v, j-1])   (if apply; M delta)
 *   power_k     = sum_v |delta[v, k]|^2 / coef_k^2                  (always)
 * rows (s): the seen byte values, distinct, including every byte of the window; t_ref (s x K)
 * float64 and t_now (s x K) float32 their traces when the window opened and now; alpha (K);
 * coef (K): -eta gamma_obs(k, d). Returns 0, or -1 for bad arguments, -2 when out of memory. */
int soma_window_update(int s, int K, int C, int bandpass, int apply, const int64_t *rows,
                       const double *t_ref, const float *t_now, int L, const uint8_t *bytes,
                       int o, const int64_t *obs, const float *dzc, const double *alpha,
                       const float *coef, float *ucat, float *carry, double *power) {
    if (s < 0 || s > V || K < 1 || K > MAX_BANDS || C < 1 || L < 0 || o < 0 || o > L) return -1;
    int is_row[V] = {0};
    for (int i = 0; i < s; i++) {
        if (rows[i] < 0 || rows[i] >= V || is_row[rows[i]]) return -1;
        is_row[rows[i]] = 1;
    }
    for (int t = 0; t < L; t++)
        if (!is_row[bytes[t]]) return -1;
    for (int i = 0; i < o; i++)
        if (obs[i] < 0 || obs[i] >= L || (i > 0 && obs[i] <= obs[i - 1])) return -1;
    int slot[V], first_obs[V];
    int u = window_values(L, bytes, slot);
    double *acc = malloc((size_t)(u ? u : 1) * K * sizeof(double));
    float *feats = malloc((size_t)(o && u ? o * u : 1) * K * sizeof(float));
    float *decay_at = malloc((size_t)(o ? o : 1) * K * sizeof(float));
    float *grad_carry = malloc((size_t)K * C * sizeof(float));
    float *own = malloc((size_t)(K + 1) * C * sizeof(float)); /* row K: zeros, band K+1 */
    float *delta = malloc((size_t)2 * C * sizeof(float)); /* this band's and the previous one's */
    if (!acc || !feats || !decay_at || !grad_carry || !own || !delta) {
        free(acc); free(feats); free(decay_at); free(grad_carry); free(own); free(delta);
        return -2;
    }
    window_feats(L, K, bytes, o, obs, alpha, slot, u, acc, feats, decay_at, first_obs);
    weighted_sum(K, C, o, 0, decay_at, K, dzc, grad_carry);
    memset(own + (size_t)K * C, 0, (size_t)C * sizeof(float));
    for (int k = 0; k < K; k++) power[k] = 0.0;
    for (int r = 0; r < s; r++) {
        const double *tr = t_ref + (size_t)r * K;
        const float *tn = t_now + (size_t)r * K;
        int q = slot[rows[r]];
        int has_own = q >= 0 && first_obs[q] < o; /* observed after its first byte in the window */
        if (has_own) weighted_sum(K, C, o, first_obs[q], feats + (size_t)q * K, (size_t)u * K, dzc, own);
        float *row = ucat + (size_t)rows[r] * K * C;
        float *prev = delta + C, *cur = delta;
        for (int k = 0; k < K; k++) {
            const float *d = grad_carry + (size_t)k * C;
            const float *d_next = grad_carry + (size_t)(k + 1) * C;
            int next = bandpass && k + 1 < K;
            float a = coef[k] * (float)tr[k], b = next ? coef[k] * (float)tr[k + 1] : 0.0f, ck = coef[k];
            /* separate loops, no branch inside: each one vectorizes */
            for (int c = 0; c < C; c++) cur[c] = a * d[c];
            if (next)
                for (int c = 0; c < C; c++) cur[c] -= b * d_next[c];
            if (has_own) {
                const float *o_k = own + (size_t)k * C, *o_next = own + (size_t)(next ? k + 1 : K) * C;
                for (int c = 0; c < C; c++) cur[c] += ck * (o_k[c] - o_next[c]);
            }
            power[k] += sum_of_squares(C, cur);
            if (apply) {
                float *uk = row + (size_t)k * C, *pk = carry + (size_t)k * C, t = tn[k];
                for (int c = 0; c < C; c++) uk[c] += cur[c];
                if (bandpass && k > 0)
                    for (int c = 0; c < C; c++) pk[c] += t * (cur[c] - prev[c]);
                else
                    for (int c = 0; c < C; c++) pk[c] += t * cur[c];
            }
            float *swap = prev;
            prev = cur;
            cur = swap;
        }
    }
    for (int k = 0; k < K; k++) power[k] /= (double)coef[k] * coef[k];
    free(acc); free(feats); free(decay_at); free(grad_carry); free(own); free(delta);
    return 0;
}
