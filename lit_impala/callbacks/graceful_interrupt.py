"""Ctrl-C / SIGTERM ends training after the current update, on every DDP rank (the signal handlers:
``lit_impala.interrupts``)."""

from __future__ import annotations

import signal

import lightning as L

from lit_impala import interrupts


class GracefulInterrupt(L.Callback):
    """The first SIGINT (Ctrl-C) or SIGTERM ends training after the current update, like reaching
    ``max_steps``: the update completes, ``last.ckpt`` is written by ``FinalCheckpoint`` at a
    consistent point (weights, optimizer and env-frame count of the same update), the actors are shut
    down and the loggers are flushed. A second SIGINT raises ``KeyboardInterrupt`` at once.
    """

    @property
    def interrupted_by(self) -> signal.Signals | None:
        """The signal that stopped this run, once one arrived (the CLI exits with ``interrupts.exit_code()``)."""
        return interrupts.received()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own SIGTERM handler (registered when the run starts): that one raises an exception at
        # the next batch, which skips the end-of-training checkpoint.
        interrupts.stop_on_signals()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        interrupts.unshield()  # the actors are running: Ctrl-C may reach the main thread again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        interrupted = interrupts.received() is not None
        if trainer.world_size > 1:
            # DDP: all ranks stop after the same update, or the others would wait in an all-reduce forever.
            interrupted = trainer.strategy.reduce_boolean_decision(interrupted, all=False)
        if interrupted:
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        interrupts.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        interrupts.release()
