"""Tests for lit_impala.core.losses: each term against a hand computation, its gradients, reductions and weights."""

import pytest
import torch

from lit_impala.core import losses, vtrace

T, B = 3, 2
N = T * B


def small_tensors(requires_grad=True):
    """Fixed [T, B] float64 tensors, leaves so their .grad can be inspected."""
    t = dict(
        target_log_prob=[[-0.5, -1.0], [-2.0, -0.1], [-0.7, -3.0]],
        pg_advantages=[[1.0, -2.0], [0.5, 3.0], [-1.5, 0.25]],
        vs=[[1.0, 2.0], [-1.0, 0.5], [0.0, 4.0]],
        values=[[0.5, 2.5], [-2.0, 0.5], [1.0, 1.0]],
        entropy=[[1.2, 0.3], [0.9, 1.1], [0.4, 0.8]],
    )
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for k, v in t.items()}


def hand_sum(f, *tensors):
    """sum over every (t, b) of f(elements), in plain Python floats."""
    return sum(f(*(x[t, b].item() for x in tensors)) for t in range(T) for b in range(B))


@pytest.mark.parametrize("reduction, scale", [("mean", 1 / N), ("sum", 1.0)])
def test_policy_gradient_loss(reduction, scale):
    x = small_tensors()
    loss = losses.policy_gradient_loss(x["target_log_prob"], x["pg_advantages"], reduction=reduction)
    expected = scale * hand_sum(lambda lp, a: -lp * a, x["target_log_prob"], x["pg_advantages"])
    assert loss.item() == pytest.approx(expected, rel=1e-12)

    loss.backward()
    torch.testing.assert_close(x["target_log_prob"].grad, -scale * x["pg_advantages"].detach())
    assert x["pg_advantages"].grad is None  # advantages are constants


@pytest.mark.parametrize("reduction, scale", [("mean", 1 / N), ("sum", 1.0)])
def test_baseline_loss(reduction, scale):
    x = small_tensors()
    loss = losses.baseline_loss(x["vs"], x["values"], reduction=reduction)
    expected = scale * hand_sum(lambda vs, v: 0.5 * (vs - v) ** 2, x["vs"], x["values"])
    assert loss.item() == pytest.approx(expected, rel=1e-12)

    loss.backward()
    torch.testing.assert_close(x["values"].grad, -scale * (x["vs"] - x["values"]).detach())
    assert x["vs"].grad is None  # targets are constants


@pytest.mark.parametrize("reduction, scale", [("mean", 1 / N), ("sum", 1.0)])
def test_entropy_loss(reduction, scale):
    x = small_tensors()
    loss = losses.entropy_loss(x["entropy"], reduction=reduction)
    assert loss.item() == pytest.approx(-scale * hand_sum(lambda h: h, x["entropy"]), rel=1e-12)

    loss.backward()  # minimising the loss must push every entropy up
    torch.testing.assert_close(x["entropy"].grad, torch.full((T, B), -scale, dtype=torch.float64))


def test_sum_is_mean_times_number_of_elements():
    x = small_tensors(requires_grad=False)
    pairs = [
        (losses.policy_gradient_loss, (x["target_log_prob"], x["pg_advantages"])),
        (losses.baseline_loss, (x["vs"], x["values"])),
        (losses.entropy_loss, (x["entropy"],)),
    ]
    for fn, args in pairs:
        torch.testing.assert_close(fn(*args, reduction="sum"), N * fn(*args, reduction="mean"))


def test_default_reduction_is_sum():
    x = small_tensors(requires_grad=False)
    returns = vtrace.VTraceReturns(vs=x["vs"], pg_advantages=x["pg_advantages"])
    default = losses.impala_loss(x["target_log_prob"], x["entropy"], x["values"], returns)
    summed = losses.impala_loss(x["target_log_prob"], x["entropy"], x["values"], returns, reduction="sum")
    for a, b in zip(default, summed, strict=False):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("baseline_coef, ent_coef", [(0.5, 0.01), (0.25, 0.1), (0.0, 0.0)])
def test_impala_loss_weights_and_unweighted_terms(reduction, baseline_coef, ent_coef):
    x = small_tensors()
    returns = vtrace.VTraceReturns(vs=x["vs"], pg_advantages=x["pg_advantages"])
    terms = losses.impala_loss(
        x["target_log_prob"],
        x["entropy"],
        x["values"],
        returns,
        baseline_coef=baseline_coef,
        ent_coef=ent_coef,
        reduction=reduction,
    )
    assert isinstance(terms, losses.LossTerms)
    scale = 1 / N if reduction == "mean" else 1.0
    policy = scale * hand_sum(lambda lp, a: -lp * a, x["target_log_prob"], x["pg_advantages"])
    baseline = scale * hand_sum(lambda vs, v: 0.5 * (vs - v) ** 2, x["vs"], x["values"])
    entropy = -scale * hand_sum(lambda h: h, x["entropy"])
    # The stored terms are unweighted; only the total applies the coefficients.
    assert terms.policy.item() == pytest.approx(policy, rel=1e-12)
    assert terms.baseline.item() == pytest.approx(baseline, rel=1e-12)
    assert terms.entropy.item() == pytest.approx(entropy, rel=1e-12)
    assert terms.total.item() == pytest.approx(policy + baseline_coef * baseline + ent_coef * entropy, rel=1e-12)

    terms.total.backward()
    torch.testing.assert_close(x["values"].grad, -baseline_coef * scale * (x["vs"] - x["values"]).detach())
    torch.testing.assert_close(x["target_log_prob"].grad, -scale * x["pg_advantages"].detach())
    torch.testing.assert_close(x["entropy"].grad, torch.full((T, B), -ent_coef * scale, dtype=torch.float64))
    assert x["vs"].grad is None and x["pg_advantages"].grad is None


def test_impala_loss_with_vtrace_output_end_to_end():
    torch.manual_seed(0)
    values = torch.randn(T, B, dtype=torch.float64, requires_grad=True)
    target_log_prob = torch.randn(T, B, dtype=torch.float64, requires_grad=True)
    returns = vtrace.from_log_probs(
        behaviour_action_log_probs=torch.randn(T, B, dtype=torch.float64),
        target_action_log_probs=target_log_prob,
        discounts=torch.full((T, B), 0.9, dtype=torch.float64),
        rewards=torch.randn(T, B, dtype=torch.float64),
        values=values,
        bootstrap_value=torch.randn(B, dtype=torch.float64),
    )
    terms = losses.impala_loss(
        target_log_prob, torch.rand(T, B, dtype=torch.float64), values, returns, reduction="mean"
    )
    terms.total.backward()
    # Only the direct paths contribute: vs and pg_advantages are constants.
    torch.testing.assert_close(values.grad, -0.5 * (returns.vs - values).detach() / N)
    torch.testing.assert_close(target_log_prob.grad, -returns.pg_advantages / N)


@pytest.mark.parametrize("bad", ["median", "none", "MEAN"])
def test_invalid_reduction_raises(bad):
    x = small_tensors(requires_grad=False)
    returns = vtrace.VTraceReturns(vs=x["vs"], pg_advantages=x["pg_advantages"])
    calls = [
        lambda: losses.policy_gradient_loss(x["target_log_prob"], x["pg_advantages"], reduction=bad),
        lambda: losses.baseline_loss(x["vs"], x["values"], reduction=bad),
        lambda: losses.entropy_loss(x["entropy"], reduction=bad),
        lambda: losses.impala_loss(x["target_log_prob"], x["entropy"], x["values"], returns, reduction=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=repr(bad)):
            call()


def test_shape_mismatch_raises():
    # [T, B] against [T, B, 1] would silently broadcast to [T, B, B].
    x = small_tensors(requires_grad=False)
    with pytest.raises(ValueError, match="pg_advantages"):
        losses.policy_gradient_loss(x["target_log_prob"], x["pg_advantages"].unsqueeze(-1))
    with pytest.raises(ValueError, match="values"):
        losses.baseline_loss(x["vs"], x["values"].unsqueeze(-1))


# --- the clipped surrogate (APPO): written from PPO's objective, L = -sum min(r A, clip(r, 1-eps, 1+eps) A) ---

BEHAVIOUR_LOG_PROB = [[-0.6, -1.0], [-1.5, -0.4], [-0.7, -2.5]]  # ratios 1.105, 1, 0.607, 1.350, 1, 0.607


def hand_clipped_surrogate(lp, blp, a, eps):
    """One step's loss and d loss / d lp, by cases of PPO's objective in plain floats."""
    import math

    ratio = math.exp(lp - blp)
    clipped = min(max(ratio, 1 - eps), 1 + eps)
    if ratio * a <= clipped * a:  # the unclipped term is the min: its gradient flows, d ratio / d lp = ratio
        return -ratio * a, -ratio * a
    return -clipped * a, 0.0  # the clipped term is constant in lp


@pytest.mark.parametrize("reduction, scale", [("mean", 1 / N), ("sum", 1.0)])
@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_clipped_policy_gradient_loss_against_hand_cases(reduction, scale, eps):
    x = small_tensors()
    behaviour = torch.tensor(BEHAVIOUR_LOG_PROB, dtype=torch.float64)
    loss = losses.clipped_policy_gradient_loss(x["target_log_prob"], behaviour, x["pg_advantages"], eps, reduction)
    cases = [[hand_clipped_surrogate(x["target_log_prob"][t, b].item(), behaviour[t, b].item(),
                                     x["pg_advantages"][t, b].item(), eps) for b in range(B)] for t in range(T)]
    assert loss.item() == pytest.approx(scale * sum(c[0] for row in cases for c in row), rel=1e-12)

    loss.backward()
    expected_grad = torch.tensor([[scale * c[1] for c in row] for row in cases], dtype=torch.float64)
    torch.testing.assert_close(x["target_log_prob"].grad, expected_grad)
    # The data make both kinds of step: some gradients are cut, some flow.
    assert (expected_grad == 0).any() and (expected_grad != 0).any()


def test_clipped_surrogate_has_the_plain_gradient_on_policy():
    # At ratio 1 (the first pass on fresh data) APPO's step is IMPALA's.
    x, y = small_tensors(), small_tensors()
    losses.clipped_policy_gradient_loss(
        x["target_log_prob"], x["target_log_prob"].detach(), x["pg_advantages"], 0.2).backward()
    losses.policy_gradient_loss(y["target_log_prob"], y["pg_advantages"]).backward()
    torch.testing.assert_close(x["target_log_prob"].grad, y["target_log_prob"].grad)


def test_impala_loss_uses_the_clip_only_when_asked():
    x = small_tensors(requires_grad=False)
    behaviour = torch.tensor(BEHAVIOUR_LOG_PROB, dtype=torch.float64)
    returns = vtrace.VTraceReturns(vs=x["vs"], pg_advantages=x["pg_advantages"])
    args = (x["target_log_prob"], x["entropy"], x["values"], returns)
    plain = losses.impala_loss(*args, behaviour_log_prob=behaviour)
    clipped = losses.impala_loss(*args, behaviour_log_prob=behaviour, policy_clip=0.2)
    assert plain.policy.item() == pytest.approx(
        losses.policy_gradient_loss(x["target_log_prob"], x["pg_advantages"]).item(), rel=1e-12)
    assert clipped.policy.item() == pytest.approx(losses.clipped_policy_gradient_loss(
        x["target_log_prob"], behaviour, x["pg_advantages"], 0.2).item(), rel=1e-12)
    assert clipped.baseline.item() == plain.baseline.item() and clipped.entropy.item() == plain.entropy.item()
    with pytest.raises(ValueError, match="behaviour_log_prob"):
        losses.impala_loss(*args, policy_clip=0.2)
    with pytest.raises(ValueError, match="policy_clip must be > 0, got 0"):
        losses.clipped_policy_gradient_loss(x["target_log_prob"], behaviour, x["pg_advantages"], 0.0)


# --- the options of the family configs: advantage normalisation and the clipped value loss ----------------


def test_normalize_advantages_by_hand():
    advantages = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=torch.float64, requires_grad=True)
    normalized = losses.normalize_advantages(advantages, epsilon=0.0)
    std = (sum((a - 4.0) ** 2 for a in (1, 3, 5, 7)) / 4) ** 0.5  # population std: sqrt(5)
    torch.testing.assert_close(normalized, (advantages.detach() - 4.0) / std, rtol=1e-15, atol=0)
    assert not normalized.requires_grad  # advantages are constants of the policy gradient
    flat = losses.normalize_advantages(torch.full((3, 2), 2.5, dtype=torch.float64))
    assert torch.equal(flat, torch.zeros(3, 2, dtype=torch.float64))  # equal advantages: no division by zero


@pytest.mark.parametrize("reduction, scale", [("mean", 1 / N), ("sum", 1.0)])
def test_clipped_baseline_loss_by_hand(reduction, scale):
    x = small_tensors()
    behaviour_values = torch.tensor([[0.0, 2.0], [-1.0, 1.0], [1.2, 3.0]], dtype=torch.float64)
    eps = 0.3

    def hand(v, target, old):
        clipped = old + min(max(v - old, -eps), eps)
        return 0.5 * max((v - target) ** 2, (clipped - target) ** 2)

    loss = losses.clipped_baseline_loss(x["vs"], x["values"], behaviour_values, eps, reduction)
    expected = scale * hand_sum(hand, x["values"], x["vs"], behaviour_values)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # by hand: the gradient flows through whichever branch is larger; a clipped branch outside the clip has none
    for t in range(T):
        for b in range(B):
            v, target, old = x["values"][t, b].item(), x["vs"][t, b].item(), behaviour_values[t, b].item()
            clipped = old + min(max(v - old, -eps), eps)
            inside = -eps < v - old < eps
            grad = (v - target) if (v - target) ** 2 >= (clipped - target) ** 2 else ((clipped - target) if inside
                                                                                       else 0.0)
            assert x["values"].grad[t, b].item() == pytest.approx(scale * grad, abs=1e-12)


def test_clipped_baseline_loss_equals_the_plain_one_at_the_old_values():
    x = small_tensors()
    values = x["values"]
    plain = losses.baseline_loss(x["vs"], values)
    clipped = losses.clipped_baseline_loss(x["vs"], values, values.detach(), 0.2)
    assert clipped.item() == pytest.approx(plain.item(), rel=1e-15)


def test_impala_loss_uses_the_value_clip_only_when_asked():
    x = small_tensors(requires_grad=False)
    returns = vtrace.VTraceReturns(vs=x["vs"], pg_advantages=x["pg_advantages"])
    old = x["values"] + 1.0
    args = (x["target_log_prob"], x["entropy"], x["values"], returns)
    plain = losses.impala_loss(*args, behaviour_values=old)
    clipped = losses.impala_loss(*args, behaviour_values=old, value_clip=0.2)
    assert plain.baseline.item() == pytest.approx(losses.baseline_loss(x["vs"], x["values"]).item())
    assert clipped.baseline.item() == pytest.approx(
        losses.clipped_baseline_loss(x["vs"], x["values"], old, 0.2).item())
    with pytest.raises(ValueError, match="value_clip needs behaviour_values"):
        losses.impala_loss(*args, value_clip=0.2)
