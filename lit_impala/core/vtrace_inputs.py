"""Checks and broadcasting of V-trace's inputs, so that ``core.vtrace`` holds only the math.

Pure functions on tensors; every error is a ValueError (or TypeError) naming the argument and its shape.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def accepts_american_spelling(fn):
    """Let ``fn`` take TorchBeast's ``behavior_*`` keywords for its ``behaviour_*`` arguments."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for american in [name for name in kwargs if name.startswith("behavior_")]:
            british = "behaviour_" + american.removeprefix("behavior_")
            if british in kwargs:
                raise TypeError(f"{fn.__name__}() got both {british!r} and its alias {american!r}")
            kwargs[british] = kwargs.pop(american)
        return fn(*args, **kwargs)

    return wrapper


def check_threshold(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be None (no clipping) or > 0, got {value!r}")


def check_lambda(lambda_: float | Tensor) -> None:
    if isinstance(lambda_, Tensor):
        if lambda_.numel() == 0:
            return
        # One reduction and one host sync, whatever the size (NaN fails both comparisons).
        low, high = torch.aminmax(lambda_.detach())
        if not bool((low >= 0) & (high <= 1)):
            raise ValueError(f"lambda_ must be in [0, 1], got a tensor with values in [{low.item()}, {high.item()}]")
    elif not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_!r}")


def broadcast_shape(time_major: dict[str, Tensor], bootstrap_value: Tensor, lambda_: float | Tensor) -> torch.Size:
    """The ``[T, B, ...]`` shape the inputs broadcast to, or a ValueError naming every shape.

    Args:
        time_major: name -> ``[T, B, ...]`` tensor, ``values`` among them; all of one rank and one T.
        bootstrap_value: ``[B, ...]``, one rank less.
        lambda_: a float, or a tensor of no dims or of the rank of ``values``.

    Dims after T broadcast from size 1 only (numpy rules on equal ranks); lambda_ may broadcast over T too.
    """
    values = time_major["values"]
    rank, steps = values.dim(), values.shape[0] if values.dim() else 0
    if rank < 1 or steps < 1:
        raise ValueError(f"values must be [T, B, ...] with T >= 1, got shape {tuple(values.shape)}")
    if all(t.shape == values.shape for t in time_major.values()) and bootstrap_value.shape == values.shape[1:]:
        full = values.shape  # the common case: no broadcasting, no further checks
        if not isinstance(lambda_, Tensor) or lambda_.shape == full or lambda_.dim() == 0:
            return full

    shapes = {name: tuple(t.shape) for name, t in time_major.items()}
    shapes["bootstrap_value"] = tuple(bootstrap_value.shape)
    if isinstance(lambda_, Tensor):
        shapes["lambda_"] = tuple(lambda_.shape)

    def incompatible(name: str, why: str) -> ValueError:
        listed = ", ".join(f"{key} {shape}" for key, shape in shapes.items())
        return ValueError(
            f"{name} {shapes[name]} {why}. Got {listed}. Inputs are [T, B, ...] of one rank and one T "
            "(bootstrap_value [B, ...]); other dims must be equal or 1."
        )

    full = values.shape
    for name, tensor in time_major.items():
        if tensor.dim() != rank:
            raise incompatible(name, f"must have the rank of values ({rank})")
        if tensor.shape[0] != steps:
            raise incompatible(name, f"must have the T of values ({steps})")
        try:
            full = torch.broadcast_shapes(full, tensor.shape)
        except RuntimeError:
            raise incompatible(name, "does not broadcast with the others") from None
    if bootstrap_value.dim() != rank - 1:
        raise incompatible("bootstrap_value", f"must have rank {rank - 1}, one less than values")
    try:
        full = torch.broadcast_shapes(full, (1, *bootstrap_value.shape))
    except RuntimeError:
        raise incompatible("bootstrap_value", "does not broadcast with values.shape[1:]") from None
    if isinstance(lambda_, Tensor) and lambda_.dim() != 0:
        if lambda_.dim() != rank:
            raise incompatible("lambda_", f"must have no dims or the rank of values ({rank})")
        # lambda_ only scales: it may not grow the outputs.
        if any(size not in (1, full_size) for size, full_size in zip(lambda_.shape, full, strict=False)):
            raise incompatible("lambda_", f"does not broadcast to the outputs' shape {tuple(full)}")
    return full
