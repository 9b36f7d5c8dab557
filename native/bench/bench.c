/*
 * bench.c: timing loops for benchmarks/bench_native.py (benchmark-only
 * build, native/bench/build.py): the active kernel called `iters` times in a
 * C loop, so the figure excludes Python. Declared in bench.h.
 */
#define _POSIX_C_SOURCE 199309L
#include <time.h>

#include "bench.h"
#include "kernels.h"

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

#if ADL_HAVE_X86
#include <immintrin.h>
__attribute__((target("avx2,fma"))) static float read_avx2(const float *p, size_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
           a6 = a0, a7 = a0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
        a4 = _mm256_add_ps(a4, _mm256_loadu_ps(p + i + 32));
        a5 = _mm256_add_ps(a5, _mm256_loadu_ps(p + i + 40));
        a6 = _mm256_add_ps(a6, _mm256_loadu_ps(p + i + 48));
        a7 = _mm256_add_ps(a7, _mm256_loadu_ps(p + i + 56));
    }
    a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                       _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    float t[8], s = 0.0f;
    _mm256_storeu_ps(t, a0);
    for (int k = 0; k < 8; ++k)
        s += t[k];
    for (; i < n; ++i)
        s += p[i];
    return s;
}
#endif
#if ADL_HAVE_NEON
#include <arm_neon.h>
static float read_neon(const float *p, size_t n) {
    float32x4_t a[8];
    for (int k = 0; k < 8; ++k)
        a[k] = vdupq_n_f32(0.0f);
    size_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 8; ++k)
            a[k] = vaddq_f32(a[k], vld1q_f32(p + i + 4 * k));
    for (int k = 1; k < 8; ++k)
        a[0] = vaddq_f32(a[0], a[k]);
    float s = vaddvq_f32(a[0]);
    for (; i < n; ++i)
        s += p[i];
    return s;
}
#endif

static float read_scalar(const float *p, size_t n) {
    float a[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k)
            a[k] += p[i + k];
    float s = 0.0f;
    for (int k = 0; k < 8; ++k)
        s += a[k];
    for (; i < n; ++i)
        s += p[i];
    return s;
}

double adl_bench_read(const float *p, size_t n, size_t iters) {
    float (*f)(const float *, size_t) = read_scalar;
    const char *isa = adl_active_isa();
#if ADL_HAVE_X86
    if (isa[0] == 'a')
        f = read_avx2;
#endif
#if ADL_HAVE_NEON
    if (isa[0] == 'n')
        f = read_neon;
#endif
    (void)isa;
    volatile float sink = f(p, n);
    const double t0 = now_ns();
    for (size_t i = 0; i < iters; ++i)
        sink += f(p, n);
    (void)sink;
    return iters ? (now_ns() - t0) / (double)iters : 0.0;
}

double adl_bench_forward_add(const float *x, size_t in, const float *A,
                             int a_layout, size_t r, const float *B,
                             size_t out_f, float s, float *out, size_t iters) {
    if (iters == 0)
        return 0.0;
    adl_lora_forward_add(x, 1, in, A, a_layout, r, B, out_f, s, out); /* warm */
    const double t0 = now_ns();
    for (size_t i = 0; i < iters; ++i)
        adl_lora_forward_add(x, 1, in, A, a_layout, r, B, out_f, s, out);
    return (now_ns() - t0) / (double)iters;
}

double adl_bench_accumulate(const float *x, const float *grad_out, size_t in,
                            size_t out_f, const float *A, int a_layout,
                            size_t r, const float *B, float c, float *gA,
                            float *gB, size_t iters) {
    if (iters == 0)
        return 0.0;
    adl_lora_accumulate(x, grad_out, 1, in, out_f, A, a_layout, r, B, c, gA,
                        a_layout, gB);
    const double t0 = now_ns();
    for (size_t i = 0; i < iters; ++i)
        adl_lora_accumulate(x, grad_out, 1, in, out_f, A, a_layout, r, B, c, gA,
                            a_layout, gB);
    return (now_ns() - t0) / (double)iters;
}

double adl_bench_apply_ewc(float *param, float *grad, size_t count,
                           float *fisher, const float *optimal, size_t iters) {
    if (iters == 0)
        return 0.0;
    adl_apply_ewc(param, grad, count, 1.0f, 1e-3f, 0.1f, fisher, optimal,
                  0.999f, 1, 1);
    const double t0 = now_ns();
    for (size_t i = 0; i < iters; ++i)
        adl_apply_ewc(param, grad, count, 1.0f, 1e-3f, 0.1f, fisher, optimal,
                      0.999f, 1, 1);
    return (now_ns() - t0) / (double)iters;
}

double adl_bench_forward_add_batched(const float *x, size_t n, size_t in,
                                     const float *A_stack, int a_layout, size_t r,
                                     const float *B_stack, size_t out_f,
                                     size_t m, const int64_t *idx, float s,
                                     float *out, size_t iters) {
    if (iters == 0)
        return 0.0;
    adl_lora_forward_add_batched(x, n, in, A_stack, a_layout, r, B_stack, out_f,
                                 m, idx, NULL, s, out);
    const double t0 = now_ns();
    for (size_t i = 0; i < iters; ++i)
        adl_lora_forward_add_batched(x, n, in, A_stack, a_layout, r, B_stack,
                                     out_f, m, idx, NULL, s, out);
    return (now_ns() - t0) / (double)iters;
}
