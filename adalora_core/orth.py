"""AdaLoRA's orthogonal regulariser, which keeps A's rows and B's columns near-orthonormal.

    orth = mean over the 2N matrices of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F

(Frobenius norm, not squared.) By default the matrices are grouped by shape
and each group is one stacked batched product, so the number of array
operations grows with the number of distinct shapes, not with the number of
modules (a transformer has a handful of shapes and hundreds of modules). The
value differs from a per-module sum only by float32 rounding (another
summation order). ``peft_order=True`` sums module by module, A before B, as
PEFT does, so the float32 value on torch is PEFT's bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from ._xp import Array, namespace

_SHAPE = attrgetter("shape")


def _namespace(pairs: Sequence[tuple[Array, Array]], what: str) -> Any:
    """The pairs' namespace, from one array per type (a mix of libraries is still named; hundreds of
    modules are not walked one by one)."""
    if not pairs:
        raise ValueError(f"{what} needs at least one (A, B) pair")
    return namespace(*{type(t): t for p in pairs for t in p}.values())


def _groups(mats: Sequence[Array]) -> list[list[int]]:
    """Indices of ``mats`` grouped by shape, groups in order of first appearance."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(map(_SHAPE, mats)):
        by_shape.setdefault(shape, []).append(i)
    return list(by_shape.values())


def _residual(xp, S: Array, rows: bool) -> Array:
    """``S Sᵀ - I`` (``rows``) or ``Sᵀ S - I``, for one matrix or a stack of them."""
    St = xp.matrix_transpose(S)
    g = S @ St if rows else St @ S
    return g - xp.eye(g.shape[-1], dtype=g.dtype, device=getattr(g, "device", None))


def _sides(pairs: Sequence[tuple[Array, Array]]) -> tuple[tuple[list[Array], bool], tuple[list[Array], bool]]:
    """The A matrices (residual over rows) and the B matrices (over columns)."""
    return ([A for A, _ in pairs], True), ([B for _, B in pairs], False)


def orth_reg(pairs: Sequence[tuple[Array, Array]], *, peft_order: bool = False) -> Array:
    """The regulariser's value (a 0-d array) over ``pairs`` of ``(A, B)`` in module order.

    Grouped by shape (see the module docstring) unless ``peft_order``.
    Matrices of rank 0 count in the mean with a norm of 0, as in PEFT.
    """
    xp = _namespace(pairs, "orth_reg")
    total = None
    if peft_order:
        for A, B in pairs:
            for m, rows in ((A, True), (B, False)):
                n = xp.linalg.vector_norm(_residual(xp, m, rows))
                total = n if total is None else total + n
    else:
        for mats, rows in _sides(pairs):
            for idx in _groups(mats):
                R = _residual(xp, xp.stack(mats if len(idx) == len(mats) else [mats[i] for i in idx]), rows)
                n = xp.sum(xp.linalg.vector_norm(R, axis=(-2, -1)))
                total = n if total is None else total + n
    assert total is not None
    return total / (2 * len(pairs))


def orth_reg_grad(pairs: Sequence[tuple[Array, Array]]) -> list[tuple[Array, Array]]:
    """``(d orth/dA, d orth/dB)`` per pair, computed per shape group.

    d||M||/dA = 2 M A / ||M|| for M = A Aᵀ - I (and 2 B M / ||M|| for
    M = Bᵀ B - I); zero where ||M|| = 0, where the norm has no gradient.
    """
    xp = _namespace(pairs, "orth_reg_grad")
    scale = 2.0 / (2 * len(pairs))
    grads: list[list[Array | None]] = [[None, None] for _ in pairs]
    for side, (mats, rows) in enumerate(_sides(pairs)):
        for idx in _groups(mats):
            S = xp.stack([mats[i] for i in idx])
            R = _residual(xp, S, rows)
            n = xp.linalg.vector_norm(R, axis=(-2, -1), keepdims=True)
            RS = R @ S if rows else S @ R
            G = xp.where(n > 0, scale * RS / xp.where(n > 0, n, 1.0), 0.0)
            for j, i in enumerate(idx):
                grads[i][side] = G[j, ...]
    return [(ga, gb) for ga, gb in grads]  # type: ignore[misc]
