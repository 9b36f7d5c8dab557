"""The shared validate-then-commit helper: every problem is reported, named, in one error."""

import numpy as np
import pytest

from adalora_core.errors import CheckpointError
from adalora_core.validate import Problems, check_arrays


def test_fields_are_typed_and_all_problems_reported_together():
    p = Problems("state.json")
    assert p.int_field({"a": 3}, "a") == 3
    assert p.int_field({"a": None}, "a", optional=True) is None
    assert p.bool_field({"b": False}, "b") is False
    assert not p
    p.int_field({"a": "7"}, "a")
    p.int_field({"a": -5}, "a")
    p.int_field({"a": True}, "a")
    p.int_field({}, "missing")
    p.bool_field({"c": "False"}, "c")
    with pytest.raises(CheckpointError) as err:
        p.raise_if_any()
    msg = str(err.value)
    assert msg.startswith("state.json: ")
    for part in ("a='7' must be an int", "a=-5 must be >= 0", "a=True must be an int",
                 "missing field 'missing'", "c='False' must be a bool"):
        assert part in msg


def test_mapping_refuses_non_dict_json():
    p = Problems("cfg.json", ValueError)
    assert p.mapping([1, 2], "the config") == {}
    with pytest.raises(ValueError, match="cfg.json: the config must be a JSON object"):
        p.raise_if_any()


def test_arrays_checked_for_keys_shape_dtype_finiteness():
    p = Problems("w")
    check_arrays(p, {"x": np.zeros(3), "y": np.array([np.nan]), "z": np.zeros(2, np.int32), "q": np.ones(1)},
                 {"x": (4,), "y": (1,), "z": (2,), "w": (1,)})
    msg = str(pytest.raises(CheckpointError, p.raise_if_any).value)
    for part in ("missing arrays ['w']", "unexpected arrays ['q']", "'x' has shape (3,), expected (4,)",
                 "'y' has non-finite values", "'z' has dtype int32, expected a floating dtype"):
        assert part in msg
    ok = Problems("w")
    check_arrays(ok, {"x": np.zeros(4)}, {"x": (4,)})
    ok.raise_if_any()


@pytest.mark.parametrize("dtype", [None, np.dtype("float64")])
def test_a_wrong_dtype_is_reported_once(dtype):
    p = Problems("w")
    assert not p.array("x", np.zeros(3, np.int64), (3,), dtype=dtype)
    assert len(p.items) == 1
    expected = "a floating dtype" if dtype is None else "float64"
    assert p.items == [f"'x' has dtype int64, expected {expected}"]


def test_a_float_of_the_wrong_width_is_still_checked_for_finiteness():
    p = Problems("w")
    assert not p.array("x", np.array([np.inf], np.float32), (1,), dtype=np.dtype("float64"))
    assert p.items == ["'x' has dtype float32, expected float64", "'x' has non-finite values"]
