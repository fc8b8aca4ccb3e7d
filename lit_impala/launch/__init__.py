"""The launcher: a grid of ``fit`` overrides times seeds, at most N fits at a time, as processes on this machine or
as SLURM jobs through submitit, each run in a directory of its own, and a summary table at the end.

``python -m lit_impala.launch`` is the command (``__main__``); ``launch(runs, parallel)`` the same for Python callers
(``benchmarks.learning`` runs its seeds with it). The parts: ``grid`` (settings x seeds, their names), ``runs``
(one run's directory: reuse, resume or start over; its result), ``processes`` (a fit's process and its group),
``executors`` (N at a time, stopping), ``summary`` (the table), ``check`` (every setting checked before anything
runs), ``tied`` (a fit stops when its launcher dies).
"""

from lit_impala.launch.executors import Interrupted, launch
from lit_impala.launch.runs import Run, RunResult

__all__ = ["Interrupted", "Run", "RunResult", "launch"]
