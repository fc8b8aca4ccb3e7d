"""The envpool backend on real envpool envs: the same episode boundaries and keys as the gymnasium backend
(CartPole's boundary checks run on both in test_envs.py), Atari options mapped, life losses reported."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lit_impala.envs.envpool import envpool_config, import_envpool
from lit_impala.envs.factory import describe_env, make_vector_env

if importlib.util.find_spec("envpool") is None:
    pytest.skip('the envpool extra is not installed: pip install -e ".[envpool]"', allow_module_level=True)
envpool = import_envpool()


def test_importing_envpool_leaves_the_environment_of_later_processes_alone():
    # envpool's own import sets MPLBACKEND=Agg for every process started afterwards (notebook kernels
    # then draw nothing); import_envpool undoes it. Checked in a fresh interpreter.
    code = ("import os; before = dict(os.environ); from lit_impala.envs.envpool import import_envpool; "
            "import_envpool(); print(sorted(k for k in os.environ if before.get(k) != os.environ[k]))")
    changed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("MPL")}).stdout
    assert changed.strip() == "[]"


def test_envpool_alone_would_insert_a_phantom_transition_between_episodes():
    # Why envs.envpool resets finished envs itself: envpool's in-step reset ignores the action and pays 0.
    env = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=1, seed=0)
    env.reset()
    rewards, done_seen = [], False
    while not done_seen or len(rewards) < 600:
        _, reward, terminated, truncated, _ = env.step(np.zeros(1, dtype=np.int64))
        rewards.append(float(reward[0]))
        if done_seen:
            break
        done_seen = bool(terminated[0] or truncated[0])
    assert rewards[-1] == 0.0  # the step after the end: a reset, not a CartPole step (which pays 1)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "HalfCheetah-v5"])
def test_the_same_keys_shapes_and_dtypes_as_the_gymnasium_backend(env_id, tmp_path, monkeypatch):
    if env_id == "HalfCheetah-v5":
        pytest.importorskip("mujoco", reason="the mujoco extra provides gymnasium's HalfCheetah")
        monkeypatch.chdir(tmp_path)  # MuJoCo writes its model-compiler warnings to MUJOCO_LOG.TXT in the cwd
        # envpool declares MuJoCo actions float64, gymnasium float32: the backend hands out float32 like gymnasium
        assert describe_env(env_id, backend="envpool") == describe_env(env_id)
    gymnasium_env = make_vector_env(env_id, 4, seed=0)
    envpool_env = make_vector_env(env_id, 4, seed=0, backend="envpool")
    for spec in ("full_observation_spec", "full_action_spec", "full_reward_spec", "full_done_spec"):
        ours, theirs = getattr(envpool_env, spec), getattr(gymnasium_env, spec)
        assert sorted(ours.keys(True, True)) == sorted(theirs.keys(True, True)), spec
        for key in theirs.keys(True, True):
            assert (ours[key].shape, ours[key].dtype) == (theirs[key].shape, theirs[key].dtype), (spec, key)
    if env_id == "HalfCheetah-v5":
        rollout = envpool_env.rollout(20, break_when_any_done=False)
        assert rollout["action"].dtype == torch.float32 and rollout["next", "observation"].shape == (4, 20, 17)
        gymnasium_env.close()
        envpool_env.close()
        return
    torch.manual_seed(0)
    rollout = envpool_env.rollout(300, break_when_any_done=False)
    assert rollout.shape == (4, 300) and (rollout["next", "reward"] == 1).all()
    done = rollout["next", "done"].squeeze(-1)
    assert done.any()
    # the step after a done starts an episode (is_init) with a counter back at 1
    after = torch.zeros_like(done)
    after[:, 1:] = done[:, :-1]
    assert torch.equal(rollout["is_init"].squeeze(-1)[:, 1:], after[:, 1:])
    assert (rollout["next", "step_count"].squeeze(-1)[after] == 1).all()
    gymnasium_env.close()
    envpool_env.close()


def test_seeds_fix_the_episodes_and_differ_between_actors():
    def lengths(seed):
        env = make_vector_env("CartPole-v1", 8, seed=seed, backend="envpool")
        torch.manual_seed(0)
        rollout = env.rollout(60, break_when_any_done=False)
        env.close()
        return rollout["observation"][:, 0]

    assert torch.equal(lengths(1), lengths(1))
    assert not torch.equal(lengths(1), lengths(2))


def test_atari_options_map_onto_envpool_preprocessing():
    task_id, kwargs, life_loss = envpool_config(
        "ALE/Pong-v5",
        atari_options={"noop_max": 10, "frame_skip": 3, "screen_size": 64, "frame_stack": 2,
                       "terminal_on_life_loss": True, "repeat_action_probability": 0.25, "full_action_space": True},
        max_episode_steps=1000,
    )
    assert task_id == "Pong-v5" and life_loss
    assert kwargs == {"max_episode_steps": 1000, "noop_max": 10, "frame_skip": 3, "stack_num": 2,
                      "repeat_action_probability": 0.25, "full_action_space": True, "img_height": 64,
                      "img_width": 64, "reward_clip": False, "episodic_life": False, "use_fire_reset": False}
    # the defaults: those of envs.atari (sticky actions off, raw score, no FIRE at reset, full games)
    _, kwargs, life_loss = envpool_config("ALE/Breakout-v5")
    assert not life_loss and kwargs["repeat_action_probability"] == 0.0 and kwargs["reward_clip"] is False
    facts = describe_env("ALE/Pong-v5", backend="envpool")
    assert facts.observation_shape == (4, 84, 84) and facts.observation_dtype == "uint8" and facts.action_space.n == 6


def test_atari_life_losses_are_signalled_and_whole_games_logged():
    env = make_vector_env("ALE/Breakout-v5", 2, seed=0, backend="envpool",
                          atari_options={"terminal_on_life_loss": True})
    torch.manual_seed(0)
    rollout = env.rollout(3000, break_when_any_done=True)
    final = rollout[:, -1]
    done = final["next", "done"][:, 0]
    assert done.any() and final["next", "terminated"][done].all()
    assert rollout["observation"].shape[-3:] == (4, 84, 84) and rollout["observation"].dtype == torch.uint8
    lost = rollout["next", "life_lost"]
    assert lost[done].sum(-1).eq(4).all()  # 5 lives: 4 losses signalled, the 5th is the game over itself
    assert not lost[:, -1][done].any()
    assert torch.equal(final["next", "episode_reward"][done], rollout["next", "reward"].sum(1)[done])
    env.close()
