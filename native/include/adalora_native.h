/*
 * adalora_native.h: the C micro-kernels of adalora-core (float32).
 *
 * Contiguity contract (every kernel):
 *   - all arrays are float32, dense, row-major (C order), 4-byte aligned;
 *     no other alignment is assumed (unaligned SIMD loads are used);
 *   - a batch of n vectors of length d is n*d consecutive floats;
 *   - LoRA A (in, r) comes in one of two layouts, given by `a_layout`:
 *       ADL_ROW_MAJOR  : A[i*r + k]   ((in, r) C order)
 *       ADL_RANK_MAJOR : A[k*in + i]  ((r, in) C order: the library's public A,
 *                                      PEFT's lora_A.weight, as adapters store it)
 *     for r == 1 both are the same memory;
 *   - LoRA B (r, out) is always rank-major: B[k*out + j];
 *   - outputs must not alias inputs (out, gA, gB, param... are written in
 *     place; x, A, B, grad_out... are read only), except where stated;
 *   - sizes are element counts (size_t); 0 is allowed (empty sums are 0); rank
 *     r = 0 is a no-op for the entry points below (the Python layer rejects
 *     it as an error).
 * The kernels never allocate and hold no global state besides the dispatch
 * table chosen once (adl_select_isa / at load time). They are thread-safe
 * when concurrent calls write to distinct outputs.
 *
 * Reference formulas are given in NumPy notation next to each function; the
 * scalar path (src/scalar.c) is the executable reference the SIMD paths are
 * tested against (native/tests/).
 */
#ifndef ADALORA_NATIVE_H
#define ADALORA_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ADL_ROW_MAJOR 0
#define ADL_RANK_MAJOR 1

/* ---- dispatch ---------------------------------------------------------- */

/* Name of the path that runs now: "scalar", "avx2" or "neon". */
const char *adl_active_isa(void);
/* 1 if `name` ("scalar", "avx2", "neon") can run on this CPU and build, else 0. */
int adl_isa_supported(const char *name);
/* Force a path. Returns 0 on success, -1 if the CPU (or this build) lacks it,
 * -2 if the name is unknown. NULL or "" or "auto" selects the best path.
 * Not thread-safe against concurrent kernel calls: call it at start-up. */
int adl_select_isa(const char *name);
/* Compiler and flags the kernels were built with (a static string). */
const char *adl_build_info(void);

/* ---- LoRA forward ------------------------------------------------------ */

/* out += s * (x @ A) @ B for n rows: x (n, in), out (n, out_f).
 * Picks the rank-1, rank-2 or generic-rank kernel from r. */
void adl_lora_forward_add(const float *x, size_t n, size_t in,
                          const float *A, int a_layout, size_t r,
                          const float *B, size_t out_f, float s, float *out);
/* Many adapters at once: for b in range(n):
 *   out[b] += s[idx[b]] * (x[b] @ A_stack[idx[b]]) @ B_stack[idx[b]]
 * A_stack (m, in, r) in `a_layout` per adapter (adapter stride in*r floats),
 * B_stack (m, r, out_f); scales (m,) or NULL to use `s` for every adapter.
 * Every idx[b] is checked against [0, m) before anything is written: returns
 * -1 on success, else the first bad position b (and `out` is untouched). */
int64_t adl_lora_forward_add_batched(const float *x, size_t n, size_t in,
                                     const float *A_stack, int a_layout,
                                     size_t r, const float *B_stack,
                                     size_t out_f, size_t m,
                                     const int64_t *idx, const float *scales,
                                     float s, float *out);

/* ---- LoRA training ----------------------------------------------------- */

/* Exact backprop of y = s (x A) B with upstream c/s * grad_out, summed over
 * n rows (c = s * reward):
 *   gA += c * outer(x, grad_out @ B.T)   (gA in `ga_layout`, like A)
 *   gB += c * outer(x @ A, grad_out)     (gB (r, out_f) rank-major)
 * x (n, in), grad_out (n, out_f). */
void adl_lora_accumulate(const float *x, const float *grad_out, size_t n,
                         size_t in, size_t out_f,
                         const float *A, int a_layout, size_t r,
                         const float *B, float c,
                         float *gA, int ga_layout, float *gB);

/* param -= lr * grad; grad[:] = 0 (count elements). */
void adl_apply(float *param, float *grad, size_t count, float lr);

/* EWC step over count elements, in this order for each element:
 *   g = grad * inv_count
 *   if update_fisher: F = decay * F + (1 - decay) * g * g
 *   proximal: param = (param - lr*g + lr*lam*F*optimal) / (1 + lr*lam*F)
 *   explicit: param = param - lr*g - lr*lam*F*(param - optimal)
 *   grad = 0
 * (the step uses the Fisher value updated in the same pass). */
void adl_apply_ewc(float *param, float *grad, size_t count, float inv_count,
                   float lr, float lam, float *fisher, const float *optimal,
                   float decay, int proximal, int update_fisher);

#ifdef __cplusplus
}
#endif
#endif /* ADALORA_NATIVE_H */
