"""Atari preprocessing on real ALE games, checked against a raw frameskip-1 ALE env stepped by hand."""

import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from lit_impala.core.encoders import ResNetEncoder
from lit_impala.envs.atari import is_atari_id, make_atari_env
from lit_impala.envs.factory import describe_env, make_gym_env, make_vector_env

ale_py = pytest.importorskip("ale_py", reason='the atari extra is not installed: pip install -e ".[atari]"')
cv2 = pytest.importorskip("cv2", reason='the atari extra is not installed: pip install -e ".[atari]"')
gym.register_envs(ale_py)


def resize(frame):
    return cv2.resize(frame, (84, 84), interpolation=cv2.INTER_AREA)


def raw_env(env_id):
    """The reference: one ALE frame per step, no sticky actions, the ALE's grayscale screen."""
    return gym.make(env_id, frameskip=1, repeat_action_probability=0.0, obs_type="grayscale")


def test_observations_are_stacks_of_four_84x84_uint8_frames():
    env = make_atari_env("ALE/Pong-v5", render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert env.observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert all(np.array_equal(frame, obs[-1]) for frame in obs)  # after a reset the first frame is repeated
    previous = obs
    for action in (0, 2, 3, 1):
        obs, *_ = env.step(action)
        assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
        assert np.array_equal(obs[:-1], previous[1:])  # oldest first; one new frame per step
        previous = obs
    assert env.render().shape == (210, 160, 3)  # videos show the full colour screen
    env.close()


def test_frame_skip_sums_raw_rewards_and_max_pools_the_last_two_frames():
    # A whole Breakout game of random actions, each played once through the pipeline and as 4 raw
    # frames of the reference. Grayscale is the ALE's own (both envs read it), so the expected frame
    # is computed with the same cv2.resize and must match exactly.
    env, raw = make_atari_env("ALE/Breakout-v5", noop_max=0), raw_env("ALE/Breakout-v5")
    obs, _ = env.reset(seed=1)
    frame, _ = raw.reset(seed=1)
    assert np.array_equal(obs[-1], resize(frame))
    rng = np.random.default_rng(0)
    total = raw_total = 0.0
    pooling_mattered = False
    terminated = truncated = False
    while not (terminated or truncated):
        action = int(rng.integers(env.action_space.n))
        obs, reward, terminated, truncated, _ = env.step(action)
        frames, raw_rewards = [], []
        for _ in range(4):
            frame, raw_reward, raw_terminated, raw_truncated, _ = raw.step(action)
            frames.append(frame)
            raw_rewards.append(raw_reward)
            if raw_terminated or raw_truncated:
                break  # a game over inside the skip: the observation pools the last frames played
        expected = resize(np.maximum(frames[-2], frames[-1]) if len(frames) > 1 else frames[-1])
        assert reward == sum(raw_rewards)
        assert np.array_equal(obs[-1], expected)
        assert (terminated, truncated) == (raw_terminated, raw_truncated)
        pooling_mattered |= not np.array_equal(expected, resize(frames[-1]))
        total += reward
        raw_total += sum(raw_rewards)
    assert terminated and total == raw_total > 0  # the logged return is the game score
    assert pooling_mattered  # the ball flickers: max-pooling changed some observations
    assert len(frames) < 4, "with these seeds the game ends inside the last skip; the final frame is still exact"
    env.close()
    raw.close()


def test_same_frames_as_gymnasium_atari_preprocessing_but_a_real_final_frame():
    # gymnasium's AtariPreprocessing (Machado et al. 2018) with FrameStackObservation is the reference
    # pipeline; on the game-over step it returns the previous step's frames, we return the real last screen.
    env = make_atari_env("ALE/Breakout-v5", noop_max=0)
    reference = gym.wrappers.FrameStackObservation(
        gym.wrappers.AtariPreprocessing(raw_env("ALE/Breakout-v5"), noop_max=0, frame_skip=4, screen_size=84), 4
    )
    assert np.array_equal(env.reset(seed=2)[0], reference.reset(seed=2)[0])
    rng = np.random.default_rng(2)
    terminated = False
    while not terminated:
        action = int(rng.integers(env.action_space.n))
        obs, reward, terminated, truncated, _ = env.step(action)
        reference_obs, reference_reward, *ends, _ = reference.step(action)
        assert [terminated, truncated] == ends and reward == reference_reward
        assert np.array_equal(obs[:-1], reference_obs[:-1])
        if not terminated:
            assert np.array_equal(obs[-1], reference_obs[-1])
    assert not np.array_equal(obs[-1], reference_obs[-1])
    env.close()
    reference.close()


def test_noop_reset_is_random_but_fixed_by_the_seed():
    env = make_atari_env("ALE/Pong-v5", noop_max=30)
    ale = env.unwrapped.ale

    def frames_after_reset(seed):
        env.reset(seed=seed)
        return ale.getEpisodeFrameNumber()

    counts = [frames_after_reset(seed) for seed in range(6)]
    assert all(1 <= n <= 30 for n in counts) and len(set(counts)) > 1, counts
    assert [frames_after_reset(seed) for seed in range(6)] == counts
    env.close()
    env = make_atari_env("ALE/Pong-v5", noop_max=0)
    env.reset(seed=0)
    assert env.unwrapped.ale.getEpisodeFrameNumber() == 0
    env.close()


def test_rewards_are_not_clipped():
    env = make_atari_env("ALE/SpaceInvaders-v5")
    env.reset(seed=0)
    env.action_space.seed(0)
    rewards = []
    while not any(r > 1 for r in rewards):  # an alien is worth 5 to 30 points
        _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not (terminated or truncated)
        rewards.append(reward)
    assert max(rewards) in (5, 10, 15, 20, 25, 30, 200)
    env.close()


def test_life_loss_is_signalled_without_ending_the_episode():
    env = make_atari_env("ALE/Breakout-v5", terminal_on_life_loss=True)
    ale = env.unwrapped.ale
    _, info = env.reset(seed=0)
    assert info["life_lost"] is False and ale.lives() == 5
    env.action_space.seed(0)
    lives, signalled = ale.lives(), []
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        assert info["life_lost"] == (ale.lives() < lives and not terminated)
        assert terminated == (ale.lives() == 0)  # only the game over ends the episode
        signalled.append(info["life_lost"])
        lives = ale.lives()
    assert terminated and sum(signalled) == 4  # 5 lives: 4 losses go on, the 5th is the game over
    env.close()

    env = make_atari_env("ALE/Breakout-v5")
    _, info = env.reset(seed=0)
    assert "life_lost" not in info
    for _ in range(50):
        assert "life_lost" not in env.step(env.action_space.sample())[-1]
    env.close()


def test_sticky_actions_and_full_action_space_are_off_by_default():
    env = make_atari_env("ALE/Pong-v5")
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    assert env.action_space == gym.spaces.Discrete(6)  # Pong's minimal action set
    env.close()
    env = make_atari_env("ALE/Pong-v5", repeat_action_probability=0.25, full_action_space=True)
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert env.action_space == gym.spaces.Discrete(18)
    env.close()


def test_max_episode_steps_counts_agent_steps():
    env = make_atari_env("ALE/Pong-v5", max_episode_steps=10)
    env.reset(seed=0)
    ends = [env.step(0)[3] for _ in range(10)]
    assert ends == [False] * 9 + [True]
    env.close()


def test_make_gym_env_and_describe_env_build_atari_envs():
    assert is_atari_id("ALE/Pong-v5") and is_atari_id("PongNoFrameskip-v4") and not is_atari_id("CartPole-v1")
    facts = describe_env("ALE/Pong-v5")
    assert facts.observation_shape == (4, 84, 84) and facts.observation_dtype == "uint8" and facts.is_image
    assert facts.action_space == gym.spaces.Discrete(6)
    assert describe_env("ALE/Pong-v5", atari_options={"full_action_space": True}).action_space == gym.spaces.Discrete(
        18
    )
    env = make_gym_env("ALE/Pong-v5", atari_options={"frame_stack": 2})
    assert env.observation_space.shape == (2, 84, 84)  # channels first already: no ChannelsFirst on top
    env.close()
    encoder = ResNetEncoder(facts.observation_shape)  # the IMPALA paper's deep encoder takes [N, 4, 84, 84]
    assert encoder(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 256)
    with pytest.raises(ValueError, match=r"Unknown gymnasium env id 'ALE/NoSuchGame-v5'"):
        describe_env("ALE/NoSuchGame-v5")
    with pytest.raises(ValueError, match=r"atari_options .* 'CartPole-v1'"):
        make_gym_env("CartPole-v1", atari_options={"frame_stack": 2})


def test_missing_ale_py_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # what `import ale_py` meets without the extra
    with pytest.raises(ValueError, match=r"'ALE/Pong-v5' .*ale-py: pip install -e \"\.\[atari\]\""):
        make_atari_env("ALE/Pong-v5")


def test_vector_env_of_atari_games():
    env = make_vector_env("ALE/Pong-v5", 2, seed=0)
    td = env.reset()
    assert td["observation"].shape == (2, 4, 84, 84) and td["observation"].dtype == torch.uint8
    td = env.rand_step(td)
    assert td["next", "observation"].shape == (2, 4, 84, 84) and td["next", "observation"].dtype == torch.uint8
    assert torch.equal(td["next", "observation"][:, :-1], td["observation"][:, 1:])
    env.close()


def test_vector_env_logs_whole_game_returns_with_life_loss_signalling():
    # What the actors run: torchrl's RewardSum/StepCounter over the batched env. Lives lost do not end
    # episodes, so the first episode to end is a whole game and its logged return is its score.
    env = make_vector_env("ALE/Breakout-v5", 2, seed=0, atari_options={"terminal_on_life_loss": True})
    torch.manual_seed(0)
    rollout = env.rollout(2000, break_when_any_done=True)  # [2 envs, T steps]: random actions until a game ends
    final = rollout[:, -1]
    done = final["next", "done"][:, 0]
    assert done.any() and final["next", "terminated"][done].all()
    steps = rollout.shape[1]
    assert (final["next", "step_count"][done] == steps).all() and steps > 100  # 5 lives: > 100 steps
    assert torch.equal(final["next", "episode_reward"][done], rollout["next", "reward"].sum(1)[done])
    env.close()
