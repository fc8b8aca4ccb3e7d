"""A progress display that suits a terminal and a log file alike.

In a terminal, Lightning's tqdm bar. When stdout is not a terminal (CI, ``nohup``, SLURM, ``> log.txt``),
tqdm's carriage-return redraws would put every refresh into the file (~100 KB for a 20-second CartPole
run); there, one plain line every ``log_every_s`` seconds instead, plus one when training starts and
one when it ends.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from lit_impala.config import NonNegativeInt, PositiveFloat, check_arguments


class ProgressBar(TQDMProgressBar):
    """Lightning's ``TQDMProgressBar`` in a terminal; timed plain-text lines in a log file.

    A line reads ``update 120/2000 (6%) | 76,800 env frames | 40.1K frames/s | return 45.2 | 0:00:12``
    (the learner's ``frames``, ``fps`` and ``return`` progress-bar metrics, global over DDP ranks).

    Args:
        refresh_rate: terminal: redraw the bar every this many updates.
        log_every_s: log file: seconds between two progress lines.
        interactive: True: always the tqdm bar; False: always lines; None: tqdm when stdout is a terminal.
    """

    def __init__(
        self, refresh_rate: NonNegativeInt = 1, log_every_s: PositiveFloat = 10.0, interactive: bool | None = None
    ):
        check_arguments(ProgressBar.__init__, locals())
        super().__init__(refresh_rate=refresh_rate)
        self.log_every_s = log_every_s
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self._started_at: float | None = None
        self._last_line_at = 0.0

    @property
    def is_disabled(self) -> bool:
        # Every tqdm bar is built with disable=self.is_disabled: in a log file none draws, lines are printed.
        return super().is_disabled or not self.interactive

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started_at = self._last_line_at = time.monotonic()
        if self._prints_lines:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
            self._line(f"training: up to {total} updates, a progress line every {self.log_every_s:g} s")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._prints_lines and time.monotonic() - self._last_line_at >= self.log_every_s:
            self._line(self.progress_line(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._prints_lines:
            self._line(self.progress_line(trainer))

    def print(self, *args, sep: str = " ", **kwargs) -> None:
        # LightningModule.print goes through the progress bar; TQDMProgressBar drops the text when no bar draws.
        if self.interactive:
            super().print(*args, sep=sep, **kwargs)
        else:
            print(*args, sep=sep, flush=True, **kwargs)

    @property
    def _prints_lines(self) -> bool:
        return not self.interactive and super().is_enabled  # rank 0 only, and not switched off

    def _line(self, text: str) -> None:
        self._last_line_at = time.monotonic()
        print(text, flush=True)

    def progress_line(self, trainer: L.Trainer) -> str:
        """One line of progress from the trainer's progress-bar metrics."""
        metrics = trainer.progress_bar_metrics
        step, max_steps = trainer.global_step, trainer.max_steps
        parts = [
            f"update {step}/{max_steps} ({step / max_steps:.0%})" if max_steps and max_steps > 0 else f"update {step}"
        ]
        if "frames" in metrics:
            parts.append(f"{int(metrics['frames']):,} env frames")
        if "fps" in metrics:
            parts.append(f"{_si(metrics['fps'])} frames/s")
        if "return" in metrics:
            parts.append(f"return {metrics['return']:.1f}")
        if self._started_at is not None:
            parts.append(str(timedelta(seconds=round(time.monotonic() - self._started_at))))
        return " | ".join(parts)


def _si(value: float) -> str:
    """40123.4 -> '40.1K'."""
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
