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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters while parsing, before anything exists;
        # an unreadable file must fail there with a message naming it, not a zip-reader error.
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, OSError, EOFError, ValueError) as error:
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            raise ValueError(
                f"checkpoint {str(ckpt_path)!r} cannot be read ({type(error).__name__}: {error}); it may be truncated "
                "or not a Lightning checkpoint"
            ) from error

    def before_fit(self) -> None:
        path = resume_checkpoint_path(self.trainer, self.config[self.subcommand].get("ckpt_path"))
        if path is not None:
            checkpoint = read_checkpoint(path, self.model)  # before any actor process exists
            continue_wandb_run(self.trainer, checkpoint)

    def before_test(self) -> None:
        path = resume_checkpoint_path(self.trainer, self.config[self.subcommand].get("ckpt_path"))
        if path is not None:
            read_checkpoint(path, self.model)

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


def read_checkpoint(path: Path, model) -> dict:
    """Load ``path`` and check it fits ``model``; a ``ValueError`` naming the file otherwise.

    Lightning would find the same problems only after the actors started, and with less clear
    messages (a pickling error for a truncated file, a size mismatch deep in ``load_state_dict``).
    """
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}: {error}); it may be truncated or not a "
            "Lightning checkpoint"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    saved, expected = checkpoint["state_dict"], model.state_dict()
    problems = [
        f"{key}: {tuple(saved[key].shape)} in the checkpoint, {tuple(value.shape)} here"
        for key, value in expected.items()
        if key in saved and tuple(saved[key].shape) != tuple(value.shape)
    ]
    problems += [f"{key}: missing from the checkpoint" for key in expected if key not in saved]
    problems += [f"{key}: not in this network" for key in saved if key not in expected]
    if problems:
        written_for = {k: checkpoint.get("hyper_parameters", {}).get(k) for k in ("observation_shape", "action_space")}
        raise ValueError(
            f"checkpoint {str(path)!r} was written for a different env or network ({written_for}); "
            f"this run has observation_shape={list(model.hparams.observation_shape)}, "
            f"action_space={model.hparams.action_space}. Differences: " + "; ".join(problems[:5])
        )
    return checkpoint


def continue_wandb_run(trainer, checkpoint: dict) -> None:
    """Point the trainer's (not yet started) W&B loggers at the run that wrote ``checkpoint``, so a
    resumed training continues that run's history instead of starting a new one."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg._experiment is None]
    if not loggers:
        return
    run_id = checkpoint.get("impala", {}).get("wandb_run_id")
    if run_id:
        for logger in loggers:
            # WandbLogger has no public setter; these are the fields its constructor fills from `id`.
            logger._wandb_init.update(id=run_id, resume="allow")
            logger._id = run_id


def _log_location(logger) -> str:
    experiment = getattr(logger, "experiment", None)
    run_dir = getattr(experiment, "dir", None)  # a W&B run's files (offline: sync with `wandb sync`)
    return str(run_dir or getattr(logger, "log_dir", None) or logger.save_dir)
