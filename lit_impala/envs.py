"""Picklable env factories: a gymnasium id -> one torchrl env holding several sub-envs.

Each actor process steps ``envs_per_actor`` copies of the env in one gymnasium ``SyncVectorEnv``
(no extra processes) wrapped by torchrl's ``GymWrapper``. Autoreset is *disabled* in gymnasium, so
torchrl resets finished sub-envs itself: ``("next", "observation")`` is then always the real final
observation of a step (needed to bootstrap truncated episodes), and no phantom transition appears
between episodes (the trap of gymnasium 1.x next-step autoreset).
"""

from __future__ import annotations

import difflib
from functools import partial
from typing import NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torchrl.envs import EnvBase, GymWrapper, RewardSum, StepCounter, TransformedEnv

EPISODE_RETURN_KEY = "episode_reward"  # written by torchrl's RewardSum: running return of the episode
EPISODE_LENGTH_KEY = "step_count"  # written by torchrl's StepCounter: steps taken in the episode


class EnvFacts(NamedTuple):
    """What the learner's network must know about an env, read once from its spaces."""

    env_id: str
    observation_size: int
    num_actions: int


def describe_env(env_id: str) -> EnvFacts:
    """Build one env in this process, check it is supported and return its facts.

    Raises ``ValueError`` naming the id for an unknown env, and naming the space for an observation
    or action space the MLP agent cannot handle. Called before any actor process starts.
    """
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(f"Unknown gymnasium env id {env_id!r}.{hint}")
    env = gym.make(env_id)
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        raise ValueError(
            f"Env {env_id!r} has observation space {obs_space}; the MLP agent needs a 1-D Box (a vector)."
        )
    if not isinstance(act_space, gym.spaces.Discrete):
        raise ValueError(f"Env {env_id!r} has action space {act_space}; the agent needs a Discrete action space.")
    return EnvFacts(env_id, int(obs_space.shape[0]), int(act_space.n))


def make_vector_env(env_id: str, num_envs: int, seed: int | None = None, max_episode_steps: int | None = None) -> EnvBase:
    """``num_envs`` copies of ``env_id`` as one batched torchrl env of batch size ``[num_envs]``.

    Adds torchrl's ``RewardSum`` and ``StepCounter`` so every step carries the running episode
    return and length; they are reset with each sub-env, so at a ``done`` step they hold the
    finished episode's return and length.
    """
    make_one = partial(gym.make, env_id, **({} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}))
    vector_env = SyncVectorEnv([make_one for _ in range(num_envs)], autoreset_mode=AutoresetMode.DISABLED)
    env = TransformedEnv(
        GymWrapper(vector_env, categorical_action_encoding=True),
        RewardSum(in_keys=["reward"], out_keys=[EPISODE_RETURN_KEY]),
    )
    env.append_transform(StepCounter())
    if seed is not None:
        env.set_seed(seed)
    return env


def actor_seeds(seed: int, num_actors: int, rank: int = 0) -> list[int]:
    """Distinct, reproducible env seeds for each actor (and each DDP rank)."""
    return [int(s) for s in np.random.SeedSequence([seed, rank]).generate_state(num_actors)]
