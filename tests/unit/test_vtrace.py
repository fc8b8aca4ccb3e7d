"""Tests for lit_impala.core.vtrace against an independent float64 reference written as the paper's explicit
sum (eq. 1)."""

import re

import numpy as np
import pytest
import torch

from lit_impala.core import vtrace

THRESHOLD_NAMES = ("clip_rho_threshold", "clip_c_threshold", "clip_pg_rho_threshold")


def reference_vtrace(log_rhos, discounts, rewards, values, bootstrap_value, rho_bar, c_bar, pg_rho_bar, lambda_):
    """V-trace as the explicit sum of eq. 1, in float64 numpy (no backward recursion).

    v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i) delta_t V, with
    delta_t V = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)) and V(x_T) = bootstrap_value.
    Time is axis 0; any further axes are elementwise.
    """
    log_rhos, discounts, rewards, values, bootstrap_value = (
        np.asarray(a, dtype=np.float64) for a in (log_rhos, discounts, rewards, values, bootstrap_value)
    )
    T = values.shape[0]
    rhos = np.exp(log_rhos)
    clipped_rhos = rhos if rho_bar is None else np.minimum(rho_bar, rhos)
    cs = lambda_ * (rhos if c_bar is None else np.minimum(c_bar, rhos))
    pg_rhos = rhos if pg_rho_bar is None else np.minimum(pg_rho_bar, rhos)

    def value_at(t):
        return bootstrap_value if t == T else values[t]

    deltas = [clipped_rhos[t] * (rewards[t] + discounts[t] * value_at(t + 1) - values[t]) for t in range(T)]

    vs = np.empty_like(values)
    for s in range(T):
        total = values[s].copy()
        for t in range(s, T):
            weight = np.ones_like(values[s])
            for i in range(s, t):
                weight = weight * discounts[i] * cs[i]
            total = total + weight * deltas[t]
        vs[s] = total

    def vs_at(t):
        return bootstrap_value if t == T else vs[t]

    pg_advantages = np.stack(
        [pg_rhos[t] * (rewards[t] + discounts[t] * vs_at(t + 1) - values[t]) for t in range(T)]
    )
    return vs, pg_advantages


def make_inputs(T, batch_shape, seed=0, dtype=torch.float64):
    """Random inputs with rhos in [0.2, 3] (straddling every threshold used) and some zero discounts."""
    rng = np.random.default_rng(seed)
    shape = (T, *batch_shape)
    log_rhos = np.log(rng.uniform(0.2, 3.0, size=shape))
    # Episode ends (discount 0) in about a quarter of the steps.
    discounts = 0.99 * (rng.random(size=shape) > 0.25)
    rewards = rng.normal(size=shape)
    values = rng.normal(size=shape)
    bootstrap_value = rng.normal(size=batch_shape)
    arrays = dict(
        log_rhos=log_rhos, discounts=discounts, rewards=rewards, values=values, bootstrap_value=bootstrap_value
    )
    return arrays, {k: torch.tensor(v, dtype=dtype) for k, v in arrays.items()}


SHAPES = [(1, (4,)), (5, (3,)), (20, (8,)), (7, (3, 2))]
THRESHOLDS = [
    (1.0, 1.0, 1.0),
    (1.0, 0.8, 1.2),
    (None, None, None),
    (2.0, None, 0.5),
]


@pytest.mark.parametrize("T, batch_shape", SHAPES)
@pytest.mark.parametrize("rho_bar, c_bar, pg_rho_bar", THRESHOLDS)
@pytest.mark.parametrize("lambda_", [1.0, 0.9, 0.0])
def test_matches_explicit_sum_reference(T, batch_shape, rho_bar, c_bar, pg_rho_bar, lambda_):
    arrays, tensors = make_inputs(T, batch_shape, seed=T * 100 + len(batch_shape))
    rhos = np.exp(arrays["log_rhos"])
    if rhos.size >= 16:  # the premise of the test: clipping is actually exercised on both sides
        for bar in (rho_bar, c_bar, pg_rho_bar):
            if bar is not None:
                assert (rhos < bar).any() and (rhos > bar).any()
        assert (arrays["discounts"] == 0).any() and (arrays["discounts"] > 0).any()

    out = vtrace.from_importance_weights(
        **tensors,
        clip_rho_threshold=rho_bar,
        clip_c_threshold=c_bar,
        clip_pg_rho_threshold=pg_rho_bar,
        lambda_=lambda_,
    )
    ref_vs, ref_pg = reference_vtrace(**arrays, rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar, lambda_=lambda_)

    assert isinstance(out, vtrace.VTraceReturns)
    assert out.vs.shape == (T, *batch_shape) and out.pg_advantages.shape == (T, *batch_shape)
    np.testing.assert_allclose(out.vs.numpy(), ref_vs, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.pg_advantages.numpy(), ref_pg, rtol=0, atol=1e-10)


def test_clipping_changes_the_result():
    # Guards against a reference and implementation that both ignore the thresholds.
    _, tensors = make_inputs(10, (16,))
    clipped = vtrace.from_importance_weights(**tensors)
    unclipped = vtrace.from_importance_weights(
        **tensors, clip_rho_threshold=None, clip_c_threshold=None, clip_pg_rho_threshold=None
    )
    assert not torch.allclose(clipped.vs, unclipped.vs)
    assert not torch.allclose(clipped.pg_advantages, unclipped.pg_advantages)


@pytest.mark.parametrize("threshold", [None, 1.0])
def test_on_policy_is_bootstrapped_n_step_return(threshold):
    # With pi == mu (rho = 1) and lambda = 1, v_s is the discounted return bootstrapped from V(x_T),
    # whatever the values V(x_t) are.
    T, B = 6, 5
    arrays, tensors = make_inputs(T, (B,), seed=7)
    tensors["log_rhos"] = torch.zeros(T, B, dtype=torch.float64)
    out = vtrace.from_importance_weights(
        **tensors,
        clip_rho_threshold=threshold,
        clip_c_threshold=threshold,
        clip_pg_rho_threshold=threshold,
        lambda_=1.0,
    )
    r, g, v, bootstrap = arrays["rewards"], arrays["discounts"], arrays["values"], arrays["bootstrap_value"]
    expected = np.zeros((T, B))
    for s in range(T):
        discount = np.ones(B)
        for t in range(s, T):
            expected[s] += discount * r[t]
            discount = discount * g[t]
        expected[s] += discount * bootstrap
    np.testing.assert_allclose(out.vs.numpy(), expected, rtol=0, atol=1e-10)

    next_expected = np.concatenate([expected[1:], bootstrap[None]])
    np.testing.assert_allclose(out.pg_advantages.numpy(), r + g * next_expected - v, rtol=0, atol=1e-10)


def test_outputs_carry_no_gradient():
    _, tensors = make_inputs(5, (3,))
    tensors = {k: v.requires_grad_(True) for k, v in tensors.items()}
    out = vtrace.from_importance_weights(**tensors)
    for tensor in out:
        assert not tensor.requires_grad
        assert tensor.grad_fn is None


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NO_CUDA])]  # gpu: the GPU check runs it


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_preserved(dtype, device):
    arrays, tensors = make_inputs(8, (4,), dtype=dtype)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    out = vtrace.from_importance_weights(**tensors, clip_c_threshold=0.8, lambda_=0.9)
    ref_vs, ref_pg = reference_vtrace(**arrays, rho_bar=1.0, c_bar=0.8, pg_rho_bar=1.0, lambda_=0.9)
    for tensor in out:
        assert tensor.dtype == dtype
        assert tensor.device.type == device
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(out.vs.cpu().numpy(), ref_vs, rtol=tol, atol=tol)
    np.testing.assert_allclose(out.pg_advantages.cpu().numpy(), ref_pg, rtol=tol, atol=tol)


def test_inputs_not_modified():
    _, tensors = make_inputs(6, (3,))
    copies = {k: v.clone() for k, v in tensors.items()}
    vtrace.from_importance_weights(**tensors, lambda_=0.9)
    for k in tensors:
        assert torch.equal(tensors[k], copies[k]), k


@pytest.mark.parametrize("name", THRESHOLD_NAMES)
@pytest.mark.parametrize("bad", [0, -1, 0.0, -0.5])
def test_invalid_threshold_raises(name, bad):
    _, tensors = make_inputs(3, (2,))
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        vtrace.from_importance_weights(**tensors, **{name: bad})
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_invalid_lambda_raises(bad):
    _, tensors = make_inputs(3, (2,))
    with pytest.raises(ValueError, match="lambda_") as info:
        vtrace.from_importance_weights(**tensors, lambda_=bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("lambda_", [0.0, 1.0])
def test_lambda_bounds_are_valid(lambda_):
    _, tensors = make_inputs(3, (2,))
    vtrace.from_importance_weights(**tensors, lambda_=lambda_)


@pytest.mark.parametrize(
    "name, bad_shape",
    [
        ("bootstrap_value", (3,)),
        ("bootstrap_value", (4, 2)),
        ("rewards", (4, 3)),
        ("discounts", (5, 2)),
        ("log_rhos", (4, 2, 1)),
    ],
)
def test_shape_mismatch_raises(name, bad_shape):
    _, tensors = make_inputs(4, (2,))
    tensors[name] = torch.zeros(bad_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=name):
        vtrace.from_importance_weights(**tensors)


def numpy_log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("lambda_", [1.0, 0.9])
def test_from_logits_and_from_log_probs_agree_with_importance_weights(lambda_):
    T, B, A = 7, 5, 4
    rng = np.random.default_rng(3)
    arrays, tensors = make_inputs(T, (B,), seed=3)
    behaviour_logits = rng.normal(size=(T, B, A))
    target_logits = rng.normal(size=(T, B, A))
    actions = rng.integers(0, A, size=(T, B))

    def taken(logits):
        return np.take_along_axis(numpy_log_softmax(logits), actions[..., None], axis=-1)[..., 0]

    behaviour_lp, target_lp = taken(behaviour_logits), taken(target_logits)
    log_rhos = target_lp - behaviour_lp
    kwargs = dict(
        discounts=tensors["discounts"],
        rewards=tensors["rewards"],
        values=tensors["values"],
        bootstrap_value=tensors["bootstrap_value"],
        clip_rho_threshold=1.0,
        clip_c_threshold=0.8,
        clip_pg_rho_threshold=1.2,
        lambda_=lambda_,
    )
    expected = vtrace.from_importance_weights(log_rhos=torch.tensor(log_rhos), **kwargs)

    target_logits_t = torch.tensor(target_logits, requires_grad=True)
    from_logits = vtrace.from_logits(
        behaviour_policy_logits=torch.tensor(behaviour_logits),
        target_policy_logits=target_logits_t,
        actions=torch.tensor(actions, dtype=torch.int64),
        **kwargs,
    )
    from_log_probs = vtrace.from_log_probs(
        behaviour_action_log_probs=torch.tensor(behaviour_lp),
        target_action_log_probs=torch.tensor(target_lp),
        **kwargs,
    )
    for out in (from_logits, from_log_probs):
        assert isinstance(out, vtrace.VTraceFromLogProbsReturns)
        np.testing.assert_allclose(out.vs.numpy(), expected.vs.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.pg_advantages.numpy(), expected.pg_advantages.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.log_rhos.detach().numpy(), log_rhos, rtol=0, atol=1e-10)
        np.testing.assert_allclose(out.behaviour_action_log_probs.detach().numpy(), behaviour_lp, atol=1e-10)
        np.testing.assert_allclose(out.target_action_log_probs.detach().numpy(), target_lp, atol=1e-10)

    # The learner's log-probs keep their graph; the V-trace targets do not.
    assert from_logits.target_action_log_probs.requires_grad
    assert not from_logits.vs.requires_grad and not from_logits.pg_advantages.requires_grad


def test_from_logits_rejects_bad_actions_shape():
    T, B, A = 3, 2, 4
    _, tensors = make_inputs(T, (B,))
    del tensors["log_rhos"]
    logits = torch.zeros(T, B, A, dtype=torch.float64)
    with pytest.raises(ValueError, match="actions"):
        vtrace.from_logits(logits, logits, torch.zeros(T, B, 1, dtype=torch.int64), **tensors)


@pytest.mark.parametrize("rho_bar, c_bar", [(1.0, 1.0), (1.0, 0.8), (1.5, 1.0)])
def test_matches_torchrl(rho_bar, c_bar):
    """Secondary check against torchrl's vtrace on the semantics both share.

    torchrl is batch-first [B, T, 1], has a scalar gamma with done flags, no lambda, and uses rho_bar for
    the policy-gradient advantages, so we compare with gamma_t = gamma * (1 - done_t), lambda = 1 and
    clip_pg_rho_threshold = clip_rho_threshold.
    """
    functional = pytest.importorskip(
        "torchrl.objectives.value.functional", reason="torchrl's functional value estimators are the comparison"
    )
    T, B = 12, 6
    gamma = 0.75  # exactly representable: torchrl builds its discounts in the default (float32) dtype
    rng = np.random.default_rng(11)
    arrays, tensors = make_inputs(T, (B,), seed=11)
    done = rng.random(size=(T, B)) < 0.2
    done[3, 0] = True  # at least one termination
    tensors["discounts"] = torch.tensor(gamma * ~done, dtype=torch.float64)

    ours = vtrace.from_importance_weights(
        **tensors, clip_rho_threshold=rho_bar, clip_c_threshold=c_bar, clip_pg_rho_threshold=rho_bar, lambda_=1.0
    )

    def batch_first(x):  # [T, B] -> [B, T, 1]
        return x.transpose(0, 1).unsqueeze(-1)

    values = tensors["values"]
    next_values = torch.cat([values[1:], tensors["bootstrap_value"][None]])
    done_t = batch_first(torch.tensor(done))
    advantages, vs = functional.vtrace_advantage_estimate(
        gamma,
        batch_first(tensors["log_rhos"]),  # log_pi - log_mu = log_rhos
        torch.zeros(B, T, 1, dtype=torch.float64),
        batch_first(values),
        batch_first(next_values),
        batch_first(tensors["rewards"]),
        done_t,
        done_t,
        # As tensors: torchrl turns float thresholds into float32 ones (0.8 -> 0.800000011920929).
        rho_thresh=torch.tensor(rho_bar, dtype=torch.float64),
        c_thresh=torch.tensor(c_bar, dtype=torch.float64),
    )
    np.testing.assert_allclose(ours.vs.numpy(), vs.squeeze(-1).T.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.pg_advantages.numpy(), advantages.squeeze(-1).T.numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 7, 8, 9, 31, 64, 80, 129])
def test_reverse_linear_scan_matches_sequential_loop(T):
    """The log-depth scan against the plain backward loop y_t = x_t + c_t y_{t+1}, in float64."""
    rng = np.random.default_rng(T)
    inputs = rng.normal(size=(T, 5))
    coeffs = rng.uniform(0.0, 1.2, size=(T, 5)) * (rng.random(size=(T, 5)) > 0.2)  # zeros: episode ends
    expected = np.zeros_like(inputs)
    following = np.zeros(5)
    for t in reversed(range(T)):
        following = inputs[t] + coeffs[t] * following
        expected[t] = following
    inputs_t, coeffs_t = torch.tensor(inputs), torch.tensor(coeffs)
    result = vtrace.reverse_linear_scan(inputs_t, coeffs_t)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-12)
    # Inputs untouched, result is a fresh tensor.
    assert np.array_equal(inputs_t.numpy(), inputs) and np.array_equal(coeffs_t.numpy(), coeffs)


def test_float32_matches_float64_reference_at_benchmark_size():
    """At T = 80, B = 256 the float32 scan stays within float32 rounding of the float64 result."""
    arrays, tensors64 = make_inputs(80, (256,), seed=5)
    tensors32 = {k: v.float() for k, v in tensors64.items()}
    out64 = vtrace.from_importance_weights(**tensors64)
    out32 = vtrace.from_importance_weights(**tensors32)
    np.testing.assert_allclose(out32.vs.double().numpy(), out64.vs.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out32.pg_advantages.double().numpy(), out64.pg_advantages.numpy(), rtol=1e-5, atol=1e-5
    )
