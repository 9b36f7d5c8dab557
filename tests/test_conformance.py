"""The conformance suite, run through ``run()`` on every CPU backend and both dtypes.

Each case x backend x dtype is its own test; the suite itself is run once per
backend and cached. The rest checks the runner: that wrong answers, wrong keys,
wrong shapes and exceptions are FAILs, that a bug planted in the core is caught,
the CLI's exit codes and the JSON report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest
from adalora_core.conformance import cases as C
from adalora_core.conformance import runner
from adalora_core.conformance.cases import TOL, Case, Skip
from adalora_core.conformance.runner import FAIL, PASS, SKIP, run

DTYPES = ("float32", "float64")
BACKENDS = ("numpy", "native", "array_api_strict", "array_api_strict:device1", "torch")
CASE_NAMES = [c.name for c in C.all_cases()]

_cache: dict[str, dict[tuple[str, str], runner.Result]] = {}


def _results(spec: str) -> dict[tuple[str, str], runner.Result]:
    if spec not in _cache:
        _, bad = runner.resolve_backends([spec])
        if bad:
            pytest.skip(f"{spec} is not available here: {bad[spec]}")
        _cache[spec] = {(r.case, r.dtype): r for r in run(backends=[spec], dtypes=DTYPES)}
    return _cache[spec]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", BACKENDS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_case(case: str, spec: str, dtype: str) -> None:
    r = _results(spec)[(case, dtype)]
    if r.verdict == SKIP:
        pytest.skip(r.message)
    assert r.verdict == PASS, f"{case} [{spec}/{dtype}]: {r.message}\n{r.traceback}"


# ---------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------


def test_registry_covers_the_core() -> None:
    names = set(CASE_NAMES)
    assert len(names) == len(CASE_NAMES)
    for prefix in ("triplet.forward.", "triplet.backward.", "triplet.delta_weight.", "triplet.merge.",
                   "triplet.unmerge.", "orth.value.", "orth.grad.", "schedule.spec_example", "ema.",
                   "scores.", "threshold.ties", "allocator.run.", "optim.adam.", "optim.sgd",
                   "checkpoint.adapter.", "checkpoint.allocator_state."):
        assert any(n.startswith(prefix) for n in names), prefix
    for c in C.adalora_cases():
        assert set(c.tol) == set(DTYPES), c.name
        assert c.tol["float32"] <= 1e-5 and c.tol["float64"] <= 1e-10, c.name


def test_default_backends_include_the_strict_second_device() -> None:
    specs = runner.default_backends()
    assert "numpy" in specs
    if "array_api_strict" in specs:
        assert "array_api_strict:device1" in specs


def test_dict_cases_from_other_modules_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("adalora_core.conformance._fake_cases")

    def fake_cases():
        return [
            {"name": "fake.torch_only", "run": lambda b, d: {"x": np.zeros(2)},
             "reference": lambda d: {"x": np.zeros(2)}, "tol": {"float32": 1e-5, "float64": 1e-10},
             "backends": {"torch"}},
            {"name": "fake.everywhere", "run": lambda b, d: {"x": np.ones(2)},
             "reference": lambda d: {"x": np.ones(2)}, "tol": {"float32": 1e-5, "float64": 1e-10}},
            {"name": "fake.malformed"},
        ]

    mod.fake_cases = fake_cases
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(C, "_EXTRA", (("_fake_cases", "fake_cases"), ("_no_such_module", "cases")))
    status = C.extra_sources()
    assert status["_fake_cases"] == "loaded 2 cases"
    assert status["_no_such_module"].startswith("skipped: ModuleNotFoundError")
    extra = [c for c in C.all_cases() if c.origin == "_fake_cases"]
    assert [c.name for c in extra] == ["fake.torch_only", "fake.everywhere", "_fake_cases.case2"]
    assert extra[0].backends == frozenset({"torch"})
    res = {r.case: r for r in run(backends=["numpy"], dtypes=["float64"], cases="fake.")}
    assert res["fake.torch_only"].verdict == SKIP and "torch" in res["fake.torch_only"].message
    assert res["fake.everywhere"].verdict == PASS
    malformed = run(backends=["numpy"], dtypes=["float64"], cases="_fake_cases.case2")
    assert malformed[0].verdict == FAIL and "malformed" in malformed[0].message


# ---------------------------------------------------------------------------
# the runner catches what it should
# ---------------------------------------------------------------------------


def _ref(dtype):
    return {"y": np.linspace(-3.0, 5.0, 12).reshape(3, 4), "n": np.array([3, 1, 4])}


def _case(name, run_fn, tol=TOL, **kw) -> Case:
    return Case(name, run_fn, _ref, dict(tol), **kw)


def _one(case: Case, dtype: str = "float64") -> runner.Result:
    (r,) = run(backends=["numpy"], dtypes=[dtype], cases=[case])
    return r


def test_a_wrong_answer_fails_at_float64_tolerance() -> None:
    def off(b, dtype):
        return {k: v + (1e-3 if k == "y" else 0) for k, v in _ref(dtype).items()}

    r = _one(_case("wrong.offset", off))
    assert r.verdict == FAIL and r.worst == "y"
    assert r.error == pytest.approx(1e-3 / 5.0)
    assert "tolerance" in r.message
    assert _one(_case("wrong.offset_loose", off, tol={"float32": 1e-2, "float64": 1e-2})).verdict == PASS
    assert _one(_case("right", lambda b, d: _ref(d))).verdict == PASS


@pytest.mark.parametrize(
    "output, fragment",
    [
        ({"y": _ref(None)["y"]}, "missing keys ['n']"),
        ({**_ref(None), "z": np.zeros(1)}, "unexpected keys ['z']"),
        ({"y": _ref(None)["y"].T, "n": _ref(None)["n"]}, "has shape (4, 3), expected (3, 4)"),
        ({"y": _ref(None)["y"], "n": np.array([3, 1, 5])}, "compared exactly"),
        ({"y": np.full((3, 4), np.nan), "n": _ref(None)["n"]}, "tolerance"),
        ({"y": _ref(None)["y"], "n": np.array(["a", "b", "c"])}, "not numeric"),
    ],
    ids=["missing_key", "extra_key", "shape", "exact_int", "nan", "not_numeric"],
)
def test_mismatches_are_failures_not_crashes(output, fragment) -> None:
    r = _one(_case("wrong.output", lambda b, d: output))
    assert r.verdict == FAIL
    assert fragment in r.message


def test_exceptions_skips_and_backend_limits() -> None:
    def boom(b, dtype):
        raise RuntimeError("kaboom in the core")

    r = _one(_case("wrong.raises", boom))
    assert r.verdict == FAIL and "RuntimeError: kaboom in the core" in r.message and r.traceback

    def not_here(b, dtype):
        raise Skip("no such op here")

    r = _one(_case("skip.op", not_here))
    assert r.verdict == SKIP and r.message == "no such op here"
    r = _one(_case("skip.torch_only", lambda b, d: _ref(d), backends=frozenset({"torch"})))
    assert r.verdict == SKIP and "torch" in r.message
    r = _one(Case("wrong.reference", lambda b, d: _ref(d), lambda d: 1 / 0, dict(TOL)))
    assert r.verdict == FAIL and r.message.startswith("reference failed: ZeroDivisionError")
    r = _one(_case("wrong.not_a_dict", lambda b, d: [1, 2]))
    assert r.verdict == FAIL and "expected a dict" in r.message


def test_output_of_the_wrong_dtype_or_library_is_caught() -> None:
    from adalora_core.backends import get_backend

    b = get_backend("numpy")
    with pytest.raises(AssertionError, match="dtype float64, expected float32"):
        C._host(b, np.zeros(2), "float32")
    if "array_api_strict" in runner.default_backends():
        s = get_backend("array_api_strict", device="device1")
        with pytest.raises(AssertionError, match="numpy array"):
            C._host(s, np.zeros(2, dtype=np.float32), "float32")
        x = s.asarray(np.zeros(2), dtype="float32")
        with pytest.raises(AssertionError, match="device"):
            C._host(get_backend("array_api_strict"), x, "float32")


def test_a_bug_planted_in_the_core_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from adalora_core import allocator as AL
    from adalora_core import triplet as T

    monkeypatch.setattr(T, "EPS", 1e-3)  # PEFT adds 1e-5 to ranknum
    res = run(backends=["numpy"], dtypes=["float32", "float64"], cases="triplet.forward.")
    assert res and all(r.verdict == FAIL for r in res)
    monkeypatch.undo()

    # ties must all be pruned (score <= threshold); a strict < keeps them
    monkeypatch.setattr(AL, "keep_mask", lambda s, t: (AL.namespace(s).ones(s.shape, dtype=bool) if t is None
                                                      else AL.namespace(s).logical_not(s < t)))
    res = run(backends=["numpy"], dtypes=["float64"], cases="threshold.ties")
    assert res and all(r.verdict == FAIL for r in res)
    monkeypatch.undo()

    # the uncertainty EMA must use the updated m
    def stale_ema(ms, us, ipts, beta1, beta2):
        new_m = [beta1 * m + (1 - beta1) * i for m, i in zip(ms, ipts)]
        new_u = [beta2 * u + (1 - beta2) * abs(i - m) for u, i, m in zip(us, ipts, ms)]
        return new_m, new_u

    monkeypatch.setattr(AL, "ema_update", stale_ema)
    res = run(backends=["numpy"], dtypes=["float64"], cases="ema.,allocator.run.deltaT3")
    assert res and all(r.verdict == FAIL for r in res)


def test_run_rejects_unknown_backends_and_dtypes() -> None:
    with pytest.raises(ValueError, match="nosuch"):
        run(backends=["nosuch"], cases="schedule.spec")
    with pytest.raises(ValueError, match="float16"):
        run(backends=["numpy"], dtypes=["float16"], cases="schedule.spec")


# ---------------------------------------------------------------------------
# command line and JSON
# ---------------------------------------------------------------------------


def test_cli_success_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = runner.main(["--backends", "numpy", "--cases", "schedule.spec,threshold.ties"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "numpy/f32" in out and "numpy/f64" in out and "schedule.spec_example" in out
    assert "6 results over 3 cases: 6 passed, 0 failed, 0 skipped" in out
    assert runner.main(["--list", "--cases", "allocator.run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "allocator.run.deltaT3 *" in listed and not any(n.startswith("triplet") for n in listed)


def test_cli_fails_on_a_broken_case(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _case("broken.case", lambda b, d: {k: v * 1.01 for k, v in _ref(d).items()})
    monkeypatch.setattr(runner, "all_cases", lambda: [*C.adalora_cases(), broken])
    rc = runner.main(["--backends", "numpy", "--dtypes", "float64", "--cases", "broken,schedule.spec"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILURES" in out and "broken.case [numpy/float64]" in out


def test_cli_fails_on_an_unavailable_backend(capsys: pytest.CaptureFixture[str]) -> None:
    rc = runner.main(["--backends", "numpy,nosuch", "--dtypes", "float64", "--cases", "schedule.spec"])
    cap = capsys.readouterr()
    assert rc == 2
    assert "nosuch" in cap.err and "unavailable" in cap.err
    assert "UNAVAILABLE backend nosuch" in cap.out
    assert runner.main(["--backends", "numpy", "--dtypes", "float16"]) == 2
    assert runner.main(["--backends", "numpy", "--cases", "no-case-has-this-name"]) == 2


def test_cli_json_report(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _case("broken.case", lambda b, d: {k: v + 1 for k, v in _ref(d).items()})
    torch_only = _case("torch.only", lambda b, d: _ref(d), backends=frozenset({"torch"}))
    monkeypatch.setattr(runner, "all_cases", lambda: [*C.adalora_cases(), broken, torch_only])
    path = tmp_path / "out.json"
    rc = runner.main(["--backends", "numpy", "--cases", "schedule.spec,torch.only,broken", "--json", str(path)])
    assert rc == 1
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert data["backends"] == ["numpy"] and data["dtypes"] == ["float32", "float64"]
    assert set(data["sources"]) == {"cases_microlora", "cases_peft"}
    assert data["summary"] == {"pass": 2, "fail": 2, "skip": 2}
    assert len(data["results"]) == 6
    keys = {"case", "backend", "dtype", "verdict", "error", "tol", "worst", "message", "note", "seconds",
            "stateful", "origin", "warnings", "traceback"}
    for r in data["results"]:
        assert set(r) == keys
        assert r["verdict"] in ("PASS", "FAIL", "SKIP")
    by = {(r["case"], r["dtype"]): r for r in data["results"]}
    assert by[("schedule.spec_example", "float64")]["error"] == 0.0
    assert by[("broken.case", "float64")]["verdict"] == "FAIL"
    assert by[("torch.only", "float32")]["verdict"] == "SKIP"


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "adalora_core.conformance", "--backends", "numpy",
                           "--dtypes", "float64", "--cases", "schedule.spec_example"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 0 failed" in proc.stdout
