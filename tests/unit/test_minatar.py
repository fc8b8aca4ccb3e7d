"""MinAtar (Young & Tian 2019) as a pixel task: boolean [10, 10, C] images carried as uint8 [C, 10, 10]
(0 / 255), and the MinAtar paper's small encoder."""

import numpy as np
import pytest
import torch
from torch import nn

from lit_impala.core.distributions import Categorical
from lit_impala.core.encoders import MinAtarEncoder
from lit_impala.core.networks import ImpalaAgent
from lit_impala.envs.factory import describe_env, make_gym_env, make_vector_env

minatar_gym = pytest.importorskip("minatar.gym", reason='the minatar extra is missing: pip install -e ".[minatar]"')


def test_boolean_channels_become_uint8_pixels_channels_first():
    import gymnasium as gym

    minatar_gym.register_envs()
    raw = gym.make("MinAtar/Breakout-v1")
    ours = make_gym_env("MinAtar/Breakout-v1")
    raw_obs, _ = raw.reset(seed=3)
    obs, _ = ours.reset(seed=3)
    assert obs.shape == (4, 10, 10) and obs.dtype == np.uint8 and set(np.unique(obs)) <= {0, 255}
    assert np.array_equal(obs, np.moveaxis(raw_obs, -1, 0).astype(np.uint8) * 255)
    for action in (0, 1, 2, 1):
        raw_obs, raw_reward, *_ = raw.step(action)
        obs, reward, *_ = ours.step(action)
        assert np.array_equal(obs, np.moveaxis(raw_obs, -1, 0).astype(np.uint8) * 255) and reward == raw_reward


@pytest.mark.parametrize("game, channels, actions", [("Breakout", 4, 3), ("Asterix", 4, 5), ("Freeway", 7, 3)])
def test_every_game_is_described_as_a_uint8_image(game, channels, actions):
    facts = describe_env(f"MinAtar/{game}-v1")
    assert facts.observation_shape == (channels, 10, 10) and facts.observation_dtype == "uint8"
    assert facts.action_space.n == actions


def test_vector_env_carries_uint8_observations():
    env = make_vector_env("MinAtar/Breakout-v1", 3, seed=0)
    rollout = env.rollout(50, break_when_any_done=False)
    assert rollout["observation"].shape == (3, 50, 4, 10, 10) and rollout["observation"].dtype == torch.uint8
    env.close()


def test_minatar_encoder_is_the_papers_network():
    encoder = MinAtarEncoder((4, 10, 10))
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [(4, 16, 3, 1)]
    assert encoder.fc.in_features == 8 * 8 * 16 and encoder.fc.out_features == 128
    pixels = torch.randint(0, 2, (5, 4, 10, 10), dtype=torch.uint8) * 255
    torch.testing.assert_close(encoder(pixels), encoder(pixels.float() / 255.0))


def test_agent_with_the_minatar_encoder_and_the_nature_cnn_refusing_10x10():
    agent = ImpalaAgent((4, 10, 10), Categorical(3), "minatar", feature_dim=128)
    output = agent(torch.zeros(2, 3, 4, 10, 10, dtype=torch.uint8), agent.initial_state(3))
    assert output.policy_params.shape == (2, 3, 3) and output.baseline.shape == (2, 3)
    with pytest.raises(ValueError, match=r"observation shape \(4, 10, 10\) is too small for the 'nature' encoder"):
        ImpalaAgent((4, 10, 10), Categorical(3), "nature")
