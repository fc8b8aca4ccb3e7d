"""Dict observations and action masks: the packed layout, the network that reads it, and the masked distribution
against a float64 reference written from its definition (probabilities renormalised over the legal actions)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from lit_impala.core.distributions import Categorical, MultiCategorical
from lit_impala.core.networks import ImpalaAgent
from lit_impala.core.observation_parts import mask_logits, pack, parts_from_spec, split
from lit_impala.envs.dict_observation import PackDictObservation, dict_observation_parts
from lit_impala.envs.factory import describe_env, make_gym_env
from tests.masked_envs import MaskedTarget

# --- the masked distribution, float64 ------------------------------------------------------------------------


def reference_log_prob(logits: np.ndarray, legal: np.ndarray, action: int) -> float:
    """log pi(a) of the policy restricted to the legal actions: exp(l_a) / sum over legal j of exp(l_j)."""
    weights = np.exp(logits - logits.max()) * legal
    return float(np.log(weights[action] / weights.sum()))


def reference_entropy(logits: np.ndarray, legal: np.ndarray) -> float:
    weights = np.exp(logits - logits.max()) * legal
    probs = weights[legal.astype(bool)] / weights.sum()
    return float(-(probs * np.log(probs)).sum())


def random_masks(generator: torch.Generator, rows: int, actions: int) -> torch.Tensor:
    legal = torch.rand(rows, actions, generator=generator, dtype=torch.float64) < 0.6
    legal[torch.arange(rows), torch.randint(actions, (rows,), generator=generator)] = True  # at least one legal
    return legal


def test_masked_log_probs_entropy_and_vtrace_ratio_match_the_float64_reference():
    generator = torch.Generator().manual_seed(0)
    rows, actions = 64, 6
    legal = random_masks(generator, rows, actions)
    target_logits = torch.randn(rows, actions, generator=generator, dtype=torch.float64) * 3
    behaviour_logits = torch.randn(rows, actions, generator=generator, dtype=torch.float64) * 3
    distribution = Categorical(actions)
    # an action each row's behaviour policy could take
    chosen = torch.stack([torch.nonzero(row)[torch.randint(int(row.sum()), (1,), generator=generator)][0, 0]
                          for row in legal])

    target = distribution.log_prob(mask_logits(target_logits, legal), chosen)
    behaviour = distribution.log_prob(mask_logits(behaviour_logits, legal), chosen)
    entropy = distribution.entropy(mask_logits(target_logits, legal))
    for i in range(rows):
        mask, action = legal[i].numpy().astype(float), int(chosen[i])
        expected_target = reference_log_prob(target_logits[i].numpy(), mask, action)
        expected_behaviour = reference_log_prob(behaviour_logits[i].numpy(), mask, action)
        assert float(target[i]) == pytest.approx(expected_target, abs=1e-12)
        # V-trace's importance ratio pi / mu of the same masked distributions
        assert float(torch.exp(target[i] - behaviour[i])) == pytest.approx(
            np.exp(expected_target - expected_behaviour), rel=1e-12)
        assert float(entropy[i]) == pytest.approx(reference_entropy(target_logits[i].numpy(), mask), abs=1e-12)


def test_illegal_logits_get_no_gradient_and_every_gradient_is_finite():
    logits = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    legal = random_masks(torch.Generator().manual_seed(1), 8, 5)
    masked = mask_logits(logits, legal)
    chosen = legal.to(torch.float64).argmax(-1)  # a legal action of each row
    loss = -Categorical(5).log_prob(masked, chosen).sum() - Categorical(5).entropy(masked).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (logits.grad[~legal] == 0).all()


def test_illegal_actions_are_never_sampled_and_never_the_mode():
    generator = torch.Generator().manual_seed(2)
    legal = random_masks(generator, 16, 4)
    logits = torch.randn(16, 4, generator=generator) * 5
    logits[~legal] += 50.0  # the illegal actions would be the most likely ones unmasked
    masked = mask_logits(logits, legal)
    distribution = Categorical(4)
    samples = torch.stack([distribution.sample(masked) for _ in range(2000)])  # [2000, 16]
    assert legal.gather(1, samples.T).all()
    assert legal.gather(1, distribution.mode(masked).unsqueeze(1)).all()


def test_a_multi_discrete_mask_masks_each_component():
    distribution = MultiCategorical([3, 2])
    legal = torch.tensor([[1, 0, 1, 0, 1]], dtype=torch.bool)
    logits = torch.zeros(1, 5, dtype=torch.float64)
    samples = torch.stack([distribution.sample(mask_logits(logits, legal))[0] for _ in range(500)])
    assert set(samples[:, 0].tolist()) == {0, 2} and set(samples[:, 1].tolist()) == {1}
    log_prob = distribution.log_prob(mask_logits(logits, legal), torch.tensor([[2, 1]]))
    assert float(log_prob) == pytest.approx(np.log(0.5), abs=1e-12)


def test_a_row_without_any_legal_action_is_left_as_it_was():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(mask_logits(logits, torch.zeros(1, 3)), logits)


# --- the layout and the env side ------------------------------------------------------------------------------


def test_dict_spaces_become_parts_and_pack_and_split_invert_each_other():
    space = gym.spaces.Dict({
        "frame": gym.spaces.Box(0, 255, (6, 7, 3), dtype=np.uint8),
        "cells": gym.spaces.Box(0, 1, (4, 5, 2), dtype=np.bool_),
        "position": gym.spaces.Box(-1, 1, (2, 2), dtype=np.float32),
        "direction": gym.spaces.Discrete(4),
        "legal": gym.spaces.MultiBinary(3),
    })
    parts = dict_observation_parts(space, action_mask_key="legal")
    by_name = {part.name: part for part in parts}
    assert by_name["frame"].shape == (3, 6, 7) and by_name["frame"].kind == "image" and by_name["frame"].pixels
    assert by_name["cells"].shape == (2, 4, 5) and by_name["cells"].pixels
    assert by_name["position"].shape == (4,) and by_name["position"].kind == "vector"
    assert by_name["direction"].shape == (4,)
    assert by_name["legal"].kind == "mask"
    assert parts_from_spec([part.to_spec() for part in parts]) == parts

    class Fixed(gym.Env):
        observation_space, action_space = space, gym.spaces.Discrete(3)

    sample = space.sample()
    packed = PackDictObservation(Fixed(), "legal").observation(sample)
    entries = split(torch.as_tensor(packed)[None], parts)
    assert torch.equal(entries["frame"][0], torch.as_tensor(np.moveaxis(sample["frame"], -1, 0), dtype=torch.float32))
    assert torch.equal(entries["cells"][0], torch.as_tensor(np.moveaxis(sample["cells"], -1, 0) * 255.0,
                                                             dtype=torch.float32))
    assert int(entries["direction"][0].argmax()) == sample["direction"] and float(entries["direction"].sum()) == 1
    assert torch.equal(pack(entries, parts), torch.as_tensor(packed)[None])


@pytest.mark.parametrize(("options", "message"), [
    ({"action_mask_key": "nope"}, "action_mask_key 'nope' is not an entry"),
    ({"action_mask_key": "image"}, "action mask 'image' must be a MultiBinary(n)"),
    ({"action_mask_key": "action_mask", "observation_key": "image"}, "needs the whole dict observation"),
])
def test_bad_mask_settings_name_the_value(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        describe_env("tests.masked_envs:MaskedTarget-v0", **options)


def test_a_mask_key_on_a_plain_observation_is_refused():
    with pytest.raises(ValueError, match="action_mask_key 'action_mask' is for dict observations"):
        make_gym_env("CartPole-v1", action_mask_key="action_mask")


# --- the network reading the parts ---------------------------------------------------------------------------


def masked_target_network(**options) -> tuple[ImpalaAgent, object]:
    facts = describe_env("tests.masked_envs:MaskedTarget-v0", action_mask_key="action_mask")
    torch.manual_seed(0)
    network = ImpalaAgent(facts.observation_shape, Categorical(4), encoder="minatar",
                          observation_parts=facts.observation_parts, **options)
    return network, facts


def masked_target_observations(count: int) -> torch.Tensor:
    env = make_gym_env("tests.masked_envs:MaskedTarget-v0", action_mask_key="action_mask")
    observations = [env.reset(seed=0)[0]]
    while len(observations) < count:
        observations.append(env.step(env.action_space.sample())[0])
    return torch.as_tensor(np.stack(observations))


def test_the_network_masks_its_logits_and_acts_as_it_learns():
    network, facts = masked_target_network(normalize_observations=True, shared_encoder=False)
    observations = masked_target_observations(12)  # [12, D]
    legal = split(observations, facts.observation_parts)["action_mask"].bool()
    learner = network(observations.reshape(3, 4, -1)).policy_params.reshape(12, -1)  # [T, B] at once
    actor = torch.cat([network(row[None, None]).policy_params[0] for row in observations])  # one step at a time
    torch.testing.assert_close(actor, learner)
    assert (learner[~legal] == torch.finfo(learner.dtype).min).all()
    assert torch.isfinite(learner[legal]).all()


def test_each_part_reaches_the_network_and_the_normaliser_sees_the_vectors_only():
    network, facts = masked_target_network(normalize_observations=True)
    assert network.normalizer.mean.shape == (2,)  # the one-hot `shift`
    observations = masked_target_observations(8)
    network.normalizer.update(network.vector_parts(observations))
    baseline = network(observations[None]).baseline
    for name in ("image", "shift"):
        changed = split(observations.clone(), facts.observation_parts)
        changed[name] = changed[name].flip(0)  # another step's value of this part only
        assert not torch.allclose(network(pack(changed, facts.observation_parts)[None]).baseline, baseline), name


@pytest.mark.parametrize(("options", "message"), [
    ({"encoder": "mlp"}, "observation parts ['image'] are images: set the encoder to a pixel one"),
    ({"distribution": Categorical(5)}, "action mask 'action_mask' has 4 entries; the policy has 5 logits"),
])
def test_network_settings_that_do_not_fit_the_parts_are_refused(options, message):
    facts = describe_env("tests.masked_envs:MaskedTarget-v0", action_mask_key="action_mask")
    arguments = {"encoder": "minatar", "distribution": Categorical(4), **options}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ImpalaAgent(facts.observation_shape, observation_parts=facts.observation_parts, **arguments)


def test_the_test_env_counts_illegal_actions(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKED_TARGET_LOG_DIR", str(tmp_path))
    env = MaskedTarget()
    observation, _ = env.reset(seed=3)
    for _ in range(10):
        illegal = int(np.flatnonzero(observation["action_mask"] == 0)[0])
        observation, *_ = env.step(illegal)
    from tests.masked_envs import illegal_action_counts

    assert illegal_action_counts(tmp_path) == (10, 10)
