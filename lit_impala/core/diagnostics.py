"""What the learner logs about one update: how off-policy its batch was (importance weights, policy lag)
and the loss terms. Pure functions of detached tensors."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from lit_impala.core.losses import LossTerms


class UpdateTensors(NamedTuple):
    """What one update's metrics are computed from (all detached), ``[T, B]`` unless said."""

    log_rhos: Tensor  # log(pi / mu) of the actions taken
    policy_lag: Tensor  # learner version - the version of the weights that acted
    terms: LossTerms  # scalars
    entropy: Tensor  # policy entropy per step
    baseline: Tensor  # V(x_t)


def update_metrics(
    update: UpdateTensors, rho_bar: float | None, c_bar: float | None, pg_rho_bar: float | None
) -> dict[str, tuple[Tensor, str]]:
    """``name -> (scalar, how to reduce it over DDP ranks)``: extremes by max / min, the rest by mean."""
    weights = importance_weight_stats(update.log_rhos.exp(), rho_bar, c_bar, pg_rho_bar)
    return {
        "policy_lag/max": (update.policy_lag.max(), "max"),
        "rho/max": (weights.pop("rho/max"), "max"),
        "rho/min": (weights.pop("rho/min"), "min"),
        **{name: (value, "mean") for name, value in weights.items()},
        "loss/total": (update.terms.total, "mean"),
        "loss/policy": (update.terms.policy, "mean"),
        "loss/baseline": (update.terms.baseline, "mean"),
        "loss/entropy": (update.terms.entropy, "mean"),
        "train/entropy": (update.entropy.mean(), "mean"),
        "policy_lag/mean": (update.policy_lag.mean(), "mean"),
        "train/value_mean": (update.baseline.mean(), "mean"),
    }


def importance_weight_stats(
    rhos: Tensor, rho_bar: float | None, c_bar: float | None, pg_rho_bar: float | None
) -> dict[str, Tensor]:
    """How off-policy a batch is, from its importance weights ``rhos = pi / mu``, ``[T, B]``.

    ``rho/clipped_by_*``: fraction of steps whose weight each threshold cuts (0 when it is None).
    ``rho/ess``: effective sample size ``(sum rho)^2 / (N sum rho^2)`` in (0, 1]: 1 when every weight
    is equal (on-policy), small when a few steps carry all the weight.
    """
    rhos = rhos.detach().float()

    def clipped(threshold: float | None) -> Tensor:
        return (rhos > threshold).float().mean() if threshold is not None else rhos.new_zeros(())

    return {
        "rho/mean": rhos.mean(),
        "rho/min": rhos.min(),
        "rho/max": rhos.max(),
        "rho/clipped_by_rho_bar": clipped(rho_bar),
        "rho/clipped_by_c_bar": clipped(c_bar),
        "rho/clipped_by_pg_rho_bar": clipped(pg_rho_bar),
        "rho/ess": rhos.sum().square() / (rhos.numel() * rhos.square().sum()).clamp_min(1e-12),
    }
