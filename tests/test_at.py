"""The in-place-or-copy helper: written in place (the same array back) where the library allows
it, a new array elsewhere with the input unchanged; a whole array or one index along axis 0."""

from __future__ import annotations

import numpy as np
import pytest

from adalora_core._at import at, is_mutable, owned_copy


def host(b, a):
    return np.asarray(b.to_numpy(a), dtype=np.float64)


def _backends():
    names = ["numpy", "array_api_strict", "array_api_strict:device1", "torch", "jax"]
    return [pytest.param(n, id=n) for n in names]


@pytest.fixture(params=_backends())
def be(request):
    from conftest import make_backend

    return make_backend(request.param)


def test_set_and_add(be):
    x = be.asarray(np.arange(12.0).reshape(3, 4), dtype="float32")
    before = host(be, x)
    y = at(x, 1).set(be.asarray(np.full(4, -1.0), dtype="float32"))
    z = at(y).add(be.asarray(np.ones(4), dtype="float32"))  # broadcast over the rows
    w = at(z, 2).set(0)
    want = before.copy()
    want[1] = -1.0
    want += 1.0
    want[2] = 0.0
    np.testing.assert_array_equal(host(be, w), want)
    assert w.dtype == x.dtype and str(w.device) == str(x.device)
    if is_mutable(be.xp):
        assert w is x  # one array, written three times
    else:
        assert w is not x
        np.testing.assert_array_equal(host(be, x), before)  # the input is left alone


def test_owned_copy_is_rank_major_for_a_transposed_view(be):
    src = be.asarray(np.arange(6.0).reshape(2, 3), dtype="float32")
    c = owned_copy(src.T)
    np.testing.assert_array_equal(host(be, c), np.arange(6.0).reshape(2, 3).T)
    assert c is not src
    if be.name == "numpy":
        assert c.flags.c_contiguous
