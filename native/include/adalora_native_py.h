/*
 * adalora_native_py.h: one-call entry points for CPython + NumPy callers.
 *
 * backends/native.py passes NumPy arrays by object address (CPython's id())
 * instead of converting each one to a cffi pointer (from_buffer costs more
 * than the whole rank-2 kernel at d = 768). These functions read the array
 * header (type, dtype, flags, ndim, shape, data) at offsets given once by
 * adl_py_init, validate everything the operation needs, and run the kernel.
 * They never raise and never guess: whenever anything is unusual (not an
 * exact ndarray, another dtype object, non-contiguous, wrong shape, overlap,
 * rank 0, ...) they return ADL_PY_DECLINED without touching memory, and the
 * Python caller takes its fully checked path, which handles the unusual but
 * valid cases and raises a clear error for the invalid ones.
 *
 * The layout is checked by backends/native.py at import against NumPy's own
 * view of probe arrays (adl_py_probe); on any mismatch the fast path stays
 * off. No Python or NumPy header is needed to build this file.
 */
#ifndef ADALORA_NATIVE_PY_H
#define ADALORA_NATIVE_PY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ADL_PY_DONE 0
#define ADL_PY_DECLINED 1

typedef struct adl_pylayout {
    int64_t off_type;    /* PyObject.ob_type */
    int64_t off_data;    /* PyArrayObject.data */
    int64_t off_nd;      /* .nd (int) */
    int64_t off_dims;    /* .dimensions (npy_intp *) */
    int64_t off_strides; /* .strides (npy_intp *) */
    int64_t off_descr;   /* .descr */
    int64_t off_flags;   /* .flags (int) */
    int64_t flag_c_contiguous, flag_f_contiguous, flag_aligned, flag_writeable;
    intptr_t ndarray_type; /* id(numpy.ndarray) */
    intptr_t f32_descr;    /* id(numpy.dtype(numpy.float32)) */
    intptr_t i64_descr;    /* id(numpy.dtype(numpy.int64)) */
    /* argument tuples (adl_pyt_*): */
    int64_t off_tuple_size;  /* PyVarObject.ob_size */
    int64_t off_tuple_items; /* PyTupleObject.ob_item */
    int64_t off_float_value; /* PyFloatObject.ob_fval */
    intptr_t tuple_type, float_type, true_obj, false_obj;
} adl_pylayout;

/* Install the layout (copied). Returns 0. Call with the GIL held, before any
 * other adl_py_ function. enable = 0 turns the fast path off. */
int adl_py_init(const adl_pylayout *layout, int enable);

/* Reads item i of tuple `obj` (its address) into *item, a float's value
 * into *value (NaN if not an exact float): for the import-time check. */
void adl_py_probe_tuple(intptr_t obj, int64_t i, int64_t *item, double *value);

/* Reads the header of array `obj` with the installed layout into
 * out[0..8] = data, nd, dim0, dim1, stride0, stride1, descr, flags, type
 * (dims/strides beyond nd are 0). For the import-time layout check. */
void adl_py_probe(intptr_t obj, int64_t *out9);

/* out += s * (x @ A) @ B; x (in,) or (n, in), A (in, r) C- or F-contiguous,
 * B (r, out) C-contiguous, out like x with out columns. */
int adl_py_forward_add(intptr_t x, intptr_t A, intptr_t B, double s,
                       intptr_t out);
/* gA += s*reward*outer(x, g @ B.T); gB += s*reward*outer(x @ A, g) */
int adl_py_accumulate(intptr_t x, intptr_t grad_out, intptr_t A, intptr_t B,
                      double s, double reward, intptr_t gA, intptr_t gB);
/* param -= lr * grad; grad[:] = 0 */
int adl_py_apply(intptr_t param, intptr_t grad, double lr);
/* see adl_apply_ewc */
int adl_py_apply_ewc(intptr_t param, intptr_t grad, double inv_count,
                     double lr, double lam, intptr_t fisher, intptr_t optimal,
                     double decay, int proximal, int update_fisher);
/* Returns -1 when done, the first bad position b >= 0 when idx[b] is out of
 * range (nothing written), or -2 when declined. scales = 0: use s. */
int64_t adl_py_forward_add_batched(intptr_t x, intptr_t A_stack,
                                   intptr_t B_stack, double s, intptr_t scales,
                                   intptr_t idx, intptr_t out);
/* out += s * B @ (E * (A @ x)) per row */
int adl_py_triplet_forward_add(intptr_t x, intptr_t A, intptr_t E, intptr_t B,
                               double s, intptr_t out);

/* The same operations with all arguments in one tuple (its address), in
 * the order of the functions above (scalars must be exact Python floats,
 * flags True/False): one argument to convert instead of up to ten. Same
 * return values; ADL_PY_DECLINED (batched: -2) also for any other scalar. */
int adl_pyt_forward_add(intptr_t args);
int adl_pyt_accumulate(intptr_t args);
int adl_pyt_apply(intptr_t args);
int adl_pyt_apply_ewc(intptr_t args);
int64_t adl_pyt_forward_add_batched(intptr_t args);
int adl_pyt_triplet_forward_add(intptr_t args);

#ifdef __cplusplus
}
#endif
#endif /* ADALORA_NATIVE_PY_H */
