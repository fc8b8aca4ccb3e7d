"""Run control: the final checkpoint, graceful Ctrl-C / SIGTERM, one run per checkpoint directory, and what a
checkpoint says about itself.

``CheckpointFormat`` writes ``checkpoint["lit_impala"] = {"format": CHECKPOINT_FORMAT, "wandb_run_id": ...}``
and refuses a checkpoint of a format this version cannot read, naming it. Format 2 keeps the progress counts in
``EpisodeStats``'s callback state; format 1 (progress under ``"impala"``) is still read (``resume``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from lit_impala import interrupts
from lit_impala.checkpoint_io import remove_partial_files
from lit_impala.config import ConfigError

CHECKPOINT_FORMAT = 2
log = logging.getLogger(__name__)


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


class CheckpointDirectoryLock(L.Callback):
    """One run at a time per checkpoint directory: two runs of the same config would otherwise resume from and
    overwrite each other's ``last.ckpt``.

    While ``fit`` runs, rank 0 holds an exclusive ``flock`` on ``<dirpath>.lock`` (a file beside each
    ``ModelCheckpoint`` directory, which Lightning would otherwise report as "not empty"). A second run that
    wants the same directory stops before its actors start, with one line naming the directory and the run that
    holds it (``ConfigError``: exit code 2). The kernel releases the lock when its process ends, however it ends,
    so a job requeued after a kill takes the directory at once. Holding it, rank 0 removes the temporary files
    that a killed writer left there (``checkpoint_io.remove_partial_files``).

    Directories Lightning chooses itself (a ``ModelCheckpoint`` without ``dirpath``) are new for every run and
    not locked. On a filesystem without ``flock`` the run goes on with a warning.
    """

    def __init__(self):
        self._held: list[int] = []  # file descriptors of the locks this process holds

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After Lightning launched the ranks (rank 0 is known) and before the checkpoint is restored or any
        # actor starts.
        if stage != "fit" or not trainer.is_global_zero:
            return
        directories = {Path(c.dirpath).resolve() for c in trainer.checkpoint_callbacks
                       if isinstance(c, ModelCheckpoint) and c.dirpath and "://" not in str(c.dirpath)}
        for directory in sorted(directories):
            self._lock(directory)

    def _lock(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        lock_path = directory.with_name(directory.name + ".lock")
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(descriptor)
            self.release()
            raise ConfigError(
                f"checkpoint directory {str(directory)!r} is in use by another run ({holder}): two runs would "
                "resume from and overwrite each other's checkpoints. Wait for it to end, or give this run its own "
                "directory (the ModelCheckpoint callback's dirpath)"
            ) from None
        except OSError as error:  # e.g. a network filesystem without locks
            os.close(descriptor)
            log.warning("cannot lock checkpoint directory %r (%s): make sure no other run uses it", str(directory),
                        error)
            return
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._held.append(descriptor)
        for leftover in remove_partial_files(directory):
            log.info("removed %s, a checkpoint being written when its run was killed", leftover)

    def release(self) -> None:
        for descriptor in self._held:
            os.close(descriptor)  # closing the last descriptor of the file releases the flock
        self._held.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.release()


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
