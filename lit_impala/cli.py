"""Command line: ``python -m lit_impala fit --config configs/cartpole.yaml`` (a LightningCLI).

The YAML's ``model`` and ``data`` sections are the typed ``__init__`` arguments of ``ImpalaModule``
and ``ImpalaDataModule``; env facts (observation shape, action space) are linked from the data
module into the model, never written by hand.

``main`` is the command's entry point: a configuration error (an unknown or ill-typed argument, a value
our classes refuse, an unusable checkpoint) is one ``error: ...`` line on stderr and exit code 2, as
argparse does, before any actor process starts; an env's non-finite data (``envs.finite``) is one line and exit
code 1. ``LIT_IMPALA_FULL_ERROR=1`` shows the traceback instead.
``cli_main`` is the same CLI for Python callers (tests, notebooks): it raises.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import CheckpointIO

from lit_impala import checkpoints, interrupts
from lit_impala.callbacks import EpisodeStats, PhaseTimes
from lit_impala.callbacks.phase_times import process_age
from lit_impala.checkpoint_io import CheckpointFiles
from lit_impala.config import ConfigError, argument_defaults
from lit_impala.data import ImpalaDataModule
from lit_impala.envs.finite import NonFiniteEnvData
from lit_impala.learner import ImpalaModule
from lit_impala.schedule import budget_problem

IMPORTS_DONE_AGE = process_age()  # the command's imports end here (the phase times' first phase)

FULL_ERROR_ENV = "LIT_IMPALA_FULL_ERROR"  # "1": a configuration error shows its traceback (as HYDRA_FULL_ERROR)
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# The model arguments the data module links in from the env: a checkpoint's values of them are not the user's choice.
ENV_FACTS = ("observation_shape", "action_space", "observation_parts")

# What every run shares (a config file sets what differs). An infinite stream never ends an epoch, so
# max_steps (or the stop rule) ends a run. (The logger stays in each config: as a default here, switching it
# with --trainer.logger would carry W&B's init arguments, such as name=None, over to the new class.)
TRAINER_DEFAULTS = {
    "devices": 1,
    "max_epochs": -1,
    "log_every_n_steps": 20,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
}


class ImpalaCLI(LightningCLI):
    resume_point: checkpoints.ResumePoint | None = None  # the checkpoint this command starts from, read once

    def __init__(self, *args, phase_times: PhaseTimes | None = None, **kwargs):
        # Times from this call unless the command gives its own (from process start, imports included).
        self.phase_times = phase_times if phase_times is not None else PhaseTimes(origin_age=process_age())
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.observation_shape", "model.observation_shape", apply_on="instantiate")
        parser.link_arguments("data.action_space", "model.action_space", apply_on="instantiate")
        parser.link_arguments("data.observation_parts", "model.observation_parts", apply_on="instantiate")
        # Progress, the recent episodes and the stop rule: always there, configured in its own section.
        parser.add_lightning_class_args(EpisodeStats, "episode_stats")
        parser.add_argument(
            "--trust_checkpoint", type=bool, default=False,
            help="Unpickle everything in --ckpt_path, which runs any code the file holds: only for a checkpoint you "
                 "made yourself or whose author you trust. Default: tensors and plain data only; a file holding "
                 "anything else is refused unread.",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's model hyper-parameters here, while parsing. We read the checkpoint
        # once, for all that needs it (these hyper-parameters, the W&B run, the fit check, Lightning's restore):
        # `last` or a directory as the newest intact checkpoint, safely (lit_impala.checkpoints). A private Lightning
        # method, with no public hook at this point: tests/unit/test_lightning_internals.py fails if it moves.
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        trainer = config.get("trainer") or {}
        try:
            self.resume_point = checkpoints.find_resume_point(
                config.get("ckpt_path"), checkpoint_dirs(trainer.get("callbacks")), config.get("trust_checkpoint"))
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if self.resume_point is not None:
            hparams = checkpoints.model_hparams(self.resume_point.checkpoint, argument_defaults(ImpalaModule))
            given = config.get("model") or {}
            replaced = [f"model.{key}={given[key]!r} (the checkpoint's: {value!r})" for key, value in hparams.items()
                        if key in given and given[key] != value and key not in ENV_FACTS]
            if replaced:  # LightningCLI's rule; said, so that a changed learning rate does not vanish silently
                checkpoints.say("The checkpoint's model hyper-parameters apply; not used from this command's config: "
                           + ", ".join(replaced))
            if hparams:
                self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None:
            return
        # The shipped configs list lit_impala.callbacks.ProgressBar; `--trainer.enable_progress_bar false`
        # then means "no bar" rather than Lightning's error about a progress bar among the callbacks.
        if trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
            trainer.callbacks = [c for c in trainer.callbacks if not _is_class(c, ProgressBar)]
        # A resumed run continues the W&B run that wrote its checkpoint: WandbLogger(id=...).
        run_id = checkpoints.wandb_run_id(self.resume_point.checkpoint) if self.resume_point else None
        for logger in _logger_configs(trainer.get("logger")):
            if run_id and _is_class(logger, WandbLogger) and logger.init_args.get("id") is None:
                logger.init_args.id = run_id

    def instantiate_classes(self) -> None:
        # Our classes check their arguments in __init__ (ValueError naming the value): a configuration error.
        try:
            super().instantiate_classes()
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def instantiate_trainer(self, **kwargs):
        # Checkpoints written atomically in their own directory and read safely (lit_impala.checkpoint_io),
        # unless the config brings a CheckpointIO of its own.
        config = self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        plugins = (config.get("trainer") or {}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(CheckpointFiles(trust=bool(config.get("trust_checkpoint"))))
        trainer = super().instantiate_trainer(**{"plugins": plugins, **kwargs})
        trainer.callbacks.append(self.phase_times)
        return trainer

    def before_fit(self) -> None:
        check_run_settings(self.trainer, self.model, self.datamodule)
        self._use_resume_point()
        prepare_wandb_loggers(self.trainer)

    def before_test(self) -> None:
        self._use_resume_point()
        prepare_wandb_loggers(self.trainer)

    def _use_resume_point(self) -> None:
        """Check the checkpoint against this network before any actor process exists, give Lightning the
        file it resolved to (`last`: the newest intact one; None: start fresh) and the content already read."""
        point = self.resume_point
        if point is not None:
            try:
                checkpoints.check_fits(point, self.model)
            except ValueError as error:
                raise ConfigError(str(error)) from error
            if isinstance(self.trainer.strategy.checkpoint_io, CheckpointFiles):
                self.trainer.strategy.checkpoint_io.hand_over(point.path, point.checkpoint)
            if self.subcommand == "fit":  # `test` reports the checkpoint's update itself (TestReport)
                checkpoints.say(f"Resuming from {point.describe()}")
                step, max_steps = point.checkpoint.get("global_step", 0), self.trainer.max_steps
                if max_steps is not None and 0 <= max_steps <= step:
                    checkpoints.say(f"The checkpoint is at update {step} and trainer.max_steps is {max_steps}: nothing "
                               "left to train (a larger --trainer.max_steps extends the run)")
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path not in checkpoints.LIGHTNING_RESOLVES:
            self.config_init[self.subcommand]["ckpt_path"] = None if point is None else str(point.path)

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero:  # nothing in here is a collective: the other ranks are not waiting
            print("\n".join(fit_summary(trainer)), flush=True)
        if (code := interrupts.exit_code()) is not None:  # stopped by Ctrl-C or SIGTERM (lit_impala.interrupts)
            raise SystemExit(code)


def cli_main(args: list[str] | None = None, run: bool = True, **cli_options) -> ImpalaCLI:
    """The CLI for Python callers (tests, notebooks, benchmarks): errors are raised, a bad argument as
    jsonargparse's ``argparse.ArgumentError``, a refused value or checkpoint as ``ConfigError``. ``run=False``
    builds the trainer, model and data module of a ``fit`` without running it (``args`` without ``fit``)."""
    cli_options.setdefault("save_config_kwargs", {"overwrite": True})
    return ImpalaCLI(
        ImpalaModule,
        ImpalaDataModule,
        args=args,
        run=run,
        **cli_options,
        trainer_defaults=TRAINER_DEFAULTS,
        # Parse errors raise instead of printing the whole usage (~100 lines) and exiting: `main` reports them.
        parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in SUBCOMMANDS}},
    )


def main(args: list[str] | None = None) -> None:
    """The command (``python -m lit_impala`` / ``lit-impala``, which shield Ctrl-C first: ``lit_impala.__main__``):
    a configuration error is one line and exit code 2."""
    quiet_third_party_start_up()
    try:
        cli_main(args, phase_times=PhaseTimes(imports_done_age=IMPORTS_DONE_AGE))
    except (argparse.ArgumentError, ConfigError) as error:
        if os.environ.get(FULL_ERROR_ENV) == "1":
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except NonFiniteEnvData as error:  # the message names env, actor, sub-env and step: the traceback adds nothing
        if os.environ.get(FULL_ERROR_ENV) == "1":
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# jsonargparse's error wording for restricted types and literals, made short by one_line; the BAD_INPUTS rows of
# tests/integration/test_cli.py fail when a jsonargparse release words them otherwise.
_RESTRICTED = re.compile(
    r'^Parser key "(?P<key>[^"]+)": (?P<union>Does not validate against any of the Union subtypes.*?)?'
    r"Not of type (?P<type>\w+): (?P<value>\S+ )?does not conform to restriction (?P<rule>.+?)"
    r"(?: - Expected a .*Given value: (?P<given>.*))?$"
)
_LITERAL = re.compile(
    r'^Parser key "(?P<key>[^"]+)": Expected a typing\.Literal\[(?P<choices>.*)\]\. Got value: (?P<value>.*)$'
)


def one_line(error: BaseException) -> str:
    """A configuration error as one line; jsonargparse's messages for restricted types and literals made
    short: ``model.clip_rho_threshold: expected a PositiveFloat (v>0) or null, got 0``."""
    text = " ".join(str(error).split())
    if found := _RESTRICTED.match(text):
        value = (found["value"] or found["given"] or "?").strip()
        optional = " or null" if found["union"] and "NoneType" in text else ""
        return f"{found['key']}: expected a {found['type']} ({found['rule']}){optional}, got {value}"
    if found := _LITERAL.match(text):
        return f"{found['key']}: expected one of {found['choices']}, got {found['value']!r}"
    return text


def _is_class(config, cls: type) -> bool:
    """Whether a ``class_path`` config (of a callback or a logger) names ``cls`` or a subclass."""
    class_path = config.get("class_path", "") if hasattr(config, "get") else ""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return False  # jsonargparse reports a bad class path itself
    return isinstance(found, type) and issubclass(found, cls)


def checkpoint_dirs(callbacks) -> list[str]:
    """The ``dirpath`` of each ``ModelCheckpoint`` among the trainer's callback configs (``class_path``)."""
    return [c.init_args.dirpath for c in callbacks or []
            if _is_class(c, ModelCheckpoint) and (c.get("init_args") or {}).get("dirpath")]


def _logger_configs(logger) -> list:
    if isinstance(logger, list):
        return logger
    return [logger] if hasattr(logger, "get") else []


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def quiet_third_party_start_up() -> None:
    """Silence known-harmless start-up messages of the stack, for the command line only (the library
    itself changes no global warning or logging state)."""
    # lightning 2.6 with torch >= 2.10: Lightning's own use of a deprecated torch pytree class.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A resumed run whose checkpoint already reached trainer.max_steps gets an empty train loader, so that no actor
    # starts (ImpalaDataModule.train_dataloader); the CLI says "nothing left to train" instead.
    warnings.filterwarnings("ignore", message=r"Total length of `\w+` across ranks is zero")
    # lightning 2.6 advertises its cloud logger at every Trainer construction.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("litlogger"))


def prepare_wandb_loggers(trainer) -> None:
    """Before a W&B run starts: avoid the two warnings our set-up would otherwise cause at every start."""
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        # wandb looks for a git repository from the run directory, and warns when it does not exist yet.
        if logger.save_dir:
            Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
        # Lightning 2.6 passes anonymous=None, which wandb >= 0.19 warns about although None means "unset". Lightning
        # has no public way to leave it out: its private init arguments (tests/unit/test_lightning_internals.py).
        init_kwargs = getattr(logger, "_wandb_init", {})
        if init_kwargs.get("anonymous", "") is None:
            del init_kwargs["anonymous"]


def check_run_settings(trainer, model, datamodule) -> None:
    """Settings that only make sense together, checked before Lightning launches ranks or actors start."""
    if problem := budget_problem(trainer.max_steps, model.hparams.lr_decay, model.hparams.get("ent_coef_final")):
        raise ConfigError(problem)
    if datamodule is not None and datamodule.hparams.actors == "remote" and trainer.world_size > 1:
        raise ConfigError(
            f"data.actors remote needs a single learner process, got {trainer.world_size} (trainer.devices x "
            "trainer.num_nodes): torchrl's DistributedCollector makes the learner rank 0 of the default process "
            "group, which DDP also needs"
        )


def fit_summary(trainer) -> list[str]:
    """What ``fit`` prints at the end: progress over all ranks, where the logs and checkpoints are, and the seconds
    each phase took (``PhaseTimes``)."""
    stats = EpisodeStats.of(trainer)
    progress = stats.progress if stats is not None else None  # summed over DDP ranks
    if progress is None and stats is not None:  # no update in this run (a budget the checkpoint already reached)
        frames, episodes, mean_return = stats.env_frames, len(stats.episode_returns), stats.mean_return
    else:
        frames = int(progress.env_frames) if progress else 0
        episodes = progress.episodes if progress else 0
        mean_return = progress.mean_return if progress else math.nan
    mean_return = f"{mean_return:.1f}" if episodes else "none finished"
    lines = [f"Training stopped after {trainer.global_step} updates and {frames} env frames; "
             f"mean return of the last {episodes} episodes: {mean_return}."]
    for logger in trainer.loggers:
        lines.append(f"Logs ({type(logger).__name__}): {_log_location(logger)}")
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        lines.append(f"Checkpoints: {trainer.checkpoint_callback.dirpath}")
    if (phase_times := PhaseTimes.of(trainer)) is not None:
        lines.append(phase_times.line())
    return lines


def _log_location(logger) -> str:
    experiment = getattr(logger, "experiment", None)
    run_dir = getattr(experiment, "dir", None)  # a W&B run's files (offline: sync with `wandb sync`)
    return str(run_dir or getattr(logger, "log_dir", None) or logger.save_dir)
