/*
 * impl_common.h: internal. The kernels composed from one path's primitives.
 *
 * Included once by each of scalar.c, avx2.c and neon.c after they define:
 *   ADL_TARGET      function attribute of the path (target("avx2,fma") or empty)
 *   ADL_TABLE_NAME  the adl_kernels table to define
 *   ADL_PATH_NAME   "scalar", "avx2" or "neon"
 * and these static primitives (n >= 0 everywhere; A "planar" rows are rank rows):
 *   float dot1(x, a, n)                       sum x*a
 *   void  dot2(x, a0, a1, n, h[2])            h = [x.a0, x.a1]
 *   void  dot2i(x, A, n, h[2])                h = x @ A, A (n, 2) row-major
 *   void  dot4(x, a0, a1, a2, a3, n, h[4])
 *   void  axpy1(y, b0, c0, n)                 y += c0*b0
 *   void  axpy2(y, b0, b1, c0, c1, n)         y += c0*b0 + c1*b1
 *   void  axpy4(y, b0..b3, c[4], n)
 *   float dot_axpy1(g, b0, gb0, c0, n)        returns g.b0;     gb0 += c0*g
 *   void  dot_axpy2(g, b0, b1, gb0, gb1, c0, c1, n, u[2])
 *                                             u = [g.b0, g.b1]; gbk += ck*g
 *   void  outer2i(gA, x, c0, c1, n)           gA[i,0] += c0*x[i]; gA[i,1] += c1*x[i]
 *   void  k_apply(param, grad, count, lr)
 *   void  k_apply_ewc(...)                    see adl_apply_ewc
 */
#ifndef ADL_TARGET
#error "define ADL_TARGET before including impl_common.h"
#endif

/* Generic-rank kernels work on chunks of at most this many ranks (stack). */
#define ADL_RCHUNK 32

static inline size_t adl_min(size_t a, size_t b) { return a < b ? a : b; }

/* h[0:kc] = x @ A[:, k0:k0+kc] for A (in, r) in `layout`. */
static ADL_TARGET void xa_chunk(const float *x, size_t in, const float *A,
                                int layout, size_t r, size_t k0, size_t kc,
                                float *h) {
    if (layout == ADL_RANK_MAJOR || r == 1) {
        const float *a = A + k0 * in;
        size_t k = 0;
        for (; k + 4 <= kc; k += 4)
            dot4(x, a + k * in, a + (k + 1) * in, a + (k + 2) * in,
                 a + (k + 3) * in, in, h + k);
        for (; k + 2 <= kc; k += 2)
            dot2(x, a + k * in, a + (k + 1) * in, in, h + k);
        for (; k < kc; ++k)
            h[k] = dot1(x, a + k * in, in);
    } else if (r == 2) {
        dot2i(x, A, in, h);
    } else {
        for (size_t k = 0; k < kc; ++k)
            h[k] = 0.0f;
        for (size_t i = 0; i < in; ++i) {
            const float xi = x[i];
            const float *row = A + i * r + k0;
            for (size_t k = 0; k < kc; ++k)
                h[k] += xi * row[k];
        }
    }
}

/* out += sum_k c[k] * Bk[k, :] for the kc rank rows Bk (kc, out_f). */
static ADL_TARGET void hb_chunk(float *out, const float *Bk, size_t out_f,
                                size_t kc, const float *c) {
    size_t k = 0;
    for (; k + 4 <= kc; k += 4)
        axpy4(out, Bk + k * out_f, Bk + (k + 1) * out_f, Bk + (k + 2) * out_f,
              Bk + (k + 3) * out_f, c + k, out_f);
    for (; k + 2 <= kc; k += 2)
        axpy2(out, Bk + k * out_f, Bk + (k + 1) * out_f, c[k], c[k + 1], out_f);
    for (; k < kc; ++k)
        axpy1(out, Bk + k * out_f, c[k], out_f);
}

static ADL_TARGET void k_fwd_r1(const float *x, size_t n, size_t in,
                                const float *A, const float *B, size_t out_f,
                                float s, float *out) {
    for (size_t b = 0; b < n; ++b) {
        const float h = dot1(x + b * in, A, in);
        axpy1(out + b * out_f, B, s * h, out_f);
    }
}

static ADL_TARGET void k_fwd_r2(const float *x, size_t n, size_t in,
                                const float *A, int a_layout, const float *B,
                                size_t out_f, float s, float *out) {
    for (size_t b = 0; b < n; ++b) {
        float h[2];
        if (a_layout == ADL_RANK_MAJOR)
            dot2(x + b * in, A, A + in, in, h);
        else
            dot2i(x + b * in, A, in, h);
        axpy2(out + b * out_f, B, B + out_f, s * h[0], s * h[1], out_f);
    }
}

static ADL_TARGET void k_fwd_rn(const float *x, size_t n, size_t in,
                                const float *A, int a_layout, size_t r,
                                const float *B, size_t out_f, float s,
                                float *out) {
    float h[ADL_RCHUNK];
    for (size_t b = 0; b < n; ++b) {
        for (size_t k0 = 0; k0 < r; k0 += ADL_RCHUNK) {
            const size_t kc = adl_min(ADL_RCHUNK, r - k0);
            xa_chunk(x + b * in, in, A, a_layout, r, k0, kc, h);
            for (size_t k = 0; k < kc; ++k)
                h[k] *= s;
            hb_chunk(out + b * out_f, B + k0 * out_f, out_f, kc, h);
        }
    }
}

static ADL_TARGET void k_accumulate(const float *x, const float *grad_out,
                                    size_t n, size_t in, size_t out_f,
                                    const float *A, int a_layout, size_t r,
                                    const float *B, float c, float *gA,
                                    int ga_layout, float *gB) {
    float h[ADL_RCHUNK], u[ADL_RCHUNK];
    for (size_t b = 0; b < n; ++b) {
        const float *xb = x + b * in;
        const float *gb = grad_out + b * out_f;
        if (r == 1) {
            const float h0 = dot1(xb, A, in);
            const float u0 = dot_axpy1(gb, B, gB, c * h0, out_f);
            axpy1(gA, xb, c * u0, in);
        } else if (r == 2) {
            if (a_layout == ADL_RANK_MAJOR)
                dot2(xb, A, A + in, in, h);
            else
                dot2i(xb, A, in, h);
            dot_axpy2(gb, B, B + out_f, gB, gB + out_f, c * h[0], c * h[1],
                      out_f, u);
            if (ga_layout == ADL_RANK_MAJOR) {
                axpy1(gA, xb, c * u[0], in);
                axpy1(gA + in, xb, c * u[1], in);
            } else {
                outer2i(gA, xb, c * u[0], c * u[1], in);
            }
        } else {
            for (size_t k0 = 0; k0 < r; k0 += ADL_RCHUNK) {
                const size_t kc = adl_min(ADL_RCHUNK, r - k0);
                xa_chunk(xb, in, A, a_layout, r, k0, kc, h);
                for (size_t k = 0; k < kc; ++k)
                    u[k] = c * dot_axpy1(gb, B + (k0 + k) * out_f,
                                         gB + (k0 + k) * out_f, c * h[k], out_f);
                if (ga_layout == ADL_RANK_MAJOR) {
                    for (size_t k = 0; k < kc; ++k)
                        axpy1(gA + (k0 + k) * in, xb, u[k], in);
                } else {
                    for (size_t i = 0; i < in; ++i) {
                        const float xi = xb[i];
                        float *row = gA + i * r + k0;
                        for (size_t k = 0; k < kc; ++k)
                            row[k] += xi * u[k];
                    }
                }
            }
        }
    }
}

ADL_INTERNAL const adl_kernels ADL_TABLE_NAME = {
    ADL_PATH_NAME, k_fwd_r1, k_fwd_r2, k_fwd_rn, k_accumulate, k_apply, k_apply_ewc,
};
