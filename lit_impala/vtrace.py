"""V-trace off-policy value targets and policy-gradient advantages (Espeholt et al. 2018, IMPALA, eq. 1).

Pure tensor functions, time-major ``[T, B, ...]``, with the DeepMind / TorchBeast names and argument order.
"""

from typing import NamedTuple

import torch
from torch import Tensor


class VTraceReturns(NamedTuple):
    """V-trace outputs, both ``[T, B, ...]`` and gradient-free."""

    vs: Tensor  # v_s, the V-trace value targets
    pg_advantages: Tensor  # rho_s * (r_s + gamma_s * v_{s+1} - V(x_s))


class VTraceFromLogProbsReturns(NamedTuple):
    """V-trace outputs plus the log-probabilities they were computed from, all ``[T, B, ...]``."""

    vs: Tensor
    pg_advantages: Tensor
    log_rhos: Tensor
    behaviour_action_log_probs: Tensor
    target_action_log_probs: Tensor


def _check_threshold(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be None (no clipping) or > 0, got {value!r}")


def _clip(rhos: Tensor, threshold: float | None) -> Tensor:
    return rhos if threshold is None else rhos.clamp(max=threshold)


def reverse_linear_scan(inputs: Tensor, coeffs: Tensor) -> Tensor:
    """Solve ``y_t = inputs_t + coeffs_t * y_{t+1}`` backwards from ``y_T = 0``, over dim 0.

    Args:
        inputs: ``[T, ...]``.
        coeffs: ``[T, ...]``, same shape.

    Returns:
        ``y``: ``[T, ...]``, a new tensor.

    A sequential loop costs one tiny kernel launch per step, and at T = 80 launch overhead dominates. Instead
    this is a Hillis-Steele scan with log2(T) vectorised steps: the step map ``y -> inputs_t + coeffs_t * y`` composes
    associatively, ``(c1, x1) o (c2, x2) = (c1 * c2, x1 + c1 * x2)``, so after the step with stride ``s`` element
    t holds the composition of steps ``[t, t + 2s)``. A coefficient is read only while its whole span lies
    inside ``[0, T)``, so no padding is needed. Same sums as the loop, grouped differently: float rounding
    differs in the last bits only.
    """
    if inputs.shape != coeffs.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and coeffs {tuple(coeffs.shape)} must have the same shape")
    num_steps = inputs.shape[0]
    ys = inputs  # never written: every step builds a new tensor
    stride = 1
    while stride < num_steps:
        next_ys = ys.clone()
        next_ys[:-stride].addcmul_(coeffs[:-stride], ys[stride:])
        if 2 * stride < num_steps:  # the last step's coefficients would never be read
            next_coeffs = coeffs.clone()
            next_coeffs[:-stride].mul_(coeffs[stride:])
            coeffs = next_coeffs
        ys = next_ys
        stride *= 2
    return ys


def from_importance_weights(
    log_rhos: Tensor,
    discounts: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_c_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    lambda_: float = 1.0,
) -> VTraceReturns:
    """V-trace targets ``vs`` and policy-gradient advantages from log importance weights.

    Args:
        log_rhos: ``[T, B, ...]`` log(pi(a_t|x_t) / mu(a_t|x_t)), target over behaviour policy.
        discounts: ``[T, B, ...]`` per-step discount gamma_t; 0 where the episode ends at step t.
        rewards: ``[T, B, ...]`` r_t.
        values: ``[T, B, ...]`` V(x_t) from the learner's baseline.
        bootstrap_value: ``[B, ...]`` V(x_T), the value of the state after the last step.
        clip_rho_threshold: rho_bar in the deltas; ``None`` disables clipping.
        clip_c_threshold: c_bar in the trace coefficients; ``None`` disables clipping.
        clip_pg_rho_threshold: rho_bar used for the policy-gradient advantages; ``None`` disables clipping.
        lambda_: trace-cutting factor in [0, 1], c_t = lambda_ * min(c_bar, rho_t) (paper, remark after eq. 1).

    Returns:
        ``VTraceReturns(vs, pg_advantages)``, each ``[T, B, ...]`` with the dtype and device of the
        inputs. They are targets, so they carry no gradient.
    """
    _check_threshold("clip_rho_threshold", clip_rho_threshold)
    _check_threshold("clip_c_threshold", clip_c_threshold)
    _check_threshold("clip_pg_rho_threshold", clip_pg_rho_threshold)
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_!r}")
    if values.dim() < 1 or values.shape[0] < 1:
        raise ValueError(f"values must be [T, B, ...] with T >= 1, got shape {tuple(values.shape)}")
    for name, tensor in (("log_rhos", log_rhos), ("discounts", discounts), ("rewards", rewards)):
        if tensor.shape != values.shape:
            raise ValueError(
                f"{name} must have the shape of values {tuple(values.shape)}, got {tuple(tensor.shape)}"
            )
    if bootstrap_value.shape != values.shape[1:]:
        raise ValueError(
            f"bootstrap_value must have shape values.shape[1:] = {tuple(values.shape[1:])}, "
            f"got {tuple(bootstrap_value.shape)}"
        )

    # The outputs are regression/advantage targets: gradients must not flow through them.
    with torch.no_grad():
        rhos = log_rhos.exp()
        clipped_rhos = _clip(rhos, clip_rho_threshold)
        cs = lambda_ * _clip(rhos, clip_c_threshold)

        values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)
        discount_cs = discounts * cs

        # vs_t - V(x_t) = delta_t + gamma_t c_t (vs_{t+1} - V(x_{t+1})): a linear recurrence backwards in t.
        vs_minus_v = reverse_linear_scan(deltas, discount_cs)
        vs = vs_minus_v.add_(values)

        vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        clipped_pg_rhos = _clip(rhos, clip_pg_rho_threshold)
        pg_advantages = clipped_pg_rhos * (rewards + discounts * vs_t_plus_1 - values)

    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)


def from_log_probs(
    behaviour_action_log_probs: Tensor,
    target_action_log_probs: Tensor,
    discounts: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_c_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    lambda_: float = 1.0,
) -> VTraceFromLogProbsReturns:
    """V-trace from the log-probabilities of the taken actions under mu (behaviour) and pi (target).

    Args:
        behaviour_action_log_probs: ``[T, B, ...]`` log mu(a_t|x_t), recorded by the actors.
        target_action_log_probs: ``[T, B, ...]`` log pi(a_t|x_t), from the learner.
        discounts, rewards, values, bootstrap_value, clip_*, lambda_: as in :func:`from_importance_weights`.

    Returns:
        ``VTraceFromLogProbsReturns``; ``vs`` and ``pg_advantages`` are gradient-free, while
        ``log_rhos`` and the log-probs are returned as given (they may carry gradient).
    """
    log_rhos = target_action_log_probs - behaviour_action_log_probs
    vtrace_returns = from_importance_weights(
        log_rhos=log_rhos.detach(),
        discounts=discounts,
        rewards=rewards,
        values=values,
        bootstrap_value=bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_c_threshold=clip_c_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
        lambda_=lambda_,
    )
    return VTraceFromLogProbsReturns(
        vs=vtrace_returns.vs,
        pg_advantages=vtrace_returns.pg_advantages,
        log_rhos=log_rhos,
        behaviour_action_log_probs=behaviour_action_log_probs,
        target_action_log_probs=target_action_log_probs,
    )


def action_log_probs(policy_logits: Tensor, actions: Tensor) -> Tensor:
    """log pi(a_t|x_t) of the taken actions: logits ``[T, B, A]``, actions ``[T, B]`` int64 -> ``[T, B]``."""
    if actions.shape != policy_logits.shape[:-1]:
        raise ValueError(
            f"actions must have shape policy_logits.shape[:-1] = {tuple(policy_logits.shape[:-1])}, "
            f"got {tuple(actions.shape)}"
        )
    log_probs = torch.log_softmax(policy_logits, dim=-1)
    return log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def from_logits(
    behaviour_policy_logits: Tensor,
    target_policy_logits: Tensor,
    actions: Tensor,
    discounts: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_c_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    lambda_: float = 1.0,
) -> VTraceFromLogProbsReturns:
    """V-trace from categorical policy logits, as in TorchBeast.

    Args:
        behaviour_policy_logits: ``[T, B, A]`` logits of mu, recorded by the actors.
        target_policy_logits: ``[T, B, A]`` logits of pi, from the learner.
        actions: ``[T, B]`` int64 actions taken by the actors.
        discounts, rewards, values, bootstrap_value, clip_*, lambda_: ``[T, B]`` / ``[B]``, as in
            :func:`from_importance_weights`.

    Returns:
        ``VTraceFromLogProbsReturns``; ``target_action_log_probs`` keeps its gradient.
    """
    if behaviour_policy_logits.shape != target_policy_logits.shape:
        raise ValueError(
            f"behaviour_policy_logits {tuple(behaviour_policy_logits.shape)} and target_policy_logits "
            f"{tuple(target_policy_logits.shape)} must have the same shape"
        )
    return from_log_probs(
        behaviour_action_log_probs=action_log_probs(behaviour_policy_logits, actions),
        target_action_log_probs=action_log_probs(target_policy_logits, actions),
        discounts=discounts,
        rewards=rewards,
        values=values,
        bootstrap_value=bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_c_threshold=clip_c_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
        lambda_=lambda_,
    )
