"""AdaLoRA's three-phase cubic budget schedule (PEFT ``RankAllocator.budget_schedule``)."""

from __future__ import annotations


def budget_schedule(
    step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int, deltaT: int
) -> tuple[int, bool]:
    """``(budget, mask_now)`` at ``step``: the total number of triplets to keep.

    * warm-up, ``step <= tinit``: full budget, no masking;
    * final phase, ``step > total_step - tfinal``: target budget, mask every step;
    * in between, the cubic decay
      ``int((init - target) * (1 - (step - tinit) / (T - tfinal - tinit))**3 + target)``
      in Python float math with truncation, masking when ``step % deltaT == 0``.
    """
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % deltaT == 0
