"""Where the seconds of a run go: one line at the end of ``fit`` with the time from process start to each phase
(imports, set-up, the actors' first rollout, the first update, the target reached, the end of ``fit``), so that a
slow phase shows in any run, not only under a profiler."""

from __future__ import annotations

import os
import time

import lightning as L

from lit_impala.callbacks.episode_stats import EpisodeStats

_FIRST_IMPORT = time.monotonic()  # the fallback origin where /proc is missing


def process_age() -> float:
    """Seconds since this process started: from the kernel's start time on Linux (10 ms resolution, so the
    interpreter's own start-up counts too); elsewhere since ``lit_impala`` was first imported."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # Fields after "pid (comm)": state is field 3, starttime (clock ticks after boot) field 22.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _FIRST_IMPORT


class PhaseTimes(L.Callback):
    """Seconds from the origin (``origin_age``: the process age that counts as 0, the process start for the
    command) to each phase of ``fit``, as ``line()`` says them.

    Phases, each when it ends: ``imports`` (given by the command: the CLI module imported), ``set-up`` (the
    config parsed, the model, data module, logger and trainer made: Lightning's ``on_fit_start``), ``first rollout``
    (the first batch of the actors' unrolls reached the learner), ``first update``, ``target reached``
    (``episode_stats.stop_at_return``, when set and reached) and ``end of fit`` (the actors stopped, asked by
    ``line``).
    """

    def __init__(self, origin_age: float = 0.0, imports_done_age: float | None = None):
        self.origin_age = origin_age
        self.ages: dict[str, float] = {} if imports_done_age is None else {"imports": imports_done_age}

    @staticmethod
    def of(trainer: L.Trainer) -> PhaseTimes | None:
        return next((callback for callback in trainer.callbacks if isinstance(callback, PhaseTimes)), None)

    def _mark(self, phase: str) -> None:
        self.ages.setdefault(phase, process_age())

    def on_fit_start(self, trainer, pl_module) -> None:
        self._mark("set-up")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mark("first rollout")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mark("first update")
        stats = EpisodeStats.of(trainer)
        if stats is not None and stats.target_reached:
            self._mark("target reached")

    def line(self) -> str:
        """``Seconds from process start: imports 5.1, set-up 6.3, ...``, with the end of ``fit`` as of now."""
        self._mark("end of fit")
        origin = "process start" if self.origin_age == 0.0 else "the CLI's start"
        phases = ", ".join(f"{phase} {age - self.origin_age:.1f}" for phase, age in self.ages.items())
        return f"Seconds from {origin}: {phases}"
