"""Which checkpoint ``--ckpt_path`` resumes from, read once and checked before any actor starts.

``find_resume_point`` turns ``--ckpt_path`` into one intact checkpoint, already read (safely:
``checkpoint_io.read_checkpoint``): ``last`` means the newest readable ``*.ckpt`` in the run's ``ModelCheckpoint``
directories, a directory the newest readable one in it, a file that file. Candidates are tried newest first; an
unreadable one (a torn or truncated file) is skipped with a warning naming it, so that a job requeued after a
kill resumes from the previous intact checkpoint instead of failing at every restart. ``last`` with nothing
to load is one line, "no checkpoint in DIR: starting fresh". A file named explicitly gets no fallback: any
problem with it is a ``ValueError`` naming it (the CLI prints it as one line).

The rest says what a checkpoint means for this run: ``model_hparams`` (what of an older format still applies),
and ``check_fits`` (does it fit this network).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from lit_impala.callbacks.run_control import check_checkpoint_format, checkpoint_format
from lit_impala.checkpoint_io import UnreadableCheckpoint, read_checkpoint

log = logging.getLogger(__name__)

# Model hyper-parameters of format-1 checkpoints that are no longer the model's (now: data.sync_every,
# the episode_stats section, data.eval_deterministic); the current config's values apply instead.
FORMAT_1_MOVED_HPARAMS = ("sync_every", "stop_at_return", "return_window", "test_deterministic")
LIGHTNING_RESOLVES = ("best", "hpc", "registry")  # other special --ckpt_path values: Lightning's own


class ResumePoint(NamedTuple):
    """The checkpoint a command starts from: its file and its content (read once, on the CPU)."""

    path: Path
    checkpoint: dict

    def describe(self) -> str:
        frames = self.checkpoint.get("callbacks", {}).get("EpisodeStats", {}).get("env_frames")
        if frames is None:  # format 1
            frames = self.checkpoint.get("impala", {}).get("env_frames")
        counted = f", {int(frames):,} env frames" if frames is not None else ""
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
    check_checkpoint_format(checkpoint, repr(str(path)))
    return checkpoint


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
    if checkpoint_format(checkpoint) == 1:
        for name in FORMAT_1_MOVED_HPARAMS:
            hparams.pop(name, None)
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
        written_for = {k: hparams.get(k) for k in ("observation_shape", "action_space")}
        raise ValueError(
            f"checkpoint {str(point.path)!r} was written for a different env or network ({written_for}); "
            f"this run has observation_shape={list(model.hparams.observation_shape)}, "
            f"action_space={model.hparams.action_space}. Differences: " + "; ".join(problems[:5])
        )

