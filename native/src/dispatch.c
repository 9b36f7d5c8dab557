/*
 * dispatch.c: the public entry points. The path is chosen once (at load
 * time, or by adl_select_isa) and every call goes through its table.
 *   x86-64 : avx2 when __builtin_cpu_supports("avx2") and ("fma"), else scalar
 *   AArch64: neon (Advanced SIMD is mandatory on AArch64)
 *   other  : scalar
 */
#include <string.h>

#include "kernels.h"

#ifndef ADL_BUILD_INFO
#define ADL_BUILD_INFO "unknown (built without ADL_BUILD_INFO)"
#endif

static const adl_kernels *g_active; /* accessed with __atomic builtins */

static int cpu_has(const char *name) {
    if (strcmp(name, "scalar") == 0)
        return 1;
#if ADL_HAVE_X86 && defined(__GNUC__)
    if (strcmp(name, "avx2") == 0) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
#endif
#if ADL_HAVE_NEON
    if (strcmp(name, "neon") == 0)
        return 1;
#endif
    return 0;
}

ADL_INTERNAL const adl_kernels *adl_kernels_for(const char *name) {
    if (name == NULL || !cpu_has(name))
        return NULL;
    if (strcmp(name, "scalar") == 0)
        return &adl_scalar_kernels;
#if ADL_HAVE_X86
    if (strcmp(name, "avx2") == 0)
        return &adl_avx2_kernels;
#endif
#if ADL_HAVE_NEON
    if (strcmp(name, "neon") == 0)
        return &adl_neon_kernels;
#endif
    return NULL;
}

static const adl_kernels *best(void) {
    const adl_kernels *k = NULL;
#if ADL_HAVE_X86
    k = adl_kernels_for("avx2");
#endif
#if ADL_HAVE_NEON
    k = adl_kernels_for("neon");
#endif
    return k ? k : &adl_scalar_kernels;
}

#if defined(__GNUC__)
__attribute__((constructor)) static void adl_init(void) {
    __atomic_store_n(&g_active, best(), __ATOMIC_RELEASE);
}
#endif

ADL_INTERNAL const adl_kernels *adl_active_kernels(void) {
    const adl_kernels *k = __atomic_load_n(&g_active, __ATOMIC_ACQUIRE);
    if (__builtin_expect(k == NULL, 0)) {
        k = best();
        __atomic_store_n(&g_active, k, __ATOMIC_RELEASE);
    }
    return k;
}

#define K adl_active_kernels()

const char *adl_active_isa(void) { return K->name; }

int adl_isa_supported(const char *name) {
    return name != NULL && adl_kernels_for(name) != NULL;
}

int adl_select_isa(const char *name) {
    if (name == NULL || name[0] == '\0' || strcmp(name, "auto") == 0) {
        __atomic_store_n(&g_active, best(), __ATOMIC_RELEASE);
        return 0;
    }
    if (strcmp(name, "scalar") != 0 && strcmp(name, "avx2") != 0 &&
        strcmp(name, "neon") != 0)
        return -2;
    const adl_kernels *k = adl_kernels_for(name);
    if (k == NULL)
        return -1;
    __atomic_store_n(&g_active, k, __ATOMIC_RELEASE);
    return 0;
}

const char *adl_build_info(void) { return ADL_BUILD_INFO; }

void adl_lora_forward_add(const float *x, size_t n, size_t in, const float *A,
                          int a_layout, size_t r, const float *B, size_t out_f,
                          float s, float *out) {
    const adl_kernels *k = K;
    if (r == 1)
        k->fwd_r1(x, n, in, A, B, out_f, s, out);
    else if (r == 2)
        k->fwd_r2(x, n, in, A, a_layout, B, out_f, s, out);
    else if (r > 2)
        k->fwd_rn(x, n, in, A, a_layout, r, B, out_f, s, out);
}

int64_t adl_lora_forward_add_batched(const float *x, size_t n, size_t in,
                                     const float *A_stack, int a_layout,
                                     size_t r, const float *B_stack,
                                     size_t out_f, size_t m,
                                     const int64_t *idx, const float *scales,
                                     float s, float *out) {
    for (size_t b = 0; b < n; ++b)
        if (idx[b] < 0 || (uint64_t)idx[b] >= (uint64_t)m)
            return (int64_t)b;
    if (r == 0)
        return -1;
    const adl_kernels *k = K;
    const size_t a_step = in * r, b_step = r * out_f;
    for (size_t b = 0; b < n; ++b) {
        const size_t a = (size_t)idx[b];
        const float sb = scales ? scales[a] : s;
        const float *xb = x + b * in;
        float *ob = out + b * out_f;
        if (r == 1)
            k->fwd_r1(xb, 1, in, A_stack + a * a_step, B_stack + a * b_step,
                      out_f, sb, ob);
        else if (r == 2)
            k->fwd_r2(xb, 1, in, A_stack + a * a_step, a_layout,
                      B_stack + a * b_step, out_f, sb, ob);
        else
            k->fwd_rn(xb, 1, in, A_stack + a * a_step, a_layout, r,
                      B_stack + a * b_step, out_f, sb, ob);
    }
    return -1;
}

void adl_lora_accumulate(const float *x, const float *grad_out, size_t n,
                         size_t in, size_t out_f, const float *A, int a_layout,
                         size_t r, const float *B, float c, float *gA,
                         int ga_layout, float *gB) {
    if (r > 0)
        K->accumulate(x, grad_out, n, in, out_f, A, a_layout, r, B, c, gA,
                      ga_layout, gB);
}

void adl_apply(float *param, float *grad, size_t count, float lr) {
    K->apply(param, grad, count, lr);
}

void adl_apply_ewc(float *param, float *grad, size_t count, float inv_count,
                   float lr, float lam, float *fisher, const float *optimal,
                   float decay, int proximal, int update_fisher) {
    K->apply_ewc(param, grad, count, inv_count, lr, lam, fisher, optimal, decay,
                 proximal, update_fisher);
}
