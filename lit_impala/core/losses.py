"""IMPALA loss terms (Espeholt et al. 2018, section 4.2): V-trace policy gradient, baseline regression and
entropy bonus.

Pure functions on time-major ``[T, B]`` tensors. The reduction is a documented choice: we default to
``reduction="sum"`` over time and batch, as the paper and TorchBeast do, because the paper's optimiser
settings assume it: RMSprop with ``eps=0.01`` divides by ``sqrt(mean g^2) + eps``, so summed gradients
(magnitude ~1) make the update nearly scale-free, while a mean over T * B (gradients ~1e-3) would be
dominated by ``eps`` and silently shrink the learning rate. ``reduction="mean"`` is there for optimisers
without that coupling (e.g. Adam with a small eps).
"""

from typing import NamedTuple

import torch
from torch import Tensor

from lit_impala.core.vtrace import VTraceFromLogProbsReturns, VTraceReturns

REDUCTIONS = ("sum", "mean")


class LossTerms(NamedTuple):
    """The scalar IMPALA loss and its parts.

    ``total`` is the weighted sum that is minimised,
    ``policy + baseline_coef * baseline + ent_coef * entropy``. ``policy``, ``baseline`` and
    ``entropy`` are the UNWEIGHTED terms (so they can be logged independently of the coefficients);
    ``entropy`` is the entropy *loss*, i.e. minus the (reduced) policy entropy.
    """

    total: Tensor
    policy: Tensor
    baseline: Tensor
    entropy: Tensor


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(x: Tensor, reduction: str) -> Tensor:
    _check_reduction(reduction)
    return x.sum() if reduction == "sum" else x.mean()


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    # Silent broadcasting of e.g. [T, B] against [T, B, 1] would yield a [T, B, B] loss that still trains.
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def policy_gradient_loss(target_log_prob: Tensor, pg_advantages: Tensor, reduction: str = "sum") -> Tensor:
    """V-trace policy-gradient loss, ``-reduce(log pi(a_t|x_t) * A_t)``.

    Args:
        target_log_prob: ``[T, B]`` log pi(a_t|x_t) of the taken actions under the learner policy.
        pg_advantages: ``[T, B]`` V-trace advantages; treated as constants (detached).
        reduction: ``"sum"`` (default; paper / TorchBeast) or ``"mean"`` (over T * B).

    Returns:
        Scalar tensor.
    """
    _check_same_shape("target_log_prob", target_log_prob, "pg_advantages", pg_advantages)
    return _reduce(-target_log_prob * pg_advantages.detach(), reduction)


def clipped_policy_gradient_loss(
    target_log_prob: Tensor,
    behaviour_log_prob: Tensor,
    pg_advantages: Tensor,
    policy_clip: float,
    reduction: str = "sum",
) -> Tensor:
    """PPO's clipped surrogate on V-trace advantages (APPO, as RLlib's ``APPO`` builds it),
    ``-reduce(min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t))`` with ``ratio_t = pi(a_t|x_t) /
    mu(a_t|x_t)``.

    Why: one V-trace step may move the policy arbitrarily far from the one that acted; the clip takes the
    gradient away from every step whose ratio has already moved more than ``eps`` in the advantage's
    direction, so several updates on one batch (``data.passes_per_batch``) cannot run away from the data.
    Its gradient at ``ratio == 1`` is that of ``policy_gradient_loss``. The advantages keep V-trace's
    ``min(rho_bar, rho_t)`` factor, as RLlib's APPO keeps it: near on-policy (our lag is a few updates) it is ~1.

    Args:
        target_log_prob: ``[T, B]`` log pi(a_t|x_t) under the learner policy (carries the gradient).
        behaviour_log_prob: ``[T, B]`` log mu(a_t|x_t) of the policy that acted (a constant).
        pg_advantages: ``[T, B]`` V-trace advantages; treated as constants (detached).
        policy_clip: eps > 0, how far the ratio may move before its gradient is cut (PPO: 0.2).
        reduction: ``"sum"`` (default; paper / TorchBeast) or ``"mean"`` (over T * B).

    Returns:
        Scalar tensor.
    """
    _check_same_shape("target_log_prob", target_log_prob, "pg_advantages", pg_advantages)
    _check_same_shape("target_log_prob", target_log_prob, "behaviour_log_prob", behaviour_log_prob)
    if not policy_clip > 0:
        raise ValueError(f"policy_clip must be > 0, got {policy_clip}")
    advantages = pg_advantages.detach()
    ratio = torch.exp(target_log_prob - behaviour_log_prob.detach())
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - policy_clip, 1 + policy_clip) * advantages)
    return _reduce(-surrogate, reduction)


def baseline_loss(vs: Tensor, values: Tensor, reduction: str = "sum") -> Tensor:
    """Baseline regression towards the V-trace targets, ``reduce(0.5 * (vs - V(x_t))^2)``.

    Args:
        vs: ``[T, B]`` V-trace targets; treated as constants (detached).
        values: ``[T, B]`` V(x_t) from the learner's baseline.
        reduction: ``"sum"`` (default; paper / TorchBeast) or ``"mean"`` (over T * B).

    Returns:
        Scalar tensor.
    """
    _check_same_shape("vs", vs, "values", values)
    return _reduce(0.5 * (vs.detach() - values) ** 2, reduction)


def clipped_baseline_loss(vs: Tensor, values: Tensor, behaviour_values: Tensor, value_clip: float,
                          reduction: str = "sum") -> Tensor:
    """PPO's clipped value loss (Schulman et al.'s baselines, CleanRL ``clip_vloss``, Sample Factory
    ``ppo_clip_value``): ``reduce(0.5 * max((V - vs)^2, (V_clipped - vs)^2))`` with
    ``V_clipped = V_old + clip(V - V_old, -eps, eps)``.

    Why: like the policy clip, it keeps several updates on one batch from moving the value far from the one
    the actors had, where that move is away from the target; at ``V == V_old`` its gradient is
    ``baseline_loss``'s.

    Args:
        vs: ``[T, B]`` value targets; treated as constants (detached).
        values: ``[T, B]`` V(x_t) from the learner's baseline (carries the gradient).
        behaviour_values: ``[T, B]`` V_old(x_t), what the acting network's baseline said (a constant).
        value_clip: eps > 0, in the units of ``values``.
        reduction: ``"sum"`` (default) or ``"mean"`` (over T * B).

    Returns:
        Scalar tensor.
    """
    _check_same_shape("vs", vs, "values", values)
    _check_same_shape("vs", vs, "behaviour_values", behaviour_values)
    if not value_clip > 0:
        raise ValueError(f"value_clip must be > 0, got {value_clip}")
    vs, behaviour_values = vs.detach(), behaviour_values.detach()
    clipped = behaviour_values + (values - behaviour_values).clamp(-value_clip, value_clip)
    return _reduce(0.5 * torch.maximum((values - vs) ** 2, (clipped - vs) ** 2), reduction)


def normalize_advantages(advantages: Tensor, epsilon: float = 1e-8) -> Tensor:
    """``(A - mean(A)) / (std(A) + epsilon)`` over the whole batch (PPO's per-minibatch normalisation).

    Why: the policy gradient's size then no longer follows the rewards' scale, so one learning rate and one
    entropy weight fit tasks whose returns differ by orders of magnitude.

    Args:
        advantages: ``[T, B]`` (any shape; all elements share one mean and one population std).
        epsilon: keeps a batch of equal advantages from dividing by zero.

    Returns:
        The normalised advantages, same shape.
    """
    advantages = advantages.detach()
    return (advantages - advantages.mean()) / (advantages.std(unbiased=False) + epsilon)


def entropy_loss(entropy: Tensor, reduction: str = "sum") -> Tensor:
    """Entropy loss, ``-reduce(H(pi(.|x_t)))``: minimising it maximises the policy entropy.

    Args:
        entropy: ``[T, B]`` entropy of the learner policy at each step.
        reduction: ``"sum"`` (default; paper / TorchBeast) or ``"mean"`` (over T * B).

    Returns:
        Scalar tensor.
    """
    return -_reduce(entropy, reduction)


def impala_loss(
    target_log_prob: Tensor,
    entropy: Tensor,
    values: Tensor,
    vtrace_returns: VTraceReturns | VTraceFromLogProbsReturns,
    baseline_coef: float = 0.5,
    ent_coef: float = 0.01,
    reduction: str = "sum",
    *,
    behaviour_log_prob: Tensor | None = None,
    policy_clip: float | None = None,
    behaviour_values: Tensor | None = None,
    value_clip: float | None = None,
) -> LossTerms:
    """Full IMPALA loss, ``policy + baseline_coef * baseline + ent_coef * entropy``.

    Args:
        target_log_prob: ``[T, B]`` log pi(a_t|x_t) of the taken actions under the learner policy.
        entropy: ``[T, B]`` entropy of the learner policy.
        values: ``[T, B]`` V(x_t) from the learner's baseline.
        vtrace_returns: provides ``vs`` and ``pg_advantages``, both ``[T, B]`` (gradient-free).
        baseline_coef: weight of the baseline loss (TorchBeast's ``baseline_cost``).
        ent_coef: weight of the entropy loss (TorchBeast's ``entropy_cost``).
        reduction: ``"sum"`` (default) sums every term over time and batch as the paper and
            TorchBeast do (what RMSprop's ``eps=0.01`` assumes); ``"mean"`` averages over T * B.
        behaviour_log_prob: ``[T, B]`` log mu(a_t|x_t); needed with ``policy_clip``.
        policy_clip: None (the paper): the policy term is ``policy_gradient_loss``; eps: it is
            ``clipped_policy_gradient_loss`` (APPO).
        behaviour_values: ``[T, B]`` V_old(x_t) of the acting network; needed with ``value_clip``.
        value_clip: None (the paper): the baseline term is ``baseline_loss``; eps: it is
            ``clipped_baseline_loss``.

    Returns:
        ``LossTerms`` of scalars: the weighted ``total`` and the unweighted ``policy``, ``baseline``
        and ``entropy`` terms.
    """
    _check_reduction(reduction)
    _check_same_shape("entropy", entropy, "target_log_prob", target_log_prob)
    _check_same_shape("values", values, "target_log_prob", target_log_prob)
    if policy_clip is None:
        policy = policy_gradient_loss(target_log_prob, vtrace_returns.pg_advantages, reduction)
    elif behaviour_log_prob is None:
        raise ValueError("policy_clip needs behaviour_log_prob")
    else:
        policy = clipped_policy_gradient_loss(
            target_log_prob, behaviour_log_prob, vtrace_returns.pg_advantages, policy_clip, reduction
        )
    if value_clip is None:
        baseline = baseline_loss(vtrace_returns.vs, values, reduction)
    elif behaviour_values is None:
        raise ValueError("value_clip needs behaviour_values")
    else:
        baseline = clipped_baseline_loss(vtrace_returns.vs, values, behaviour_values, value_clip, reduction)
    entropy_term = entropy_loss(entropy, reduction)
    total = policy + baseline_coef * baseline + ent_coef * entropy_term
    return LossTerms(total=total, policy=policy, baseline=baseline, entropy=entropy_term)
