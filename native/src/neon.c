/*
 * neon.c: the AArch64 path (Advanced SIMD, 4 floats per vector).
 *
 * Advanced SIMD is part of the AArch64 base architecture, so this path is
 * compiled without extra flags and always runs on AArch64. Reductions keep
 * ADL_ACC independent accumulators of 4 floats per sum (FMA latency ~4
 * cycles, 2 to 4 FMA pipes on current cores).
 */
#include "kernels.h"

#if ADL_HAVE_NEON
#include <arm_neon.h>

#define ADL_TARGET
#define ADL_TABLE_NAME adl_neon_kernels
#define ADL_PATH_NAME "neon"

#ifndef ADL_ACC
#define ADL_ACC 8
#endif
#define U ADL_ACC
#define W 4

#define LD(p) vld1q_f32(p)
#define ST(p, v) vst1q_f32((p), (v))
/* FMA(a, b, c) = a*b + c, as in avx2.c */
#define FMA(a, b, c) vfmaq_f32((c), (a), (b))

static inline float32x4_t fold(float32x4_t *acc) {
#pragma GCC unroll 16
    for (int w = 1; w < U; w *= 2)
#pragma GCC unroll 16
        for (int u = 0; u + w < U; u += 2 * w)
            acc[u] = vaddq_f32(acc[u], acc[u + w]);
    return acc[0];
}

static float dot1(const float *x, const float *a, size_t n) {
    float32x4_t acc[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
        acc[u] = vdupq_n_f32(0.0f);
    size_t i = 0;
    for (; i + W * U <= n; i += W * U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u)
            acc[u] = FMA(LD(x + i + W * u), LD(a + i + W * u), acc[u]);
    }
    for (; i + W <= n; i += W)
        acc[0] = FMA(LD(x + i), LD(a + i), acc[0]);
    float t = vaddvq_f32(fold(acc));
    for (; i < n; ++i)
        t += x[i] * a[i];
    return t;
}

static void dot2(const float *x, const float *a0, const float *a1, size_t n,
                 float *h) {
    float32x4_t p[U / 2], q[U / 2];
#pragma GCC unroll 16
    for (int u = 0; u < U / 2; ++u)
        p[u] = q[u] = vdupq_n_f32(0.0f);
    size_t i = 0;
    for (; i + W * (U / 2) <= n; i += W * (U / 2)) {
#pragma GCC unroll 16
        for (int u = 0; u < U / 2; ++u) {
            const float32x4_t xv = LD(x + i + W * u);
            p[u] = FMA(xv, LD(a0 + i + W * u), p[u]);
            q[u] = FMA(xv, LD(a1 + i + W * u), q[u]);
        }
    }
    for (; i + W <= n; i += W) {
        const float32x4_t xv = LD(x + i);
        p[0] = FMA(xv, LD(a0 + i), p[0]);
        q[0] = FMA(xv, LD(a1 + i), q[0]);
    }
    float32x4_t ps = p[0], qs = q[0];
    for (int u = 1; u < U / 2; ++u) {
        ps = vaddq_f32(ps, p[u]);
        qs = vaddq_f32(qs, q[u]);
    }
    float t0 = vaddvq_f32(ps), t1 = vaddvq_f32(qs);
    for (; i < n; ++i) {
        t0 += x[i] * a0[i];
        t1 += x[i] * a1[i];
    }
    h[0] = t0;
    h[1] = t1;
}

/* A (n, 2) row-major: vld2q splits 4 rows into the two rank columns. */
static void dot2i(const float *x, const float *A, size_t n, float *h) {
    float32x4_t p[U / 2], q[U / 2];
#pragma GCC unroll 16
    for (int u = 0; u < U / 2; ++u)
        p[u] = q[u] = vdupq_n_f32(0.0f);
    size_t i = 0;
    for (; i + W * (U / 2) <= n; i += W * (U / 2)) {
#pragma GCC unroll 16
        for (int u = 0; u < U / 2; ++u) {
            const float32x4_t xv = LD(x + i + W * u);
            const float32x4x2_t a = vld2q_f32(A + 2 * (i + W * u));
            p[u] = FMA(xv, a.val[0], p[u]);
            q[u] = FMA(xv, a.val[1], q[u]);
        }
    }
    for (; i + W <= n; i += W) {
        const float32x4_t xv = LD(x + i);
        const float32x4x2_t a = vld2q_f32(A + 2 * i);
        p[0] = FMA(xv, a.val[0], p[0]);
        q[0] = FMA(xv, a.val[1], q[0]);
    }
    float32x4_t ps = p[0], qs = q[0];
    for (int u = 1; u < U / 2; ++u) {
        ps = vaddq_f32(ps, p[u]);
        qs = vaddq_f32(qs, q[u]);
    }
    float t0 = vaddvq_f32(ps), t1 = vaddvq_f32(qs);
    for (; i < n; ++i) {
        t0 += x[i] * A[2 * i];
        t1 += x[i] * A[2 * i + 1];
    }
    h[0] = t0;
    h[1] = t1;
}

static void dot4(const float *x, const float *a0, const float *a1,
                 const float *a2, const float *a3, size_t n, float *h) {
    float32x4_t p0[2], p1[2], p2[2], p3[2];
    for (int u = 0; u < 2; ++u)
        p0[u] = p1[u] = p2[u] = p3[u] = vdupq_n_f32(0.0f);
    size_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
#pragma GCC unroll 2
        for (int u = 0; u < 2; ++u) {
            const size_t o = i + W * u;
            const float32x4_t xv = LD(x + o);
            p0[u] = FMA(xv, LD(a0 + o), p0[u]);
            p1[u] = FMA(xv, LD(a1 + o), p1[u]);
            p2[u] = FMA(xv, LD(a2 + o), p2[u]);
            p3[u] = FMA(xv, LD(a3 + o), p3[u]);
        }
    }
    float t0 = vaddvq_f32(vaddq_f32(p0[0], p0[1]));
    float t1 = vaddvq_f32(vaddq_f32(p1[0], p1[1]));
    float t2 = vaddvq_f32(vaddq_f32(p2[0], p2[1]));
    float t3 = vaddvq_f32(vaddq_f32(p3[0], p3[1]));
    for (; i < n; ++i) {
        t0 += x[i] * a0[i];
        t1 += x[i] * a1[i];
        t2 += x[i] * a2[i];
        t3 += x[i] * a3[i];
    }
    h[0] = t0;
    h[1] = t1;
    h[2] = t2;
    h[3] = t3;
}

static void axpy1(float *y, const float *b0, float c0, size_t n) {
    const float32x4_t c = vdupq_n_f32(c0);
    size_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u)
            ST(y + j + W * u, FMA(c, LD(b0 + j + W * u), LD(y + j + W * u)));
    }
    for (; j + W <= n; j += W)
        ST(y + j, FMA(c, LD(b0 + j), LD(y + j)));
    for (; j < n; ++j)
        y[j] += c0 * b0[j];
}

static void axpy2(float *y, const float *b0, const float *b1, float c0,
                  float c1, size_t n) {
    const float32x4_t v0 = vdupq_n_f32(c0), v1 = vdupq_n_f32(c1);
    size_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
            const size_t o = j + W * u;
            ST(y + o, FMA(v1, LD(b1 + o), FMA(v0, LD(b0 + o), LD(y + o))));
        }
    }
    for (; j + W <= n; j += W)
        ST(y + j, FMA(v1, LD(b1 + j), FMA(v0, LD(b0 + j), LD(y + j))));
    for (; j < n; ++j)
        y[j] += c0 * b0[j] + c1 * b1[j];
}

static void axpy4(float *y, const float *b0, const float *b1, const float *b2,
                  const float *b3, const float *c, size_t n) {
    const float32x4_t v0 = vdupq_n_f32(c[0]), v1 = vdupq_n_f32(c[1]);
    const float32x4_t v2 = vdupq_n_f32(c[2]), v3 = vdupq_n_f32(c[3]);
    size_t j = 0;
    for (; j + W <= n; j += W) {
        float32x4_t t = FMA(v0, LD(b0 + j), LD(y + j));
        t = FMA(v1, LD(b1 + j), t);
        t = FMA(v2, LD(b2 + j), t);
        ST(y + j, FMA(v3, LD(b3 + j), t));
    }
    for (; j < n; ++j)
        y[j] += c[0] * b0[j] + c[1] * b1[j] + c[2] * b2[j] + c[3] * b3[j];
}

static float dot_axpy1(const float *g, const float *b0, float *gb0, float c0,
                       size_t n) {
    const float32x4_t c = vdupq_n_f32(c0);
    float32x4_t acc[4];
    for (int u = 0; u < 4; ++u)
        acc[u] = vdupq_n_f32(0.0f);
    size_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
            const size_t o = j + W * u;
            const float32x4_t gv = LD(g + o);
            acc[u] = FMA(gv, LD(b0 + o), acc[u]);
            ST(gb0 + o, FMA(c, gv, LD(gb0 + o)));
        }
    }
    for (; j + W <= n; j += W) {
        const float32x4_t gv = LD(g + j);
        acc[0] = FMA(gv, LD(b0 + j), acc[0]);
        ST(gb0 + j, FMA(c, gv, LD(gb0 + j)));
    }
    float t = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for (; j < n; ++j) {
        t += g[j] * b0[j];
        gb0[j] += c0 * g[j];
    }
    return t;
}

static void dot_axpy2(const float *g, const float *b0, const float *b1,
                      float *gb0, float *gb1, float c0, float c1, size_t n,
                      float *u2) {
    const float32x4_t v0 = vdupq_n_f32(c0), v1 = vdupq_n_f32(c1);
    float32x4_t p[4], q[4];
    for (int u = 0; u < 4; ++u)
        p[u] = q[u] = vdupq_n_f32(0.0f);
    size_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
            const size_t o = j + W * u;
            const float32x4_t gv = LD(g + o);
            p[u] = FMA(gv, LD(b0 + o), p[u]);
            q[u] = FMA(gv, LD(b1 + o), q[u]);
            ST(gb0 + o, FMA(v0, gv, LD(gb0 + o)));
            ST(gb1 + o, FMA(v1, gv, LD(gb1 + o)));
        }
    }
    for (; j + W <= n; j += W) {
        const float32x4_t gv = LD(g + j);
        p[0] = FMA(gv, LD(b0 + j), p[0]);
        q[0] = FMA(gv, LD(b1 + j), q[0]);
        ST(gb0 + j, FMA(v0, gv, LD(gb0 + j)));
        ST(gb1 + j, FMA(v1, gv, LD(gb1 + j)));
    }
    float t0 = vaddvq_f32(vaddq_f32(vaddq_f32(p[0], p[1]), vaddq_f32(p[2], p[3])));
    float t1 = vaddvq_f32(vaddq_f32(vaddq_f32(q[0], q[1]), vaddq_f32(q[2], q[3])));
    for (; j < n; ++j) {
        t0 += g[j] * b0[j];
        t1 += g[j] * b1[j];
        gb0[j] += c0 * g[j];
        gb1[j] += c1 * g[j];
    }
    u2[0] = t0;
    u2[1] = t1;
}

static void outer2i(float *gA, const float *x, float c0, float c1, size_t n) {
    size_t i = 0;
    for (; i + W <= n; i += W) {
        const float32x4_t xv = LD(x + i);
        float32x4x2_t g = vld2q_f32(gA + 2 * i);
        g.val[0] = vfmaq_n_f32(g.val[0], xv, c0);
        g.val[1] = vfmaq_n_f32(g.val[1], xv, c1);
        vst2q_f32(gA + 2 * i, g);
    }
    for (; i < n; ++i) {
        gA[2 * i] += c0 * x[i];
        gA[2 * i + 1] += c1 * x[i];
    }
}

static void k_apply(float *param, float *grad, size_t count, float lr) {
    const float32x4_t z = vdupq_n_f32(0.0f);
    size_t i = 0;
    for (; i + 2 * W <= count; i += 2 * W) {
        ST(param + i, vfmsq_n_f32(LD(param + i), LD(grad + i), lr));
        ST(param + i + W, vfmsq_n_f32(LD(param + i + W), LD(grad + i + W), lr));
        ST(grad + i, z);
        ST(grad + i + W, z);
    }
    for (; i < count; ++i) {
        param[i] -= lr * grad[i];
        grad[i] = 0.0f;
    }
}

static void k_apply_ewc(float *param, float *grad, size_t count,
                        float inv_count, float lr, float lam, float *fisher,
                        const float *optimal, float decay, int proximal,
                        int update_fisher) {
    const float32x4_t one = vdupq_n_f32(1.0f), z = vdupq_n_f32(0.0f);
    const float ll = lr * lam, omd = 1.0f - decay;
    size_t i = 0;
    for (; i + W <= count; i += W) {
        const float32x4_t gm = vmulq_n_f32(LD(grad + i), inv_count);
        float32x4_t f = LD(fisher + i);
        if (update_fisher) {
            f = vfmaq_n_f32(vmulq_n_f32(f, decay), vmulq_f32(gm, gm), omd);
            ST(fisher + i, f);
        }
        const float32x4_t a = vmulq_n_f32(f, ll);
        const float32x4_t p = LD(param + i), opt = LD(optimal + i);
        const float32x4_t t = vfmsq_n_f32(p, gm, lr); /* p - lr*g */
        float32x4_t np;
        if (proximal)
            np = vdivq_f32(vfmaq_f32(t, a, opt), vaddq_f32(one, a));
        else
            np = vfmsq_f32(t, a, vsubq_f32(p, opt));
        ST(param + i, np);
        ST(grad + i, z);
    }
    for (; i < count; ++i)
        adl_ewc_one(param + i, grad + i, fisher + i, optimal + i, inv_count,
                    lr, lam, decay, proximal, update_fisher);
}

#include "impl_common.h"

#else
typedef int adl_neon_unused; /* not an AArch64 build: no NEON path */
#endif
