from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from adalora_core import budget_schedule


def test_worked_example_from_the_spec():
    """docs/spec-adalora.md's worked example."""
    kw = {"init_bgt": 8, "target_bgt": 4, "tinit": 2, "tfinal": 3, "total_step": 12, "deltaT": 2}
    got = [budget_schedule(s, **kw) for s in range(15)]
    expected = [(8, False)] * 3 + [(6, False), (5, True), (4, False), (4, True), (4, False), (4, True),
                                   (4, False)] + [(4, True)] * 5
    assert got == expected


@given(
    init_bgt=st.integers(1, 500), frac=st.floats(0, 1), tinit=st.integers(0, 50), tfinal=st.integers(0, 50),
    budget_len=st.integers(1, 200), delta=st.integers(1, 20),
)
def test_budget_never_increases_and_stays_in_range(init_bgt, frac, tinit, tfinal, budget_len, delta):
    target = int(init_bgt * frac)
    total = tinit + tfinal + budget_len
    kw = {"init_bgt": init_bgt, "target_bgt": target, "tinit": tinit, "tfinal": tfinal, "total_step": total,
          "deltaT": delta}
    budgets = [budget_schedule(s, **kw)[0] for s in range(total + 3)]
    assert all(b1 >= b2 for b1, b2 in itertools.pairwise(budgets))
    assert all(target <= b <= init_bgt for b in budgets)
    assert budgets[total - tfinal] == target
