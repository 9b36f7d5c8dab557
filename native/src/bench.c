/*
 * bench.c: timing helpers for benchmarks/bench_native.py: the active kernel
 * called `iters` times in a C loop, so the figure excludes Python.
 */
#define _POSIX_C_SOURCE 199309L
#include <time.h>

#include "kernels.h"

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
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
                                     const float *A_stack, size_t r,
                                     const float *B_stack, size_t out_f,
                                     size_t m, const int64_t *idx, float s,
                                     float *out, size_t iters) {
    if (iters == 0)
        return 0.0;
    adl_lora_forward_add_batched(x, n, in, A_stack, ADL_ROW_MAJOR, r, B_stack,
                                 out_f, m, idx, NULL, s, out);
    const double t0 = now_ns();
    for (size_t i = 0; i < iters; ++i)
        adl_lora_forward_add_batched(x, n, in, A_stack, ADL_ROW_MAJOR, r,
                                     B_stack, out_f, m, idx, NULL, s, out);
    return (now_ns() - t0) / (double)iters;
}
