/*
 * kernels.h: internal. One table of kernels per instruction-set path; the
 * public entry points (dispatch.c) call through the table chosen once.
 */
#ifndef ADL_KERNELS_H
#define ADL_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "adalora_native.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define ADL_HAVE_X86 1
#else
#define ADL_HAVE_X86 0
#endif
#if defined(__aarch64__)
#define ADL_HAVE_NEON 1
#else
#define ADL_HAVE_NEON 0
#endif

/* Internal symbols stay out of the module's export table. */
#if defined(__GNUC__)
#define ADL_INTERNAL __attribute__((visibility("hidden")))
#else
#define ADL_INTERNAL
#endif

typedef struct adl_kernels {
    const char *name;
    void (*fwd_r1)(const float *x, size_t n, size_t in, const float *A,
                   const float *B, size_t out_f, float s, float *out);
    void (*fwd_r2)(const float *x, size_t n, size_t in, const float *A,
                   int a_layout, const float *B, size_t out_f, float s,
                   float *out);
    void (*fwd_rn)(const float *x, size_t n, size_t in, const float *A,
                   int a_layout, size_t r, const float *B, size_t out_f,
                   float s, float *out);
    void (*accumulate)(const float *x, const float *grad_out, size_t n,
                       size_t in, size_t out_f, const float *A, int a_layout,
                       size_t r, const float *B, float c, float *gA,
                       int ga_layout, float *gB);
    void (*apply)(float *param, float *grad, size_t count, float lr);
    void (*apply_ewc)(float *param, float *grad, size_t count,
                      float inv_count, float lr, float lam, float *fisher,
                      const float *optimal, float decay, int proximal,
                      int update_fisher);
} adl_kernels;

ADL_INTERNAL extern const adl_kernels adl_scalar_kernels;
#if ADL_HAVE_X86
ADL_INTERNAL extern const adl_kernels adl_avx2_kernels;
#endif
#if ADL_HAVE_NEON
ADL_INTERNAL extern const adl_kernels adl_neon_kernels;
#endif

/* The table behind the public entry points (dispatch.c). */
ADL_INTERNAL const adl_kernels *adl_active_kernels(void);
/* The table for a path name, or NULL if unknown / not runnable here. */
ADL_INTERNAL const adl_kernels *adl_kernels_for(const char *name);

/* The EWC element update, shared by every path for its tails. */
static inline void adl_ewc_one(float *p, float *g, float *F, const float *opt,
                               float inv_count, float lr, float lam,
                               float decay, int proximal, int update_fisher) {
    float gm = *g * inv_count;
    float f = *F;
    if (update_fisher) {
        f = decay * f + (1.0f - decay) * (gm * gm);
        *F = f;
    }
    float a = lr * lam * f;
    if (proximal)
        *p = (*p - lr * gm + a * *opt) / (1.0f + a);
    else
        *p = *p - lr * gm - a * (*p - *opt);
    *g = 0.0f;
}

#endif /* ADL_KERNELS_H */
