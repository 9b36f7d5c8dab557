"""AdaLoRA's orthogonal regulariser, which keeps A's rows and B's columns near-orthonormal.

    orth = mean over the 2N matrices of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F

(Frobenius norm, not squared.) Summed in module order, A before B, as PEFT
does, so the float32 value matches PEFT's on torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._xp import Array, namespace


def _gram_residuals(A: Array, B: Array) -> tuple[Array, Array]:
    xp = namespace(A, B)
    ga = A @ A.T
    gb = B.T @ B
    ia = xp.eye(ga.shape[0], dtype=ga.dtype, device=getattr(ga, "device", None))
    ib = xp.eye(gb.shape[0], dtype=gb.dtype, device=getattr(gb, "device", None))
    return ga - ia, gb - ib


def _fro(xp, m: Array) -> Array:
    return xp.linalg.vector_norm(m)


def orth_reg(pairs: Sequence[tuple[Array, Array]]) -> Array:
    """The regulariser's value (a 0-d array) over ``pairs`` of ``(A, B)`` in module order."""
    if not pairs:
        raise ValueError("orth_reg needs at least one (A, B) pair")
    xp = namespace(*(t for p in pairs for t in p))
    total = None
    for A, B in pairs:
        ra, rb = _gram_residuals(A, B)
        for m in (ra, rb):
            n = _fro(xp, m)
            total = n if total is None else total + n
    return total / (2 * len(pairs))


def orth_reg_grad(pairs: Sequence[tuple[Array, Array]]) -> list[tuple[Array, Array]]:
    """``(d orth/dA, d orth/dB)`` per pair.

    d||M||/dA = 2 M A / ||M|| for M = A Aᵀ - I (and 2 B M / ||M|| for
    M = Bᵀ B - I); zero where ||M|| = 0, where the norm has no gradient.
    """
    if not pairs:
        raise ValueError("orth_reg_grad needs at least one (A, B) pair")
    xp = namespace(*(t for p in pairs for t in p))
    scale = 1.0 / (2 * len(pairs))
    out = []
    for A, B in pairs:
        ra, rb = _gram_residuals(A, B)
        na, nb = _fro(xp, ra), _fro(xp, rb)
        ga = xp.where(na > 0, 2.0 * scale * (ra @ A) / xp.where(na > 0, na, 1.0), 0.0)
        gb = xp.where(nb > 0, 2.0 * scale * (B @ rb) / xp.where(nb > 0, nb, 1.0), 0.0)
        out.append((ga, gb))
    return out
