"""Checkpoint callbacks: the final checkpoint, one run per checkpoint directory, and the format stamp.

What a checkpoint holds and which one a run resumes from is ``lit_impala.checkpoints``; writing and reading the file
is ``lit_impala.checkpoint_io``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

from lit_impala import checkpoints
from lit_impala.checkpoint_io import remove_partial_files
from lit_impala.config import ConfigError

log = logging.getLogger(__name__)


class FinalCheckpoint(L.Callback):
    """Make ``last.ckpt`` hold the final weights when training ends.

    ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` at each periodic save, but at the end
    of training only if it never saved before: a run stopped by ``stop_at_return`` at update 780
    would otherwise resume from update 500. When no checkpoint was written in this run, its own ``on_train_end``
    (which runs after this one) writes the final ``last.ckpt``, so this callback leaves it alone: saving here too
    would make it write a second copy, ``last-v1.ckpt``. Which updates were saved is seen through the public
    ``on_save_checkpoint`` hook, called for every checkpoint the trainer writes.

    Runs on every rank: ``save_checkpoint`` is a collective under DDP.
    """

    def __init__(self):
        self._saved_at: int | None = None  # the update of the last checkpoint written in this run

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved_at is None or self._saved_at == trainer.global_step:
            return  # ModelCheckpoint.on_train_end saves last.ckpt itself, or this very update is saved already
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
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


class CheckpointFormat(L.Callback):
    """Stamps each checkpoint with its format and the W&B run id (a resumed run continues that W&B run), and reads
    a checkpoint of an older format as the current one (``checkpoints.upgrade``)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        run_id = None
        if trainer.is_global_zero:  # rank 0 writes the file; other ranks' W&B experiment is a dummy
            run_id = next((logger.experiment.id for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
        checkpoints.stamp(checkpoint, run_id)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning calls every callback's on_load_checkpoint before any load_state_dict: EpisodeStats then finds
        # a format-1 checkpoint's counts where format 2 keeps them.
        checkpoints.check_format(checkpoint, "being restored")
        checkpoints.upgrade(checkpoint)
