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

int soma_abi_version(void) { return 3; }

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
