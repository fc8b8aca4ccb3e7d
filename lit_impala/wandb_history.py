"""Read the metric history of an offline W&B run directory without a server or an account.

A run's ``run-<id>.wandb`` file is a LevelDB-style record log (a 7-byte W&B header, then 32 KiB
blocks of records with 7-byte headers) whose records are wandb's own ``Record`` protobufs; we keep
the ``history`` ones. Used by tests and notebooks to check what a run logged.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK_BYTES = 32 * 1024
_RECORD_HEADER_BYTES = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(raw: bytes):
    position, chunks = 7, []  # skip the W&B file header
    while position + _RECORD_HEADER_BYTES <= len(raw):
        left_in_block = _BLOCK_BYTES - position % _BLOCK_BYTES
        if left_in_block < _RECORD_HEADER_BYTES:  # block trailer padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[position : position + _RECORD_HEADER_BYTES])
        position += _RECORD_HEADER_BYTES
        if kind == 0 and length == 0:
            break
        chunks.append(raw[position : position + length])
        position += length
        if kind in (_FULL, _LAST):
            yield b"".join(chunks)
            chunks = []


def read_history(run_dir: str | Path) -> list[dict]:
    """Rows of logged metrics (``{key: value}``, in logging order) of an offline W&B run directory."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    rows = []
    for data in _records(files[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows
