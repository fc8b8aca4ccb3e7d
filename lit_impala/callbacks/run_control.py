"""Run control: the final checkpoint, graceful Ctrl-C / SIGTERM, and what a checkpoint says about itself.

``CheckpointFormat`` writes ``checkpoint["lit_impala"] = {"format": CHECKPOINT_FORMAT, "wandb_run_id": ...}``
and refuses a checkpoint of a format this version cannot read, naming it. Formats: 1 (before
lit_impala 0.2: progress counts under ``"impala"``, monitoring settings among the model's
hyper-parameters; still read), 2 (progress counts in ``EpisodeStats``'s callback state).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from lit_impala import interrupts

CHECKPOINT_FORMAT = 2


class FinalCheckpoint(L.Callback):
    """Make ``last.ckpt`` hold the final weights when training ends.

    ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` at each periodic save, but at the end
    of training only if it never saved before: a run stopped by ``stop_at_return`` at update 780
    would otherwise resume from update 500. When it never saved, its own ``on_train_end`` (which runs
    after this one) writes the final ``last.ckpt``, so this callback leaves it alone: saving here too
    would make it write a second copy, ``last-v1.ckpt``.

    Runs on every rank: ``save_checkpoint`` is a collective under DDP.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if not (isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath):
                continue
            if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
                continue  # this very update is already saved
            if not getattr(callback, "_last_checkpoint_saved", True):
                continue  # ModelCheckpoint.on_train_end saves last.ckpt itself
            path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            trainer.save_checkpoint(path, weights_only=False)


class GracefulInterrupt(L.Callback):
    """The first SIGINT (Ctrl-C) or SIGTERM ends training after the current update, like reaching
    ``max_steps``: the update completes, ``last.ckpt`` is written by ``FinalCheckpoint`` at a
    consistent point (weights, optimizer and env-frame count of the same update), the actors are shut
    down and the loggers are flushed. A second SIGINT raises ``KeyboardInterrupt`` at once.

    ``interrupted_by`` holds the signal's name once one arrived (the CLI then exits with 128 + signal).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._interrupted_by: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    @property
    def interrupted_by(self) -> signal.Signals | None:
        return self._interrupted_by or interrupts.received()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning's own SIGTERM handler (registered when the run starts): that
        # one raises an exception at the next batch, which skips the end-of-training checkpoint.
        self._interrupted_by = None
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for signum in self.SIGNALS:
            if signum == signal.SIGINT and (interrupts.shielded() or interrupts.received()):
                continue  # the CLI's start-up shield records Ctrl-C (lit_impala.interrupts)
            self._previous[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame) -> None:
        self._interrupted_by = signal.Signals(signum)
        # From now on the default handlers apply: a second Ctrl-C interrupts at once.
        self._restore()
        print(f"\n{self._interrupted_by.name}: {interrupts.STOP_MESSAGE}", file=sys.stderr, flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        interrupts.unshield()  # the actors are running: Ctrl-C may reach the main thread again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        interrupted = self.interrupted_by is not None
        if trainer.world_size > 1:
            # DDP: all ranks stop after the same update, or the others would wait in an all-reduce forever.
            interrupted = trainer.strategy.reduce_boolean_decision(interrupted, all=False)
        if interrupted:
            trainer.should_stop = True

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._interrupted_by = self.interrupted_by  # kept for the CLI's exit code
        self._restore()
        interrupts.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        interrupts.release()


def checkpoint_format(checkpoint: dict) -> int:
    """The format a checkpoint was written in (1: written before formats were recorded)."""
    return int(checkpoint.get("lit_impala", {}).get("format", 1))


def check_checkpoint_format(checkpoint: dict, name: str) -> None:
    """A ``ValueError`` naming ``name`` and its format if this version of lit_impala cannot read it."""
    found = checkpoint_format(checkpoint)
    if found > CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {name} has format {found}; this version of lit_impala reads formats 1 to "
            f"{CHECKPOINT_FORMAT}: upgrade lit_impala to resume it"
        )


class CheckpointFormat(L.Callback):
    """Records the checkpoint format and the W&B run id (a resumed run continues that W&B run)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        run_id = None
        if trainer.is_global_zero:  # rank 0 writes the file; other ranks' W&B experiment is a dummy
            run_id = next((logger.experiment.id for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
        checkpoint["lit_impala"] = {"format": CHECKPOINT_FORMAT, "wandb_run_id": run_id}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        check_checkpoint_format(checkpoint, "being restored")


def wandb_run_id(checkpoint: dict) -> str | None:
    """The W&B run that wrote ``checkpoint`` (format 1 kept it under ``"impala"``)."""
    return checkpoint.get("lit_impala", {}).get("wandb_run_id") or checkpoint.get("impala", {}).get("wandb_run_id")
