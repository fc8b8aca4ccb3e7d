"""lit_impala.core.vtrace's surface against the other references' conventions (issue 14).

TorchBeast's positional order, keyword-only extras, multi-head broadcasting, per-step lambda, the paper's and
rlax's policy-gradient targets, and TorchBeast's spelling. Ground truth is ``reference_loop`` below: a float64
transcription of the paper's recursion and of the rlax q-estimate, one Python step per t.
"""

import inspect
import re

import numpy as np
import pytest
import torch

from lit_impala.core import vtrace

ATOL = 1e-10


def reference_loop(
    log_rhos, discounts, rewards, values, bootstrap_value, lambdas, pg_target, rho_bar=1.0, c_bar=1.0, pg_rho_bar=1.0
):
    """V-trace in float64 numpy, one step of t at a time; every array ``[T, B]``, bootstrap_value ``[B]``.

    vs_t = V(x_t) + delta_t + gamma_t c_t (vs_{t+1} - V(x_{t+1})), vs_T = V(x_T) = bootstrap_value, with
    delta_t = min(rho_bar, rho_t) (r_t + gamma_t V(x_{t+1}) - V(x_t)) and c_t = lambda_t min(c_bar, rho_t)
    (paper, eq. 1 and remark 1). Advantage = min(pg_rho_bar, rho_t) (q_t - V(x_t)) with
      paper: q_t = r_t + gamma_t vs_{t+1};
      rlax:  q_t = r_t + gamma_t (lambda_t vs_{t+1} + (1 - lambda_t) V(x_{t+1})) for t < T - 1,
             q_{T-1} = r_{T-1} + gamma_{T-1} V(x_T).
    """
    log_rhos, discounts, rewards, values, bootstrap_value, lambdas = (
        np.asarray(a, dtype=np.float64) for a in (log_rhos, discounts, rewards, values, bootstrap_value, lambdas)
    )
    T = values.shape[0]
    lambdas = np.broadcast_to(lambdas, values.shape)
    rhos = np.exp(log_rhos)

    def value(t):
        return bootstrap_value if t == T else values[t]

    vs = [None] * (T + 1)
    vs[T] = bootstrap_value
    for t in reversed(range(T)):
        delta = min_or(rho_bar, rhos[t]) * (rewards[t] + discounts[t] * value(t + 1) - values[t])
        c = lambdas[t] * min_or(c_bar, rhos[t])
        vs[t] = values[t] + delta + discounts[t] * c * (vs[t + 1] - value(t + 1))

    advantages = []
    for t in range(T):
        if pg_target == "paper":
            q = rewards[t] + discounts[t] * vs[t + 1]
        elif t < T - 1:
            q = rewards[t] + discounts[t] * (lambdas[t] * vs[t + 1] + (1 - lambdas[t]) * values[t + 1])
        else:
            q = rewards[t] + discounts[t] * bootstrap_value
        advantages.append(min_or(pg_rho_bar, rhos[t]) * (q - values[t]))
    return np.stack(vs[:T]), np.stack(advantages)


def min_or(bar, rhos):
    return rhos if bar is None else np.minimum(bar, rhos)


def make_inputs(T, B, seed=0):
    """float64 ``[T, B]`` inputs (bootstrap ``[B]``) with rhos straddling 1 and some episode ends."""
    rng = np.random.default_rng(seed)
    arrays = dict(
        log_rhos=np.log(rng.uniform(0.2, 3.0, size=(T, B))),
        discounts=0.95 * (rng.random(size=(T, B)) > 0.2),
        rewards=rng.normal(size=(T, B)),
        values=rng.normal(size=(T, B)),
        bootstrap_value=rng.normal(size=B),
    )
    return arrays, {k: torch.tensor(v) for k, v in arrays.items()}


def assert_matches(out, ref_vs, ref_pg):
    np.testing.assert_allclose(out.vs.numpy(), ref_vs, rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.pg_advantages.numpy(), ref_pg, rtol=0, atol=ATOL)


# --- the policy-gradient target ------------------------------------------------------------------------


def test_two_step_example_paper_and_rlax_differ_by_half_in_the_first_step():
    # On-policy, gamma = 1, lambda = 0.5, V = 0 everywhere, reward 1 at the last step only:
    # vs_1 = 1 and vs_0 = 0 + 0.5 * (vs_1 - V_1) = 0.5 in both conventions.
    # paper: q_0 = r_0 + vs_1 = 1; rlax: q_0 = r_0 + 0.5 * vs_1 + 0.5 * V_1 = 0.5. At t = 1 both are r_1 + V_2 = 1.
    tensors = dict(
        log_rhos=torch.zeros(2, 1, dtype=torch.float64),
        discounts=torch.ones(2, 1, dtype=torch.float64),
        rewards=torch.tensor([[0.0], [1.0]], dtype=torch.float64),
        values=torch.zeros(2, 1, dtype=torch.float64),
        bootstrap_value=torch.zeros(1, dtype=torch.float64),
    )
    paper = vtrace.from_importance_weights(**tensors, lambda_=0.5)  # the default
    rlax = vtrace.from_importance_weights(**tensors, lambda_=0.5, pg_target="rlax")
    explicit = vtrace.from_importance_weights(**tensors, lambda_=0.5, pg_target="paper")
    assert all(torch.equal(a, b) for a, b in zip(paper, explicit, strict=False))

    assert paper.vs[:, 0].tolist() == rlax.vs[:, 0].tolist() == [0.5, 1.0]
    assert paper.pg_advantages[:, 0].tolist() == [1.0, 1.0]
    assert rlax.pg_advantages[:, 0].tolist() == [0.5, 1.0]
    assert (paper.pg_advantages - rlax.pg_advantages)[:, 0].tolist() == [0.5, 0.0]

    arrays = {k: v.numpy() for k, v in tensors.items()}
    for out, pg_target in ((paper, "paper"), (rlax, "rlax")):
        assert_matches(out, *reference_loop(**arrays, lambdas=0.5, pg_target=pg_target))


@pytest.mark.parametrize("pg_target", ["paper", "rlax"])
@pytest.mark.parametrize("lambda_", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("rho_bar, c_bar, pg_rho_bar", [(1.0, 1.0, 1.0), (1.5, 0.8, 0.7), (None, None, None)])
@pytest.mark.parametrize("T", [1, 2, 9])
def test_both_pg_targets_match_reference(pg_target, lambda_, rho_bar, c_bar, pg_rho_bar, T):
    arrays, tensors = make_inputs(T, 6, seed=T)
    out = vtrace.from_importance_weights(
        **tensors,
        clip_rho_threshold=rho_bar,
        clip_pg_rho_threshold=pg_rho_bar,
        clip_c_threshold=c_bar,
        lambda_=lambda_,
        pg_target=pg_target,
    )
    ref = reference_loop(
        **arrays, lambdas=lambda_, pg_target=pg_target, rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar
    )
    assert_matches(out, *ref)


def test_pg_targets_agree_at_lambda_one_and_differ_below():
    _, tensors = make_inputs(8, 5, seed=1)
    at_one = [vtrace.from_importance_weights(**tensors, pg_target=target) for target in ("paper", "rlax")]
    torch.testing.assert_close(at_one[0].pg_advantages, at_one[1].pg_advantages, rtol=0, atol=1e-12)
    below = [vtrace.from_importance_weights(**tensors, lambda_=0.7, pg_target=target) for target in ("paper", "rlax")]
    assert torch.equal(below[0].vs, below[1].vs)  # only the advantages depend on the target
    assert not torch.allclose(below[0].pg_advantages[:-1], below[1].pg_advantages[:-1])
    assert torch.equal(below[0].pg_advantages[-1], below[1].pg_advantages[-1])  # both bootstrap from V(x_T)


@pytest.mark.parametrize("bad", ["acme", "PAPER", "", None])
def test_unknown_pg_target_raises(bad):
    _, tensors = make_inputs(3, 2)
    with pytest.raises(ValueError, match=r"pg_target must be one of \('paper', 'rlax'\)"):
        vtrace.from_importance_weights(**tensors, pg_target=bad)


# --- positional order ------------------------------------------------------------------------------


def test_positional_thresholds_are_torchbeasts_rho_then_pg_rho():
    _, tensors = make_inputs(6, 4, seed=2)
    args = [tensors[k] for k in ("log_rhos", "discounts", "rewards", "values", "bootstrap_value")]
    positional = vtrace.from_importance_weights(*args, 1.0, 0.5)
    keyword = vtrace.from_importance_weights(*args, clip_rho_threshold=1.0, clip_pg_rho_threshold=0.5)
    assert torch.equal(positional.vs, keyword.vs) and torch.equal(positional.pg_advantages, keyword.pg_advantages)
    # What the old order made of the same call: c_bar = 0.5. It differs, so the check above has teeth.
    c_bar_half = vtrace.from_importance_weights(*args, clip_rho_threshold=1.0, clip_c_threshold=0.5)
    assert not torch.allclose(positional.pg_advantages, c_bar_half.pg_advantages)


def test_from_logits_and_from_log_probs_take_thresholds_positionally_in_torchbeasts_order():
    T, B, A = 5, 4, 3
    rng = np.random.default_rng(4)
    _, tensors = make_inputs(T, B, seed=4)
    behaviour_logits, target_logits = torch.tensor(rng.normal(size=(2, T, B, A)))
    actions = torch.tensor(rng.integers(0, A, size=(T, B)))
    rest = [tensors[k] for k in ("discounts", "rewards", "values", "bootstrap_value")]
    keywords = dict(clip_rho_threshold=1.0, clip_pg_rho_threshold=0.5)

    from_logits = vtrace.from_logits(behaviour_logits, target_logits, actions, *rest, 1.0, 0.5)
    expected = vtrace.from_logits(behaviour_logits, target_logits, actions, *rest, **keywords)
    assert torch.equal(from_logits.pg_advantages, expected.pg_advantages) and torch.equal(from_logits.vs, expected.vs)

    log_probs = (expected.behaviour_action_log_probs, expected.target_action_log_probs)
    from_log_probs = vtrace.from_log_probs(*log_probs, *rest, 1.0, 0.5)
    assert torch.equal(from_log_probs.pg_advantages, expected.pg_advantages)
    assert torch.equal(from_log_probs.vs, expected.vs)


TORCHBEAST_POSITIONAL = {
    "from_importance_weights": ["log_rhos", "discounts", "rewards", "values", "bootstrap_value"],
    "from_log_probs": [
        "behaviour_action_log_probs", "target_action_log_probs", "discounts", "rewards", "values", "bootstrap_value"
    ],
    "from_logits": [
        "behaviour_policy_logits", "target_policy_logits", "actions", "discounts", "rewards", "values",
        "bootstrap_value",
    ],
}


@pytest.mark.parametrize("name", list(TORCHBEAST_POSITIONAL))
def test_signature_is_torchbeasts_then_keyword_only_extras(name):
    parameters = inspect.signature(getattr(vtrace, name)).parameters.values()
    positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword_only = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert positional == TORCHBEAST_POSITIONAL[name] + ["clip_rho_threshold", "clip_pg_rho_threshold"]
    assert keyword_only == ["clip_c_threshold", "lambda_", "pg_target"]


def test_c_bar_or_lambda_passed_positionally_raise_type_error():
    _, tensors = make_inputs(4, 3)
    args = [tensors[k] for k in ("log_rhos", "discounts", "rewards", "values", "bootstrap_value")]
    with pytest.raises(TypeError):
        vtrace.from_importance_weights(*args, 1.0, 1.0, 0.5)  # the old (rho, c, pg_rho) order
    with pytest.raises(TypeError):
        vtrace.from_importance_weights(*args, 1.0, 1.0, 1.0, 0.9)  # seed_rl-style positional lambda
    log_probs = (tensors["log_rhos"], torch.zeros_like(tensors["log_rhos"]))
    with pytest.raises(TypeError):
        vtrace.from_log_probs(*log_probs, *args[1:], 1.0, 1.0, 0.5)
    logits, actions = torch.zeros(4, 3, 2, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(TypeError):
        vtrace.from_logits(logits, logits, actions, *args[1:], 1.0, 1.0, 0.5)


# --- broadcasting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pg_target", ["paper", "rlax"])
def test_three_value_heads_match_reference_per_head(pg_target):
    T, B, C = 7, 4, 3
    arrays, tensors = make_inputs(T, B, seed=5)
    rng = np.random.default_rng(6)
    values = rng.normal(size=(T, B, C))
    bootstrap = rng.normal(size=(B, C))
    lambda_ = 0.6
    out = vtrace.from_importance_weights(
        tensors["log_rhos"][..., None],
        tensors["discounts"][..., None],
        tensors["rewards"][..., None],
        torch.tensor(values),
        torch.tensor(bootstrap),
        clip_c_threshold=0.9,
        lambda_=lambda_,
        pg_target=pg_target,
    )
    assert out.vs.shape == out.pg_advantages.shape == (T, B, C)
    shared = {k: arrays[k] for k in ("log_rhos", "discounts", "rewards")}
    for head in range(C):
        ref_vs, ref_pg = reference_loop(
            **shared, values=values[..., head], bootstrap_value=bootstrap[..., head], lambdas=lambda_,
            pg_target=pg_target, c_bar=0.9,
        )
        np.testing.assert_allclose(out.vs[..., head].numpy(), ref_vs, rtol=0, atol=ATOL)
        np.testing.assert_allclose(out.pg_advantages[..., head].numpy(), ref_pg, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "shapes",
    [
        # log_rhos, discounts, rewards, values, bootstrap_value
        ((5, 2, 1), (5, 2, 1), (5, 2, 1), (5, 2, 3), (2, 3)),
        ((5, 2, 3), (5, 2, 1), (5, 2, 3), (5, 2, 1), (2, 1)),  # values and bootstrap broadcast up
        ((5, 2, 1), (5, 1, 1), (5, 2, 3), (5, 2, 3), (1, 3)),
        ((5, 2, 3), (5, 2, 3), (5, 2, 3), (5, 2, 3), (2, 1)),
    ],
)
def test_broadcasting_equals_explicit_expansion(shapes):
    rng = np.random.default_rng(7)
    names = ("log_rhos", "discounts", "rewards", "values", "bootstrap_value")
    small = {name: torch.tensor(rng.uniform(-1.0, 1.0, size=shape)) for name, shape in zip(names, shapes, strict=False)}
    full = (5, 2, 3)
    expanded = {name: t.expand(full if name != "bootstrap_value" else full[1:]) for name, t in small.items()}
    for pg_target in ("paper", "rlax"):
        out = vtrace.from_importance_weights(**small, lambda_=0.8, pg_target=pg_target)
        ref_vs, ref_pg = zip(*(
            reference_loop(
                **{name: t[:, :, head].numpy() if t.dim() == 3 else t[:, head].numpy() for name, t in expanded.items()},
                lambdas=0.8, pg_target=pg_target,
            )
            for head in range(full[-1])
        ), strict=False)
        assert out.vs.shape == full
        np.testing.assert_allclose(out.vs.numpy(), np.stack(ref_vs, axis=-1), rtol=0, atol=ATOL)
        np.testing.assert_allclose(out.pg_advantages.numpy(), np.stack(ref_pg, axis=-1), rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("rewards", (4, 2, 2)),  # 2 vs 3 value heads
        ("log_rhos", (4, 2)),  # rank 2 with rank-3 values: torch would pair B with C
        ("discounts", (5, 2, 1)),  # another T
        ("bootstrap_value", (2, 2)),
        ("bootstrap_value", (3,)),  # rank
        ("lambda_", (4, 2, 2)),
        ("lambda_", (4, 2)),  # per-step lambda must have the rank of the inputs
    ],
)
def test_incompatible_shapes_raise_naming_the_shapes(name, shape):
    T, B, C = 4, 2, 3
    inputs = dict(
        log_rhos=torch.zeros(T, B, 1),
        discounts=torch.full((T, B, 1), 0.9),
        rewards=torch.ones(T, B, 1),
        values=torch.zeros(T, B, C),
        bootstrap_value=torch.zeros(B, C),
    )
    inputs[name] = torch.full(shape, 0.5)
    with pytest.raises(ValueError) as info:
        vtrace.from_importance_weights(**inputs)
    message = str(info.value)
    assert message.startswith(f"{name} {shape}")
    assert f"values {(T, B, C)}" in message and f"bootstrap_value {tuple(inputs['bootstrap_value'].shape)}" in message


# --- lambda ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pg_target", ["paper", "rlax"])
@pytest.mark.parametrize("lambda_shape", [(9, 5), (9, 1), (1, 5)])
def test_per_step_lambda_matches_reference(pg_target, lambda_shape):
    T, B = 9, 5
    arrays, tensors = make_inputs(T, B, seed=8)
    lambdas = np.random.default_rng(9).uniform(0.0, 1.0, size=lambda_shape)
    lambdas[0] = 0.0  # the bounds are valid
    lambdas[-1] = 1.0
    out = vtrace.from_importance_weights(
        **tensors, clip_c_threshold=1.2, lambda_=torch.tensor(lambdas), pg_target=pg_target
    )
    assert_matches(out, *reference_loop(**arrays, lambdas=lambdas, pg_target=pg_target, c_bar=1.2))


@pytest.mark.parametrize("pg_target", ["paper", "rlax"])
def test_constant_lambda_tensor_equals_float(pg_target):
    _, tensors = make_inputs(6, 3, seed=10)
    as_float = vtrace.from_importance_weights(**tensors, lambda_=0.9, pg_target=pg_target)
    for lambda_ in (torch.tensor(0.9, dtype=torch.float64), torch.full((6, 3), 0.9, dtype=torch.float64)):
        as_tensor = vtrace.from_importance_weights(**tensors, lambda_=lambda_, pg_target=pg_target)
        torch.testing.assert_close(as_tensor.vs, as_float.vs, rtol=0, atol=1e-14)
        torch.testing.assert_close(as_tensor.pg_advantages, as_float.pg_advantages, rtol=0, atol=1e-14)


def test_float64_lambda_tensor_does_not_promote_float32_outputs():
    _, tensors = make_inputs(5, 3, seed=11)
    tensors32 = {k: v.float() for k, v in tensors.items()}
    out = vtrace.from_importance_weights(**tensors32, lambda_=torch.full((5, 3), 0.5, dtype=torch.float64))
    assert out.vs.dtype == out.pg_advantages.dtype == torch.float32


@pytest.mark.parametrize("bad", [[0.5, 1.5], [-0.1, 0.5], [float("nan"), 0.5]])
def test_lambda_tensor_outside_unit_interval_raises(bad):
    _, tensors = make_inputs(2, 1)
    with pytest.raises(ValueError, match=r"lambda_ must be in \[0, 1\], got a tensor"):
        vtrace.from_importance_weights(**tensors, lambda_=torch.tensor(bad, dtype=torch.float64)[:, None])


# --- gradients and spelling ------------------------------------------------------------------------


@pytest.mark.parametrize("pg_target", ["paper", "rlax"])
def test_outputs_carry_no_gradient_with_heads_and_lambda_tensor(pg_target):
    T, B, C = 5, 3, 2
    inputs = dict(
        log_rhos=torch.randn(T, B, 1, dtype=torch.float64),
        discounts=torch.full((T, B, 1), 0.9, dtype=torch.float64),
        rewards=torch.randn(T, B, 1, dtype=torch.float64),
        values=torch.randn(T, B, C, dtype=torch.float64),
        bootstrap_value=torch.randn(B, C, dtype=torch.float64),
    )
    inputs = {k: v.requires_grad_(True) for k, v in inputs.items()}
    lambda_ = torch.full((T, B, 1), 0.7, dtype=torch.float64, requires_grad=True)
    out = vtrace.from_importance_weights(**inputs, lambda_=lambda_, pg_target=pg_target)
    for tensor in out:
        assert not tensor.requires_grad and tensor.grad_fn is None

    target = inputs["log_rhos"]
    from_log_probs = vtrace.from_log_probs(
        torch.zeros(T, B, 1, dtype=torch.float64), target, inputs["discounts"], inputs["rewards"],
        inputs["values"], inputs["bootstrap_value"], lambda_=lambda_, pg_target=pg_target,
    )
    assert not from_log_probs.vs.requires_grad and not from_log_probs.pg_advantages.requires_grad
    assert from_log_probs.target_action_log_probs.requires_grad  # the learner's log-probs keep their graph


def test_torchbeast_american_spelling_is_accepted():
    T, B, A = 4, 3, 5
    rng = np.random.default_rng(12)
    _, tensors = make_inputs(T, B, seed=12)
    rest = {k: tensors[k] for k in ("discounts", "rewards", "values", "bootstrap_value")}
    behaviour_logits, target_logits = torch.tensor(rng.normal(size=(2, T, B, A)))
    actions = torch.tensor(rng.integers(0, A, size=(T, B)))

    british = vtrace.from_logits(
        behaviour_policy_logits=behaviour_logits, target_policy_logits=target_logits, actions=actions, **rest
    )
    american = vtrace.from_logits(
        behavior_policy_logits=behaviour_logits, target_policy_logits=target_logits, actions=actions, **rest
    )
    for field in vtrace.VTraceFromLogProbsReturns._fields:
        assert torch.equal(getattr(british, field), getattr(american, field)), field
    assert american.behavior_action_log_probs is american.behaviour_action_log_probs

    log_probs = vtrace.from_log_probs(
        behavior_action_log_probs=british.behaviour_action_log_probs,
        target_action_log_probs=british.target_action_log_probs,
        **rest,
    )
    assert torch.equal(log_probs.pg_advantages, british.pg_advantages)

    with pytest.raises(TypeError, match=re.escape("both 'behaviour_policy_logits' and its alias")):
        vtrace.from_logits(
            behaviour_policy_logits=behaviour_logits, behavior_policy_logits=behaviour_logits,
            target_policy_logits=target_logits, actions=actions, **rest,
        )
