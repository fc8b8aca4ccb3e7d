"""Normalised value targets (lit_impala.core.value_normalization) against hand computations in float64, and
PopArt's promise: the denormalised values are exactly what they were after the statistics move."""

import math

import pytest
import torch
from torch import nn

from lit_impala.core import value_normalization as vn
from lit_impala.core.distributions import Categorical
from lit_impala.core.networks import ImpalaAgent

F64 = torch.float64


def test_merge_moments_by_hand():
    # mean 1, second moment 5; batch [2, 4]: E = 3, E[x^2] = 10; beta 0.25
    mean, second = vn.merge_moments(torch.tensor(1.0, dtype=F64), torch.tensor(5.0, dtype=F64), 0.25,
                                    torch.tensor([2.0, 4.0], dtype=F64))
    assert mean.item() == pytest.approx(0.75 * 1 + 0.25 * 3, rel=1e-15)
    assert second.item() == pytest.approx(0.75 * 5 + 0.25 * 10, rel=1e-15)


def test_std_of_by_hand_and_its_floor():
    assert vn.std_of(torch.tensor(1.5, dtype=F64), torch.tensor(6.25, dtype=F64), 1e-2).item() == 2.0
    assert vn.std_of(torch.tensor(3.0, dtype=F64), torch.tensor(9.0, dtype=F64), 1e-2).item() == 1e-2  # constant


def test_preserve_outputs_by_hand():
    # V = 2 * (w.h + b) + 1 with w = [1, -1], b = 0.5; new statistics mean 3, std 4
    weight, bias = torch.tensor([[1.0, -1.0]], dtype=F64), torch.tensor([0.5], dtype=F64)
    new_weight, new_bias = vn.preserve_outputs(weight, bias, torch.tensor(1.0, dtype=F64), torch.tensor(2.0, dtype=F64),
                                               torch.tensor(3.0, dtype=F64), torch.tensor(4.0, dtype=F64))
    torch.testing.assert_close(new_weight, torch.tensor([[0.5, -0.5]], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(new_bias, torch.tensor([(0.5 * 2 + 1 - 3) / 4], dtype=F64), rtol=0, atol=0)
    h = torch.tensor([0.3, -2.0], dtype=F64)
    before = 2 * (weight @ h + bias) + 1
    after = 4 * (new_weight @ h + new_bias) + 3
    torch.testing.assert_close(after, before, rtol=1e-15, atol=0)


def test_value_normalizer_starts_as_identity_then_takes_the_first_batch_whole():
    normalizer = vn.ValueNormalizer(beta=0.1)
    x = torch.tensor([1.0, -3.0], dtype=F64)
    torch.testing.assert_close(normalizer.normalize(x), x)
    normalizer.update(torch.tensor([2.0, 4.0, 6.0], dtype=F64))
    assert normalizer.mean.item() == pytest.approx(4.0)
    assert normalizer.std.item() == pytest.approx(math.sqrt(8 / 3))
    normalizer.update(torch.tensor([10.0], dtype=F64))  # now a moving average with beta 0.1
    assert normalizer.mean.item() == pytest.approx(0.9 * 4.0 + 0.1 * 10.0)
    torch.testing.assert_close(normalizer.denormalize(normalizer.normalize(x)), x)


def test_popart_update_keeps_every_denormalised_output_of_the_head():
    torch.manual_seed(0)
    normalizer = vn.ValueNormalizer(beta=0.5).double()
    head = nn.Linear(8, 1).double()
    features = torch.randn(32, 8, dtype=F64)
    # the first update starts the values at the targets' scale: the untrained head's outputs are not kept
    untrained = normalizer.denormalize(head(features).squeeze(-1))
    normalizer.update(torch.randn(64, dtype=F64) * 50 + 200, head)
    started = normalizer.denormalize(head(features).squeeze(-1))
    assert untrained.abs().max() < 5 and (started - 200).abs().max() < 100
    for targets in (torch.randn(64, dtype=F64) * 5 + 20, torch.randn(64, dtype=F64) * 3 - 7):
        before = normalizer.denormalize(head(features).squeeze(-1))
        normalizer.update(targets, head)
        after = normalizer.denormalize(head(features).squeeze(-1))
        torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-10)
    running = nn.Linear(8, 1).double()  # without the head ("running"), the values move with the statistics
    before = normalizer.denormalize(running(features).squeeze(-1))
    normalizer.update(torch.randn(64, dtype=F64) * 10 + 100)
    assert not torch.allclose(normalizer.denormalize(running(features).squeeze(-1)), before)


def test_agent_with_normalised_values_gives_denormalised_baselines_that_popart_preserves():
    torch.manual_seed(0)
    agent = ImpalaAgent((4,), Categorical(2), normalize_values=True, value_norm_beta=1.0)
    observation = torch.randn(5, 3, 4)
    raw = agent.baseline_head(agent.encoder(observation.reshape(-1, 4))).reshape(5, 3)
    torch.testing.assert_close(agent(observation).baseline, raw)  # identity before any update
    agent.value_normalizer.update(torch.randn(100) * 30 + 80, agent.baseline_head)  # the first: sets the scale
    assert agent.value_normalizer.std.item() > 10
    before = agent(observation).baseline
    agent.value_normalizer.update(torch.randn(100) * 3 + 8, agent.baseline_head)
    torch.testing.assert_close(agent(observation).baseline, before, rtol=1e-5, atol=1e-4)
    # the statistics are state: saved, loaded and shipped to the actors with the weights
    assert {"value_normalizer.mean", "value_normalizer.second_moment"} <= set(agent.state_dict())


def test_bad_beta_is_refused():
    with pytest.raises(ValueError, match="beta must be in"):
        vn.ValueNormalizer(beta=0.0)
