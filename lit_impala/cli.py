"""Command line: ``python -m lit_impala fit --config configs/cartpole.yaml`` (a LightningCLI).

The YAML's ``model`` and ``data`` sections are the typed ``__init__`` arguments of ``ImpalaModule``
and ``ImpalaDataModule``; env facts (observation shape, action space) are linked from the data
module into the model, never written by hand.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from lit_impala.callbacks import GracefulInterrupt
from lit_impala.data import ImpalaDataModule
from lit_impala.module import ImpalaModule


class ImpalaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.observation_shape", "model.observation_shape", apply_on="instantiate")
        parser.link_arguments("data.action_space", "model.action_space", apply_on="instantiate")

    def before_fit(self) -> None:
        checkpoint = resume_checkpoint_path(self.trainer, self.config[self.subcommand].get("ckpt_path"))
        if checkpoint is not None:
            continue_wandb_run(self.trainer, checkpoint)

    def after_fit(self) -> None:
        trainer = self.trainer
        module = trainer.lightning_module
        progress = module.progress  # summed / averaged over DDP ranks
        frames = int(progress.env_frames) if progress else module.env_frames
        episodes = progress.episodes if progress else 0
        mean_return = progress.mean_return if progress else float("nan")
        lines = [f"Training stopped after {trainer.global_step} updates and {frames} env frames; "
                 f"mean return of the last {episodes} episodes: {mean_return:.1f}."]
        for logger in trainer.loggers:
            lines.append(f"Logs ({type(logger).__name__}): {_log_location(logger)}")
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            lines.append(f"Checkpoints: {trainer.checkpoint_callback.dirpath}")
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)
        interrupt = next((cb.interrupted_by for cb in trainer.callbacks if isinstance(cb, GracefulInterrupt)), None)
        if interrupt is not None:
            raise SystemExit(128 + interrupt.value)  # the shell convention for "ended by a signal"


def cli_main(args: list[str] | None = None) -> ImpalaCLI:
    """Entry point; ``args`` lets tests call the CLI in-process."""
    return ImpalaCLI(
        ImpalaModule,
        ImpalaDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def resume_checkpoint_path(trainer, ckpt_path: str | None) -> Path | None:
    """The file ``fit --ckpt_path`` will resume from: ``last`` is the newest ``last*.ckpt`` in a
    ``ModelCheckpoint`` directory (as Lightning resolves it); None when nothing will be resumed."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    candidates = [
        path
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
        for path in Path(callback.dirpath).glob(f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}")
    ]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def continue_wandb_run(trainer, checkpoint: Path) -> None:
    """Point the trainer's (not yet started) W&B loggers at the run that wrote ``checkpoint``, so a
    resumed training continues that run's history instead of starting a new one."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg._experiment is None]
    if not loggers or not checkpoint.is_file():
        return  # a missing file is Lightning's error to report, with its own message
    state = torch.load(checkpoint, map_location="cpu", weights_only=False).get("impala", {})
    run_id = state.get("wandb_run_id")
    if run_id:
        for logger in loggers:
            # WandbLogger has no public setter; these are the fields its constructor fills from `id`.
            logger._wandb_init.update(id=run_id, resume="allow")
            logger._id = run_id


def _log_location(logger) -> str:
    experiment = getattr(logger, "experiment", None)
    run_dir = getattr(experiment, "dir", None)  # a W&B run's files (offline: sync with `wandb sync`)
    return str(run_dir or getattr(logger, "log_dir", None) or logger.save_dir)
