"""Normalised value targets: the value head learns ``(G - mean) / std`` of the returns, not the returns.

Why: the value loss and its gradients scale with the returns' magnitude, so one learning rate (and one entropy
weight next to it) fits only tasks whose returns are of one size: CartPole's ~100 needed ``reward_scale 0.05``,
MuJoCo's ~1000 ``0.1``. Learning the targets in units of their running standard deviation takes the scale out.

Two ways, as the field has them (``model.value_normalization``):

* ``running``: Sample Factory's ``normalize_returns``. The head's output ``n`` means ``V = n * std + mean``;
  when the statistics move, so does every V (the head catches up in a few updates).
* ``popart``: PopArt (van Hasselt et al. 2016; IMPALA's multi-task extension, Hessel et al. 2019). When the
  statistics move from ``(mean, std)`` to ``(mean', std')``, the head's last layer is rescaled so that every
  denormalised output stays exactly what it was: ``W' = W * std / std'``, ``b' = (b * std + mean - mean') / std'``.

Pure functions and one small ``nn.Module`` of buffers; the learner decides when to update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

VALUE_NORMALIZATIONS = ("none", "running", "popart")


def merge_moments(mean: Tensor, second_moment: Tensor, beta: float, batch: Tensor) -> tuple[Tensor, Tensor]:
    """Exponential moving averages of the first and second moments (PopArt's update, eq. 6):
    ``mean' = (1 - beta) * mean + beta * E[batch]``, ``second' = (1 - beta) * second + beta * E[batch^2]``.

    Args:
        mean, second_moment: ``[]`` the current moments.
        beta: step size in (0, 1]; 1 keeps only the batch.
        batch: ``[...]`` the new targets (any shape, all used).

    Returns:
        ``(mean', second_moment')``, both ``[]``.
    """
    batch = batch.to(mean.dtype)
    return (1 - beta) * mean + beta * batch.mean(), (1 - beta) * second_moment + beta * batch.square().mean()


def std_of(mean: Tensor, second_moment: Tensor, min_std: float) -> Tensor:
    """``sqrt(second - mean^2)``, at least ``min_std`` (PopArt bounds it too: a constant return would divide by 0)."""
    return (second_moment - mean.square()).clamp(min=0).sqrt().clamp(min=min_std)


def preserve_outputs(weight: Tensor, bias: Tensor, old_mean: Tensor, old_std: Tensor, new_mean: Tensor,
                     new_std: Tensor) -> tuple[Tensor, Tensor]:
    """PopArt's output-preserving update (van Hasselt et al. 2016, eq. 5 ff.) of a linear value head.

    With ``n(x) = W h(x) + b`` and ``V(x) = std * n(x) + mean``, returns ``(W', b')`` such that
    ``new_std * (W' h + b') + new_mean == old_std * (W h + b) + old_mean`` for every ``h``.

    Args:
        weight: ``[1, H]`` the head's weight; bias: ``[1]`` its bias.
        old_mean, old_std, new_mean, new_std: ``[]`` the statistics before and after the update.
    """
    scale = (old_std / new_std).to(weight.dtype)
    return weight * scale, ((bias * old_std + old_mean - new_mean) / new_std).to(bias.dtype)


class ValueNormalizer(nn.Module):
    """Running statistics of the value targets, as float64 buffers (saved in checkpoints, shipped to the actors
    with the weights): ``mean``, ``second_moment`` and the number of ``updates``.

    Before the first update it is the identity (mean 0, std 1). The first update takes the batch's moments whole
    and does not preserve the head's outputs (an untrained head's values mean nothing): the values start at the
    targets' scale instead of at 0.

    Args:
        beta: step size of the moving averages. The first update takes the batch's moments whole, so the
            statistics start from the data, not from (0, 1).
        min_std: lower bound on the standard deviation.
    """

    def __init__(self, beta: float = 3e-4, min_std: float = 1e-2):
        super().__init__()
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        self.beta = beta
        self.min_std = min_std
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("second_moment", torch.ones((), dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @property
    def std(self) -> Tensor:
        return std_of(self.mean, self.second_moment, self.min_std)

    def normalize(self, value: Tensor) -> Tensor:
        """``[...] -> [...]``: ``(value - mean) / std`` in ``value``'s dtype."""
        return (value - self.mean.to(value.dtype)) / self.std.to(value.dtype)

    def denormalize(self, normalized: Tensor) -> Tensor:
        """``[...] -> [...]``: ``normalized * std + mean`` in ``normalized``'s dtype."""
        return normalized * self.std.to(normalized.dtype) + self.mean.to(normalized.dtype)

    @torch.no_grad()
    def update(self, targets: Tensor, head: nn.Linear | None = None) -> None:
        """Merge ``targets [...]`` into the statistics; with ``head`` (PopArt), rescale it so that the
        denormalised values it gives stay the same."""
        if targets.numel() == 0:
            return
        first = int(self.updates) == 0
        beta = 1.0 if first else self.beta
        old_mean, old_std = self.mean.clone(), self.std
        mean, second_moment = merge_moments(self.mean, self.second_moment, beta, targets)
        self.mean.copy_(mean)
        self.second_moment.copy_(second_moment)
        self.updates += 1
        if head is not None and not first:
            # Not at the first update: the freshly initialised head's values mean nothing yet, and letting them
            # take the targets' mean and std at once is a better start than preserving them.
            weight, bias = preserve_outputs(head.weight, head.bias, old_mean, old_std, self.mean, self.std)
            head.weight.copy_(weight)
            head.bias.copy_(bias)
