"""Lightning callbacks that connect the learner to its actors."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class ActorWeightSync(L.Callback):
    """Publish the learner's weights to the actors after every ``sync_every`` optimizer steps.

    The weights published are those of the plain network (never a DDP wrapper), tagged with the
    learner's update count, so each unroll records the version it was acted with.
    """

    def __init__(self, sync_every: int = 1):
        self.sync_every = sync_every

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After a checkpoint restore: the actors must act with the restored weights.
        trainer.datamodule.publish_weights(pl_module.network, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.sync_every == 0:
            trainer.datamodule.publish_weights(pl_module.network, trainer.global_step)


class FinalCheckpoint(L.Callback):
    """Make ``last.ckpt`` hold the final weights when training ends.

    ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` at each periodic save, but at the end
    of training only if it never saved before: a run stopped by ``stop_at_return`` at update 780
    would otherwise resume from update 500.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if not (isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath):
                continue
            if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
                continue  # this very update is already saved
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
        self.interrupted_by: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning's own SIGTERM handler (registered when the run starts): that
        # one raises an exception at the next batch, which skips the end-of-training checkpoint.
        self.interrupted_by = None
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame) -> None:
        self.interrupted_by = signal.Signals(signum)
        # From now on the default handlers apply: a second Ctrl-C interrupts at once.
        self._restore()
        print(f"\n{self.interrupted_by.name}: stopping after this update and writing a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

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
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
