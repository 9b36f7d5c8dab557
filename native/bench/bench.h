/*
 * bench.h: timing loops of the benchmark-only build (native/bench/build.py).
 * Each returns the average nanoseconds per call of the active kernel, timed
 * in a C loop of `iters` calls (clock_gettime, monotonic), after one warm-up
 * call. Arguments and layouts as in adalora_native.h.
 */
#ifndef ADALORA_BENCH_H
#define ADALORA_BENCH_H

#include <stddef.h>
#include <stdint.h>

/* lora_forward_add on one vector (n = 1). */
double adl_bench_forward_add(const float *x, size_t in, const float *A,
                             int a_layout, size_t r, const float *B,
                             size_t out_f, float s, float *out, size_t iters);
/* lora_accumulate on one vector, gA in A's layout. */
double adl_bench_accumulate(const float *x, const float *grad_out, size_t in,
                            size_t out_f, const float *A, int a_layout,
                            size_t r, const float *B, float c, float *gA,
                            float *gB, size_t iters);
/* apply_ewc (proximal, Fisher update) over count elements. */
double adl_bench_apply_ewc(float *param, float *grad, size_t count,
                           float *fisher, const float *optimal, size_t iters);
/* The batched forward over all n requests (one scaling for every adapter). */
double adl_bench_forward_add_batched(const float *x, size_t n, size_t in,
                                     const float *A_stack, int a_layout, size_t r,
                                     const float *B_stack, size_t out_f,
                                     size_t m, const int64_t *idx, float s,
                                     float *out, size_t iters);
/* One read-only sweep over n floats (8 independent vector sums on the SIMD
 * paths): the load bandwidth available at that footprint. */
double adl_bench_read(const float *p, size_t n, size_t iters);

#endif /* ADALORA_BENCH_H */
