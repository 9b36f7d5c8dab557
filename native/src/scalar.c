/*
 * scalar.c: the portable reference path (plain C, one accumulator per sum).
 * Every SIMD path is tested against it (native/tests/); it is also the
 * fallback on CPUs without a SIMD path.
 */
#include "kernels.h"

#define ADL_TARGET
#define ADL_TABLE_NAME adl_scalar_kernels
#define ADL_PATH_NAME "scalar"

static float dot1(const float *x, const float *a, size_t n) {
    float t = 0.0f;
    for (size_t i = 0; i < n; ++i)
        t += x[i] * a[i];
    return t;
}

static void dot2(const float *x, const float *a0, const float *a1, size_t n,
                 float *h) {
    float t0 = 0.0f, t1 = 0.0f;
    for (size_t i = 0; i < n; ++i) {
        t0 += x[i] * a0[i];
        t1 += x[i] * a1[i];
    }
    h[0] = t0;
    h[1] = t1;
}

static void dot2i(const float *x, const float *A, size_t n, float *h) {
    float t0 = 0.0f, t1 = 0.0f;
    for (size_t i = 0; i < n; ++i) {
        t0 += x[i] * A[2 * i];
        t1 += x[i] * A[2 * i + 1];
    }
    h[0] = t0;
    h[1] = t1;
}

static void dot4(const float *x, const float *a0, const float *a1,
                 const float *a2, const float *a3, size_t n, float *h) {
    float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
    for (size_t i = 0; i < n; ++i) {
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
    for (size_t j = 0; j < n; ++j)
        y[j] += c0 * b0[j];
}

static void axpy2(float *y, const float *b0, const float *b1, float c0,
                  float c1, size_t n) {
    for (size_t j = 0; j < n; ++j)
        y[j] += c0 * b0[j] + c1 * b1[j];
}

static void axpy4(float *y, const float *b0, const float *b1, const float *b2,
                  const float *b3, const float *c, size_t n) {
    const float c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
    for (size_t j = 0; j < n; ++j)
        y[j] += c0 * b0[j] + c1 * b1[j] + c2 * b2[j] + c3 * b3[j];
}

static float dot_axpy1(const float *g, const float *b0, float *gb0, float c0,
                       size_t n) {
    float t = 0.0f;
    for (size_t j = 0; j < n; ++j) {
        t += g[j] * b0[j];
        gb0[j] += c0 * g[j];
    }
    return t;
}

static void dot_axpy2(const float *g, const float *b0, const float *b1,
                      float *gb0, float *gb1, float c0, float c1, size_t n,
                      float *u) {
    float t0 = 0.0f, t1 = 0.0f;
    for (size_t j = 0; j < n; ++j) {
        t0 += g[j] * b0[j];
        t1 += g[j] * b1[j];
        gb0[j] += c0 * g[j];
        gb1[j] += c1 * g[j];
    }
    u[0] = t0;
    u[1] = t1;
}

static void outer2i(float *gA, const float *x, float c0, float c1, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        gA[2 * i] += c0 * x[i];
        gA[2 * i + 1] += c1 * x[i];
    }
}

static void k_apply(float *param, float *grad, size_t count, float lr) {
    for (size_t i = 0; i < count; ++i) {
        param[i] -= lr * grad[i];
        grad[i] = 0.0f;
    }
}

static void k_apply_ewc(float *param, float *grad, size_t count,
                        float inv_count, float lr, float lam, float *fisher,
                        const float *optimal, float decay, int proximal,
                        int update_fisher) {
    for (size_t i = 0; i < count; ++i)
        adl_ewc_one(param + i, grad + i, fisher + i, optimal + i, inv_count, lr,
                    lam, decay, proximal, update_fisher);
}

#include "impl_common.h"
