/*
 * test_kernels.c: checks every instruction-set path built for this machine
 * against the scalar path, and the scalar path against double-precision
 * formulas, on awkward sizes, unaligned pointers and non-finite inputs.
 *
 *   make -C native/tests check          # native build
 *   make -C native/tests check-neon     # AArch64 build under qemu-aarch64
 *   make -C native/tests check-sanitize # ASan + UBSan build
 *
 * Exit status 0 when every check passes; failures are printed.
 */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/kernels.h"

static const size_t SIZES[] = {1, 7, 15, 16, 17, 767, 768, 4096, 4097};
#define NSIZES (sizeof SIZES / sizeof SIZES[0])
static const size_t RANKS[] = {1, 2, 3, 5, 33};
#define NRANKS (sizeof RANKS / sizeof RANKS[0])

static long g_checks, g_fail;
static const char *g_ctx = "";
static char g_ctxbuf[256];

#define CTX(...) (snprintf(g_ctxbuf, sizeof g_ctxbuf, __VA_ARGS__), g_ctx = g_ctxbuf)

/* ---- data ---------------------------------------------------------------- */

static unsigned long long g_rng = 0x9E3779B97F4A7C15ull;
static float frand(void) { /* uniform in [-1, 1) */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* A buffer of n floats starting `off` floats past a 64-byte boundary. */
typedef struct {
    void *base;
    float *p;
    size_t n;
} buf;

static buf balloc(size_t n, size_t off) {
    buf b;
    b.base = NULL;
    if (posix_memalign(&b.base, 64, (n + off + 16) * sizeof(float)) != 0) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    b.p = (float *)b.base + off;
    b.n = n;
    for (size_t i = 0; i < n; ++i)
        b.p[i] = frand();
    return b;
}
static void bfree(buf b) { free(b.base); }
static buf bcopy(buf src, size_t off) {
    buf b = balloc(src.n, off);
    memcpy(b.p, src.p, src.n * sizeof(float));
    return b;
}

/* ---- comparison ---------------------------------------------------------- */

static const double EPS32 = 5.960464477539063e-08; /* 2^-24 */

/* got vs want with absolute tolerance tol[i] (NULL: bound*scale); non-finite
 * values must match in kind (NaN vs NaN, +inf vs +inf). */
static void check_close(const char *what, const float *got, const double *want,
                        const double *tol, size_t n) {
    long bad = 0;
    size_t first = 0;
    for (size_t i = 0; i < n; ++i) {
        const double g = got[i], w = want[i];
        int ok;
        if (isnan(w) || isnan(g))
            ok = isnan(w) && isnan(g);
        else if (isinf(w) || isinf(g))
            ok = g == w;
        else
            ok = fabs(g - w) <= tol[i];
        if (!ok && bad++ == 0)
            first = i;
    }
    ++g_checks;
    if (bad) {
        ++g_fail;
        printf("FAIL %s [%s]: %ld of %zu differ, first at %zu: got %.9g want %.9g tol %.3g\n",
               what, g_ctx, bad, n, first, (double)got[first], want[first], tol[first]);
    }
}

/* got (a path) vs ref (scalar path): each is within tol of the exact value,
 * so they are within 2*tol of each other. */
static void check_paths(const char *what, const float *got, const float *ref,
                        const double *tol, size_t n) {
    double *w = malloc(n * sizeof *w), *t2 = malloc(n * sizeof *t2);
    for (size_t i = 0; i < n; ++i) {
        w[i] = ref[i];
        t2[i] = 2.0 * tol[i];
    }
    check_close(what, got, w, t2, n);
    free(w);
    free(t2);
}

static void check(int cond, const char *what) {
    ++g_checks;
    if (!cond) {
        ++g_fail;
        printf("FAIL %s [%s]\n", what, g_ctx);
    }
}

/* ---- double-precision formulas -------------------------------------------- */

static double A_at(const float *A, int layout, size_t in, size_t r, size_t i, size_t k) {
    return layout == ADL_RANK_MAJOR ? A[k * in + i] : A[i * r + k];
}

/* out0 + s * (x @ A) @ B and its error scale, per element. */
static void ref_forward(const float *x, size_t n, size_t in, const float *A,
                        int layout, size_t r, const float *B, size_t out_f,
                        float s, const float *out0, double *want, double *tol) {
    double *h = malloc(r * sizeof *h), *ha = malloc(r * sizeof *ha);
    for (size_t b = 0; b < n; ++b) {
        for (size_t k = 0; k < r; ++k) {
            h[k] = ha[k] = 0.0;
            for (size_t i = 0; i < in; ++i) {
                const double a = A_at(A, layout, in, r, i, k);
                h[k] += x[b * in + i] * a;
                ha[k] += fabs(x[b * in + i] * a);
            }
        }
        for (size_t j = 0; j < out_f; ++j) {
            double t = 0.0, ta = 0.0;
            for (size_t k = 0; k < r; ++k) {
                t += h[k] * B[k * out_f + j];
                ta += ha[k] * fabs(B[k * out_f + j]);
            }
            const double o = out0[b * out_f + j];
            want[b * out_f + j] = o + s * t;
            /* out is updated once per rank (scalar generic path): its
             * magnitude enters every rounding */
            tol[b * out_f + j] =
                2.0 * EPS32 * (double)(in + r + 4) * (fabs(s) * ta + fabs(o)) + 1e-30;
        }
    }
    free(h);
    free(ha);
}

/* ---- the checks ------------------------------------------------------------ */

static void test_forward(const adl_kernels *K, const adl_kernels *S, size_t in,
                         size_t out_f, size_t r, size_t n, int layout, size_t off) {
    CTX("%s forward in=%zu out=%zu r=%zu n=%zu layout=%d off=%zu", K->name, in,
        out_f, r, n, layout, off);
    buf x = balloc(n * in, off), A = balloc(in * r, off), B = balloc(r * out_f, off);
    buf o = balloc(n * out_f, off);
    buf oK = bcopy(o, off), oS = bcopy(o, 0);
    const float s = 0.75f;
    double *want = malloc(n * out_f * sizeof *want), *tol = malloc(n * out_f * sizeof *tol);
    ref_forward(x.p, n, in, A.p, layout, r, B.p, out_f, s, o.p, want, tol);

    if (r == 1) {
        K->fwd_r1(x.p, n, in, A.p, B.p, out_f, s, oK.p);
        S->fwd_r1(x.p, n, in, A.p, B.p, out_f, s, oS.p);
        check_close("fwd_r1 vs double", oS.p, want, tol, n * out_f);
        check_paths("fwd_r1 vs scalar", oK.p, oS.p, tol, n * out_f);
    }
    if (r == 2) {
        memcpy(oK.p, o.p, n * out_f * sizeof(float));
        memcpy(oS.p, o.p, n * out_f * sizeof(float));
        K->fwd_r2(x.p, n, in, A.p, layout, B.p, out_f, s, oK.p);
        S->fwd_r2(x.p, n, in, A.p, layout, B.p, out_f, s, oS.p);
        check_close("fwd_r2 vs double", oS.p, want, tol, n * out_f);
        check_paths("fwd_r2 vs scalar", oK.p, oS.p, tol, n * out_f);
    }
    memcpy(oK.p, o.p, n * out_f * sizeof(float));
    memcpy(oS.p, o.p, n * out_f * sizeof(float));
    K->fwd_rn(x.p, n, in, A.p, layout, r, B.p, out_f, s, oK.p);
    S->fwd_rn(x.p, n, in, A.p, layout, r, B.p, out_f, s, oS.p);
    check_close("fwd_rn vs double", oS.p, want, tol, n * out_f);
    check_paths("fwd_rn vs scalar", oK.p, oS.p, tol, n * out_f);

    free(want);
    free(tol);
    bfree(x), bfree(A), bfree(B), bfree(o), bfree(oK), bfree(oS);
}

static void test_accumulate(const adl_kernels *K, const adl_kernels *S, size_t in,
                            size_t out_f, size_t r, size_t n, int layout,
                            int ga_layout, size_t off) {
    CTX("%s accumulate in=%zu out=%zu r=%zu n=%zu layout=%d ga_layout=%d off=%zu",
        K->name, in, out_f, r, n, layout, ga_layout, off);
    buf x = balloc(n * in, off), go = balloc(n * out_f, off);
    buf A = balloc(in * r, off), B = balloc(r * out_f, off);
    buf gA = balloc(in * r, off), gB = balloc(r * out_f, off);
    buf gAK = bcopy(gA, off), gBK = bcopy(gB, off), gAS = bcopy(gA, 0), gBS = bcopy(gB, 0);
    const float c = -0.6f;
    double *wA = calloc(in * r, sizeof *wA), *tA = calloc(in * r, sizeof *tA);
    double *wB = calloc(r * out_f, sizeof *wB), *tB = calloc(r * out_f, sizeof *tB);
    double *h = malloc(r * sizeof *h), *ha = malloc(r * sizeof *ha);
    double *u = malloc(r * sizeof *u), *ua = malloc(r * sizeof *ua);
    for (size_t b = 0; b < n; ++b) {
        const float *xb = x.p + b * in, *gb = go.p + b * out_f;
        for (size_t k = 0; k < r; ++k) {
            h[k] = ha[k] = u[k] = ua[k] = 0.0;
            for (size_t i = 0; i < in; ++i) {
                const double a = A_at(A.p, layout, in, r, i, k);
                h[k] += xb[i] * a;
                ha[k] += fabs(xb[i] * a);
            }
            for (size_t j = 0; j < out_f; ++j) {
                u[k] += (double)gb[j] * B.p[k * out_f + j];
                ua[k] += fabs((double)gb[j] * B.p[k * out_f + j]);
            }
        }
        for (size_t i = 0; i < in; ++i)
            for (size_t k = 0; k < r; ++k) {
                const size_t e = ga_layout == ADL_RANK_MAJOR ? k * in + i : i * r + k;
                wA[e] += c * xb[i] * u[k];
                tA[e] += fabs(c * xb[i]) * ua[k];
            }
        for (size_t k = 0; k < r; ++k)
            for (size_t j = 0; j < out_f; ++j) {
                wB[k * out_f + j] += c * h[k] * gb[j];
                tB[k * out_f + j] += fabs(c * gb[j]) * ha[k];
            }
    }
    for (size_t e = 0; e < in * r; ++e) {
        wA[e] += gA.p[e];
        tA[e] = 2.0 * EPS32 * ((double)(in + out_f + 8) * tA[e] + (double)(n + 1) * fabs(gA.p[e])) + 1e-30;
    }
    for (size_t e = 0; e < r * out_f; ++e) {
        wB[e] += gB.p[e];
        tB[e] = 2.0 * EPS32 * ((double)(in + out_f + 8) * tB[e] + (double)(n + 1) * fabs(gB.p[e])) + 1e-30;
    }
    K->accumulate(x.p, go.p, n, in, out_f, A.p, layout, r, B.p, c, gAK.p, ga_layout, gBK.p);
    S->accumulate(x.p, go.p, n, in, out_f, A.p, layout, r, B.p, c, gAS.p, ga_layout, gBS.p);
    check_close("accumulate gA vs double", gAS.p, wA, tA, in * r);
    check_close("accumulate gB vs double", gBS.p, wB, tB, r * out_f);
    check_paths("accumulate gA vs scalar", gAK.p, gAS.p, tA, in * r);
    check_paths("accumulate gB vs scalar", gBK.p, gBS.p, tB, r * out_f);
    free(wA), free(tA), free(wB), free(tB), free(h), free(ha), free(u), free(ua);
    bfree(x), bfree(go), bfree(A), bfree(B), bfree(gA), bfree(gB);
    bfree(gAK), bfree(gBK), bfree(gAS), bfree(gBS);
}

static void test_apply(const adl_kernels *K, const adl_kernels *S, size_t count, size_t off) {
    CTX("%s apply count=%zu off=%zu", K->name, count, off);
    buf p = balloc(count, off), g = balloc(count, off);
    buf pK = bcopy(p, off), gK = bcopy(g, off), pS = bcopy(p, 0), gS = bcopy(g, 0);
    const float lr = 0.01f;
    double *want = malloc(count * sizeof *want), *tol = malloc(count * sizeof *tol);
    for (size_t i = 0; i < count; ++i) {
        want[i] = (double)p.p[i] - (double)lr * g.p[i];
        tol[i] = 3.0 * EPS32 * (fabs(p.p[i]) + fabs(lr * g.p[i])) + 1e-30;
    }
    K->apply(pK.p, gK.p, count, lr);
    S->apply(pS.p, gS.p, count, lr);
    check_close("apply vs double", pS.p, want, tol, count);
    check_paths("apply vs scalar", pK.p, pS.p, tol, count);
    int zero = 1;
    for (size_t i = 0; i < count; ++i)
        zero &= gK.p[i] == 0.0f && gS.p[i] == 0.0f;
    check(zero, "apply zeroes grad");
    free(want), free(tol);
    bfree(p), bfree(g), bfree(pK), bfree(gK), bfree(pS), bfree(gS);
}

static void test_apply_ewc(const adl_kernels *K, const adl_kernels *S, size_t count,
                           int proximal, int update_fisher, size_t off) {
    CTX("%s apply_ewc count=%zu proximal=%d update_fisher=%d off=%zu", K->name,
        count, proximal, update_fisher, off);
    buf p = balloc(count, off), g = balloc(count, off), F = balloc(count, off);
    buf opt = balloc(count, off);
    for (size_t i = 0; i < count; ++i)
        F.p[i] = fabsf(F.p[i]) * 50.0f; /* lr*lam*F up to 2.5: both forms matter */
    buf pK = bcopy(p, off), gK = bcopy(g, off), FK = bcopy(F, off);
    buf pS = bcopy(p, 0), gS = bcopy(g, 0), FS = bcopy(F, 0);
    const float inv = 1.0f / 3.0f, lr = 0.05f, lam = 1.0f, decay = 0.9f;
    double *wp = calloc(count, sizeof *wp), *tp = calloc(count, sizeof *tp);
    double *wf = calloc(count, sizeof *wf), *tf = calloc(count, sizeof *tf);
    for (size_t i = 0; i < count; ++i) {
        const double gm = (double)g.p[i] * inv;
        double f = F.p[i];
        if (update_fisher)
            f = decay * f + (1.0 - decay) * gm * gm;
        wf[i] = f;
        tf[i] = 4.0 * EPS32 * f + 1e-30;
        const double a = (double)lr * lam * f, th = p.p[i], o = opt.p[i];
        if (proximal)
            wp[i] = (th - lr * gm + a * o) / (1.0 + a);
        else
            wp[i] = th - lr * gm - a * (th - o);
        tp[i] = 10.0 * EPS32 * (fabs(th) + fabs(lr * gm) + fabs(a) * (fabs(o) + fabs(th))) + 1e-30;
    }
    K->apply_ewc(pK.p, gK.p, count, inv, lr, lam, FK.p, opt.p, decay, proximal, update_fisher);
    S->apply_ewc(pS.p, gS.p, count, inv, lr, lam, FS.p, opt.p, decay, proximal, update_fisher);
    check_close("apply_ewc param vs double", pS.p, wp, tp, count);
    check_close("apply_ewc fisher vs double", FS.p, wf, tf, count);
    check_paths("apply_ewc param vs scalar", pK.p, pS.p, tp, count);
    check_paths("apply_ewc fisher vs scalar", FK.p, FS.p, tf, count);
    int zero = 1;
    for (size_t i = 0; i < count; ++i)
        zero &= gK.p[i] == 0.0f && gS.p[i] == 0.0f;
    check(zero, "apply_ewc zeroes grad");
    free(wp), free(tp), free(wf), free(tf);
    bfree(p), bfree(g), bfree(F), bfree(opt), bfree(pK), bfree(gK), bfree(FK);
    bfree(pS), bfree(gS), bfree(FS);
}

/* NaN and inf propagate the same way on every path. */
static void test_nonfinite(const adl_kernels *K, const adl_kernels *S, size_t in,
                           size_t out_f) {
    const float specials[] = {NAN, INFINITY, -INFINITY};
    for (int sp = 0; sp < 3; ++sp) {
        for (int where = 0; where < 3; ++where) { /* in x, in A, in B */
            for (size_t r = 1; r <= 3; ++r) {
                CTX("%s nonfinite in=%zu out=%zu r=%zu special=%g where=%d",
                    K->name, in, out_f, r, (double)specials[sp], where);
                buf x = balloc(in, 1), A = balloc(in * r, 1), B = balloc(r * out_f, 1);
                buf o = balloc(out_f, 1);
                buf *t = where == 0 ? &x : where == 1 ? &A : &B;
                t->p[t->n / 2] = specials[sp];
                buf oK = bcopy(o, 1), oS = bcopy(o, 0);
                double *tol = malloc(out_f * sizeof *tol), *w = malloc(out_f * sizeof *w);
                ref_forward(x.p, 1, in, A.p, ADL_ROW_MAJOR, r, B.p, out_f, 0.5f, o.p, w, tol);
                /* the double reference has no overflow but the same NaN/inf
                 * pattern; tolerances of non-finite rows are meaningless */
                for (size_t j = 0; j < out_f; ++j)
                    if (!isfinite(tol[j]))
                        tol[j] = INFINITY;
                K->fwd_rn(x.p, 1, in, A.p, ADL_ROW_MAJOR, r, B.p, out_f, 0.5f, oK.p);
                S->fwd_rn(x.p, 1, in, A.p, ADL_ROW_MAJOR, r, B.p, out_f, 0.5f, oS.p);
                check_close("nonfinite fwd_rn vs double", oS.p, w, tol, out_f);
                check_paths("nonfinite fwd_rn vs scalar", oK.p, oS.p, tol, out_f);
                if (r <= 2) {
                    memcpy(oK.p, o.p, out_f * sizeof(float));
                    memcpy(oS.p, o.p, out_f * sizeof(float));
                    if (r == 1) {
                        K->fwd_r1(x.p, 1, in, A.p, B.p, out_f, 0.5f, oK.p);
                        S->fwd_r1(x.p, 1, in, A.p, B.p, out_f, 0.5f, oS.p);
                    } else {
                        K->fwd_r2(x.p, 1, in, A.p, ADL_ROW_MAJOR, B.p, out_f, 0.5f, oK.p);
                        S->fwd_r2(x.p, 1, in, A.p, ADL_ROW_MAJOR, B.p, out_f, 0.5f, oS.p);
                    }
                    check_paths("nonfinite fwd_r1/r2 vs scalar", oK.p, oS.p, tol, out_f);
                }
                free(tol), free(w);
                bfree(x), bfree(A), bfree(B), bfree(o), bfree(oK), bfree(oS);
            }
        }
        /* apply / apply_ewc with a special gradient */
        CTX("%s nonfinite apply special=%g", K->name, (double)specials[sp]);
        const size_t count = in;
        buf p = balloc(count, 1), g = balloc(count, 1), F = balloc(count, 1), opt = balloc(count, 1);
        for (size_t i = 0; i < count; ++i)
            F.p[i] = fabsf(F.p[i]);
        g.p[count / 2] = specials[sp];
        buf pK = bcopy(p, 1), gK = bcopy(g, 1), FK = bcopy(F, 1);
        buf pS = bcopy(p, 0), gS = bcopy(g, 0), FS = bcopy(F, 0);
        K->apply_ewc(pK.p, gK.p, count, 0.5f, 0.1f, 0.5f, FK.p, opt.p, 0.9f, 1, 1);
        S->apply_ewc(pS.p, gS.p, count, 0.5f, 0.1f, 0.5f, FS.p, opt.p, 0.9f, 1, 1);
        double *tol = malloc(count * sizeof *tol);
        for (size_t i = 0; i < count; ++i)
            tol[i] = 1e-5 * (1.0 + fabs(pS.p[i]));
        check_paths("nonfinite apply_ewc param vs scalar", pK.p, pS.p, tol, count);
        for (size_t i = 0; i < count; ++i)
            tol[i] = 1e-5 * (1.0 + fabs(FS.p[i]));
        check_paths("nonfinite apply_ewc fisher vs scalar", FK.p, FS.p, tol, count);
        free(tol);
        bfree(p), bfree(g), bfree(F), bfree(opt), bfree(pK), bfree(gK), bfree(FK);
        bfree(pS), bfree(gS), bfree(FS);
    }
}

/* The public batched entry point: per-row agreement with the single-adapter
 * kernel, per-adapter scales, and index checks that write nothing. */
static void test_batched(const char *isa, size_t in, size_t out_f, size_t r, int layout) {
    CTX("%s batched in=%zu out=%zu r=%zu layout=%d", isa, in, out_f, r, layout);
    check(adl_select_isa(isa) == 0, "select isa");
    const size_t n = 5, m = 3;
    buf x = balloc(n * in, 1), As = balloc(m * in * r, 1), Bs = balloc(m * r * out_f, 1);
    buf sc = balloc(m, 1), o = balloc(n * out_f, 1);
    buf oK = bcopy(o, 1);
    int64_t idx[5] = {2, 0, 2, 1, 0};
    double *want = malloc(n * out_f * sizeof *want), *tol = malloc(n * out_f * sizeof *tol);
    for (size_t b = 0; b < n; ++b)
        ref_forward(x.p + b * in, 1, in, As.p + idx[b] * in * r, layout, r,
                    Bs.p + idx[b] * r * out_f, out_f, sc.p[idx[b]], o.p + b * out_f,
                    want + b * out_f, tol + b * out_f);
    int64_t rc = adl_lora_forward_add_batched(x.p, n, in, As.p, layout, r, Bs.p, out_f, m,
                                              idx, sc.p, 0.0f, oK.p);
    check(rc == -1, "batched returns -1");
    check_close("batched vs double", oK.p, want, tol, n * out_f);
    /* a single scale for every adapter */
    memcpy(oK.p, o.p, n * out_f * sizeof(float));
    for (size_t b = 0; b < n; ++b)
        ref_forward(x.p + b * in, 1, in, As.p + idx[b] * in * r, layout, r,
                    Bs.p + idx[b] * r * out_f, out_f, 0.5f, o.p + b * out_f,
                    want + b * out_f, tol + b * out_f);
    rc = adl_lora_forward_add_batched(x.p, n, in, As.p, layout, r, Bs.p, out_f, m, idx,
                                      NULL, 0.5f, oK.p);
    check(rc == -1, "batched (one scale) returns -1");
    check_close("batched (one scale) vs double", oK.p, want, tol, n * out_f);
    /* bad indices: the first bad position is reported, nothing is written */
    const int64_t bads[] = {3, -1, 1000000, INT64_MIN, INT64_MAX};
    for (size_t t = 0; t < sizeof bads / sizeof bads[0]; ++t) {
        int64_t bidx[5] = {0, 1, 2, 0, 1};
        bidx[3] = bads[t];
        memcpy(oK.p, o.p, n * out_f * sizeof(float));
        rc = adl_lora_forward_add_batched(x.p, n, in, As.p, layout, r, Bs.p, out_f, m, bidx,
                                          sc.p, 0.0f, oK.p);
        check(rc == 3, "batched reports the bad position");
        check(memcmp(oK.p, o.p, n * out_f * sizeof(float)) == 0, "batched writes nothing on error");
    }
    free(want), free(tol);
    bfree(x), bfree(As), bfree(Bs), bfree(sc), bfree(o), bfree(oK);
}

static void test_dispatch(void) {
    CTX("dispatch");
    check(adl_select_isa("scalar") == 0, "scalar always selectable");
    check(strcmp(adl_active_isa(), "scalar") == 0, "scalar active after select");
    check(adl_select_isa("bogus") == -2, "unknown path name is -2");
#if ADL_HAVE_X86
    check(adl_select_isa("neon") == -1, "neon is not available on x86");
#endif
#if ADL_HAVE_NEON
    check(adl_select_isa("avx2") == -1, "avx2 is not available on AArch64");
#endif
    check(adl_select_isa(NULL) == 0, "auto select");
    check(adl_build_info() != NULL && adl_build_info()[0] != '\0', "build info");
}

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    const char *paths[] = {"scalar", "avx2", "neon"};
    const adl_kernels *S = adl_kernels_for("scalar");
    test_dispatch();
    printf("active path at load: %s\n", (adl_select_isa(NULL), adl_active_isa()));
    for (size_t p = 0; p < 3; ++p) {
        const adl_kernels *K = adl_kernels_for(paths[p]);
        if (K == NULL) {
            printf("path %-6s: not available here, skipped\n", paths[p]);
            continue;
        }
        const long f0 = g_fail, c0 = g_checks;
        size_t combo = 0;
        for (size_t a = 0; a < NSIZES; ++a)
            for (size_t b = 0; b < NSIZES; ++b) {
                const size_t in = SIZES[a], out_f = SIZES[b];
                if (quick && (in > 1000) != (out_f > 1000))
                    continue;
                for (size_t ri = 0; ri < NRANKS; ++ri) {
                    const size_t r = RANKS[ri];
                    const size_t off = combo++ % 2; /* aligned and unaligned */
                    for (int layout = 0; layout < 2; ++layout) {
                        const size_t n = (combo + layout) % 2 ? 3 : 1;
                        test_forward(K, S, in, out_f, r, n, layout, off);
                        test_accumulate(K, S, in, out_f, r, n, layout, layout ^ (int)(combo % 2), off);
                    }
                }
            }
        for (size_t a = 0; a < NSIZES; ++a) {
            test_apply(K, S, SIZES[a], a % 2);
            for (int prox = 0; prox < 2; ++prox)
                for (int upd = 0; upd < 2; ++upd)
                    test_apply_ewc(K, S, SIZES[a] * 2, prox, upd, (a + prox) % 2);
            test_nonfinite(K, S, SIZES[a], SIZES[NSIZES - 1 - a]);
        }
        for (size_t ri = 0; ri < NRANKS; ++ri)
            for (int layout = 0; layout < 2; ++layout) {
                test_batched(paths[p], 17, 767, RANKS[ri], layout);
                test_batched(paths[p], 768, 16, RANKS[ri], layout);
            }
        printf("path %-6s: %ld checks, %ld failed\n", paths[p], g_checks - c0, g_fail - f0);
    }
    adl_select_isa(NULL);
    printf("%s: %ld checks, %ld failed\n", g_fail ? "FAILED" : "OK", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
