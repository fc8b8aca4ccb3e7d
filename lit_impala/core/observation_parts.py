"""Dict observations as one flat vector: the layout of its parts, and the network's way back to them.

An env with a dict observation (an image and a vector, an action mask) is packed into one float32 vector
``[D]`` by ``envs.wrappers.PackDictObservation``, so every path a plain observation takes (actor processes,
the batched inference server, shared memory, remote nodes, the unroll stream, checkpoints) carries it
unchanged; the network alone splits it again (``split``) and sends each part to an encoder suited to it.
RLlib's ``ComplexInputNetwork`` does the same (flatten in the env, ``restore_original_dimensions`` in the model).

A layout is plain data (a list of dicts), so it is a model hyper-parameter the CLI links from the data module,
is saved in checkpoints, and is what an exported policy documents as its input.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

PartKind = Literal["vector", "image", "mask"]
PART_KINDS = ("vector", "image", "mask")


class ObservationPart(NamedTuple):
    """One entry of a dict observation, as the network reads it."""

    name: str  # the env's key
    shape: tuple[int, ...]  # (size,) for vectors and masks; (C, H, W), channels first, for images
    kind: PartKind  # "image": a pixel encoder; "vector": the MLP; "mask": legal actions, applied to the logits
    pixels: bool = False  # an image of uint8 (or boolean) pixels 0-255, scaled by 1/255 in the network

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_spec(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "kind": self.kind, "pixels": self.pixels}


def parts_from_spec(spec: list[dict]) -> tuple[ObservationPart, ...]:
    """The inverse of ``[part.to_spec() ...]``; ``ValueError`` naming what is wrong in a hand-written spec."""
    parts = []
    for entry in spec:
        try:
            part = ObservationPart(str(entry["name"]), tuple(int(s) for s in entry["shape"]), entry["kind"],
                                   bool(entry.get("pixels", False)))
        except (KeyError, TypeError) as error:
            raise ValueError(f"observation part {entry!r} needs a name, a shape and a kind") from error
        if part.kind not in PART_KINDS:
            raise ValueError(f"observation part {part.name!r} has kind {part.kind!r}; valid: {', '.join(PART_KINDS)}")
        if not part.shape or not all(s >= 1 for s in part.shape) or len(part.shape) != (3 if part.kind == "image"
                                                                                          else 1):
            raise ValueError(f"observation part {part.name!r} ({part.kind}) has shape {list(part.shape)}: an image is "
                             "(C, H, W), a vector or a mask (size,)")
        parts.append(part)
    if len({p.name for p in parts}) != len(parts):
        raise ValueError(f"observation parts repeat a name: {[p.name for p in parts]}")
    if sum(p.kind == "mask" for p in parts) > 1:
        raise ValueError(f"at most one observation part is an action mask: {[p.name for p in parts]}")
    return tuple(parts)


def flat_size(parts: tuple[ObservationPart, ...]) -> int:
    """D, the length of the packed observation."""
    return sum(part.size for part in parts)


def split(observation: Tensor, parts: tuple[ObservationPart, ...]) -> dict[str, Tensor]:
    """Packed ``[N, D]`` -> ``{name: [N, *part.shape]}`` (views), in ``parts``' order."""
    pieces = torch.split(observation, [part.size for part in parts], dim=-1)
    return {part.name: piece.reshape(-1, *part.shape) for part, piece in zip(parts, pieces, strict=True)}


def pack(entries: dict[str, Tensor], parts: tuple[ObservationPart, ...]) -> Tensor:
    """``{name: [N, *part.shape]}`` -> packed float32 ``[N, D]``: what ``split`` inverts (an exported policy packs
    its named inputs with it)."""
    return torch.cat([entries[part.name].reshape(entries[part.name].shape[0], -1).to(torch.float32)
                      for part in parts], dim=-1)


def mask_logits(logits: Tensor, legal: Tensor) -> Tensor:
    """``logits [..., A]`` with the illegal actions' (``legal [..., A]`` == 0) set to the dtype's lowest finite value.

    Their probability is then exactly 0 under softmax, and log-probs, entropies and their gradients stay finite
    (``-inf`` would give ``0 * -inf = nan`` in the entropy). Actors and learner both mask inside the network, so
    the behaviour and target log-probs are of the same masked distribution and V-trace's ratio stays exact. A row
    with no legal action is left as it was: the env broke its own contract, and a uniform draw over all actions is
    better than a NaN.
    """
    legal = legal.to(torch.bool)
    any_legal = legal.any(dim=-1, keepdim=True)
    return logits.masked_fill(~legal & any_legal, torch.finfo(logits.dtype).min)
