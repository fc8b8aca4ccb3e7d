"""The learning-rate schedule: linear decay to 0 over ``trainer.max_steps`` (the paper), or constant, and how a
resumed run fits it to its budget; and the entropy bonus's line (``linear_value``).

A checkpoint restores the scheduler with the budget of the run that wrote it (``LinearLR.total_iters``). A run
extended with ``--trainer.max_steps`` larger than that, then resumed, would keep counting to the old budget and
train at a learning rate of 0. The rule applied instead: **after a resume, the learning rate is what it would be
in a run given the current ``trainer.max_steps`` from the start**, ``lr * (1 - step / max_steps)``, decaying
linearly to 0 at the new ``max_steps`` (and ``lr`` throughout with ``model.lr_decay: false``).
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LinearLR


def budget_problem(max_steps: int | None, lr_decay: bool, ent_coef_final: float | None) -> str | None:
    """The one statement of the rule that a schedule over ``trainer.max_steps`` needs ``max_steps >= 1``: what is
    wrong with these settings, in one line naming them, or None. The CLI says it before anything starts
    (``cli.check_run_settings``); ``ImpalaModule.configure_optimizers`` raises it for Python callers."""
    if max_steps is not None and max_steps >= 1:
        return None
    if lr_decay:
        return (f"model.lr_decay decays the learning rate to 0 over trainer.max_steps, which is {max_steps}: "
                "set trainer.max_steps >= 1 or model.lr_decay false")
    if ent_coef_final is not None:
        return (f"model.ent_coef_final is reached at trainer.max_steps, which is {max_steps}: "
                "set trainer.max_steps >= 1 or leave model.ent_coef_final unset")
    return None


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int | None, decay: bool) -> LinearLR:
    """``LinearLR`` from the optimizer's learning rate to 0 over ``total_steps`` (``decay``), or constant.
    A scheduler either way, so that Lightning's ``LearningRateMonitor`` logs the rate (as ``train/lr``).
    ``total_steps`` as ``budget_problem`` allows."""
    return LinearLR(optimizer, start_factor=1.0, end_factor=0.0 if decay else 1.0,
                    total_iters=total_steps if decay else 1)


def fit_to_budget(schedule: LinearLR, step: int, total_steps: int | None, decay: bool) -> str | None:
    """Make a restored ``schedule`` (of ``linear_schedule``) continue at ``step`` as if built for ``total_steps``
    and ``decay`` (the module's rule), whatever it was saved with.

    Returns None when it was saved for this very schedule, else one line saying what changed, for the user.
    """
    saved = f"decayed to 0 at update {schedule.total_iters}" if schedule.end_factor == 0.0 else "was constant"
    wanted = f"decays to 0 at update {total_steps}" if decay else "is constant"
    unchanged = (schedule.end_factor == 0.0) == decay and (not decay or schedule.total_iters == total_steps)
    schedule.start_factor = 1.0
    schedule.end_factor = 0.0 if decay else 1.0
    schedule.total_iters = total_steps if decay else 1
    schedule.last_epoch = step
    # LinearLR updates each rate from the previous one (rate_t = rate_{t-1} * (T - t) / (T - t + 1)): set this
    # step's rates in closed form, and every later step follows the new line.
    factor = max(0.0, 1.0 - step / total_steps) if decay else 1.0
    for group, base_lr in zip(schedule.optimizer.param_groups, schedule.base_lrs, strict=True):
        group["lr"] = base_lr * factor  # what the optimizer uses and LearningRateMonitor logs; the scheduler's
        # own record of it (get_last_lr) follows at the first step
    if unchanged:
        return None
    return (f"Learning rate: the checkpoint's schedule {saved}; this run's (trainer.max_steps={total_steps}) "
            f"{wanted}, so it goes on at {schedule.base_lrs[0] * factor:.3g} from update {step}, as in a run "
            "given this budget from the start")


def linear_value(start: float, end: float, step: int, total_steps: int | None) -> float:
    """The value at update ``step`` of a line from ``start`` (update 0) to ``end`` (update ``total_steps``), held at
    ``end`` after it; ``total_steps`` as ``budget_problem`` allows."""
    progress = min(1.0, max(0.0, step / total_steps))
    return start + (end - start) * progress
