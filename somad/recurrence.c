/* soma's forward pass and weight update for a chunk of bytes, in C (see somad/native.py).
 *
 * Forward (soma_chunk_forward). The carried state P (K x C) is the trace bank read through
 * the mixed weights U~ = M U: P_j = sum_v T[v, j] U~[v, j, :]. Byte x moves it exactly:
 *     P_j <- alpha_j P_j + (1 - alpha_j) U~[x, j, :]
 * and the pre-activations predicting the next byte are z = sum_j P_j. This is O(K * C) per
 * byte, against O(m * r * C) for the lag-mode GEMM of the torch path (m distinct byte values
 * per chunk, r lag modes). Columns are done in blocks of CB whose rows (the chunk's own weight
 * rows, mixed and scaled: g_j U~[v, j, :], g_j = 1 - alpha_j) fit in L1, and within a block in
 * register blocks (run_group); then the activation, the logits h W + b (+ Wd x), and each
 * byte's loss in bits (and, if asked, the entropy of its prediction).
 *
 * Update (soma_window_update): one SGD step from a window of observations, from what the
 * window kept (its bytes, and at each observation h and the logits): the output gradients,
 * the trace-space gradients of every seen row, the step on those rows and on W and b, P kept
 * exact, and the gradient power per band.
 *
 * Precision. The per-byte state is float32, written P += g U~ - g P: the decay enters through
 * g_j, which float32 holds to 6e-8 of itself, not through alpha_j (for slow bands alpha_j is
 * 1 - 1e-5, which float32 holds only to 0.6 % of 1 - alpha_j: a biased decay). The state
 * carried to the next chunk is computed apart as alpha^n P + sum_v c[v, j] g_j U~[v, j] with
 * c[v, j] = sum over the chunk's bytes s equal to v of alpha_j^(n-1-s) (summed in float64):
 * one rounding per chunk, as in the torch path, so it does not drift over many chunks.
 *
 * C99 with GCC/clang vector extensions, no library but libm; it allocates nothing (the caller
 * passes scratch memory), and is compiled on the device at first use (native.py).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CB 64          /* output columns per block */
#define MAX_BANDS 64   /* SomaConfig allows n_bands 1..64 */
#define V 256

int soma_abi_version(void) { return 10; }

/* SIMD through GCC/clang vector extensions (no intrinsics: the same code on x86 and Arm), a
 * vector as wide as the target's registers. */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4 /* SSE2, NEON */
#endif
typedef float vec __attribute__((vector_size(VW * sizeof(float))));
static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }
typedef int32_t veci __attribute__((vector_size(VW * sizeof(int32_t))));
static inline vec vselect(veci mask, vec a, vec b) { return (vec)((mask & (veci)a) | (~mask & (veci)b)); }
static inline vec vmax(vec a, vec b) { return vselect(a > b, a, b); }
/* x limited to [lo, hi]; NaN stays NaN (a non-finite weight must reach the loss check) */
static inline vec vclamp(vec x, float lo, float hi) { return vselect(x > hi, (vec){0} + hi, vselect(x < lo, (vec){0} + lo, x)); }

#define RCB (2 * VW) /* columns of a register block of the recurrence (two vectors) */
#define TILE 64      /* bytes per tile: the tile's sums (TILE x RCB floats) stay in L1 */
#define LOSS_ROWS 64 /* rows of logits made, then turned into losses, at a time */

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

/* z[(t - t0) * zs + c] += sum over bands j0 .. j0 + 3 of P_j before byte t (t0 <= t < t1),
 * c < RCB, the four bands' states entering from st (4 x RCB) and left there after byte
 * t1 - 1 (the chunk's last byte only moves the state, in advance_state); rows as mix_rows
 * made them, this register block's columns from r0. The states, four bands by two vectors,
 * stay in registers: eight independent chains, enough to hide the latency of the two
 * operations (P += u - g P) a byte adds to each. Measured on this project's x86 VM: 1.5x the
 * speed of one loop over all bands with the states in memory. */
static void run_group(int t0, int t1, int n, const int64_t *bytes, const int *slot, int K, int j0,
                      int r0, const float *rows, const float *gain, float *st, float *z, size_t zs) {
    vec a0 = vload(st), a1 = vload(st + RCB), a2 = vload(st + 2 * RCB), a3 = vload(st + 3 * RCB);
    vec b0 = vload(st + VW), b1 = vload(st + RCB + VW), b2 = vload(st + 2 * RCB + VW), b3 = vload(st + 3 * RCB + VW);
    const float g0 = gain[j0], g1 = gain[j0 + 1], g2 = gain[j0 + 2], g3 = gain[j0 + 3];
    for (int t = t0; t < t1; t++) {
        float *zt = z + (size_t)(t - t0) * zs;
        vstore(zt, vload(zt) + ((a0 + a1) + (a2 + a3)));
        vstore(zt + VW, vload(zt + VW) + ((b0 + b1) + (b2 + b3)));
        if (t + 1 == n) break;
        const float *u = rows + ((size_t)slot[bytes[t]] * K + j0) * CB + r0;
        a0 += vload(u) - g0 * a0;
        b0 += vload(u + VW) - g0 * b0;
        a1 += vload(u + CB) - g1 * a1;
        b1 += vload(u + CB + VW) - g1 * b1;
        a2 += vload(u + 2 * CB) - g2 * a2;
        b2 += vload(u + 2 * CB + VW) - g2 * b2;
        a3 += vload(u + 3 * CB) - g3 * a3;
        b3 += vload(u + 3 * CB + VW) - g3 * b3;
    }
    vstore(st, a0), vstore(st + RCB, a1), vstore(st + 2 * RCB, a2), vstore(st + 3 * RCB, a3);
    vstore(st + VW, b0), vstore(st + RCB + VW, b1), vstore(st + 2 * RCB + VW, b2), vstore(st + 3 * RCB + VW, b3);
}

#if defined(__AVX512F__) || defined(__aarch64__)
/* run_group for eight bands, on targets with 32 vector registers (16 chains, one z update per
 * eight bands: 6 % faster than two groups of four on this project's AVX-512 VM). */
#define GROUP 8
static void run_group8(int t0, int t1, int n, const int64_t *bytes, const int *slot, int K, int j0,
                       int r0, const float *rows, const float *gain, float *st, float *z, size_t zs) {
    vec a0 = vload(st), a1 = vload(st + RCB), a2 = vload(st + 2 * RCB), a3 = vload(st + 3 * RCB);
    vec a4 = vload(st + 4 * RCB), a5 = vload(st + 5 * RCB), a6 = vload(st + 6 * RCB), a7 = vload(st + 7 * RCB);
    vec b0 = vload(st + VW), b1 = vload(st + RCB + VW), b2 = vload(st + 2 * RCB + VW), b3 = vload(st + 3 * RCB + VW);
    vec b4 = vload(st + 4 * RCB + VW), b5 = vload(st + 5 * RCB + VW), b6 = vload(st + 6 * RCB + VW), b7 = vload(st + 7 * RCB + VW);
    const float *g = gain + j0;
    for (int t = t0; t < t1; t++) {
        float *zt = z + (size_t)(t - t0) * zs;
        vstore(zt, vload(zt) + (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))));
        vstore(zt + VW, vload(zt + VW) + (((b0 + b1) + (b2 + b3)) + ((b4 + b5) + (b6 + b7))));
        if (t + 1 == n) break;
        const float *u = rows + ((size_t)slot[bytes[t]] * K + j0) * CB + r0;
        a0 += vload(u) - g[0] * a0, b0 += vload(u + VW) - g[0] * b0;
        a1 += vload(u + CB) - g[1] * a1, b1 += vload(u + CB + VW) - g[1] * b1;
        a2 += vload(u + 2 * CB) - g[2] * a2, b2 += vload(u + 2 * CB + VW) - g[2] * b2;
        a3 += vload(u + 3 * CB) - g[3] * a3, b3 += vload(u + 3 * CB + VW) - g[3] * b3;
        a4 += vload(u + 4 * CB) - g[4] * a4, b4 += vload(u + 4 * CB + VW) - g[4] * b4;
        a5 += vload(u + 5 * CB) - g[5] * a5, b5 += vload(u + 5 * CB + VW) - g[5] * b5;
        a6 += vload(u + 6 * CB) - g[6] * a6, b6 += vload(u + 6 * CB + VW) - g[6] * b6;
        a7 += vload(u + 7 * CB) - g[7] * a7, b7 += vload(u + 7 * CB + VW) - g[7] * b7;
    }
    vstore(st, a0), vstore(st + RCB, a1), vstore(st + 2 * RCB, a2), vstore(st + 3 * RCB, a3);
    vstore(st + 4 * RCB, a4), vstore(st + 5 * RCB, a5), vstore(st + 6 * RCB, a6), vstore(st + 7 * RCB, a7);
    vstore(st + VW, b0), vstore(st + RCB + VW, b1), vstore(st + 2 * RCB + VW, b2), vstore(st + 3 * RCB + VW, b3);
    vstore(st + 4 * RCB + VW, b4), vstore(st + 5 * RCB + VW, b5), vstore(st + 6 * RCB + VW, b6), vstore(st + 7 * RCB + VW, b7);
}
#else
#define GROUP 4
#endif

/* run_group for one band (those left over when groups do not divide K). */
static void run_band(int t0, int t1, int n, const int64_t *bytes, const int *slot, int K, int j,
                     int r0, const float *rows, const float *gain, float *st, float *z, size_t zs) {
    vec a = vload(st), b = vload(st + VW);
    const float g = gain[j];
    for (int t = t0; t < t1; t++) {
        float *zt = z + (size_t)(t - t0) * zs;
        vstore(zt, vload(zt) + a);
        vstore(zt + VW, vload(zt + VW) + b);
        if (t + 1 == n) break;
        const float *u = rows + ((size_t)slot[bytes[t]] * K + j) * CB + r0;
        a += vload(u) - g * a;
        b += vload(u + VW) - g * b;
    }
    vstore(st, a);
    vstore(st + VW, b);
}

/* zc[t, col : col + w] = zinit + sum_j P_j before byte t for the columns of one block (w <=
 * CB; zinit: CB floats), the states entering from carry: register blocks of RCB columns, tiles
 * of TILE bytes. */
static void run_block(int n, const int64_t *bytes, const int *slot, int K, int C, int col, int w,
                      const float *rows, const float *gain, const float *carry, const float *zinit,
                      float *zc) {
    float st[MAX_BANDS * RCB], spill[TILE * RCB];
    for (int r0 = 0; r0 < w; r0 += RCB) {
        int rw = w - r0 < RCB ? w - r0 : RCB;
        for (int j = 0; j < K; j++)
            for (int c = 0; c < RCB; c++) st[j * RCB + c] = c < rw ? carry[(size_t)j * C + col + r0 + c] : 0.0f;
        for (int t0 = 0; t0 < n; t0 += TILE) {
            int t1 = n - t0 < TILE ? n : t0 + TILE;
            /* sums straight into zc, but for a last block narrower than RCB */
            float *z = rw == RCB ? zc + (size_t)t0 * C + col + r0 : spill;
            size_t zs = rw == RCB ? (size_t)C : RCB;
            vec z0 = vload(zinit + r0), z1 = vload(zinit + r0 + VW);
            for (int t = t0; t < t1; t++) {
                vstore(z + (t - t0) * zs, z0);
                vstore(z + (t - t0) * zs + VW, z1);
            }
            int j0 = 0;
#if GROUP == 8
            for (; j0 + 8 <= K; j0 += 8)
                run_group8(t0, t1, n, bytes, slot, K, j0, r0, rows, gain, st + j0 * RCB, z, zs);
#endif
            for (; j0 + 4 <= K; j0 += 4)
                run_group(t0, t1, n, bytes, slot, K, j0, r0, rows, gain, st + j0 * RCB, z, zs);
            for (; j0 < K; j0++)
                run_band(t0, t1, n, bytes, slot, K, j0, r0, rows, gain, st + j0 * RCB, z, zs);
            if (rw < RCB)
                for (int t = t0; t < t1; t++)
                    memcpy(zc + (size_t)t * C + col + r0, spill + (size_t)(t - t0) * RCB, (size_t)rw * sizeof(float));
        }
    }
}

/* e^x for x in [-87, 88], within 2 ulp: e^x = 2^k e^r, k = round(x / ln 2), |r| <= ln 2 / 2,
 * e^r by Cephes' polynomial; NaN stays NaN. In vector operations throughout (a scalar loop
 * was vectorized only partly: its clamps and int conversion became masked half-width code),
 * as these exps are most of the loss's and the activation's time. */
static inline vec vexp(vec x) {
    x = vclamp(x, -87.0f, 88.0f);
    vec k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vec r = x - k * 0.693359375f - k * -2.12194440e-4f;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    veci bits = (__builtin_convertvector(k, veci) + 127) << 23;
    return p * (vec)bits;
}

/* The hidden units' activation, in place over rows x H (stride C): 1 tanh, 2 relu, 0 none.
 * tanh(x) = (e^2x - 1) / (e^2x + 1), |x| capped at 9 (tanh(9) rounds to 1 in float32). */
static void activate(int n, int C, int H, int act, float *zc) {
    vec zero = {0};
    for (int t = 0; t < n; t++) {
        float *z = zc + (size_t)t * C;
        int c = 0;
        if (act == 1) {
            for (; c + VW <= H; c += VW) {
                vec e = vexp(2.0f * vclamp(vload(z + c), -9.0f, 9.0f));
                vstore(z + c, (e - 1.0f) / (e + 1.0f));
            }
            if (c < H) { /* the last columns, through one padded vector */
                float tail[VW] = {0};
                memcpy(tail, z + c, (size_t)(H - c) * sizeof(float));
                vec e = vexp(2.0f * vclamp(vload(tail), -9.0f, 9.0f));
                vstore(tail, (e - 1.0f) / (e + 1.0f));
                memcpy(z + c, tail, (size_t)(H - c) * sizeof(float));
            }
        } else if (act == 2) {
            for (; c + VW <= H; c += VW) { /* NaN stays NaN */
                vec x = vload(z + c);
                vstore(z + c, vselect(x < zero, zero, x));
            }
            for (; c < H; c++) z[c] = z[c] < 0.0f ? 0.0f : z[c];
        }
    }
}

/* Rows of a GEMM register block: MR rows by two vectors of accumulators, as many as the target
 * has registers for beside the two B vectors and a broadcast (32 vector registers on AVX-512
 * and Arm: 8 rows, 16 accumulators; 16 on AVX2 and SSE: 6 rows). Measured on this project's
 * AVX-512 VM, a 256 x 128 by 128 x 256 product: 4 rows 87, 6 rows 102, 8 rows 121 GFLOP/s
 * (torch's MKL: about 120). */
#if defined(__AVX512F__) || defined(__aarch64__)
#define MR 8
#else
#define MR 6
#endif
#define KCB 256 /* the inner dimension in blocks: a block of B (KCB x two vectors) stays in L1 */

/* out[r, c] = beta cin[r, c] + scale sum_i a[r * ars + i * acs] b[i * ldb + c], for r < R,
 * c < N, i < I, out rows ldo apart and cin rows ldc apart (ldc 0: one row for all; cin NULL:
 * out itself); beta 0 ignores cin. Register blocks of MR rows
 * by two vectors (the strides of a only change which scalars are broadcast, so one kernel
 * serves A and A^T), the inner dimension in blocks of KCB. */
static void gemm(int R, int N, int I, const float *a, size_t ars, size_t acs, const float *b,
                 size_t ldb, float *out, size_t ldo, float beta, float scale, const float *cin,
                 size_t ldc) {
    for (int i0 = 0; i0 < I || i0 == 0; i0 += KCB) {
        int i1 = I - i0 < KCB ? I : i0 + KCB;
        float bb = i0 == 0 ? beta : 1.0f; /* later blocks add to what the first wrote */
        const float *c_in = i0 == 0 && cin ? cin : out; /* what beta scales */
        size_t ldi = i0 == 0 && cin ? ldc : ldo;
        int c0 = 0;
        for (; c0 + 2 * VW <= N; c0 += 2 * VW) {
            int r = 0;
            for (; r + MR <= R; r += MR) {
                vec x[MR], y[MR];
                for (int k = 0; k < MR; k++) x[k] = (vec){0}, y[k] = (vec){0};
                for (int i = i0; i < i1; i++) {
                    const float *bi = b + (size_t)i * ldb + c0, *ai = a + (size_t)r * ars + (size_t)i * acs;
                    vec p = vload(bi), q = vload(bi + VW);
#pragma GCC unroll 8
                    for (int k = 0; k < MR; k++) {
                        float s = ai[(size_t)k * ars];
                        x[k] += s * p, y[k] += s * q;
                    }
                }
                for (int k = 0; k < MR; k++) {
                    float *d = out + (size_t)(r + k) * ldo + c0;
                    const float *ci = c_in + (size_t)(r + k) * ldi + c0;
                    vstore(d, bb == 0.0f ? scale * x[k] : bb * vload(ci) + scale * x[k]);
                    vstore(d + VW, bb == 0.0f ? scale * y[k] : bb * vload(ci + VW) + scale * y[k]);
                }
            }
            for (; r < R; r++) {
                vec x = {0}, y = {0};
                for (int i = i0; i < i1; i++) {
                    const float *bi = b + (size_t)i * ldb + c0;
                    float s0 = a[(size_t)r * ars + (size_t)i * acs];
                    x += s0 * vload(bi), y += s0 * vload(bi + VW);
                }
                float *d = out + (size_t)r * ldo + c0;
                const float *ci = c_in + (size_t)r * ldi + c0;
                vstore(d, bb == 0.0f ? scale * x : bb * vload(ci) + scale * x);
                vstore(d + VW, bb == 0.0f ? scale * y : bb * vload(ci + VW) + scale * y);
            }
        }
        for (; c0 + VW <= N; c0 += VW) { /* a last block of one vector: four rows at a time */
            int r = 0;
            for (; r + 4 <= R; r += 4) {
                vec x0 = {0}, x1 = {0}, x2 = {0}, x3 = {0};
                const float *a0 = a + (size_t)r * ars, *a1 = a0 + ars, *a2 = a1 + ars, *a3 = a2 + ars;
                for (int i = i0; i < i1; i++) {
                    vec p = vload(b + (size_t)i * ldb + c0);
                    size_t at = (size_t)i * acs;
                    x0 += a0[at] * p, x1 += a1[at] * p, x2 += a2[at] * p, x3 += a3[at] * p;
                }
                vec xs[4] = {x0, x1, x2, x3};
                for (int k = 0; k < 4; k++) {
                    float *d = out + (size_t)(r + k) * ldo + c0;
                    vstore(d, bb == 0.0f ? scale * xs[k] : bb * vload(c_in + (size_t)(r + k) * ldi + c0) + scale * xs[k]);
                }
            }
            for (; r < R; r++) {
                vec x = {0};
                for (int i = i0; i < i1; i++) x += a[(size_t)r * ars + (size_t)i * acs] * vload(b + (size_t)i * ldb + c0);
                float *d = out + (size_t)r * ldo + c0;
                vstore(d, bb == 0.0f ? scale * x : bb * vload(c_in + (size_t)r * ldi + c0) + scale * x);
            }
        }
        for (; c0 < N; c0++) /* columns past the last block */
            for (int r = 0; r < R; r++) {
                float x = 0.0f;
                for (int i = i0; i < i1; i++) x += a[(size_t)r * ars + (size_t)i * acs] * b[(size_t)i * ldb + c0];
                float *d = out + (size_t)r * ldo + c0;
                *d = bb == 0.0f ? scale * x : bb * c_in[(size_t)r * ldi + c0] + scale * x;
            }
        if (I == 0) break;
    }
}

/* max over x[0 .. 255], and sum of e[v] = exp(x[v] - max) written to e (may be NULL: then
 * not kept) with, in *moment, the sum of e[v] (x[v] - max) (may be NULL: not summed). */
static inline float softmax_sums(const float *x, float *e, float *top_out, float *moment) {
    vec m = vload(x);
    for (int v = VW; v < V; v += VW) m = vmax(m, vload(x + v));
    float top = m[0];
    for (int l = 1; l < VW; l++) top = m[l] > top ? m[l] : top;
    vec sum = {0}, mom = {0};
    for (int v = 0; v < V; v += VW) {
        vec d = vload(x + v) - top, ev = vexp(d);
        if (e) vstore(e + v, ev);
        sum += ev;
        if (moment) mom += ev * d;
    }
    float total = 0.0f, mt = 0.0f;
    for (int l = 0; l < VW; l++) total += sum[l], mt += mom[l];
    *top_out = top;
    if (moment) *moment = mt;
    return total;
}

/* Per row t of logits (n x 256): bits[t] = the loss of byte target[t] in bits, and if entropy
 * is not NULL the entropy of the row's softmax in bits. Returns how many losses are not finite. */
static int losses(int n, const float *logits, const int64_t *target, float *bits, float *entropy) {
    const float inv_ln2 = 1.44269504088896341f;
    int bad = 0;
    for (int t = 0; t < n; t++) {
        const float *x = logits + (size_t)t * V;
        float top, moment = 0.0f; /* two calls: each inlined without the branches it does not take */
        float sum = entropy ? softmax_sums(x, NULL, &top, &moment) : softmax_sums(x, NULL, &top, NULL);
        float lse = logf(sum); /* log sum exp(x - top) */
        bits[t] = (lse - (x[target[t]] - top)) * inv_ln2;
        if (entropy) entropy[t] = (lse - moment / sum) * inv_ln2;
        bad += !isfinite(bits[t]);
    }
    return bad;
}

/* Updates deferred for the rows outside their window ("pending"). A window's update moves
 * every seen row, but the rows of the byte values outside the window only along D:
 *     delta[v, k] = coef_k (T_ref[v, k] D_k - T_ref[v, k+1] D_k+1)     (traces: no k+1 term)
 * so a row need not be written until it is read: an update keeps its D, coef and T_ref as an
 * entry, and a row is brought up to date (refresh_rows) when a chunk is about to read it, or
 * when the entries run out (the caller refreshes every row then: soma_rows_refresh). Several
 * entries and rows at once are one GEMM per band (the entries' D read once, not once a row and
 * update): the update's pass over all seen rows, memory-bound for large models, becomes a
 * compute-bound product. P and the band power do not wait: they are kept exact at the update.
 * count entries: d (count x K x C), coef (count x K), banks[e] the address of entry e's T_ref
 * (256 x K float64); version[v] (256): the entries row v has had (entries version[v] .. count-1
 * are still to apply to it). */
typedef struct {
    int count;
    const float *d, *coef;
    const int64_t *banks;
    int32_t *version;
} pending;

/* Whether the caller's workspace (*work_len floats at work) is smaller than need floats; if
 * so, *work_len is set to need (the functions then return -3, and the caller grows it). */
static int too_little_work(const float *work, int64_t *work_len, size_t need) {
    if (work && *work_len >= 0 && (size_t)*work_len >= need) return 0;
    *work_len = (int64_t)need;
    return 1;
}

/* The seen byte values (seen: 256 flags) into rows, in increasing order. Returns their number. */
static int seen_rows(const uint8_t *seen, int *rows) {
    int s = 0;
    for (int v = 0; v < V; v++)
        if (seen[v]) rows[s++] = v;
    return s;
}

/* Floats of scratch refresh_rows needs for nr rows. */
static size_t refresh_work(int nr, int C, int count) { return (size_t)nr * C + (size_t)nr * count; }

/* Bring rows asked[0 .. n_asked) of ucat up to date with the pending entries (see pending). */
static void refresh_rows(int n_asked, const int *asked, int K, int C, int bandpass, float *ucat,
                         const pending *pd, float *work) {
    if (!pd || !pd->version || pd->count == 0) return;
    int vals[V], nr = 0, lo = pd->count; /* the rows with entries still to apply */
    for (int r = 0; r < n_asked; r++) {
        int vv = pd->version[asked[r]];
        if (vv < pd->count) {
            vals[nr++] = asked[r];
            if (vv < lo) lo = vv;
        }
    }
    if (nr == 0) return;
    int np = pd->count - lo;
    size_t KC = (size_t)K * C;
    float *tmp = work, *A = work + (size_t)nr * C; /* tmp (nr x C), A (nr x np) */
    for (int k = 0; k < K; k++) {
        int next = bandpass && k + 1 < K;
        for (int half = 0; half < 1 + next; half++) { /* the D_k term, then the D_k+1 term */
            for (int r = 0; r < nr; r++)
                for (int e = 0; e < np; e++) {
                    int ee = lo + e;
                    const double *T = (const double *)(intptr_t)pd->banks[ee];
                    float c = pd->coef[(size_t)ee * K + k];
                    A[(size_t)r * np + e] = ee < pd->version[vals[r]] ? 0.0f : (half ? -c * (float)T[(size_t)vals[r] * K + k + 1] : c * (float)T[(size_t)vals[r] * K + k]);
                }
            gemm(nr, C, np, A, (size_t)np, 1, pd->d + (size_t)lo * KC + (size_t)(k + half) * C, KC, tmp, C, half ? 1.0f : 0.0f, 1.0f, NULL, 0);
        }
        for (int r = 0; r < nr; r++) {
            float *row = ucat + ((size_t)vals[r] * K + k) * C;
            const float *t = tmp + (size_t)r * C;
            for (int c = 0; c < C; c++) row[c] += t[c];
        }
    }
    for (int r = 0; r < nr; r++) pd->version[vals[r]] = pd->count;
}

/* Every seen row brought up to date with the pending entries (version[v] = count for all). */
int soma_rows_refresh(int K, int C, int bandpass, float *ucat, const uint8_t *seen, int count,
                      const float *d, const float *coef, const int64_t *banks, int32_t *version,
                      float *work, int64_t *work_len) {
    if (K < 1 || K > MAX_BANDS || C < 1 || count < 0 || !work_len) return -1;
    int rows[V], s = seen_rows(seen, rows);
    size_t need = refresh_work(s, C, count);
    if (too_little_work(work, work_len, need)) return -3;
    pending pd = {count, d, coef, banks, version};
    refresh_rows(s, rows, K, C, bandpass, ucat, &pd, work);
    return 0;
}

/* Floats of scratch soma_chunk_forward needs for a chunk of m distinct byte values: its sums
 * (float64), coefficients and mixed rows, or the rows' refresh, whichever is more. */
static size_t forward_work(int m, int K, int C, int pend_count) {
    size_t mk = (size_t)m * K, own = 2 * mk + mk + mk * CB, refresh = refresh_work(m, C, pend_count);
    return own > refresh ? own : refresh;
}

/* The forward pass of a chunk of n bytes, and the moves of the trace bank and of P past it.
 *   zc (n x C): row t = sum_j P_j before byte t, P entering as carry (K x C); then, for
 *     act 1 (tanh) or 2 (relu), the first H columns hold the hidden units' activations h.
 * With wt (W: H x 256, not NULL) and b (256), the prediction of each byte (act must be given):
 *   zc's other C - H columns (the direct logits Wd x, if any) hold them plus b, and
 *   logits (n x 256) = h W + b (+ Wd x);
 *   bits (n): each byte's loss in bits; entropy (n, may be NULL): each prediction's entropy.
 * Optional outputs (NULL: not wanted):
 *   carry_out (K x C, may be carry itself): P after the chunk's last byte;
 *   traces_out (256 x K float64): the trace bank after the chunk, from traces before it;
 *   seen (256 bytes): set to 1 for the chunk's byte values.
 * ucat: (256 * K, C) rows (v, k), the chunk's own brought up to date first with the pending
 * entries (pend_*, version: see pending; pend_count 0 or version NULL: none); alpha: (K,) decays.
 * work: *work_len floats of scratch (8-byte aligned); when that is too little, returns -3 and
 * sets *work_len to the floats needed (the caller keeps one workspace: no allocation here).
 * Returns the number of distinct byte values; -1 for bad arguments, -3 for more workspace, -4
 * when a loss is not finite (every output written). */
int soma_chunk_forward(int n, int K, int C, int H, int bandpass, int act, const int64_t *bytes,
                       float *ucat, const double *alpha, const float *carry, const float *wt,
                       const float *b, float *zc, float *logits, float *bits, float *entropy,
                       float *carry_out, const double *traces, double *traces_out, uint8_t *seen,
                       int pend_count, const float *pend_d, const float *pend_coef,
                       const int64_t *pend_banks, int32_t *version, float *work, int64_t *work_len) {
    if (n < 1 || K < 1 || K > MAX_BANDS || C < 1 || H < 0 || H > C || act < 0 || act > 2 || !work_len) return -1;
    if (wt && (!b || !logits || !bits || act == 0 || (C != H && C != H + V))) return -1;
    if ((traces_out != NULL) != (traces != NULL)) return -1;
    for (int t = 0; t < n; t++)
        if (bytes[t] < 0 || bytes[t] >= V) return -1;
    int slot[V], values[V];
    int m = chunk_values(n, bytes, slot, values);
    float gain[MAX_BANDS];
    for (int j = 0; j < K; j++) gain[j] = (float)(1.0 - alpha[j]);
    float decay_n[MAX_BANDS];
    double decay64[MAX_BANDS];
    size_t mk = (size_t)m * K, need = forward_work(m, K, C, pend_count);
    if (too_little_work(work, work_len, need)) return -3;
    pending pd = {pend_count, pend_d, pend_coef, pend_banks, version};
    refresh_rows(m, values, K, C, bandpass, ucat, &pd, work); /* the rows this chunk reads, up to date */
    double *sums = (double *)work; /* first: 8-byte aligned as the workspace is */
    float *coef = work + 2 * mk, *rows = coef + mk;
    chunk_coefficients(n, m, K, bytes, slot, alpha, sums, coef, decay64, decay_n);
    if (traces_out) { /* T <- alpha^n T + what the chunk's bytes add */
        for (int v = 0; v < V; v++)
            for (int j = 0; j < K; j++) traces_out[(size_t)v * K + j] = traces[(size_t)v * K + j] * decay64[j];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < K; j++) traces_out[(size_t)values[i] * K + j] += (1.0 - alpha[j]) * sums[(size_t)i * K + j];
    }
    if (seen)
        for (int i = 0; i < m; i++) seen[values[i]] = 1;
    for (int c0 = 0; c0 < C; c0 += CB) {
        int w = C - c0 < CB ? C - c0 : CB;
        float zinit[CB] = {0}; /* the direct logits start from b: the logits GEMM then adds h W to them */
        if (wt && C > H)
            for (int c = 0; c < w; c++) zinit[c] = c0 + c >= H ? b[c0 + c - H] : 0.0f;
        mix_rows(m, K, C, bandpass, c0, w, values, ucat, gain, rows);
        run_block(n, bytes, slot, K, C, c0, w, rows, gain, carry, zinit, zc);
        if (carry_out)
            advance_state(m, K, C, c0, w, rows, coef, decay_n, carry, carry_out);
    }
    activate(n, C, H, act, zc);
    if (!wt) return m;
    /* logits = (direct logits + b, or b for every row) + h W, and the losses, by blocks of
     * rows: a block's logits are still in cache when its losses read them */
    int bad = 0;
    for (int t0 = 0; t0 < n; t0 += LOSS_ROWS) {
        int rows_here = n - t0 < LOSS_ROWS ? n - t0 : LOSS_ROWS;
        const float *cin = C > H ? zc + (size_t)t0 * C + H : b;
        gemm(rows_here, V, H, zc + (size_t)t0 * C, C, 1, wt, V, logits + (size_t)t0 * V, V, 1.0f, 1.0f, cin, C > H ? (size_t)C : 0);
        bad += losses(rows_here, logits + (size_t)t0 * V, bytes + t0, bits + t0, entropy ? entropy + t0 : NULL);
    }
    return bad ? -4 : m;
}

/* Scoring only: n bytes in chunks of ``chunk`` (the last shorter), soma_chunk_forward on each
 * in turn, its h and logits kept in the workspace (nobody asked for them), the trace bank and
 * P carried from one to the next: one call where a call per chunk would cost its wrapper's
 * time each. bits (n), entropy (n or NULL): as soma_chunk_forward's. carry_out (K x C) and
 * traces_out (256 x K) receive P and the trace bank after the last byte (they may be carry
 * and traces). Returns 0, -1 for bad arguments, -3 for more workspace, -4 when a loss is not
 * finite (every output written). */
int soma_score_chunks(int n, int chunk, int K, int C, int H, int bandpass, int act,
                      const int64_t *bytes, float *ucat, const double *alpha, const float *carry,
                      const float *wt, const float *b, float *bits, float *entropy,
                      float *carry_out, const double *traces, double *traces_out, uint8_t *seen,
                      int pend_count, const float *pend_d, const float *pend_coef,
                      const int64_t *pend_banks, int32_t *version, float *work, int64_t *work_len) {
    if (n < 1 || chunk < 1 || K < 1 || K > MAX_BANDS || C < 1 || !wt || !b || !bits || !carry_out || !traces || !traces_out || !work_len)
        return -1;
    int len = n < chunk ? n : chunk, most = len < V ? len : V; /* a chunk's length, and its distinct values at most */
    size_t inner = forward_work(most, K, C, pend_count), need = inner + (size_t)len * C + (size_t)len * V;
    if (too_little_work(work, work_len, need)) return -3;
    float *zc = work + inner, *logits = zc + (size_t)len * C; /* the forward's own scratch first: 8-byte aligned */
    if (carry_out != carry) memcpy(carry_out, carry, (size_t)K * C * sizeof(float));
    if (traces_out != traces) memcpy(traces_out, traces, (size_t)V * K * sizeof(double));
    int bad = 0;
    for (int t0 = 0; t0 < n; t0 += chunk) {
        int m = n - t0 < chunk ? n - t0 : chunk;
        int64_t room = (int64_t)inner;
        int rc = soma_chunk_forward(m, K, C, H, bandpass, act, bytes + t0, ucat, alpha, carry_out, wt, b, zc,
                                    logits, bits + t0, entropy ? entropy + t0 : NULL, carry_out, traces_out,
                                    traces_out, seen, pend_count, pend_d, pend_coef, pend_banks, version, work, &room);
        if (rc == -4) bad = 1;
        else if (rc < 0) return -1; /* the workspace was sized for any chunk: only bad arguments are left */
    }
    return bad ? -4 : 0;
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

/* What each observation i's gradient reaches, as the rows of at (o x R, R = (u + 1) K):
 *   at[i, j]           = alpha_j^obs[i]: how the traces the window opened with reach obs[i];
 *   at[i, (q + 1) K + j] = the window's own traces of value q at obs[i]:
 *       sum over bytes s < obs[i] equal to q of (1 - alpha_j) alpha_j^(obs[i]-1-s).
 * The sums run in float64 (acc, u x K), every seen value's decayed at each byte: u K
 * multiplies a byte, against the forward's 2 K C, and no table that grows with L. */
static void window_feats(int L, int K, const uint8_t *bytes, int o, const int64_t *obs,
                         const double *alpha, const int *slot, int u, double *acc, float *at) {
    size_t R = (size_t)(u + 1) * K;
    double power[MAX_BANDS];
    for (int j = 0; j < K; j++) power[j] = 1.0;
    memset(at, 0, (size_t)o * R * sizeof(float));
    int seen = 0, i = 0;
    for (int t = 0; t < L; t++) {
        for (; i < o && obs[i] == t; i++) {
            float *f = at + (size_t)i * R;
            for (int j = 0; j < K; j++) f[j] = (float)power[j];
            for (int x = 0; x < seen * K; x++) f[K + x] = (float)acc[x];
        }
        for (int q = 0; q < seen; q++)
            for (int j = 0; j < K; j++) acc[(size_t)q * K + j] *= alpha[j];
        for (int j = 0; j < K; j++) power[j] *= alpha[j];
        int q = slot[bytes[t]];
        double *a = acc + (size_t)q * K;
        if (q == seen) { /* first occurrence (slots are numbered in that order) */
            seen++;
            for (int j = 0; j < K; j++) a[j] = 1.0 - alpha[j];
        } else {
            for (int j = 0; j < K; j++) a[j] += 1.0 - alpha[j];
        }
    }
}

/* g (o x 256, rows ldg apart) = softmax(logits_i) - onehot(target_i): the loss gradient (in
 * nats) at the logits of each observation; also transposed into gt (256 x ldt, ldt >= o). */
static void output_grad(int o, const float *logits, const uint8_t *bytes, const int64_t *obs,
                        float *g, size_t ldg, float *gt, size_t ldt) {
    for (int i = 0; i < o; i++) {
        const float *x = logits + (size_t)i * V;
        float *gi = g + (size_t)i * ldg;
        float top;
        float inv = 1.0f / softmax_sums(x, gi, &top, NULL);
        for (int v = 0; v < V; v++) gi[v] *= inv;
        gi[bytes[obs[i]]] -= 1.0f;
        for (int v = 0; v < V; v++) gt[(size_t)v * ldt + i] = gi[v];
    }
}

/* dz (o x H, rows ldz apart) = (g w^T) * act'(h): the gradient at the hidden pre-activations;
 * w (H x 256), h (o x H), act'(z) through h: 1 - h^2 (tanh), h > 0 (relu). As the product
 * dz^T = w g^T (H x ldt, from gt: 256 x ldt, ldt a multiple of VW, into dzt), one GEMM:
 * o dot products per hidden unit would each end in a horizontal sum. */
static void hidden_grad(int o, int H, int act, const float *gt, size_t ldt, const float *w,
                        const float *h, float *dzt, float *dz, size_t ldz) {
    gemm(H, (int)ldt, V, w, V, 1, gt, ldt, dzt, ldt, 0.0f, 1.0f, NULL, 0);
    for (int i = 0; i < o; i++)
        for (int u = 0; u < H; u++) {
            float hv = h[(size_t)i * H + u];
            dz[(size_t)i * ldz + u] = dzt[(size_t)u * ldt + i] * (act == 1 ? 1.0f - hv * hv : (hv > 0.0f ? 1.0f : 0.0f));
        }
}

static float dot(int C, const float *x, const float *y) {
    vec s0 = {0}, s1 = {0};
    int c = 0;
    for (; c + 2 * VW <= C; c += 2 * VW) s0 += vload(x + c) * vload(y + c), s1 += vload(x + c + VW) * vload(y + c + VW);
    float total = 0.0f;
    for (int l = 0; l < VW; l++) total += s0[l] + s1[l];
    for (; c < C; c++) total += x[c] * y[c];
    return total;
}

/* y += a x over C floats. */
static void axpy(int C, float a, const float *x, float *y) {
    for (int c = 0; c < C; c++) y[c] += a * x[c];
}

/* y += a x + b z over C floats (one pass over y). */
static void axpy2(int C, float a, const float *x, float b, const float *z, float *y) {
    for (int c = 0; c < C; c++) y[c] += a * x[c] + b * z[c];
}

/* One SGD step from a window of observations on the rows of U and Wd (ucat) of the s byte
 * values seen so far, on W and b, with P kept exact (learner._apply_window; the torch path does
 * the same with tensor operations, learner.GradientWindow).
 *
 * The window opened when the trace bank was T_ref; since then it read L bytes, and made o
 * observations at positions obs[i] (increasing, < L), keeping at each the hidden activations
 * h_i (H) and the logits (256) that predicted byte obs[i]. From those: g_i = softmax - onehot,
 * dz_i = (g_i W^T) act'(h_i), dZ_i = [dz_i | g_i] (dz_i alone without a direct readout: C = H).
 * The traces before byte t are alpha^t T_ref plus the window's own, so the trace-space
 * gradient of row (v, j) is
 *   G[v, j] = T_ref[v, j] D_j + O[v, j],  D_j = sum_i alpha_j^obs[i] dZ_i,
 *   O[v, j] = sum_i feats[i, v, j] dZ_i   (window_feats; only for the window's own values)
 * and the step, with the band mixing M (bandpass B_k = T_k - T_{k+1}):
 *   delta[v, k] = coef_k (G[v, k] - G[v, k+1])     (traces: coef_k G[v, k])
 *   ucat[v, k] += delta[v, k],  W -= eta h^T g,  b -= eta sum_i g_i        (if apply)
 *   P_j        += sum_v T_now[v, j] (delta[v, j] - delta[v, j-1])        (if apply; M delta)
 *   power_k     = sum_v |G[v, k] - G[v, k+1]|^2                            (always)
 * The rows outside the window only move along D, so their sums over v (P, power) reduce to a
 * few scalars per band; only the window's own rows are gone through one by one.
 * seen (256 bytes): which byte values have been seen (every byte of the window among them);
 * bank_ref and bank_now (256 x K float64): the trace bank when the window opened and now; alpha (K);
 * coef (K): -eta gamma_obs(k, d) (any nonzero value when eta is 0: the power is measured
 * without it); pend_d, pend_coef, version (NULL: the rows outside the window move at once):
 * their move is kept as pending entry pend_count instead (see pending; the caller leaves room
 * for it, and the window's own rows must be up to date, as the forward passes left them);
 * work, work_len: scratch as in soma_chunk_forward.
 * Returns 0, -1 for bad arguments, -3 for more workspace. */
int soma_window_update(int K, int C, int H, int bandpass, int act, int apply, const uint8_t *seen,
                       const double *bank_ref, const double *bank_now, int L,
                       const uint8_t *bytes, int o, const int64_t *obs, const float *hidden,
                       const float *logits, const double *alpha, const float *coef, float eta,
                       float *ucat, float *w, float *b, float *carry, double *power,
                       int pend_count, float *pend_d, float *pend_coef, int32_t *version,
                       float *work, int64_t *work_len) {
    if (K < 1 || K > MAX_BANDS || H < 1 || (C != H && C != H + V) || L < 0 || o < 0 || o > L) return -1;
    if (act < 1 || act > 2 || !work_len) return -1;
    int rows[V], s = seen_rows(seen, rows);
    for (int t = 0; t < L; t++)
        if (!seen[bytes[t]]) return -1;
    for (int i = 0; i < o; i++)
        if (obs[i] < 0 || obs[i] >= L || (i > 0 && obs[i] <= obs[i - 1])) return -1;
    for (int k = 0; k < K; k++)
        if (coef[k] == 0.0f) return -1;
    int slot[V];
    int u = window_values(L, bytes, slot);
    size_t R = (size_t)(u + 1) * K, KC = (size_t)K * C, direct = C > H;
    size_t ldt = ((size_t)o + VW - 1) / VW * VW; /* o, padded to whole vectors */
    size_t need = 2 * (size_t)u * K + (size_t)o * R + (size_t)o * C + (direct ? 0 : (size_t)o * V) + 2 * KC + 2 * (size_t)C + (size_t)V * ldt + (size_t)H * ldt;
    if (too_little_work(work, work_len, need)) return -3;
    double *acc = (double *)work; /* first: 8-byte aligned as the workspace is */
    float *at = work + 2 * (size_t)u * K;
    float *dzc = at + (size_t)o * R;                         /* o x C: [dz | g] */
    float *g = direct ? dzc + H : dzc + (size_t)o * C;       /* o x 256, rows ldg apart */
    size_t ldg = direct ? (size_t)C : V;
    float *grad_carry = dzc + (size_t)o * C + (direct ? 0 : (size_t)o * V); /* D (K x C) */
    float *own_grad = grad_carry + KC;                                /* O of one window value */
    float *cur = own_grad + KC;                                       /* a row's delta, this band and the last */
    float *gt = cur + 2 * (size_t)C, *dzt = gt + (size_t)V * ldt;   /* g^T (256 x ldt), dz^T (H x ldt) */

    memset(gt, 0, (size_t)V * ldt * sizeof(float)); /* the padding columns */
    output_grad(o, logits, bytes, obs, g, ldg, gt, ldt);
    hidden_grad(o, H, act, gt, ldt, w, hidden, dzt, dzc, C);
    window_feats(L, K, bytes, o, obs, alpha, slot, u, acc, at);
    gemm(K, C, o, at, 1, R, dzc, C, grad_carry, C, 0.0f, 1.0f, NULL, 0);
    for (int k = 0; k < K; k++) power[k] = 0.0;

    /* rows outside the window, band by band: delta[v, k] = coef_k (a D_k - b D_k+1) with
     * a = T_ref[v, k], b = T_ref[v, k+1] (bandpass) */
    for (int k = 0; k < K; k++) {
        int next = bandpass && k + 1 < K;
        const float *d = grad_carry + (size_t)k * C, *dn = next ? d + C : NULL;
        double dd = dot(C, d, d), dn_d = next ? dot(C, d, dn) : 0.0, nn = next ? dot(C, dn, dn) : 0.0;
        double s_ta = 0.0, s_tb = 0.0, s_tprev = 0.0; /* sums over these rows of t a, t b, t a_{k-1} */
        for (int r = 0; r < s; r++) {
            if (slot[rows[r]] >= 0) continue;
            const double *tr = bank_ref + (size_t)rows[r] * K;
            double a = tr[k], bb = next ? tr[k + 1] : 0.0, t = bank_now[(size_t)rows[r] * K + k];
            power[k] += a * a * dd - 2.0 * a * bb * dn_d + bb * bb * nn;
            s_ta += t * a, s_tb += t * bb;
            if (bandpass && k > 0) s_tprev += t * tr[k - 1];
            if (apply && !pend_d) { /* at once; else as a pending entry (below) */
                float *row = ucat + ((size_t)rows[r] * K + k) * C;
                if (next)
                    axpy2(C, coef[k] * (float)a, d, -coef[k] * (float)bb, dn, row);
                else
                    axpy(C, coef[k] * (float)a, d, row);
            }
        }
        if (apply) { /* P_k += sum_v t (delta[v, k] - delta[v, k-1]) over these rows */
            float *p = carry + (size_t)k * C;
            axpy(C, coef[k] * (float)s_ta, d, p);
            if (next) axpy(C, -coef[k] * (float)s_tb, dn, p);
            if (bandpass && k > 0) { /* delta[v, k-1] = coef_k-1 (a' D_k-1 - a D_k) */
                axpy(C, -coef[k - 1] * (float)s_tprev, d - C, p);
                axpy(C, coef[k - 1] * (float)s_ta, d, p);
            }
        }
    }

    /* the window's own rows, one by one: G also holds their own gradient O */
    for (int r = 0; r < s; r++) {
        int q = slot[rows[r]];
        if (q < 0) continue;
        gemm(K, C, o, at + (size_t)(q + 1) * K, 1, R, dzc, C, own_grad, C, 0.0f, 1.0f, NULL, 0);
        const double *tr = bank_ref + (size_t)rows[r] * K;
        float *this = cur, *prev = cur + C;
        for (int k = 0; k < K; k++) {
            int next = bandpass && k + 1 < K;
            const float *d = grad_carry + (size_t)k * C, *ok = own_grad + (size_t)k * C;
            float a = (float)tr[k], bb = next ? (float)tr[k + 1] : 0.0f, ck = coef[k];
            const float *dn = next ? d + C : d, *okn = next ? ok + C : ok; /* with bb = 0 and no next: unused terms */
            float nk = next ? 1.0f : 0.0f;
            float *row = ucat + ((size_t)rows[r] * K + k) * C, *p = carry + (size_t)k * C, t = (float)bank_now[(size_t)rows[r] * K + k];
            int mix = bandpass && k > 0;
            vec sq0 = {0}, sq1 = {0};
            int c = 0;
            for (; c + 2 * VW <= C; c += 2 * VW) /* G - G_next, |.|^2, delta, row and P in one pass */
                for (int half = 0; half < 2; half++) {
                    int x = c + half * VW;
                    vec gv = a * vload(d + x) + vload(ok + x) - nk * (bb * vload(dn + x) + vload(okn + x));
                    if (half) sq1 += gv * gv; else sq0 += gv * gv;
                    vec delta = ck * gv;
                    vstore(this + x, delta);
                    if (apply) {
                        vstore(row + x, vload(row + x) + delta);
                        vstore(p + x, vload(p + x) + t * (mix ? delta - vload(prev + x) : delta));
                    }
                }
            double pw = 0.0;
            for (int l = 0; l < VW; l++) pw += (double)sq0[l] + (double)sq1[l];
            for (; c < C; c++) {
                float gv = a * d[c] + ok[c] - nk * (bb * dn[c] + okn[c]);
                pw += (double)gv * gv;
                this[c] = ck * gv;
                if (apply) {
                    row[c] += this[c];
                    p[c] += t * (mix ? this[c] - prev[c] : this[c]);
                }
            }
            power[k] += pw;
            float *swap = prev;
            prev = this, this = swap;
        }
    }

    if (apply && pend_d) { /* the rows outside the window: entry pend_count (its T_ref: the caller's) */
        memcpy(pend_d + (size_t)pend_count * KC, grad_carry, KC * sizeof(float));
        memcpy(pend_coef + (size_t)pend_count * K, coef, (size_t)K * sizeof(float));
        for (int r = 0; r < s; r++) /* the window's own rows have it already */
            if (slot[rows[r]] >= 0) version[rows[r]] = pend_count + 1;
    }
    if (apply && eta != 0.0f) { /* the readout: W -= eta h^T g, b -= eta sum_i g_i */
        gemm(H, V, o, hidden, 1, H, g, ldg, w, V, 1.0f, -eta, NULL, 0);
        for (int i = 0; i < o; i++) axpy(V, -eta, g + (size_t)i * ldg, b);
    }
    return 0;
}
