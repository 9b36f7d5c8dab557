"""The SVD-triplet adapter ``ΔW = B · diag(E) · A`` (AdaLoRA's P Λ Q).

Shapes: ``A (r, in)``, ``E (r, 1)``, ``B (out, r)``; ``ranknum`` is the frozen
initial rank, as a float or a ``(1,)`` array. The forward reads exactly as
PEFT's, op for op, so that float32 results are bit-identical on torch:

    ((x @ (A * E).T) @ B.T) * scaling / (ranknum + 1e-5)

``backward`` is the explicit VJP of that expression: it is what lets NumPy
and CuPy train without autograd.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._xp import Array, namespace
from .config import check_float

EPS = 1e-5  # PEFT adds it to ranknum


class Triplet(NamedTuple):
    """One module's adapter weights (or their gradients)."""

    A: Array
    E: Array
    B: Array


class TripletGrads(NamedTuple):
    x: Array
    A: Array
    E: Array
    B: Array


def _ranknum(xp: Any, ranknum: float | Array, like: Array) -> Array:
    """``ranknum`` as an array of ``like``'s dtype, so ``ranknum + 1e-5`` rounds as in PEFT."""
    if isinstance(ranknum, (int, float)):
        return xp.asarray([float(ranknum)], dtype=like.dtype, device=getattr(like, "device", None))
    return ranknum


def check_shapes(A: Array, E: Array, B: Array, x: Array | None = None) -> None:
    """Raise a ValueError naming the mismatch; used before any state changes."""
    if A.ndim != 2 or B.ndim != 2 or E.ndim != 2 or E.shape[1] != 1:
        raise ValueError(f"expected A (r, in), E (r, 1), B (out, r); got A {tuple(A.shape)}, "
                         f"E {tuple(E.shape)}, B {tuple(B.shape)}")
    r = A.shape[0]
    if E.shape[0] != r or B.shape[1] != r:
        raise ValueError(f"rank mismatch: A has {r} rows, E {E.shape[0]}, B {B.shape[1]} columns")
    if x is not None and (x.ndim < 1 or x.shape[-1] != A.shape[1]):
        raise ValueError(f"input has last dimension {x.shape[-1] if x.ndim else None}, expected in={A.shape[1]}")
    if not (A.dtype == E.dtype == B.dtype) or (x is not None and x.dtype != A.dtype):
        named = {"A": A, "E": E, "B": B, **({"x": x} if x is not None else {})}
        dts = ", ".join(f"{k} {a.dtype}" for k, a in named.items())
        raise ValueError(f"dtypes differ ({dts}); cast the inputs to one floating dtype")


def check_args(xp: Any, A: Array, E: Array, B: Array, scaling: float, ranknum: float | Array,
               x: Array | None = None) -> None:
    """Every function here checks its arguments with this, before computing.

    Shapes and one shared real floating dtype (an integer array would
    truncate the result), a finite ``scaling``, and ``ranknum`` a finite
    number > 0 (used as given, never rounded) or a real floating ``(1,)``
    array (as PEFT holds it; its value is not read: no device sync).
    Cheap: shapes, dtypes and Python numbers only.
    """
    check_shapes(A, E, B, x)
    if not xp.isdtype(A.dtype, "real floating"):
        raise TypeError(f"A, E, B{' and x' if x is not None else ''} have dtype {A.dtype}: they must be "
                        "real floating (integer arrays would truncate the result)")
    check_float("scaling", scaling)
    if hasattr(ranknum, "dtype"):
        arr: Array = ranknum
        floating = arr.dtype == A.dtype or xp.isdtype(arr.dtype, "real floating")
        if not floating or tuple(arr.shape) not in ((), (1,)):
            raise TypeError(f"ranknum must be a number > 0 or a real floating (1,) array, got an array of "
                            f"shape {tuple(arr.shape)} and dtype {arr.dtype}")
    else:
        check_float("ranknum", ranknum, 0.0, low_open=True)


def forward(x: Array, A: Array, E: Array, B: Array, scaling: float, ranknum: float | Array) -> Array:
    """The adapter's contribution to the layer output for input ``x (..., in)``.

    ``x`` is the (already dropped-out) input; the caller adds the result to the
    base layer's output in the base output's dtype.
    """
    xp = namespace(x, A, E, B)
    check_args(xp, A, E, B, scaling, ranknum, x)
    return ((x @ (A * E).T) @ B.T) * scaling / (_ranknum(xp, ranknum, A) + EPS)


def backward(
    grad_out: Array, x: Array, A: Array, E: Array, B: Array, scaling: float, ranknum: float | Array
) -> TripletGrads:
    """Gradients of ``sum(grad_out * forward(x, A, E, B))`` for x, A, E and B.

    Batch dimensions of ``x``/``grad_out`` are summed into the weight gradients.
    """
    xp = namespace(grad_out, x, A, E, B)
    check_args(xp, A, E, B, scaling, ranknum, x)
    if grad_out.shape != (*x.shape[:-1], B.shape[0]):
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, expected {(*x.shape[:-1], B.shape[0])}")
    if grad_out.dtype != x.dtype:
        raise ValueError(f"grad_out has dtype {grad_out.dtype}, x has {x.dtype}; cast it first")
    c = scaling / (_ranknum(xp, ranknum, A) + EPS)
    AE = A * E
    x2 = xp.reshape(x, (-1, x.shape[-1]))
    g2 = xp.reshape(grad_out, (-1, grad_out.shape[-1])) * c  # (n, out)
    h = x2 @ AE.T  # (n, r)
    dB = g2.T @ h  # (out, r)
    dh = g2 @ B  # (n, r)
    dAE = dh.T @ x2  # (r, in)
    dA = dAE * E
    dE = xp.sum(dAE * A, axis=1, keepdims=True)
    dx = xp.reshape(dh @ AE, x.shape)
    return TripletGrads(dx, dA, dE, dB)


def delta_weight(
    A: Array, E: Array, B: Array, scaling: float, ranknum: float | Array, fan_in_fan_out: bool = False
) -> Array:
    """``ΔW`` in the base weight's layout: ``(out, in)``, or ``(in, out)`` with ``fan_in_fan_out`` (GPT-2 Conv1D)."""
    xp = namespace(A, E, B)
    check_args(xp, A, E, B, scaling, ranknum)
    w = B @ (A * E)
    if fan_in_fan_out:
        w = w.T
    return w * scaling / (_ranknum(xp, ranknum, A) + EPS)


def merge(W: Array, A: Array, E: Array, B: Array, scaling: float, ranknum: float | Array,
          fan_in_fan_out: bool = False) -> Array:
    """``W + ΔW``; raises if the result would hold non-finite values (PEFT's ``safe_merge``).
    ``W`` must be real floating (an integer weight would truncate ``ΔW``), of any width."""
    return _combine(W, delta_weight(A, E, B, scaling, ranknum, fan_in_fan_out), +1)


def unmerge(W: Array, A: Array, E: Array, B: Array, scaling: float, ranknum: float | Array,
            fan_in_fan_out: bool = False) -> Array:
    """``W - ΔW``: the inverse of :func:`merge` up to float rounding."""
    return _combine(W, delta_weight(A, E, B, scaling, ranknum, fan_in_fan_out), -1)


def _combine(W: Array, delta: Array, sign: int) -> Array:
    xp = namespace(W, delta)
    if not xp.isdtype(W.dtype, "real floating"):
        raise TypeError(f"the weight W has dtype {W.dtype}: it must be real floating (ΔW would be truncated)")
    if W.shape != delta.shape:
        raise ValueError(f"weight has shape {tuple(W.shape)} but the adapter's ΔW is {tuple(delta.shape)}"
                         " (check fan_in_fan_out)")
    # Compute in the adapter's dtype, round once to W's: what torch's in-place
    # ``weight += delta`` does for a bf16 base and a float32 adapter.
    wide = xp.astype(W, delta.dtype) if W.dtype != delta.dtype else W
    out = wide + delta if sign > 0 else wide - delta
    out = xp.astype(out, W.dtype) if out.dtype != W.dtype else out
    if not bool(xp.all(xp.isfinite(out))):
        raise ValueError("merging would put non-finite values into the weight; the adapter is broken")
    return out
