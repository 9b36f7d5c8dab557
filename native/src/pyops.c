/*
 * pyops.c: the Python entry points of the native ops, the module
 * adalora_core._native_ops. It is built into the same shared library as the
 * cffi module adalora_core._native (PEP 489: one library may hold several
 * modules), so both use one dispatch table.
 *
 * Each op is a METH_FASTCALL function that reads its arguments through
 * NumPy's C API, checks everything the kernel relies on (type, dtype,
 * alignment, layout, shapes, overlap) and raises a TypeError or ValueError
 * naming the argument before anything is written; then it releases the GIL,
 * runs the kernel and returns its outputs. The meaning of each op and its
 * NumPy reference are in backends/native.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <stdio.h>

#include "adalora_native.h"

typedef PyArrayObject *arr_t;
#define DIM(a, i) PyArray_DIM(a, i)
#define F32(a) ((float *)PyArray_DATA(a))
#define SHAPE(a, buf) tup(PyArray_DIMS(a), PyArray_NDIM(a), buf)
#define FAIL(exc, ...) (PyErr_Format(exc, __VA_ARGS__), 0)

enum { ARG_OUT = 1, ARG_F = 2, ARG_ANY = 4 }; /* written; F order accepted; order checked by the op */

/* `v` (n entries) as Python prints a tuple: "(3, 16)", "(16,)". */
static const char *tup(const npy_intp *v, int n, char s[256]) {
    int k = snprintf(s, 256, "("), i = 0;
    for (; i < n && k < 200; ++i) /* at most 22 characters a number */
        k += snprintf(s + k, (size_t)(256 - k), i ? ", %zd" : "%zd", (Py_ssize_t)v[i]);
    snprintf(s + k, (size_t)(256 - k), i < n ? ", ...)" : n == 1 ? ",)" : ")");
    return s;
}

static int nargs(Py_ssize_t n, Py_ssize_t want, const char *sig) {
    return n == want || FAIL(PyExc_TypeError, "%s takes %zd arguments, got %zd", sig, want, n);
}

static int real(PyObject *o, const char *name, double *v) {
    *v = PyFloat_AsDouble(o);
    if (*v != -1.0 || !PyErr_Occurred())
        return 1;
    PyErr_Clear();
    return FAIL(PyExc_TypeError, "%s must be a real number, got %s %R", name, Py_TYPE(o)->tp_name, o);
}

/* `o` as a float32 array with lo <= ndim <= hi, aligned, C-contiguous (ARG_F:
 * or F-contiguous, the transpose of a C-contiguous array), writeable if ARG_OUT. */
static int arr(PyObject *o, const char *name, int lo, int hi, int flags, arr_t *out) {
    char s[256], t[256];
    if (!PyArray_Check(o))
        return FAIL(PyExc_TypeError, "%s must be a NumPy array of float32, got %s", name,
                    Py_TYPE(o)->tp_name);
    arr_t a = (arr_t)o;
    const int nd = PyArray_NDIM(a);
    if (PyArray_TYPE(a) != NPY_FLOAT32 || !PyArray_ISNOTSWAPPED(a))
        return FAIL(PyExc_TypeError, "%s must have dtype float32 (native byte order), got %S; "
                    "convert it once with %s.astype(np.float32)", name, (PyObject *)PyArray_DESCR(a), name);
    if (nd < lo || nd > hi)
        return lo == hi ? FAIL(PyExc_ValueError, "%s must be %d-D, got shape %s", name, lo, SHAPE(a, s))
                        : FAIL(PyExc_ValueError, "%s must be %d-D or %d-D, got shape %s", name, lo, hi,
                               SHAPE(a, s));
    if (!PyArray_ISALIGNED(a))
        return FAIL(PyExc_ValueError, "%s is not aligned to its itemsize; copy it with np.array(%s)",
                    name, name);
    if (!(flags & ARG_ANY) &&
        !(PyArray_IS_C_CONTIGUOUS(a) || ((flags & ARG_F) && PyArray_IS_F_CONTIGUOUS(a))))
        return FAIL(PyExc_ValueError, "%s must be %s, got strides %s for shape %s; use "
                    "np.ascontiguousarray(%s)", name, (flags & ARG_F) ?
                    "C- or F-contiguous (the transpose of a C-contiguous array)" : "C-contiguous",
                    tup(PyArray_STRIDES(a), nd, t), SHAPE(a, s), name);
    if ((flags & ARG_OUT) && !PyArray_ISWRITEABLE(a))
        return FAIL(PyExc_ValueError, "%s is read-only, but it is updated in place", name);
    *out = a;
    return 1;
}

static int rank_ok(npy_intp r, const char *name) {
    return r >= 1 || FAIL(PyExc_ValueError, "unsupported rank %zd (%s has %zd rank columns); the "
                          "kernels need r >= 1", (Py_ssize_t)r, name, (Py_ssize_t)r);
}

/* Rows of x (in,) / (n, in) and o (out_f,) / (n, out_f) into *n. */
static int rows(arr_t x, const char *xn, npy_intp in, arr_t o, const char *on, npy_intp out_f,
                const char *an, npy_intp *n) {
    char s[256], t[256];
    const int nd = PyArray_NDIM(x);
    if (DIM(x, nd - 1) != in)
        return FAIL(PyExc_ValueError, "%s has %zd features (shape %s) but %s expects %zd", xn,
                    (Py_ssize_t)DIM(x, nd - 1), SHAPE(x, s), an, (Py_ssize_t)in);
    if (PyArray_NDIM(o) != nd)
        return FAIL(PyExc_ValueError, "%s must be %s like %s %s, got %s", on, nd == 1 ? "(out,)" :
                    "(n, out)", xn, SHAPE(x, s), SHAPE(o, t));
    if (DIM(o, nd - 1) != out_f)
        return FAIL(PyExc_ValueError, "%s has %zd columns (shape %s) but the adapter gives %zd", on,
                    (Py_ssize_t)DIM(o, nd - 1), SHAPE(o, s), (Py_ssize_t)out_f);
    if (nd == 2 && DIM(o, 0) != DIM(x, 0))
        return FAIL(PyExc_ValueError, "%s has %zd rows but %s has %zd", xn, (Py_ssize_t)DIM(x, 0), on,
                    (Py_ssize_t)DIM(o, 0));
    *n = nd == 1 ? 1 : DIM(x, 0);
    return 1;
}

/* The output o shares no byte with b. */
static int apart(arr_t o, const char *on, arr_t b, const char *bn) {
    const uintptr_t p = (uintptr_t)PyArray_DATA(o), q = (uintptr_t)PyArray_DATA(b);
    const uintptr_t n = (uintptr_t)PyArray_NBYTES(o), m = (uintptr_t)PyArray_NBYTES(b);
    return !(n && m && p < q + m && q < p + n) ||
           FAIL(PyExc_ValueError, "%s overlaps %s; the output must be a separate buffer", on, bn);
}

/* a has p's shape and memory order (the elementwise ops run over flat memory). */
static int same(arr_t a, const char *an, arr_t p, const char *pn) {
    char s[256], t[256];
    if (!PyArray_SAMESHAPE(a, p))
        return FAIL(PyExc_ValueError, "%s must have %s's shape %s, got %s", an, pn, SHAPE(p, s),
                    SHAPE(a, t));
    return PyArray_NDIM(a) < 2 || PyArray_SIZE(a) < 2 ||
           !PyArray_IS_C_CONTIGUOUS(a) == !PyArray_IS_C_CONTIGUOUS(p) ||
           FAIL(PyExc_ValueError, "%s and %s must both be C-contiguous (or both F-contiguous)", an, pn);
}

/* A (r, in) C-contiguous is the kernels' rank-major layout; F-contiguous (the transpose of a
 * C-contiguous (in, r) array) their row-major one. */
static int layout(arr_t A) { return PyArray_IS_C_CONTIGUOUS(A) ? ADL_RANK_MAJOR : ADL_ROW_MAJOR; }

/* The lora pair: B (r, out) with A's rank. */
static int pair(arr_t A, arr_t B) {
    char s[256], t[256];
    return DIM(B, 0) == DIM(A, 0) ||
           FAIL(PyExc_ValueError, "A is (r, in) = %s but B is %s; B must be (r, out) with r = %zd",
                SHAPE(A, s), SHAPE(B, t), (Py_ssize_t)DIM(A, 0));
}

static PyObject *forward_add(PyObject *mod, PyObject *const *a, Py_ssize_t na) {
    double s;
    npy_intp n;
    arr_t x, A, B, o;
    if (!nargs(na, 5, "lora_forward_add(x, A, B, scaling, out)") || !real(a[3], "scaling", &s) ||
        !arr(a[0], "x", 1, 2, 0, &x) || !arr(a[1], "A", 2, 2, ARG_F, &A) ||
        !arr(a[2], "B", 2, 2, 0, &B) || !arr(a[4], "out", 1, 2, ARG_OUT, &o) ||
        !rank_ok(DIM(A, 0), "A (r, in)") || !pair(A, B) ||
        !rows(x, "x", DIM(A, 1), o, "out", DIM(B, 1), "A (r, in)", &n) || !apart(o, "out", x, "x") ||
        !apart(o, "out", A, "A") || !apart(o, "out", B, "B"))
        return NULL;
    if (PyArray_SIZE(x) && PyArray_SIZE(o)) {
        Py_BEGIN_ALLOW_THREADS
        adl_lora_forward_add(F32(x), n, DIM(A, 1), F32(A), layout(A), DIM(A, 0), F32(B), DIM(B, 1),
                             (float)s, F32(o));
        Py_END_ALLOW_THREADS
    }
    return Py_NewRef(a[4]);
}

static PyObject *accumulate(PyObject *mod, PyObject *const *a, Py_ssize_t na) {
    char s[256], t[256];
    double sc, rw;
    npy_intp n;
    arr_t x, g, A, B, gA, gB;
    if (!nargs(na, 8, "lora_accumulate(x, grad_out, A, B, scaling, reward, gA, gB)") ||
        !real(a[4], "scaling", &sc) || !real(a[5], "reward", &rw) || !arr(a[0], "x", 1, 2, 0, &x) ||
        !arr(a[1], "grad_out", 1, 2, 0, &g) || !arr(a[2], "A", 2, 2, ARG_F, &A) ||
        !arr(a[3], "B", 2, 2, 0, &B) || !arr(a[6], "gA", 2, 2, ARG_OUT | ARG_F, &gA) ||
        !arr(a[7], "gB", 2, 2, ARG_OUT, &gB) || !rank_ok(DIM(A, 0), "A (r, in)") || !pair(A, B))
        return NULL;
    if (!PyArray_SAMESHAPE(gA, A))
        return PyErr_Format(PyExc_ValueError, "gA must have A's shape %s, got %s", SHAPE(A, s),
                            SHAPE(gA, t));
    if (!PyArray_SAMESHAPE(gB, B))
        return PyErr_Format(PyExc_ValueError, "gB must have B's shape %s, got %s", SHAPE(B, s),
                            SHAPE(gB, t));
    const arr_t ins[4] = {x, g, A, B};
    const char *names[4] = {"x", "grad_out", "A", "B"};
    if (!rows(x, "x", DIM(A, 1), g, "grad_out", DIM(B, 1), "A (r, in)", &n))
        return NULL;
    for (int i = 0; i < 4; ++i)
        if (!apart(gA, "gA", ins[i], names[i]))
            return NULL;
    if (!apart(gA, "gA", gB, "gB"))
        return NULL;
    for (int i = 0; i < 4; ++i)
        if (!apart(gB, "gB", ins[i], names[i]))
            return NULL;
    if (PyArray_SIZE(x) && PyArray_SIZE(g)) {
        Py_BEGIN_ALLOW_THREADS
        adl_lora_accumulate(F32(x), F32(g), n, DIM(A, 1), DIM(B, 1), F32(A), layout(A), DIM(A, 0),
                            F32(B), (float)(sc * rw), F32(gA), layout(gA), F32(gB));
        Py_END_ALLOW_THREADS
    }
    return PyTuple_Pack(2, a[6], a[7]);
}

static PyObject *apply(PyObject *mod, PyObject *const *a, Py_ssize_t na) {
    double lr;
    arr_t p, g;
    if (!nargs(na, 3, "lora_apply(param, grad, lr_over_count)") || !real(a[2], "lr_over_count", &lr) ||
        !arr(a[0], "param", 0, NPY_MAXDIMS, ARG_OUT | ARG_F, &p) ||
        !arr(a[1], "grad", 0, NPY_MAXDIMS, ARG_OUT | ARG_F, &g) || !same(g, "grad", p, "param") ||
        !apart(p, "param", g, "grad"))
        return NULL;
    if (PyArray_SIZE(p)) {
        Py_BEGIN_ALLOW_THREADS
        adl_apply(F32(p), F32(g), PyArray_SIZE(p), (float)lr);
        Py_END_ALLOW_THREADS
    }
    return PyTuple_Pack(2, a[0], a[1]);
}

static PyObject *apply_ewc(PyObject *mod, PyObject *const *a, Py_ssize_t na) {
    double ic, lr, lam, dec;
    int prox, upd;
    arr_t p, g, F, o;
    if (!nargs(na, 10, "lora_apply_ewc(param, grad, inv_count, lr, lam, fisher, optimal, decay, "
               "proximal, update_fisher)") || !real(a[2], "inv_count", &ic) || !real(a[3], "lr", &lr) ||
        !real(a[4], "lam", &lam) || !real(a[7], "decay", &dec) || (prox = PyObject_IsTrue(a[8])) < 0 ||
        (upd = PyObject_IsTrue(a[9])) < 0 || !arr(a[0], "param", 0, NPY_MAXDIMS, ARG_OUT | ARG_F, &p) ||
        !arr(a[1], "grad", 0, NPY_MAXDIMS, ARG_OUT | ARG_F, &g) ||
        !arr(a[5], "fisher", 0, NPY_MAXDIMS, ARG_OUT | ARG_F, &F) ||
        !arr(a[6], "optimal", 0, NPY_MAXDIMS, ARG_F, &o) || !same(g, "grad", p, "param") ||
        !same(F, "fisher", p, "param") || !same(o, "optimal", p, "param") ||
        !apart(p, "param", o, "optimal") || !apart(p, "param", g, "grad") ||
        !apart(p, "param", F, "fisher") || !apart(g, "grad", o, "optimal") ||
        !apart(g, "grad", F, "fisher") || !apart(F, "fisher", o, "optimal"))
        return NULL;
    if (PyArray_SIZE(p)) {
        Py_BEGIN_ALLOW_THREADS
        adl_apply_ewc(F32(p), F32(g), PyArray_SIZE(p), (float)ic, (float)lr, (float)lam, F32(F), F32(o),
                      (float)dec, prox, upd);
        Py_END_ALLOW_THREADS
    }
    return PyTuple_Pack(3, a[0], a[1], a[5]);
}

/* The (m, r, in) stack A is the .transpose(0, 2, 1) view of a C-contiguous (m, in, r) one. */
static int row_major_stack(arr_t A) {
    const int order[3] = {1, 2, 0}; /* A's axes from the fastest to the slowest in memory */
    npy_intp step = sizeof(float);
    for (int k = 0; k < 3; ++k) {
        const int i = order[k];
        if (DIM(A, i) != 1 && PyArray_STRIDE(A, i) != step)
            return PyArray_SIZE(A) == 0;
        step *= DIM(A, i);
    }
    return 1;
}

static PyObject *forward_add_batched(PyObject *mod, PyObject *const *a, Py_ssize_t na) {
    char s[256], t[256];
    double sc = 0.0;
    npy_intp n;
    arr_t x, A, B, o, scales = NULL, idx = NULL;
    PyObject *res = NULL;
    if (!nargs(na, 6, "lora_forward_add_batched(x, A_stack, B_stack, scaling, idx, out)") ||
        !arr(a[0], "x", 2, 2, 0, &x) || !arr(a[1], "A_stack", 3, 3, ARG_ANY, &A))
        return NULL;
    const int lay = PyArray_IS_C_CONTIGUOUS(A) ? ADL_RANK_MAJOR : ADL_ROW_MAJOR;
    if (lay == ADL_ROW_MAJOR && !row_major_stack(A))
        return PyErr_Format(PyExc_ValueError, "A_stack must be a C-contiguous (m, r, in) stack, or the "
                            ".transpose(0, 2, 1) view of a C-contiguous (m, in, r) stack; got strides %s "
                            "for shape %s", tup(PyArray_STRIDES(A), 3, t), SHAPE(A, s));
    if (!arr(a[2], "B_stack", 3, 3, 0, &B) || !arr(a[5], "out", 2, 2, ARG_OUT, &o))
        return NULL;
    if (!PyArray_Check(a[4]))
        return PyErr_Format(PyExc_TypeError, "idx must be a NumPy array of int64, got %s",
                            Py_TYPE(a[4])->tp_name);
    if (!PyArray_ISINTEGER((arr_t)a[4]))
        return PyErr_Format(PyExc_TypeError, "idx must be an integer array (int64), got dtype %S",
                            (PyObject *)PyArray_DESCR((arr_t)a[4]));
    idx = (arr_t)PyArray_FROMANY(a[4], NPY_INT64, 0, 0, NPY_ARRAY_CARRAY_RO | NPY_ARRAY_FORCECAST);
    if (idx == NULL)
        return NULL;
    const npy_intp m = DIM(A, 0), r = DIM(A, 1);
    if (PyArray_NDIM(idx) != 1) {
        PyErr_Format(PyExc_ValueError, "idx must be 1-D, got shape %s", SHAPE(idx, s));
        goto done;
    }
    if (!rank_ok(r, "A_stack (m, r, in)"))
        goto done;
    if (DIM(B, 0) != m || DIM(B, 1) != r) {
        PyErr_Format(PyExc_ValueError, "A_stack is (m, r, in) = %s but B_stack is %s; B_stack must be "
                     "(m, r, out) = (%zd, %zd, out)", SHAPE(A, s), SHAPE(B, t), (Py_ssize_t)m, (Py_ssize_t)r);
        goto done;
    }
    if (!rows(x, "x", DIM(A, 2), o, "out", DIM(B, 2), "A_stack (m, r, in)", &n))
        goto done;
    if (DIM(idx, 0) != n) {
        PyErr_Format(PyExc_ValueError, "idx must have one entry per row of x (%zd), got shape %s",
                     (Py_ssize_t)n, SHAPE(idx, s));
        goto done;
    }
    if (PyArray_Check(a[3])) {
        if (!arr(a[3], "scaling", 1, 1, 0, &scales))
            goto done;
        if (DIM(scales, 0) != m) {
            PyErr_Format(PyExc_ValueError, "scaling must be a float or an (m,) = (%zd,) array, got "
                         "shape %s", (Py_ssize_t)m, SHAPE(scales, s));
            goto done;
        }
    } else if (!real(a[3], "scaling", &sc)) {
        goto done;
    }
    if (!apart(o, "out", x, "x") || !apart(o, "out", A, "A_stack") || !apart(o, "out", B, "B_stack") ||
        !apart(o, "out", idx, "idx") || (scales && !apart(o, "out", scales, "scaling")))
        goto done;
    const int64_t *ix = (const int64_t *)PyArray_DATA(idx);
    for (npy_intp b = 0; b < n; ++b)
        if (ix[b] < 0 || ix[b] >= m) {
            PyErr_Format(PyExc_ValueError, "idx[%zd] = %lld is out of range for %zd adapters (outside "
                         "[0, %zd))", (Py_ssize_t)b, (long long)ix[b], (Py_ssize_t)m, (Py_ssize_t)m);
            goto done;
        }
    if (PyArray_SIZE(x) && PyArray_SIZE(o)) {
        Py_BEGIN_ALLOW_THREADS
        adl_lora_forward_add_batched(F32(x), n, DIM(A, 2), F32(A), lay, r, F32(B), DIM(B, 2), m, ix,
                                     scales ? F32(scales) : NULL, (float)sc, F32(o));
        Py_END_ALLOW_THREADS
    }
    res = Py_NewRef(a[5]);
done:
    Py_DECREF(idx);
    return res;
}

#define OP(name, fn, sig, doc)                                                          \
    {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL,                              \
     name "($module, " sig ", /)\n--\n\n" doc " See adalora_core.backends.native."}

static PyMethodDef methods[] = {
    OP("lora_forward_add", forward_add, "x, A, B, scaling, out",
       "out += scaling * (x @ A.T) @ B in place; returns out."),
    OP("lora_accumulate", accumulate, "x, grad_out, A, B, scaling, reward, gA, gB",
       "The reward-scaled LoRA gradients added into gA, gB; returns (gA, gB)."),
    OP("lora_apply", apply, "param, grad, lr_over_count",
       "param -= lr_over_count * grad; grad[...] = 0; returns (param, grad)."),
    OP("lora_apply_ewc", apply_ewc,
       "param, grad, inv_count, lr, lam, fisher, optimal, decay, proximal, update_fisher",
       "One EWC++ step (Fisher first); returns (param, grad, fisher)."),
    OP("lora_forward_add_batched", forward_add_batched, "x, A_stack, B_stack, scaling, idx, out",
       "out[b] += s[idx[b]] * (x[b] @ A_stack[idx[b]].T) @ B_stack[idx[b]]; returns out."),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "adalora_core._native_ops",
    "The native ops' Python entry points (NumPy float32 arrays in, checked, then the C kernels).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native_ops(void) {
    import_array();
    return PyModule_Create(&module);
}
