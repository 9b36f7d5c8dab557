/*
 * avx2.c: the x86-64 path, AVX2 + FMA (8 floats per vector).
 *
 * Compiled without -mavx2: every function carries
 * __attribute__((target("avx2,fma"))) and only runs after dispatch.c has
 * checked the CPU with __builtin_cpu_supports. Loads and stores are
 * unaligned. Reductions keep ADL_ACC independent vector accumulators per sum
 * (FMA latency 4 cycles, 2 FMA pipes: 4 chains of 8 floats keep them busy
 * when the loads allow; see native/tests/bench_kernels.c).
 */
#include "kernels.h"

#if ADL_HAVE_X86
#include <immintrin.h>

#define ADL_TARGET __attribute__((target("avx2,fma")))
#define ADL_TABLE_NAME adl_avx2_kernels
#define ADL_PATH_NAME "avx2"

#ifndef ADL_ACC
#define ADL_ACC 4
#endif
#define U ADL_ACC
#define W 8

#define LD(p) _mm256_loadu_ps(p)
#define ST(p, v) _mm256_storeu_ps((p), (v))
#define FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))

static ADL_TARGET inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Sum of the U accumulators in acc (pairwise). */
static ADL_TARGET inline __m256 fold(__m256 *acc) {
#pragma GCC unroll 16
    for (int w = 1; w < U; w *= 2)
#pragma GCC unroll 16
        for (int u = 0; u + w < U; u += 2 * w)
            acc[u] = _mm256_add_ps(acc[u], acc[u + w]);
    return acc[0];
}

static ADL_TARGET float dot1(const float *x, const float *a, size_t n) {
    __m256 acc[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
        acc[u] = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + W * U <= n; i += W * U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u)
            acc[u] = FMA(LD(x + i + W * u), LD(a + i + W * u), acc[u]);
    }
    for (; i + W <= n; i += W)
        acc[0] = FMA(LD(x + i), LD(a + i), acc[0]);
    float t = hsum(fold(acc));
    for (; i < n; ++i)
        t += x[i] * a[i];
    return t;
}

static ADL_TARGET void dot2(const float *x, const float *a0, const float *a1,
                            size_t n, float *h) {
    __m256 p[U], q[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
        p[u] = q[u] = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + W * U <= n; i += W * U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
            const __m256 xv = LD(x + i + W * u);
            p[u] = FMA(xv, LD(a0 + i + W * u), p[u]);
            q[u] = FMA(xv, LD(a1 + i + W * u), q[u]);
        }
    }
    for (; i + W <= n; i += W) {
        const __m256 xv = LD(x + i);
        p[0] = FMA(xv, LD(a0 + i), p[0]);
        q[0] = FMA(xv, LD(a1 + i), q[0]);
    }
    float t0 = hsum(fold(p)), t1 = hsum(fold(q));
    for (; i < n; ++i) {
        t0 += x[i] * a0[i];
        t1 += x[i] * a1[i];
    }
    h[0] = t0;
    h[1] = t1;
}

/* A (n, 2) row-major: 8 rows are 16 floats, [a00 a01 a10 a11 ...]. x is
 * spread to [x0 x0 x1 x1 | x2 x2 x3 x3] and [x4 x4 x5 x5 | x6 x6 x7 x7] with
 * one lane-crossing permute and two in-lane unpacks. */
static ADL_TARGET inline void spread(__m256 xv, __m256 *lo, __m256 *hi) {
    const __m256 xq = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xv), 0xD8));
    *lo = _mm256_unpacklo_ps(xq, xq);
    *hi = _mm256_unpackhi_ps(xq, xq);
}

static ADL_TARGET void dot2i(const float *x, const float *A, size_t n, float *h) {
    __m256 p[U], q[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
        p[u] = q[u] = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + W * U <= n; i += W * U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
            const float *a = A + 2 * (i + W * u);
            __m256 lo, hi;
            spread(LD(x + i + W * u), &lo, &hi);
            p[u] = FMA(lo, LD(a), p[u]);
            q[u] = FMA(hi, LD(a + W), q[u]);
        }
    }
    for (; i + W <= n; i += W) {
        __m256 lo, hi;
        spread(LD(x + i), &lo, &hi);
        p[0] = FMA(lo, LD(A + 2 * i), p[0]);
        q[0] = FMA(hi, LD(A + 2 * i + W), q[0]);
    }
    /* lanes alternate h0, h1 */
    const __m256 v = _mm256_add_ps(fold(p), fold(q));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    float t0 = _mm_cvtss_f32(s);
    float t1 = _mm_cvtss_f32(_mm_shuffle_ps(s, s, 1));
    for (; i < n; ++i) {
        t0 += x[i] * A[2 * i];
        t1 += x[i] * A[2 * i + 1];
    }
    h[0] = t0;
    h[1] = t1;
}

static ADL_TARGET void dot4(const float *x, const float *a0, const float *a1,
                            const float *a2, const float *a3, size_t n,
                            float *h) {
    __m256 p0[2], p1[2], p2[2], p3[2];
    for (int u = 0; u < 2; ++u)
        p0[u] = p1[u] = p2[u] = p3[u] = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
#pragma GCC unroll 2
        for (int u = 0; u < 2; ++u) {
            const size_t o = i + W * u;
            const __m256 xv = LD(x + o);
            p0[u] = FMA(xv, LD(a0 + o), p0[u]);
            p1[u] = FMA(xv, LD(a1 + o), p1[u]);
            p2[u] = FMA(xv, LD(a2 + o), p2[u]);
            p3[u] = FMA(xv, LD(a3 + o), p3[u]);
        }
    }
    float t0 = hsum(_mm256_add_ps(p0[0], p0[1]));
    float t1 = hsum(_mm256_add_ps(p1[0], p1[1]));
    float t2 = hsum(_mm256_add_ps(p2[0], p2[1]));
    float t3 = hsum(_mm256_add_ps(p3[0], p3[1]));
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

static ADL_TARGET void axpy1(float *y, const float *b0, float c0, size_t n) {
    const __m256 c = _mm256_set1_ps(c0);
    size_t j = 0;
    for (; j + W * U <= n; j += W * U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u)
            ST(y + j + W * u, FMA(c, LD(b0 + j + W * u), LD(y + j + W * u)));
    }
    for (; j + W <= n; j += W)
        ST(y + j, FMA(c, LD(b0 + j), LD(y + j)));
    for (; j < n; ++j)
        y[j] += c0 * b0[j];
}

static ADL_TARGET void axpy2(float *y, const float *b0, const float *b1,
                             float c0, float c1, size_t n) {
    const __m256 v0 = _mm256_set1_ps(c0), v1 = _mm256_set1_ps(c1);
    size_t j = 0;
    for (; j + W * U <= n; j += W * U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
            const size_t o = j + W * u;
            ST(y + o, FMA(v1, LD(b1 + o), FMA(v0, LD(b0 + o), LD(y + o))));
        }
    }
    for (; j + W <= n; j += W)
        ST(y + j, FMA(v1, LD(b1 + j), FMA(v0, LD(b0 + j), LD(y + j))));
    for (; j < n; ++j)
        y[j] += c0 * b0[j] + c1 * b1[j];
}

static ADL_TARGET void axpy4(float *y, const float *b0, const float *b1,
                             const float *b2, const float *b3, const float *c,
                             size_t n) {
    const __m256 v0 = _mm256_set1_ps(c[0]), v1 = _mm256_set1_ps(c[1]);
    const __m256 v2 = _mm256_set1_ps(c[2]), v3 = _mm256_set1_ps(c[3]);
    size_t j = 0;
    for (; j + W <= n; j += W) {
        __m256 t = FMA(v0, LD(b0 + j), LD(y + j));
        t = FMA(v1, LD(b1 + j), t);
        t = FMA(v2, LD(b2 + j), t);
        ST(y + j, FMA(v3, LD(b3 + j), t));
    }
    for (; j < n; ++j)
        y[j] += c[0] * b0[j] + c[1] * b1[j] + c[2] * b2[j] + c[3] * b3[j];
}

static ADL_TARGET float dot_axpy1(const float *g, const float *b0, float *gb0,
                                  float c0, size_t n) {
    const __m256 c = _mm256_set1_ps(c0);
    __m256 acc[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
        acc[u] = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + W * U <= n; j += W * U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
            const size_t o = j + W * u;
            const __m256 gv = LD(g + o);
            acc[u] = FMA(gv, LD(b0 + o), acc[u]);
            ST(gb0 + o, FMA(c, gv, LD(gb0 + o)));
        }
    }
    for (; j + W <= n; j += W) {
        const __m256 gv = LD(g + j);
        acc[0] = FMA(gv, LD(b0 + j), acc[0]);
        ST(gb0 + j, FMA(c, gv, LD(gb0 + j)));
    }
    float t = hsum(fold(acc));
    for (; j < n; ++j) {
        t += g[j] * b0[j];
        gb0[j] += c0 * g[j];
    }
    return t;
}

static ADL_TARGET void dot_axpy2(const float *g, const float *b0,
                                 const float *b1, float *gb0, float *gb1,
                                 float c0, float c1, size_t n, float *u2) {
    const __m256 v0 = _mm256_set1_ps(c0), v1 = _mm256_set1_ps(c1);
    __m256 p[U], q[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u)
        p[u] = q[u] = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + W * U <= n; j += W * U) {
#pragma GCC unroll 16
        for (int u = 0; u < U; ++u) {
            const size_t o = j + W * u;
            const __m256 gv = LD(g + o);
            p[u] = FMA(gv, LD(b0 + o), p[u]);
            q[u] = FMA(gv, LD(b1 + o), q[u]);
            ST(gb0 + o, FMA(v0, gv, LD(gb0 + o)));
            ST(gb1 + o, FMA(v1, gv, LD(gb1 + o)));
        }
    }
    for (; j + W <= n; j += W) {
        const __m256 gv = LD(g + j);
        p[0] = FMA(gv, LD(b0 + j), p[0]);
        q[0] = FMA(gv, LD(b1 + j), q[0]);
        ST(gb0 + j, FMA(v0, gv, LD(gb0 + j)));
        ST(gb1 + j, FMA(v1, gv, LD(gb1 + j)));
    }
    float t0 = hsum(fold(p)), t1 = hsum(fold(q));
    for (; j < n; ++j) {
        t0 += g[j] * b0[j];
        t1 += g[j] * b1[j];
        gb0[j] += c0 * g[j];
        gb1[j] += c1 * g[j];
    }
    u2[0] = t0;
    u2[1] = t1;
}

static ADL_TARGET void outer2i(float *gA, const float *x, float c0, float c1,
                               size_t n) {
    const __m256 cc = _mm256_setr_ps(c0, c1, c0, c1, c0, c1, c0, c1);
    size_t i = 0;
    for (; i + W <= n; i += W) {
        __m256 lo, hi;
        spread(LD(x + i), &lo, &hi);
        float *g = gA + 2 * i;
        ST(g, FMA(cc, lo, LD(g)));
        ST(g + W, FMA(cc, hi, LD(g + W)));
    }
    for (; i < n; ++i) {
        gA[2 * i] += c0 * x[i];
        gA[2 * i + 1] += c1 * x[i];
    }
}

static ADL_TARGET void k_apply(float *param, float *grad, size_t count,
                               float lr) {
    const __m256 l = _mm256_set1_ps(lr), z = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 2 * W <= count; i += 2 * W) {
        ST(param + i, _mm256_fnmadd_ps(l, LD(grad + i), LD(param + i)));
        ST(param + i + W, _mm256_fnmadd_ps(l, LD(grad + i + W), LD(param + i + W)));
        ST(grad + i, z);
        ST(grad + i + W, z);
    }
    for (; i < count; ++i) {
        param[i] -= lr * grad[i];
        grad[i] = 0.0f;
    }
}

static ADL_TARGET void k_apply_ewc(float *param, float *grad, size_t count,
                                   float inv_count, float lr, float lam,
                                   float *fisher, const float *optimal,
                                   float decay, int proximal,
                                   int update_fisher) {
    const __m256 inv = _mm256_set1_ps(inv_count), l = _mm256_set1_ps(lr);
    const __m256 ll = _mm256_set1_ps(lr * lam), one = _mm256_set1_ps(1.0f);
    const __m256 d = _mm256_set1_ps(decay), omd = _mm256_set1_ps(1.0f - decay);
    const __m256 z = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + W <= count; i += W) {
        const __m256 gm = _mm256_mul_ps(LD(grad + i), inv);
        __m256 f = LD(fisher + i);
        if (update_fisher) {
            f = FMA(omd, _mm256_mul_ps(gm, gm), _mm256_mul_ps(d, f));
            ST(fisher + i, f);
        }
        const __m256 a = _mm256_mul_ps(ll, f);
        const __m256 p = LD(param + i), opt = LD(optimal + i);
        const __m256 t = _mm256_fnmadd_ps(l, gm, p); /* p - lr*g */
        __m256 np;
        if (proximal)
            np = _mm256_div_ps(FMA(a, opt, t), _mm256_add_ps(one, a));
        else
            np = _mm256_fnmadd_ps(a, _mm256_sub_ps(p, opt), t);
        ST(param + i, np);
        ST(grad + i, z);
    }
    for (; i < count; ++i)
        adl_ewc_one(param + i, grad + i, fisher + i, optimal + i, inv_count,
                    lr, lam, decay, proximal, update_fisher);
}

#include "impl_common.h"

#else
typedef int adl_avx2_unused; /* not an x86 build: no AVX2 path */
#endif
