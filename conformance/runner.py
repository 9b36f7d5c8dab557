"""Run the conformance cases on backends and dtypes; print the table; write JSON.

``python -m adalora_core.conformance [--backends numpy,array_api_strict,torch]
[--dtypes float32,float64] [--cases SUBSTR] [--json FILE]``

A backend spec is a name as ``get_backend`` takes it, optionally with a device
after a colon: ``array_api_strict:device1`` is array-api-strict's fake second
device (in the default set whenever array-api-strict is installed: it catches
arrays created on the wrong device), ``torch:cuda`` a GPU.

Exit status: 0 when nothing failed; 1 when a case failed; 2 when a requested
backend is unavailable or an argument is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .cases import DTYPES, Case, Skip, all_cases, as_case, extra_sources, select

__all__ = ["Result", "compare", "default_backends", "format_table", "main", "resolve_backends", "run"]

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class Result:
    """One case on one backend and dtype."""

    case: str
    backend: str
    dtype: str
    verdict: str  # PASS, FAIL or SKIP
    error: float | None = None  # max |got - ref| / max(1, max |ref|) over the case's arrays
    tol: float | None = None
    worst: str | None = None  # the array with the largest error
    message: str = ""  # why it failed or was skipped
    note: str = ""  # what the case reported about itself (which backend read a checkpoint, ...)
    seconds: float = 0.0
    stateful: bool = False
    origin: str = "cases"
    warnings: list[str] = field(default_factory=list)
    traceback: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["error"] is not None and not math.isfinite(d["error"]):
            d["error"] = str(d["error"])  # JSON has no inf/nan
        return d


# ---------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------


def _split(d: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays = {k: v for k, v in d.items() if not str(k).startswith("_")}
    notes = {k: v for k, v in d.items() if str(k).startswith("_")}
    return arrays, notes


def compare(got: Mapping[str, Any], ref: Mapping[str, Any]) -> tuple[float, str | None, list[str]]:
    """``(error, worst key, problems)`` of ``got`` against ``ref``.

    ``error`` is the largest, over the arrays, of ``max|got - ref| / max(1, max|ref|)``
    (equal infinities and NaN in both count as equal; a NaN on one side only is an
    infinite error). Missing or extra keys and shape mismatches are problems, as
    is any difference in an integer or boolean array (compared exactly).
    """
    got, _ = _split(got)
    ref, _ = _split(ref)
    problems = []
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    worst, error = None, 0.0
    for k in sorted(set(ref) & set(got)):
        a, b = np.asarray(got[k]), np.asarray(ref[k])
        if a.shape != b.shape:
            problems.append(f"{k!r} has shape {a.shape}, expected {b.shape}")
            continue
        exact = a.dtype.kind in "biu" or b.dtype.kind in "biu"
        try:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
        except (TypeError, ValueError):
            problems.append(f"{k!r} is not numeric ({a.dtype} vs {b.dtype})")
            continue
        if a.size == 0:
            continue
        same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(same, 0.0, np.abs(a64 - b64))
        diff = np.where(np.isnan(diff), np.inf, diff)
        finite = np.abs(b64[np.isfinite(b64)])
        scale = max(1.0, float(finite.max()) if finite.size else 1.0)
        e = float(diff.max()) / scale
        if exact and e != 0.0:
            problems.append(f"{k!r} differs in {int(np.count_nonzero(diff))} of {diff.size} entries "
                            "(compared exactly)")
        if worst is None or e > error:
            worst, error = k, e
    return error, worst, problems


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------


def _get(spec: str) -> Any:
    from adalora_core.backends import get_backend

    name, _, dev = spec.partition(":")
    return get_backend(name.strip(), device=dev.strip() or None)


def default_backends() -> list[str]:
    """Every available backend, plus array-api-strict's second device after array-api-strict."""
    from adalora_core.backends import available_backends

    specs = []
    for name in available_backends():
        specs.append(name)
        if name == "array_api_strict":
            specs.append("array_api_strict:device1")
    return specs


def resolve_backends(specs: Iterable[str] | str | None) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """``([(spec, Backend)], {unavailable spec: reason})``; ``None`` means :func:`default_backends`."""
    if specs is None:
        specs = default_backends()
    elif isinstance(specs, str):
        specs = [s for s in specs.split(",")]
    ok, bad = [], {}
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        try:
            ok.append((spec, _get(spec)))
        except Exception as exc:  # noqa: BLE001 - unknown name, missing library, no such device
            bad[spec] = f"{type(exc).__name__}: {exc}"
    return ok, bad


_dtype_support: dict[tuple[int, str], str | None] = {}


def _dtype_scope(b: Any, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """The JAX settings under which a run means its dtype, for that run only.

    JAX computes in float64 only under ``jax_enable_x64``, and on NVIDIA GPUs
    its default float32 matmul rounds its inputs to TF32 (errors near 1e-3):
    the float32 tolerances are for float32 arithmetic, so matmuls run at
    ``"highest"`` precision here. A user's own program keeps JAX's defaults.
    """
    if b.name != "jax":
        return contextlib.nullcontext()
    import jax

    stack = contextlib.ExitStack()
    stack.enter_context(jax.default_matmul_precision("highest"))
    if dtype == "float64":
        stack.enter_context(jax.enable_x64(True))
    return stack


def _dtype_problem(b: Any, dtype: str) -> str | None:
    """Why backend ``b`` cannot hold ``dtype`` arrays (None when it can)."""
    key = (id(b), dtype)
    if key not in _dtype_support:
        try:
            x = b.asarray(np.zeros(2), dtype=dtype)
            if x.dtype != b.dtype(dtype):
                raise TypeError(f"asked for {dtype}, got {x.dtype}")
            _dtype_support[key] = None
        except Exception as exc:  # noqa: BLE001 - e.g. float64 on Apple MPS
            _dtype_support[key] = f"backend has no {dtype}: {type(exc).__name__}: {exc}"
    return _dtype_support[key]


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------


def _as_cases(cases: Any) -> list[Case]:
    if cases is None:
        return all_cases()
    if isinstance(cases, str):
        return select(all_cases(), cases)
    cases = list(cases)
    if all(isinstance(c, str) for c in cases):
        return select(all_cases(), cases)
    return [as_case(c) for c in cases]


def _short_exc(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:400]


def _run_one(case: Case, spec: str, b: Any, dtype: str, ref: Any) -> Result:
    res = Result(case.name, spec, dtype, SKIP, stateful=case.stateful, origin=case.origin,
                 tol=case.tol.get(dtype))
    if case.backends is not None and b.name not in case.backends:
        res.message = f"applies to {', '.join(sorted(case.backends))} only"
        return res
    problem = _dtype_problem(b, dtype)
    if problem:
        res.message = problem
        return res
    if res.tol is None:
        res.message = f"the case has no tolerance for {dtype}"
        return res
    if isinstance(ref, BaseException):
        res.verdict, res.message = FAIL, f"reference failed: {_short_exc(ref)}"
        return res
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = case.run(b, dtype)
        except Skip as exc:
            res.message = str(exc)
            res.seconds = time.perf_counter() - t0
            return res
        except Exception as exc:  # noqa: BLE001 - a crash in a case is a failure, not a crash of the run
            res.seconds = time.perf_counter() - t0
            res.verdict, res.message = FAIL, _short_exc(exc)
            res.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
            return res
    res.seconds = time.perf_counter() - t0
    res.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})[:10]
    if not isinstance(got, Mapping):
        res.verdict, res.message = FAIL, f"run returned {type(got).__name__}, expected a dict of arrays"
        return res
    res.note = "; ".join(str(v) for k, v in sorted(got.items()) if str(k).startswith("_"))
    try:
        error, worst, problems = compare(got, ref)
    except Exception as exc:  # noqa: BLE001 - unconvertible output
        res.verdict, res.message = FAIL, f"cannot compare the output: {_short_exc(exc)}"
        return res
    res.error, res.worst = error, worst
    if problems:
        res.verdict, res.message = FAIL, "; ".join(problems)
    elif not error <= res.tol:
        res.verdict, res.message = FAIL, f"error {error:.3g} > tolerance {res.tol:.3g} in {worst!r}"
    else:
        res.verdict = PASS
    return res


def run(backends: Iterable[str] | str | None = None, dtypes: Iterable[str] | str | None = None,
        cases: Any = None) -> list[Result]:
    """Run ``cases`` on every backend spec and dtype; one :class:`Result` each.

    ``backends``: specs (``"numpy"``, ``"array_api_strict:device1"``, ...); None: every
    available one. ``dtypes``: None means float32 and float64. ``cases``: None
    (all), a substring (comma-separated alternatives) or list of substrings of
    case names, or a list of :class:`Case` objects / case dicts. Raises
    ValueError for an unavailable backend or an unknown dtype.
    """
    resolved, bad = resolve_backends(backends)
    if bad:
        raise ValueError("requested backends are unavailable: " + "; ".join(f"{k} ({v})" for k, v in bad.items()))
    if dtypes is None:
        dtypes = list(DTYPES)
    elif isinstance(dtypes, str):
        dtypes = [d.strip() for d in dtypes.split(",") if d.strip()]
    dtypes = list(dtypes)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtypes {unknown}; the suite runs {list(DTYPES)}")
    results = []
    for case in _as_cases(cases):
        refs: dict[str, Any] = {}
        for dtype in dtypes:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    refs[dtype] = case.reference(dtype)
            except Exception as exc:  # noqa: BLE001 - reported on every backend
                refs[dtype] = exc
        for spec, b in resolved:
            for dtype in dtypes:
                with _dtype_scope(b, dtype):
                    results.append(_run_one(case, spec, b, dtype, refs[dtype]))
    return results


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------

_ABBREV = {"array_api_strict": "strict", "float32": "f32", "float64": "f64"}


def _abbrev(spec: str, dtype: str) -> str:
    name, _, dev = spec.partition(":")
    name = _ABBREV.get(name, name)
    return f"{name}{':' + dev if dev else ''}/{_ABBREV.get(dtype, dtype)}"


def _tol(t: float | None) -> str:
    if t is None:
        return "-"
    return "exact" if t == 0 else f"{t:.0e}"


def _cell(r: Result) -> str:
    if r.verdict == SKIP:
        return "- SKIP"
    if r.error is None:
        return "exc FAIL" if r.verdict == FAIL else r.verdict
    err = "0" if r.error == 0 else (f"{r.error:.1e}" if math.isfinite(r.error) else str(r.error))
    return f"{err} {r.verdict}"


def summary(results: Sequence[Result]) -> dict[str, int]:
    return {v.lower(): sum(r.verdict == v for r in results) for v in (PASS, FAIL, SKIP)}


def format_table(results: Sequence[Result], sources: Mapping[str, str] | None = None,
                 unavailable: Mapping[str, str] | None = None, verbose: bool = False) -> str:
    """The case x backend/dtype table (max error and verdict per cell), then failures, skips and a summary."""
    cols: list[tuple[str, str]] = []
    rows: dict[str, dict[tuple[str, str], Result]] = {}
    tols: dict[str, dict[str, float | None]] = {}
    stateful: dict[str, bool] = {}
    dtypes: list[str] = []
    for r in results:
        if (r.backend, r.dtype) not in cols:
            cols.append((r.backend, r.dtype))
        if r.dtype not in dtypes:
            dtypes.append(r.dtype)
        rows.setdefault(r.case, {})[(r.backend, r.dtype)] = r
        tols.setdefault(r.case, {}).setdefault(r.dtype, r.tol)
        stateful[r.case] = r.stateful
    heads = [_abbrev(*c) for c in cols]
    name_w = max([len("case")] + [len(n) + 2 for n in rows])
    widths = [max(len(h), 12) for h in heads]
    tol_heads = [f"tol {_ABBREV.get(d, d)}" for d in dtypes]
    lines = []
    header = f"{'case':<{name_w}}  " + "  ".join(f"{h:>7}" for h in tol_heads) + "  " + \
        "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
    lines.append(header)
    lines.append("-" * len(header))
    for name, cells in rows.items():
        label = name + (" *" if stateful[name] else "")
        line = f"{label:<{name_w}}  " + "  ".join(f"{_tol(tols[name].get(d)):>7}" for d in dtypes) + "  "
        line += "  ".join(f"{(_cell(cells[c]) if c in cells else ''):>{w}}" for c, w in zip(cols, widths))
        lines.append(line)
    lines.append("-" * len(header))
    lines.append("cells: max |got - ref| / max(1, max |ref|) over the case's arrays, and the verdict; "
                 "* = stateful (a sequence of steps); strict = array_api_strict")
    fails = [r for r in results if r.verdict == FAIL]
    if fails:
        lines.append("")
        lines.append("FAILURES")
        for r in fails:
            lines.append(f"  {r.case} [{r.backend}/{r.dtype}]: {r.message}")
            if verbose and r.traceback:
                lines.extend("      " + t for t in r.traceback.rstrip().splitlines())
    skips: dict[str, list[str]] = {}
    for r in results:
        if r.verdict == SKIP:
            skips.setdefault(r.message, []).append(f"{r.case} [{r.backend}/{r.dtype}]")
    if skips:
        lines.append("")
        lines.append("SKIPPED")
        for reason, which in skips.items():
            shown = ", ".join(which[:4]) + (f", ... ({len(which)} in all)" if len(which) > 4 else "")
            lines.append(f"  {reason}: {shown}")
    if verbose:
        notes = [r for r in results if r.note]
        if notes:
            lines.append("")
            lines.append("NOTES")
            lines.extend(f"  {r.case} [{r.backend}/{r.dtype}]: {r.note}" for r in notes)
    if sources:
        lines.append("")
        lines.extend(f"{mod}: {status}" for mod, status in sources.items())
    if unavailable:
        lines.append("")
        lines.extend(f"UNAVAILABLE backend {spec}: {why}" for spec, why in unavailable.items())
    s = summary(results)
    lines.append("")
    lines.append(f"{len(results)} results over {len(rows)} cases: {s['pass']} passed, {s['fail']} failed, "
                 f"{s['skip']} skipped; backends: {', '.join(dict.fromkeys(c[0] for c in cols)) or 'none'}; "
                 f"dtypes: {', '.join(dtypes) or 'none'}"
                 + (f"; unavailable: {', '.join(unavailable)}" if unavailable else ""))
    return "\n".join(lines)


def to_json(results: Sequence[Result], backends: Sequence[str], dtypes: Sequence[str],
            sources: Mapping[str, str], unavailable: Mapping[str, str]) -> dict[str, Any]:
    import adalora_core

    return {
        "version": 1,
        "library": {"name": "adalora-core", "version": getattr(adalora_core, "__version__", None)},
        "backends": list(backends),
        "dtypes": list(dtypes),
        "unavailable": dict(unavailable),
        "sources": dict(sources),
        "summary": summary(results),
        "results": [r.to_dict() for r in results],
    }


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adalora_core.conformance",
        description="Run every conformance case on every backend and dtype against the float64 reference.")
    p.add_argument("--backends", help="comma-separated backend specs (default: every available one, plus "
                   "array_api_strict:device1)")
    p.add_argument("--dtypes", help="comma-separated dtypes (default: float32,float64)")
    p.add_argument("--cases", help="run only cases whose name contains one of these comma-separated substrings")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of failures and case notes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sources = extra_sources()
    if args.list:
        for c in select(all_cases(), args.cases):
            only = f"  [{', '.join(sorted(c.backends))} only]" if c.backends else ""
            print(f"{c.name}{' *' if c.stateful else ''}{only}")
        for mod, status in sources.items():
            print(f"{mod}: {status}")
        return 0
    resolved, unavailable = resolve_backends(args.backends)
    specs = [s for s, _ in resolved]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] if args.dtypes else list(DTYPES)
    bad_dtypes = [d for d in dtypes if d not in DTYPES]
    if bad_dtypes:
        print(f"error: unknown dtypes {bad_dtypes}; the suite runs {list(DTYPES)}", file=sys.stderr)
        return 2
    selected = select(all_cases(), args.cases)
    if args.cases and not selected:
        print(f"error: no case name contains any of {args.cases!r} (see --list)", file=sys.stderr)
        return 2
    results = run(specs, dtypes, selected) if specs else []
    print(format_table(results, sources, unavailable, verbose=args.verbose))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(to_json(results, specs, dtypes, sources, unavailable), fh, indent=2)
            fh.write("\n")
    for spec, why in unavailable.items():
        print(f"error: requested backend {spec!r} is unavailable: {why}", file=sys.stderr)
    if any(r.verdict == FAIL for r in results):
        return 1
    if unavailable or not specs:
        return 2
    return 0
