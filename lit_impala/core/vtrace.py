"""V-trace off-policy value targets and policy-gradient advantages (Espeholt et al. 2018, IMPALA, eq. 1).

Pure tensor functions, time-major ``[T, B, ...]``, with the DeepMind / TorchBeast names and argument order:
the positional arguments are exactly TorchBeast's and scalable_agent's (``..., bootstrap_value,
clip_rho_threshold, clip_pg_rho_threshold``). What they lack (``clip_c_threshold``, ``lambda_``,
``pg_target``) is keyword-only, so a positional call written for them either means the same here or
raises TypeError; it never silently means something else.

Conventions, and the references each one matches:

- ``pg_target="paper"`` (default): the policy-gradient advantage bootstraps from the V-trace target,
  ``q_t = r_t + gamma_t * v_{t+1}`` (paper, section 4.2). Matches the paper, TorchBeast, scalable_agent,
  seed_rl and EvoRL's "official" mode.
- ``pg_target="rlax"``: ``q_t = r_t + gamma_t * (lambda_t * v_{t+1} + (1 - lambda_t) * V(x_{t+1}))`` for
  ``t < T - 1`` and ``q_{T-1} = r_{T-1} + gamma_{T-1} * V(x_T)``. Matches rlax's
  ``vtrace_td_error_and_advantage``, Acme's IMPALA and EvoRL's "acme" mode. The two agree when lambda = 1.
- ``lambda_``: a float, or a tensor broadcastable to ``[T, B, ...]`` (rlax's per-step lambda);
  ``c_t = lambda_t * min(c_bar, rho_t)``. ``lambda_t`` is the lambda of step t, as in rlax.
- ``clip_c_threshold`` (c_bar): the references fix it at 1, our default.
- Several value heads, as TorchBeast and scalable_agent allow: every ``[T, B, ...]`` input has the same
  rank and T, and other dims are equal or 1 (``bootstrap_value`` is ``[B, ...]``, one rank less), e.g.
  ``[T, B, 1]`` log_rhos, discounts and rewards with ``[T, B, C]`` values and ``[B, C]`` bootstrap_value.
  Unequal ranks raise rather than align from the right: torch would pair B with C there.

Spelling: British ``behaviour``, kept on purpose: it is the paper's code (scalable_agent) and seed_rl's.
TorchBeast spells it ``behavior``: :func:`from_logits` and :func:`from_log_probs` accept its ``behavior_*``
keywords as aliases, and the returns have a ``behavior_action_log_probs`` property.

Names, theirs -> ours (SA: scalable_agent):

==============  ==================================================  ===================================================
reference       their name                                          ours
==============  ==================================================  ===================================================
TorchBeast, SA  ``from_importance_weights(log_rhos, ...)``          same names and positional order
TorchBeast, SA  ``from_logits(..., actions, ...)``                  same names and positional order, except:
TorchBeast      ``behavior_policy_logits``                          ``behaviour_policy_logits`` (alias accepted)
TorchBeast, SA  ``VTraceFromLogitsReturns``                         ``VTraceFromLogProbsReturns``, same fields, except:
TorchBeast      ``.behavior_action_log_probs``                      ``.behaviour_action_log_probs`` (property alias)
seed_rl         ``from_importance_weights(target_action_log_probs,  ``from_log_probs``: it takes the behaviour
                behaviour_action_log_probs, ...)``                  log-probs first, so pass these by keyword
seed_rl         ``lambda_`` (positional, after the thresholds)      ``lambda_`` (keyword-only)
rlax            ``vtrace_td_error_and_advantage``, one ``[T]``      ``from_importance_weights(...,
                trajectory (vmapped over B)                         pg_target="rlax")``, ``[T, B, ...]``; by keyword
rlax            ``v_tm1``                                           ``values``
rlax            ``v_t``                                             ``values[1:]``, ``bootstrap_value`` (= ``v_t[-1]``)
rlax            ``r_t``, ``discount_t``                             ``rewards``, ``discounts``
rlax            ``rho_tm1`` (``rho_t`` in older releases), a ratio  ``log_rhos``, its log
rlax            ``lambda_``, a scalar or ``[T]``                    ``lambda_``, a float or a tensor
rlax            ``clip_rho_threshold``, ``clip_pg_rho_threshold``   same
rlax            c_bar fixed at 1                                    ``clip_c_threshold=1.0``, the default
rlax            ``stop_target_gradients=True``                      always: the outputs carry no gradient
rlax            outputs ``errors``, ``pg_advantage``                ``vs - values``, ``pg_advantages``
rlax            output ``q_estimate``                               not returned
==============  ==================================================  ===================================================
"""

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from lit_impala.core.vtrace_inputs import accepts_american_spelling, broadcast_shape, check_lambda, check_threshold

PgTarget = Literal["paper", "rlax"]
PG_TARGETS: tuple[str, ...] = get_args(PgTarget)


class VTraceReturns(NamedTuple):
    """V-trace outputs, both ``[T, B, ...]`` and gradient-free."""

    vs: Tensor  # v_s, the V-trace value targets
    pg_advantages: Tensor  # rho_s * (q_s - V(x_s)), q_s as set by pg_target


class VTraceFromLogProbsReturns(NamedTuple):
    """V-trace outputs plus the log-probabilities they were computed from, all ``[T, B, ...]``."""

    vs: Tensor
    pg_advantages: Tensor
    log_rhos: Tensor
    behaviour_action_log_probs: Tensor
    target_action_log_probs: Tensor

    @property
    def behavior_action_log_probs(self) -> Tensor:
        """TorchBeast's spelling of ``behaviour_action_log_probs``."""
        return self.behaviour_action_log_probs


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
    clip_pg_rho_threshold: float | None = 1.0,
    *,
    clip_c_threshold: float | None = 1.0,
    lambda_: float | Tensor = 1.0,
    pg_target: PgTarget = "paper",
) -> VTraceReturns:
    """V-trace targets ``vs`` and policy-gradient advantages from log importance weights.

    Positional arguments as in TorchBeast and scalable_agent; the rest are keyword-only.

    Args:
        log_rhos: ``[T, B, ...]`` log(pi(a_t|x_t) / mu(a_t|x_t)), target over behaviour policy.
        discounts: ``[T, B, ...]`` per-step discount gamma_t; 0 where the episode ends at step t.
        rewards: ``[T, B, ...]`` r_t.
        values: ``[T, B, ...]`` V(x_t) from the learner's baseline.
        bootstrap_value: ``[B, ...]`` V(x_T), the value of the state after the last step.
        clip_rho_threshold: rho_bar in the deltas; ``None`` disables clipping.
        clip_pg_rho_threshold: rho_bar used for the policy-gradient advantages; ``None`` disables clipping.
        clip_c_threshold: c_bar in the trace coefficients; ``None`` disables clipping.
        lambda_: trace-cutting factor in [0, 1], c_t = lambda_t * min(c_bar, rho_t) (paper, remark after
            eq. 1): a float, or a tensor of no dims or of the inputs' rank broadcastable to ``[T, B, ...]``
            (per-step lambda, as rlax allows).
        pg_target: what the advantage bootstraps from, ``q_t - V(x_t)``. ``"paper"``: q_t = r_t + gamma_t *
            v_{t+1}. ``"rlax"``: q_t = r_t + gamma_t * (lambda_t * v_{t+1} + (1 - lambda_t) * V(x_{t+1})),
            which is r_t + gamma_t * V(x_T) at t = T - 1. Equal when lambda = 1; see the module docstring.

    The ``[T, B, ...]`` inputs have one rank and one T; their other dims, and those of bootstrap_value, are
    equal or 1 and broadcast (e.g. ``[T, B, 1]`` log_rhos with ``[T, B, C]`` values for C value heads).

    Returns:
        ``VTraceReturns(vs, pg_advantages)``, each of the broadcast ``[T, B, ...]`` shape, with the dtype and
        device of the inputs. They are targets, so they carry no gradient.
    """
    check_threshold("clip_rho_threshold", clip_rho_threshold)
    check_threshold("clip_c_threshold", clip_c_threshold)
    check_threshold("clip_pg_rho_threshold", clip_pg_rho_threshold)
    check_lambda(lambda_)
    if pg_target not in PG_TARGETS:
        raise ValueError(f"pg_target must be one of {PG_TARGETS}, got {pg_target!r}")
    time_major = {"log_rhos": log_rhos, "discounts": discounts, "rewards": rewards, "values": values}
    full = broadcast_shape(time_major, bootstrap_value, lambda_)

    # The outputs are regression/advantage targets: gradients must not flow through them.
    with torch.no_grad():
        if isinstance(lambda_, Tensor):
            # As a coefficient it must not promote the result (a float64 lambda with float32 inputs).
            lambda_ = lambda_.to(device=values.device, dtype=values.dtype)
        if bootstrap_value.shape != full[1:]:
            bootstrap_value = bootstrap_value.expand(full[1:])  # torch.cat does not broadcast
        if values.shape[1:] != full[1:]:
            values = values.expand(full)

        rhos = log_rhos.exp()
        clipped_rhos = _clip(rhos, clip_rho_threshold)
        cs = lambda_ * _clip(rhos, clip_c_threshold)

        values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)  # [T, B, ...] = full
        discount_cs = discounts * cs
        if discount_cs.shape != deltas.shape:
            discount_cs = discount_cs.expand_as(deltas)

        # vs_t - V(x_t) = delta_t + gamma_t c_t (vs_{t+1} - V(x_{t+1})): a linear recurrence backwards in t.
        vs_minus_v = reverse_linear_scan(deltas, discount_cs)
        vs = vs_minus_v.add_(values)

        vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        if pg_target == "rlax":
            # lambda_t v_{t+1} + (1 - lambda_t) V(x_{t+1}). At t = T - 1 both are V(x_T) (v_T is the bootstrap
            # value), so the last step bootstraps from V(x_T) exactly, as rlax does, with no special case.
            q_next = values_t_plus_1 + lambda_ * (vs_t_plus_1 - values_t_plus_1)
        else:
            q_next = vs_t_plus_1
        clipped_pg_rhos = _clip(rhos, clip_pg_rho_threshold)
        pg_advantages = clipped_pg_rhos * (rewards + discounts * q_next - values)

    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)


@accepts_american_spelling
def from_log_probs(
    behaviour_action_log_probs: Tensor,
    target_action_log_probs: Tensor,
    discounts: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    *,
    clip_c_threshold: float | None = 1.0,
    lambda_: float | Tensor = 1.0,
    pg_target: PgTarget = "paper",
) -> VTraceFromLogProbsReturns:
    """V-trace from the log-probabilities of the taken actions under mu (behaviour) and pi (target).

    Positional order of :func:`from_logits` with log-probs for logits and no actions. TorchBeast's
    ``behavior_action_log_probs=`` keyword is accepted for ``behaviour_action_log_probs``.

    Args:
        behaviour_action_log_probs: ``[T, B, ...]`` log mu(a_t|x_t), recorded by the actors.
        target_action_log_probs: ``[T, B, ...]`` log pi(a_t|x_t), from the learner.
        discounts, rewards, values, bootstrap_value, clip_*, lambda_, pg_target: as in
            :func:`from_importance_weights`.

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
        clip_pg_rho_threshold=clip_pg_rho_threshold,
        clip_c_threshold=clip_c_threshold,
        lambda_=lambda_,
        pg_target=pg_target,
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


@accepts_american_spelling
def from_logits(
    behaviour_policy_logits: Tensor,
    target_policy_logits: Tensor,
    actions: Tensor,
    discounts: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    *,
    clip_c_threshold: float | None = 1.0,
    lambda_: float | Tensor = 1.0,
    pg_target: PgTarget = "paper",
) -> VTraceFromLogProbsReturns:
    """V-trace from categorical policy logits, as in TorchBeast (same positional order).

    TorchBeast's ``behavior_policy_logits=`` keyword is accepted for ``behaviour_policy_logits``.

    Args:
        behaviour_policy_logits: ``[T, B, A]`` logits of mu, recorded by the actors.
        target_policy_logits: ``[T, B, A]`` logits of pi, from the learner.
        actions: ``[T, B]`` int64 actions taken by the actors.
        discounts, rewards, values, bootstrap_value, clip_*, lambda_, pg_target: ``[T, B]`` / ``[B]``, as in
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
        clip_pg_rho_threshold=clip_pg_rho_threshold,
        clip_c_threshold=clip_c_threshold,
        lambda_=lambda_,
        pg_target=pg_target,
    )
