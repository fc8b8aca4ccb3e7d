"""The check every remote rollout passes on arrival: a hand-built clean rollout ``[N=2, T=3]`` passes, and each
kind of corruption is named."""

import pytest
import torch
from tensordict import TensorDict

from lit_impala.actors.rollout_check import (
    RolloutSpec,
    rollout_problem,
    sample_sizes_of,
    structure_of,
    structure_problem,
)
from lit_impala.core.distributions import Categorical, DiagGaussian, MultiCategorical

N, T = 2, 3


def _rollout() -> TensorDict:
    return TensorDict({
        "observation": torch.zeros(N, T, 4),
        "policy_sample": torch.tensor([[0, 1, 1], [1, 0, 0]]),
        "behaviour_log_prob": torch.full((N, T), -0.69),
        "behaviour_value": torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.5, 1.0]]),
        "policy_version": torch.tensor([[3, 3, 4], [4, 4, 4]]),
        "is_init": torch.zeros(N, T, dtype=torch.bool),
        "next": {"observation": torch.zeros(N, T, 4), "reward": torch.ones(N, T, 1)},
    }, batch_size=[N, T])


SPEC = RolloutSpec(structure_of(_rollout()), sample_sizes=(2,))


def test_a_clean_rollout_passes():
    assert rollout_problem(_rollout(), SPEC, latest_version=4) is None
    almost_certain = _rollout().set("behaviour_log_prob", torch.full((N, T), 1e-6))  # log 1 plus float error
    assert rollout_problem(almost_certain, SPEC, latest_version=4) is None


@pytest.mark.parametrize(("corrupt", "problem"), [
    (lambda r: r["observation"].__setitem__((0, 1, 2), float("nan")), "observation has 1 non-finite value (NaN"),
    (lambda r: r["next", "reward"].__setitem__((1, 2), float("inf")), "next.reward has 1 non-finite value"),
    (lambda r: r["behaviour_value"].__setitem__((0, 2), float("nan")), "behaviour_value has 1 non-finite value"),
    (lambda r: r["behaviour_log_prob"].__setitem__((0, 0), 0.5),
     "behaviour_log_prob is above 0 (a log-probability) at 1 steps, up to 0.5"),
    (lambda r: r["policy_version"].__setitem__((1, 1), 5), "policy_version 3 .. 5 is outside 0 .. 4"),
    (lambda r: r["policy_version"].__setitem__((1, 1), -1), "policy_version -1 .. 4 is outside 0 .. 4"),
    (lambda r: r["policy_sample"].__setitem__((0, 0), 2), "policy_sample is outside 0 .. [1]"),
])
def test_each_corruption_is_named(corrupt, problem):
    rollout = _rollout()
    corrupt(rollout)
    assert rollout_problem(rollout, SPEC, latest_version=4).startswith(problem)


def test_another_structure_is_named():
    wider = TensorDict({**_rollout().to_dict(), "observation": torch.zeros(N, T, 5)}, batch_size=[N, T])
    assert structure_problem(wider, SPEC.fields) == "observation has shape [2, 3, 5], expected [2, 3, 4]"
    longer = TensorDict({k: torch.cat([v, v[:, :1]], 1) for k, v in _rollout().items(True, True)}, batch_size=[N, 4])
    assert rollout_problem(longer, SPEC, 4) == ("observation has shape [2, 4, 4], expected [2, 3, 4] "
                                                "(and 7 more fields differ)")
    doubles = _rollout().set("behaviour_log_prob", torch.zeros(N, T, dtype=torch.float64))
    assert structure_problem(doubles, SPEC.fields) == ("behaviour_log_prob has dtype torch.float64, "
                                                       "expected torch.float32")
    fewer = _rollout().exclude("is_init")
    assert structure_problem(fewer, SPEC.fields) == "keys differ: missing ['is_init'], unexpected []"
    no_values = _rollout().exclude("behaviour_value")  # every node's policy writes it: one without is refused
    assert structure_problem(no_values, SPEC.fields) == "keys differ: missing ['behaviour_value'], unexpected []"


def test_a_continuous_log_density_may_be_positive():
    continuous = RolloutSpec(SPEC.fields, sample_sizes=None)
    dense = _rollout().set("behaviour_log_prob", torch.full((N, T), 3.0))  # a narrow Gaussian's log-density
    assert rollout_problem(dense, continuous, latest_version=4) is None


def test_sample_sizes_follow_the_action_distribution():
    assert sample_sizes_of(Categorical(6)) == (6,)
    assert sample_sizes_of(MultiCategorical([3, 2])) == (3, 2)
    assert sample_sizes_of(DiagGaussian(2, low=-1.0, high=1.0)) is None
    assert sample_sizes_of(None) is None
