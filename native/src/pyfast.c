/*
 * pyfast.c: the one-call entry points of adalora_native_py.h.
 *
 * Arrays arrive as object addresses. Each is accepted only if it is an exact
 * numpy.ndarray whose dtype object is the float32 (or int64) singleton, that
 * is aligned, contiguous and, for outputs, writeable; shapes must agree and
 * outputs must not overlap inputs. Anything else returns ADL_PY_DECLINED
 * before a single element is read or written.
 *
 * The caller holds references to every array for the duration of the call
 * (they are its arguments), so the headers stay valid while the GIL is
 * released. Data pointers of a live ndarray never move (resize needs sole
 * ownership); a shape change from another thread during the call can only
 * swap in an equal-sized shape.
 */
#include <math.h>
#include <string.h>

#include "adalora_native_py.h"
#include "kernels.h"

static adl_pylayout L;
static int g_enabled;

int adl_py_init(const adl_pylayout *layout, int enable) {
    g_enabled = 0;
    if (layout != NULL) {
        L = *layout;
        g_enabled = enable != 0;
    }
    return 0;
}

typedef struct {
    char *data;
    int nd;
    const intptr_t *dims;
    int64_t flags;
    size_t size; /* elements */
} pyarr;

static intptr_t rd_ptr(const char *o, int64_t off) {
    intptr_t v;
    memcpy(&v, o + off, sizeof v);
    return v;
}
static int rd_int(const char *o, int64_t off) {
    int v;
    memcpy(&v, o + off, sizeof v);
    return v;
}

/* 1 if obj is an acceptable array (see above); fills a. */
static int view(intptr_t obj, intptr_t descr, int writeable, pyarr *a) {
    const char *o = (const char *)obj;
    if (o == NULL || rd_ptr(o, L.off_type) != L.ndarray_type ||
        rd_ptr(o, L.off_descr) != descr)
        return 0;
    const int64_t flags = rd_int(o, L.off_flags);
    const int64_t need = L.flag_aligned | (writeable ? L.flag_writeable : 0);
    if ((flags & need) != need ||
        !(flags & (L.flag_c_contiguous | L.flag_f_contiguous)))
        return 0;
    a->data = (char *)rd_ptr(o, L.off_data);
    a->nd = rd_int(o, L.off_nd);
    a->dims = (const intptr_t *)rd_ptr(o, L.off_dims);
    a->flags = flags;
    if (a->nd < 0 || a->nd > 3)
        return 0;
    size_t size = 1;
    for (int i = 0; i < a->nd; ++i) {
        if (a->dims[i] < 0)
            return 0;
        size *= (size_t)a->dims[i];
    }
    a->size = size;
    return 1;
}

static int is_c(const pyarr *a) { return (a->flags & L.flag_c_contiguous) != 0; }

/* 1 if the byte ranges of a and b (itemsize 4 or 8) overlap. */
static int overlap(const pyarr *a, size_t ia, const pyarr *b, size_t ib) {
    if (a->size == 0 || b->size == 0)
        return 0;
    const uintptr_t a0 = (uintptr_t)a->data, a1 = a0 + a->size * ia;
    const uintptr_t b0 = (uintptr_t)b->data, b1 = b0 + b->size * ib;
    return a0 < b1 && b0 < a1;
}

void adl_py_probe(intptr_t obj, int64_t *out9) {
    const char *o = (const char *)obj;
    memset(out9, 0, 9 * sizeof *out9);
    out9[0] = (int64_t)rd_ptr(o, L.off_data);
    const int nd = rd_int(o, L.off_nd);
    out9[1] = nd;
    const intptr_t *dims = (const intptr_t *)rd_ptr(o, L.off_dims);
    const intptr_t *strides = (const intptr_t *)rd_ptr(o, L.off_strides);
    for (int i = 0; i < nd && i < 2; ++i) {
        out9[2 + i] = dims[i];
        out9[4 + i] = strides[i];
    }
    out9[6] = (int64_t)rd_ptr(o, L.off_descr);
    out9[7] = rd_int(o, L.off_flags);
    out9[8] = (int64_t)rd_ptr(o, L.off_type);
}

/* x (in,) or (n, in) and out (out_f,) or (n, out_f), both C-contiguous:
 * sets *n; 0 if the shapes do not fit. */
static int rows(const pyarr *x, size_t in, const pyarr *o, size_t out_f, size_t *n) {
    if (!is_c(x) || !is_c(o) || x->nd != o->nd)
        return 0;
    if (x->nd == 1) {
        *n = 1;
        return (size_t)x->dims[0] == in && (size_t)o->dims[0] == out_f;
    }
    if (x->nd == 2) {
        *n = (size_t)x->dims[0];
        return (size_t)x->dims[1] == in && (size_t)o->dims[1] == out_f &&
               o->dims[0] == x->dims[0];
    }
    return 0;
}

int adl_py_forward_add(intptr_t xo, intptr_t Ao, intptr_t Bo, double s,
                       intptr_t oo) {
    pyarr x, A, B, o;
    if (!g_enabled || !view(xo, L.f32_descr, 0, &x) ||
        !view(Ao, L.f32_descr, 0, &A) || !view(Bo, L.f32_descr, 0, &B) ||
        !view(oo, L.f32_descr, 1, &o))
        return ADL_PY_DECLINED;
    if (A.nd != 2 || B.nd != 2 || !is_c(&B))
        return ADL_PY_DECLINED;
    const size_t in = (size_t)A.dims[0], r = (size_t)A.dims[1];
    const size_t out_f = (size_t)B.dims[1];
    size_t n;
    if (r == 0 || (size_t)B.dims[0] != r || !rows(&x, in, &o, out_f, &n))
        return ADL_PY_DECLINED;
    if (overlap(&o, 4, &x, 4) || overlap(&o, 4, &A, 4) || overlap(&o, 4, &B, 4))
        return ADL_PY_DECLINED;
    const int layout = is_c(&A) ? ADL_ROW_MAJOR : ADL_RANK_MAJOR;
    const float *px = (const float *)x.data, *pA = (const float *)A.data;
    const float *pB = (const float *)B.data;
    float *po = (float *)o.data;
    const adl_kernels *k = adl_active_kernels();
    if (r == 1)
        k->fwd_r1(px, n, in, pA, pB, out_f, (float)s, po);
    else if (r == 2)
        k->fwd_r2(px, n, in, pA, layout, pB, out_f, (float)s, po);
    else
        k->fwd_rn(px, n, in, pA, layout, r, pB, out_f, (float)s, po);
    return ADL_PY_DONE;
}

int adl_py_accumulate(intptr_t xo, intptr_t go, intptr_t Ao, intptr_t Bo,
                      double s, double reward, intptr_t gAo, intptr_t gBo) {
    pyarr x, g, A, B, gA, gB;
    if (!g_enabled || !view(xo, L.f32_descr, 0, &x) ||
        !view(go, L.f32_descr, 0, &g) || !view(Ao, L.f32_descr, 0, &A) ||
        !view(Bo, L.f32_descr, 0, &B) || !view(gAo, L.f32_descr, 1, &gA) ||
        !view(gBo, L.f32_descr, 1, &gB))
        return ADL_PY_DECLINED;
    if (A.nd != 2 || B.nd != 2 || gA.nd != 2 || gB.nd != 2 || !is_c(&B) ||
        !is_c(&gB))
        return ADL_PY_DECLINED;
    const size_t in = (size_t)A.dims[0], r = (size_t)A.dims[1];
    const size_t out_f = (size_t)B.dims[1];
    size_t n;
    if (r == 0 || (size_t)B.dims[0] != r || !rows(&x, in, &g, out_f, &n) ||
        gA.dims[0] != A.dims[0] || gA.dims[1] != A.dims[1] ||
        gB.dims[0] != B.dims[0] || gB.dims[1] != B.dims[1])
        return ADL_PY_DECLINED;
    const pyarr *ins[4] = {&x, &g, &A, &B};
    for (int i = 0; i < 4; ++i)
        if (overlap(&gA, 4, ins[i], 4) || overlap(&gB, 4, ins[i], 4))
            return ADL_PY_DECLINED;
    if (overlap(&gA, 4, &gB, 4))
        return ADL_PY_DECLINED;
    adl_active_kernels()->accumulate(
        (const float *)x.data, (const float *)g.data, n, in, out_f,
        (const float *)A.data, is_c(&A) ? ADL_ROW_MAJOR : ADL_RANK_MAJOR, r,
        (const float *)B.data, (float)(s * reward), (float *)gA.data,
        is_c(&gA) ? ADL_ROW_MAJOR : ADL_RANK_MAJOR, (float *)gB.data);
    return ADL_PY_DONE;
}

/* Same shape and same memory order (elementwise ops over flat memory). */
static int same_layout(const pyarr *a, const pyarr *b) {
    if (a->nd != b->nd)
        return 0;
    for (int i = 0; i < a->nd; ++i)
        if (a->dims[i] != b->dims[i])
            return 0;
    return a->size <= 1 || a->nd <= 1 ||
           (is_c(a) && is_c(b)) ||
           (!is_c(a) && !is_c(b)); /* both F-contiguous only */
}

int adl_py_apply(intptr_t po, intptr_t go, double lr) {
    pyarr p, g;
    if (!g_enabled || !view(po, L.f32_descr, 1, &p) ||
        !view(go, L.f32_descr, 1, &g) || !same_layout(&p, &g) ||
        overlap(&p, 4, &g, 4))
        return ADL_PY_DECLINED;
    adl_active_kernels()->apply((float *)p.data, (float *)g.data, p.size, (float)lr);
    return ADL_PY_DONE;
}

int adl_py_apply_ewc(intptr_t po, intptr_t go, double inv_count, double lr,
                     double lam, intptr_t fo, intptr_t oo, double decay,
                     int proximal, int update_fisher) {
    pyarr p, g, F, opt;
    if (!g_enabled || !view(po, L.f32_descr, 1, &p) ||
        !view(go, L.f32_descr, 1, &g) || !view(fo, L.f32_descr, 1, &F) ||
        !view(oo, L.f32_descr, 0, &opt))
        return ADL_PY_DECLINED;
    if (!same_layout(&p, &g) || !same_layout(&p, &F) || !same_layout(&p, &opt))
        return ADL_PY_DECLINED;
    if (overlap(&p, 4, &g, 4) || overlap(&p, 4, &F, 4) || overlap(&p, 4, &opt, 4) ||
        overlap(&g, 4, &F, 4) || overlap(&g, 4, &opt, 4) || overlap(&F, 4, &opt, 4))
        return ADL_PY_DECLINED;
    adl_active_kernels()->apply_ewc((float *)p.data, (float *)g.data, p.size,
                                    (float)inv_count, (float)lr, (float)lam,
                                    (float *)F.data, (const float *)opt.data,
                                    (float)decay, proximal != 0,
                                    update_fisher != 0);
    return ADL_PY_DONE;
}

int64_t adl_py_forward_add_batched(intptr_t xo, intptr_t Ao, intptr_t Bo,
                                   double s, intptr_t so, intptr_t io,
                                   intptr_t oo) {
    pyarr x, A, B, sc, idx, o;
    if (!g_enabled || !view(xo, L.f32_descr, 0, &x) ||
        !view(Ao, L.f32_descr, 0, &A) || !view(Bo, L.f32_descr, 0, &B) ||
        !view(io, L.i64_descr, 0, &idx) || !view(oo, L.f32_descr, 1, &o))
        return -2;
    if (so != 0 && !view(so, L.f32_descr, 0, &sc))
        return -2;
    if (x.nd != 2 || A.nd != 3 || B.nd != 3 || idx.nd != 1 || !is_c(&A) ||
        !is_c(&B) || !is_c(&idx))
        return -2;
    const size_t m = (size_t)A.dims[0], in = (size_t)A.dims[1];
    const size_t r = (size_t)A.dims[2], out_f = (size_t)B.dims[2];
    size_t n;
    if (r == 0 || (size_t)B.dims[0] != m || (size_t)B.dims[1] != r ||
        !rows(&x, in, &o, out_f, &n) || (size_t)idx.dims[0] != n)
        return -2;
    if (so != 0 && (sc.nd != 1 || (size_t)sc.dims[0] != m))
        return -2;
    if (overlap(&o, 4, &x, 4) || overlap(&o, 4, &A, 4) || overlap(&o, 4, &B, 4) ||
        overlap(&o, 4, &idx, 8) || (so != 0 && overlap(&o, 4, &sc, 4)))
        return -2;
    return adl_lora_forward_add_batched(
        (const float *)x.data, n, in, (const float *)A.data, ADL_ROW_MAJOR, r,
        (const float *)B.data, out_f, m, (const int64_t *)idx.data,
        so != 0 ? (const float *)sc.data : NULL, (float)s, (float *)o.data);
}

int adl_py_triplet_forward_add(intptr_t xo, intptr_t Ao, intptr_t Eo,
                               intptr_t Bo, double s, intptr_t oo) {
    pyarr x, A, E, B, o;
    if (!g_enabled || !view(xo, L.f32_descr, 0, &x) ||
        !view(Ao, L.f32_descr, 0, &A) || !view(Eo, L.f32_descr, 0, &E) ||
        !view(Bo, L.f32_descr, 0, &B) || !view(oo, L.f32_descr, 1, &o))
        return ADL_PY_DECLINED;
    if (A.nd != 2 || B.nd != 2 || !is_c(&A) || !is_c(&B))
        return ADL_PY_DECLINED;
    const size_t r = (size_t)A.dims[0], in = (size_t)A.dims[1];
    const size_t out_f = (size_t)B.dims[0];
    size_t n;
    if (r == 0 || (size_t)B.dims[1] != r || E.size != r ||
        !(E.nd == 1 || (E.nd == 2 && E.dims[1] == 1)) ||
        !rows(&x, in, &o, out_f, &n))
        return ADL_PY_DECLINED;
    if (overlap(&o, 4, &x, 4) || overlap(&o, 4, &A, 4) || overlap(&o, 4, &E, 4) ||
        overlap(&o, 4, &B, 4))
        return ADL_PY_DECLINED;
    adl_active_kernels()->triplet((const float *)x.data, n, in,
                                  (const float *)A.data, (const float *)E.data,
                                  r, (const float *)B.data, out_f, (float)s,
                                  (float *)o.data);
    return ADL_PY_DONE;
}

/* ---- argument tuples ------------------------------------------------------ */

/* The n items of tuple t, or 0 if t is not an exact tuple of n items. */
static int items(intptr_t t, int64_t n, intptr_t *out) {
    const char *o = (const char *)t;
    if (!g_enabled || o == NULL || rd_ptr(o, L.off_type) != L.tuple_type)
        return 0;
    intptr_t size;
    memcpy(&size, o + L.off_tuple_size, sizeof size);
    if ((int64_t)size != n)
        return 0;
    memcpy(out, o + L.off_tuple_items, (size_t)n * sizeof *out);
    return 1;
}

/* An exact Python float's value. */
static int fval(intptr_t obj, double *v) {
    const char *o = (const char *)obj;
    if (rd_ptr(o, L.off_type) != L.float_type)
        return 0;
    memcpy(v, o + L.off_float_value, sizeof *v);
    return 1;
}

/* True / False only. */
static int bval(intptr_t obj, int *v) {
    if (obj == L.true_obj)
        *v = 1;
    else if (obj == L.false_obj)
        *v = 0;
    else
        return 0;
    return 1;
}

void adl_py_probe_tuple(intptr_t obj, int64_t i, int64_t *item, double *value) {
    const char *o = (const char *)obj;
    intptr_t it;
    memcpy(&it, o + L.off_tuple_items + i * (int64_t)sizeof it, sizeof it);
    *item = (int64_t)it;
    double v = 0.0;
    *value = fval(it, &v) ? v : NAN;
}

int adl_pyt_forward_add(intptr_t t) {
    intptr_t a[5];
    double s;
    if (!items(t, 5, a) || !fval(a[3], &s))
        return ADL_PY_DECLINED;
    return adl_py_forward_add(a[0], a[1], a[2], s, a[4]);
}

int adl_pyt_accumulate(intptr_t t) {
    intptr_t a[8];
    double s, reward;
    if (!items(t, 8, a) || !fval(a[4], &s) || !fval(a[5], &reward))
        return ADL_PY_DECLINED;
    return adl_py_accumulate(a[0], a[1], a[2], a[3], s, reward, a[6], a[7]);
}

int adl_pyt_apply(intptr_t t) {
    intptr_t a[3];
    double lr;
    if (!items(t, 3, a) || !fval(a[2], &lr))
        return ADL_PY_DECLINED;
    return adl_py_apply(a[0], a[1], lr);
}

int adl_pyt_apply_ewc(intptr_t t) {
    intptr_t a[10];
    double inv, lr, lam, decay;
    int proximal, update;
    if (!items(t, 10, a) || !fval(a[2], &inv) || !fval(a[3], &lr) ||
        !fval(a[4], &lam) || !fval(a[7], &decay) || !bval(a[8], &proximal) ||
        !bval(a[9], &update))
        return ADL_PY_DECLINED;
    return adl_py_apply_ewc(a[0], a[1], inv, lr, lam, a[5], a[6], decay, proximal,
                            update);
}

int64_t adl_pyt_forward_add_batched(intptr_t t) {
    intptr_t a[6];
    double s = 0.0;
    if (!items(t, 6, a))
        return -2;
    const intptr_t scales = fval(a[3], &s) ? 0 : a[3]; /* else: an (m,) array */
    return adl_py_forward_add_batched(a[0], a[1], a[2], s, scales, a[4], a[5]);
}

int adl_pyt_triplet_forward_add(intptr_t t) {
    intptr_t a[6];
    double s;
    if (!items(t, 6, a) || !fval(a[4], &s))
        return ADL_PY_DECLINED;
    return adl_py_triplet_forward_add(a[0], a[1], a[2], a[3], s, a[5]);
}
