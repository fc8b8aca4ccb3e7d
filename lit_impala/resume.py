"""Resuming from a checkpoint, checked before any actor starts: which file ``--ckpt_path`` means, whether it
fits this network, what of an older checkpoint format still applies, and which W&B run it continues.

Every problem is a ``ValueError`` naming the file (the CLI prints it as one line).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_impala.callbacks.run_control import check_checkpoint_format, checkpoint_format, wandb_run_id

# Model hyper-parameters of format-1 checkpoints that are no longer the model's (now: data.sync_every,
# the episode_stats section, data.eval_deterministic); the current config's values apply instead.
FORMAT_1_MOVED_HPARAMS = ("sync_every", "stop_at_return", "return_window", "test_deterministic")


def load(path: Path | str) -> dict:
    """``torch.load`` a Lightning checkpoint of a format we read; a ``ValueError`` naming the file otherwise."""
    path = Path(path)
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
    check_checkpoint_format(checkpoint, repr(str(path)))
    return checkpoint


def model_hparams(checkpoint: dict) -> dict:
    """The checkpoint's model hyper-parameters as this version's ``ImpalaModule`` takes them."""
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.pop("_instantiator", None)
    if checkpoint_format(checkpoint) == 1:
        for name in FORMAT_1_MOVED_HPARAMS:
            hparams.pop(name, None)
    return hparams


def check_fits(checkpoint: dict, path: Path | str, model) -> None:
    """A ``ValueError`` naming the file when its weights do not fit ``model`` (another env or network).

    Lightning would find this only after the actors started, deep in ``load_state_dict``.
    """
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


def checkpoint_path(ckpt_path: str | None, checkpoint_dirs: list[str]) -> Path | None:
    """The file ``--ckpt_path`` resumes from: ``last`` is the newest ``last*.ckpt`` in the
    ``ModelCheckpoint`` directories (as Lightning resolves it); None when nothing will be resumed."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    name, extension = ModelCheckpoint.CHECKPOINT_NAME_LAST, ModelCheckpoint.FILE_EXTENSION
    candidates = [path for directory in checkpoint_dirs for path in Path(directory).glob(f"{name}*{extension}")]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def continued_wandb_run(path: Path | None) -> str | None:
    """The W&B run id of the checkpoint at ``path`` (None: no checkpoint, unreadable, or none recorded)."""
    if path is None or not path.is_file():
        return None
    try:
        return wandb_run_id(torch.load(path, map_location="cpu", weights_only=False))
    except Exception:  # noqa: BLE001 -- `load` reports an unreadable file with its own message later
        return None
