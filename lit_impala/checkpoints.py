"""Our checkpoints: what one holds (its format, the W&B run that wrote it, the progress counts), how an older
format is read, and which one ``--ckpt_path`` resumes from, read once and checked before any actor starts.
Writing and reading the file itself (atomically, without unpickling code) is ``checkpoint_io``'s; the callbacks
that save and lock are in ``callbacks/checkpoints.py``.

Formats. ``checkpoint["lit_impala"] = {"format": CHECKPOINT_FORMAT, "wandb_run_id": ...}`` (``stamp``). Format 2
keeps the progress counts in ``EpisodeStats``'s callback state. Format 1 (no ``"lit_impala"`` key) kept them,
and the W&B run id, under ``"impala"``, and had model hyper-parameters that are no longer the model's: ``upgrade``
turns it into format 2 in memory as it is read, so nothing else knows format 1. A later format than this
version's is refused, naming the file (``check_format``).

``find_resume_point`` turns ``--ckpt_path`` into one intact checkpoint, already read (safely:
``checkpoint_io.read_checkpoint``): ``last`` means the newest readable ``*.ckpt`` in the run's ``ModelCheckpoint``
directories, a directory the newest readable one in it, a file that file. Candidates are tried newest first; an
unreadable one (a torn or truncated file) is skipped with a warning naming it, so that a job requeued after a
kill resumes from the previous intact checkpoint instead of failing at every restart. ``last`` with nothing
to load is one line, "no checkpoint in DIR: starting fresh". A file named explicitly gets no fallback: any
problem with it is a ``ValueError`` naming it (the CLI prints it as one line).

The rest says what a checkpoint means for this run: ``model_hparams`` (which model hyper-parameters apply)
and ``check_fits`` (does it fit this network).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from lit_impala.checkpoint_io import UnreadableCheckpoint, read_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
PROGRESS_STATE_KEY = "EpisodeStats"  # where format 2 keeps the progress counts: that callback's state_key
# Model hyper-parameters of format-1 checkpoints that are no longer the model's (now: data.sync_every,
# the episode_stats section, data.eval_deterministic); the current config's values apply instead.
FORMAT_1_MOVED_HPARAMS = ("sync_every", "stop_at_return", "return_window", "test_deterministic")
LIGHTNING_RESOLVES = ("best", "hpc", "registry")  # other special --ckpt_path values: Lightning's own


# --- what a checkpoint holds ---------------------------------------------------------------------------------


def checkpoint_format(checkpoint: dict) -> int:
    """The format a checkpoint was written in (1: written before formats were recorded)."""
    return int(checkpoint.get("lit_impala", {}).get("format", 1))


def check_format(checkpoint: dict, name: str) -> None:
    """A ``ValueError`` naming ``name`` and its format if this version of lit_impala cannot read it."""
    found = checkpoint_format(checkpoint)
    if found > CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {name} has format {found}; this version of lit_impala reads formats 1 to "
            f"{CHECKPOINT_FORMAT}: upgrade lit_impala to resume it"
        )


def stamp(checkpoint: dict, wandb_run_id: str | None) -> None:
    """Record this version's format and the W&B run writing ``checkpoint`` (a resumed run continues it)."""
    checkpoint["lit_impala"] = {"format": CHECKPOINT_FORMAT, "wandb_run_id": wandb_run_id}


def upgrade(checkpoint: dict) -> dict:
    """``checkpoint`` in this version's format, changed in place (a no-op on the current format)."""
    if checkpoint_format(checkpoint) == 1:
        legacy = checkpoint.get("impala", {})
        callbacks = checkpoint.setdefault("callbacks", {})
        if PROGRESS_STATE_KEY not in callbacks and legacy:
            callbacks[PROGRESS_STATE_KEY] = {key: legacy[key] for key in
                                             ("env_frames", "episode_returns", "episode_lengths") if key in legacy}
        for name in FORMAT_1_MOVED_HPARAMS:
            checkpoint.get("hyper_parameters", {}).pop(name, None)
        stamp(checkpoint, legacy.get("wandb_run_id"))
    return checkpoint


# Readers of the current format (``find_resume_point`` and ``callbacks.CheckpointFormat`` upgrade what they load):


def wandb_run_id(checkpoint: dict) -> str | None:
    """The W&B run that wrote ``checkpoint``."""
    return checkpoint.get("lit_impala", {}).get("wandb_run_id")


def env_frames(checkpoint: dict) -> int | None:
    """The env frames the run that wrote ``checkpoint`` had consumed, if it counted them."""
    frames = checkpoint.get("callbacks", {}).get(PROGRESS_STATE_KEY, {}).get("env_frames")
    return None if frames is None else int(frames)


# --- which checkpoint a command starts from --------------------------------------------------------------------


class ResumePoint(NamedTuple):
    """The checkpoint a command starts from: its file and its content (read once, on the CPU)."""

    path: Path
    checkpoint: dict

    def describe(self) -> str:
        frames = env_frames(self.checkpoint)
        counted = f", {frames:,} env frames" if frames is not None else ""
        return f"{self.path} (update {self.checkpoint.get('global_step', '?')}{counted})"


def find_resume_point(ckpt_path: str | None, checkpoint_dirs: list[str], trust: bool = False) -> ResumePoint | None:
    """The checkpoint ``ckpt_path`` means (module docstring); None when the command starts fresh or Lightning
    resolves the value itself (``best``, ``hpc``, ``registry``)."""
    if ckpt_path is None or ckpt_path in LIGHTNING_RESOLVES:
        return None
    if ckpt_path != "last" and not Path(ckpt_path).is_dir():
        point = ResumePoint(Path(ckpt_path), _read(ckpt_path, trust))  # named explicitly: no fallback
    else:
        directories = checkpoint_dirs if ckpt_path == "last" else [ckpt_path]
        point = _newest_readable(directories, trust)
        if point is None:
            where = " or ".join(repr(str(d)) for d in directories) or "this config (no ModelCheckpoint dirpath)"
            say(f"--ckpt_path {ckpt_path}: no checkpoint in {where}: starting fresh")
            return None
    return point


def _newest_readable(directories: list[str], trust: bool) -> ResumePoint | None:
    extension = ModelCheckpoint.FILE_EXTENSION
    candidates = [path for directory in directories for path in Path(directory).glob(f"*{extension}")]
    candidates.sort(key=_mtime, reverse=True)
    for path in candidates:
        try:
            return ResumePoint(path, _read(path, trust))
        except UnreadableCheckpoint as error:  # torn, truncated: an older one may be intact
            if rank_zero_only.rank == 0:
                log.warning("%s; skipped, trying an older one", error)
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return float("-inf")


def _read(path: str | Path, trust: bool) -> dict:
    checkpoint = read_checkpoint(path, trust)  # UnsafeCheckpoint stops the search: it is not a torn file
    check_format(checkpoint, repr(str(path)))
    return upgrade(checkpoint)


def say(line: str) -> None:
    """Print ``line`` once per command, however many DDP ranks run it."""
    if rank_zero_only.rank == 0:
        print(line, flush=True)


def model_hparams(checkpoint: dict, defaults: dict | None = None) -> dict:
    """The checkpoint's model hyper-parameters as this version's ``ImpalaModule`` takes them.

    ``defaults``: the module's arguments with a default. One the checkpoint does not name was added after it was
    written, so the run that wrote it behaved as that default does (no value normalisation, say): it takes the
    default, not the value in this command's config, which the checkpoint's weights may not fit.
    """
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.pop("_instantiator", None)
    if hparams and defaults:
        hparams = {**{name: value for name, value in defaults.items() if name not in hparams}, **hparams}
    return hparams


def check_fits(point: ResumePoint, model) -> None:
    """A ``ValueError`` naming the file when its weights do not fit ``model`` (another env or network).

    Lightning would find this only after the actors started, deep in ``load_state_dict``.
    """
    saved, expected = point.checkpoint["state_dict"], model.state_dict()
    problems = [
        f"{key}: {tuple(saved[key].shape)} in the checkpoint, {tuple(value.shape)} here"
        for key, value in expected.items()
        if key in saved and tuple(saved[key].shape) != tuple(value.shape)
    ]
    problems += [f"{key}: missing from the checkpoint" for key in expected if key not in saved]
    problems += [f"{key}: not in this network" for key in saved if key not in expected]
    if problems:
        hparams = point.checkpoint.get("hyper_parameters", {})
        written_for = {k: hparams.get(k) for k in ("observation_shape", "action_space", "observation_parts")
                       if hparams.get(k) is not None}
        raise ValueError(
            f"checkpoint {str(point.path)!r} was written for a different env or network ({written_for}); "
            f"this run has observation_shape={list(model.hparams.observation_shape)}, "
            f"action_space={model.hparams.action_space}. Differences: " + "; ".join(problems[:5])
        )

