"""Checkpoint files: written so that a kill can never leave a torn one, read so that a file can never run code.

``CheckpointFiles`` is the Lightning ``CheckpointIO`` plug-in of every run (the CLI adds it to the trainer).

Saving: ``torch.save`` into a temporary file *beside* the target, ``fsync``, ``os.replace`` over the target,
``fsync`` of the directory (``write_atomically``). Whenever the process is killed, the target is the previous
complete file or the new complete one. Lightning's own atomic save stages the file in ``$TMPDIR`` and moves it:
when ``$TMPDIR`` is another filesystem than the checkpoint directory (a tmpfs ``/tmp``, a network ``runs/``: the
usual cluster layout) that move is a copy over the target, without ``fsync``, and a kill during it tears the file.
A temporary file left by a kill is named ``.<target>.<random>.partial`` and removed when the next run takes
the directory (``callbacks.checkpoints.CheckpointDirectoryLock``); ``*.ckpt`` globs never match it.

Reading: ``torch.load(weights_only=True)``: tensors and plain Python data (dicts, lists, numbers, strings), which
is all our checkpoints hold; anything else in the file (a pickled object, which could run code as it is
unpickled) makes ``read_checkpoint`` refuse the file *unread* (``UnsafeCheckpoint``). ``trust=True`` (the CLI's
``--trust_checkpoint true``) unpickles everything: only for files you made yourself or fully trust.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"  # a temporary checkpoint file being written (or left by a kill)

# Classes our checkpoints hold beyond what weights_only=True allows by default (tensors, dicts, lists, tuples,
# OrderedDict, numbers, strings, None). None so far: every shipped config's checkpoint loads without one
# (tests/integration/test_ddp.py reads each with read_checkpoint). Add a class here only if it is plain data.
SAFE_GLOBALS: list = []

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: files get the same permissions as any file the user creates


class UnreadableCheckpoint(ValueError):
    """The file is not a readable checkpoint: missing, truncated, torn, or not a torch file at all."""


class UnsafeCheckpoint(ValueError):
    """The file holds Python objects other than plain data: unpickling it could run code, so it was not."""


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """The checkpoint at ``path`` as a dict, on the CPU.

    Raises ``UnsafeCheckpoint`` (nothing was unpickled) for a file holding more than tensors and plain data,
    unless ``trust``; ``UnreadableCheckpoint`` for a file that is not a complete checkpoint. Both name the file.
    """
    name = repr(str(path))
    if not Path(path).is_file():
        raise UnreadableCheckpoint(f"checkpoint {name} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        # torch's restricted unpickler refuses a global it does not allow before it imports or calls anything.
        if "Weights only load failed" not in str(error):
            raise UnreadableCheckpoint(_unreadable(name, error)) from error
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({found[1]})" if found else ""
        raise UnsafeCheckpoint(
            f"checkpoint {name} was refused unread: it holds a Python object that is not plain data{what}, and "
            "unpickling it could run code. Load only checkpoints you trust; for a file you made yourself or whose "
            "author you trust, add --trust_checkpoint true"
        ) from None
    except Exception as error:  # noqa: BLE001 -- zip, EOF and OS errors all mean "not a complete checkpoint"
        raise UnreadableCheckpoint(_unreadable(name, error)) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UnreadableCheckpoint(f"checkpoint {name} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def _unreadable(name: str, error: BaseException) -> str:
    return (f"checkpoint {name} cannot be read ({type(error).__name__}: {' '.join(str(error).split())}); it may be "
            "truncated or not a Lightning checkpoint")


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` so that it is, at any moment and after any kill, either its old
    content or the complete new one: a temporary file in the same directory, flushed to disk, renamed over
    ``path`` (atomic within one filesystem), then the directory entry flushed too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        os.fchmod(descriptor, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_partial_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``directory``; call it only while no one else
    writes there (``CheckpointDirectoryLock``). Returns what was removed."""
    removed = []
    for leftover in Path(directory).glob(f".*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


class CheckpointFiles(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic saves in the checkpoint's own directory, safe loads (module docstring).

    ``hand_over(path, checkpoint)``: a checkpoint the CLI has already read and checked is given to Lightning
    when it asks for ``path``, instead of reading the file a second time.

    Args:
        trust: unpickle everything in a loaded file (``--trust_checkpoint true``); default: tensors and plain
            data only.
    """

    def __init__(self, trust: bool = False):
        super().__init__()
        self.trust = trust
        self._handed_over: dict[str, dict] = {}

    def hand_over(self, path: str | Path, checkpoint: dict) -> None:
        self._handed_over[os.path.realpath(path)] = checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            # Remote storage (s3://, ...) and storage options: Lightning's own way (fsspec transactions).
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=not self.trust)
        handed_over = self._handed_over.pop(os.path.realpath(path), None)
        if handed_over is not None:
            return handed_over
        return read_checkpoint(path, trust=self.trust)
