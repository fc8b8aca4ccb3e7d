"""Command line: ``python -m lit_impala fit --config configs/cartpole.yaml`` (a LightningCLI).

The YAML's ``model`` and ``data`` sections are the typed ``__init__`` arguments of ``ImpalaModule``
and ``ImpalaDataModule``; env facts (observation shape, action space) are linked from the data
module into the model, never written by hand.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lit_impala.data import ImpalaDataModule
from lit_impala.module import ImpalaModule


class ImpalaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.observation_shape", "model.observation_shape", apply_on="instantiate")
        parser.link_arguments("data.action_space", "model.action_space", apply_on="instantiate")

    def after_fit(self) -> None:
        trainer = self.trainer
        module = trainer.lightning_module
        lines = [f"Training stopped after {trainer.global_step} updates and {module.env_frames} env frames; "
                 f"mean return of the last {len(module.episode_returns)} episodes: {module.mean_return:.1f}."]
        for logger in trainer.loggers:
            lines.append(f"Logs ({type(logger).__name__}): {_log_location(logger)}")
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            lines.append(f"Checkpoints: {trainer.checkpoint_callback.dirpath}")
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)


def cli_main(args: list[str] | None = None) -> ImpalaCLI:
    """Entry point; ``args`` lets tests call the CLI in-process."""
    return ImpalaCLI(
        ImpalaModule,
        ImpalaDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def _log_location(logger) -> str:
    experiment = getattr(logger, "experiment", None)
    run_dir = getattr(experiment, "dir", None)  # a W&B run's files (offline: sync with `wandb sync`)
    return str(run_dir or getattr(logger, "log_dir", None) or logger.save_dir)
