"""Conformance suite: every backend and dtype against an independent float64 reference.

- :mod:`.reference`: the referee, plain NumPy float64 (never imports the library).
- :mod:`.cases`: named cases (seeded inputs, the reference's answer, tolerances).
- :mod:`.runner`: ``run()``, the table, JSON, and ``python -m adalora_core.conformance``.

The names below load lazily, so importing :mod:`.reference` alone stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Case", "Result", "Skip", "all_cases", "main", "run"]


def __getattr__(name: str) -> Any:
    if name in ("Case", "Skip", "all_cases"):
        from . import cases

        return getattr(cases, name)
    if name in ("Result", "run", "main"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
