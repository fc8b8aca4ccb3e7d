"""The one place where collector TensorDicts ``[B, T]`` become time-major learner inputs ``[T, B]``.

Episode-boundary rules, all decided here:

* step ``t`` *terminated*: no bootstrap (``discount_t = 0``); the trace stops at ``t``.
* step ``t`` *truncated* (time limit): the episode could have gone on, so the target bootstraps from
  the value of its real final observation, ``V(next_observation_t)``. V-trace has one discount per
  step for both the bootstrap and the trace, so we fold the bootstrap into the reward,
  ``r'_t = r_t + gamma * V(next_observation_t)``, and set ``discount_t = 0``: the target of step t
  is exact and no trace crosses into the next episode.
* last step ``T-1`` not done: bootstrap from ``V(next_observation_{T-1})``.
* step ``t`` lost a life (Atari with ``terminal_on_life_loss``): a termination for learning only, like
  the DQN/IMPALA setting; the game, the actor's recurrent state and the logged return go on.
* ``reward_clip`` clips rewards to ``[-c, c]`` for learning only (Atari: 1); logged returns stay raw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from tensordict import TensorDictBase
from torch import Tensor

from lit_impala.actor import (
    BEHAVIOUR_LOG_PROB_KEY,
    CORE_STATE_KEYS,
    OBSERVATION_KEY,
    POLICY_SAMPLE_KEY,
    POLICY_VERSION_KEY,
)
from lit_impala.envs import EPISODE_LENGTH_KEY, EPISODE_RETURN_KEY, IS_INIT_KEY, LIFE_LOST_KEY

# Everything the learner reads from a collector batch; the dataset keeps only these keys
# (the core-state keys exist only for recurrent policies).
BATCH_KEYS = [
    OBSERVATION_KEY,
    IS_INIT_KEY,
    POLICY_SAMPLE_KEY,
    BEHAVIOUR_LOG_PROB_KEY,
    POLICY_VERSION_KEY,
    *CORE_STATE_KEYS,
    ("next", OBSERVATION_KEY),
    ("next", "reward"),
    ("next", "terminated"),
    ("next", "truncated"),
    ("next", EPISODE_RETURN_KEY),
    ("next", EPISODE_LENGTH_KEY),
    ("next", LIFE_LOST_KEY),  # only Atari with terminal_on_life_loss
]


class Trajectory(NamedTuple):
    """A batch of unrolls, time-major. ``T`` steps, ``B`` unrolls."""

    observation: Tensor  # [T, B, *obs] x_t, what the actor saw before acting
    is_init: Tensor  # [T, B] bool, x_t is the first observation of an episode (recurrent state resets)
    action: Tensor  # [T, B, *sample] the policy's sample for a_t (what the log-probs are of)
    reward: Tensor  # [T, B] r_t, received for a_t
    terminated: Tensor  # [T, B] bool, the episode ended at t (no bootstrap)
    truncated: Tensor  # [T, B] bool, the episode was cut at t (bootstrap from next_observation)
    next_observation: Tensor  # [T, B, *obs] the real observation after a_t (final one at episode ends)
    behaviour_log_prob: Tensor  # [T, B] log mu(a_t | x_t) of the policy that acted
    policy_version: Tensor  # [T, B] int64, learner updates behind the weights that acted
    episode_return: Tensor  # [T, B] running return; the finished episode's return where done
    episode_length: Tensor  # [T, B] running length; the finished episode's length where done
    initial_core_state: tuple[Tensor, Tensor] | None  # ([B, H], [B, H]) the actor's state entering t=0
    life_lost: Tensor | None = None  # [T, B] bool, a life was lost at t: terminal for learning only

    @property
    def done(self) -> Tensor:
        """``[T, B]`` bool: an episode ended at step t, by termination or truncation."""
        return self.terminated | self.truncated


def to_time_major(batch: TensorDictBase) -> Trajectory:
    """``[B, T]`` collector TensorDict -> time-major ``Trajectory`` (views, no copies where possible)."""

    def get(key, per_step_scalar: bool = False) -> Tensor:
        value = batch.get(key)
        if per_step_scalar and value.dim() == 3:
            value = value.squeeze(2)  # torchrl keeps a trailing [1] on rewards, done flags and counters
        return value.transpose(0, 1)

    initial_core_state = None
    if CORE_STATE_KEYS[0] in batch.keys():
        initial_core_state = tuple(batch.get(key)[:, 0] for key in CORE_STATE_KEYS)
    return Trajectory(
        observation=get(OBSERVATION_KEY),
        is_init=get(IS_INIT_KEY, per_step_scalar=True),
        action=get(POLICY_SAMPLE_KEY),
        reward=get(("next", "reward"), per_step_scalar=True),
        terminated=get(("next", "terminated"), per_step_scalar=True),
        truncated=get(("next", "truncated"), per_step_scalar=True),
        next_observation=get(("next", OBSERVATION_KEY)),
        behaviour_log_prob=get(BEHAVIOUR_LOG_PROB_KEY),
        policy_version=get(POLICY_VERSION_KEY),
        episode_return=get(("next", EPISODE_RETURN_KEY), per_step_scalar=True),
        episode_length=get(("next", EPISODE_LENGTH_KEY), per_step_scalar=True),
        initial_core_state=initial_core_state,
        life_lost=batch.get(("next", LIFE_LOST_KEY)).transpose(0, 1) if ("next", LIFE_LOST_KEY) in batch.keys(True) else None,
    )


class BootstrapTargets(NamedTuple):
    """V-trace's per-step inputs after applying the episode-boundary rules (all gradient-free)."""

    discounts: Tensor  # [T, B] gamma, or 0 where the episode ended at t
    rewards: Tensor  # [T, B] r_t, plus gamma * V(final observation) where truncated at t
    bootstrap_value: Tensor  # [B] V(next_observation_{T-1})


@torch.no_grad()
def bootstrap_targets(
    trajectory: Trajectory,
    value_of_next: Callable[[Tensor], Tensor],
    discount: float,
    reward_scale: float = 1.0,
    reward_clip: float | None = None,
) -> BootstrapTargets:
    """Discounts, rewards and bootstrap value for V-trace from a trajectory.

    Args:
        trajectory: time-major batch, ``[T, B]``.
        value_of_next: ``mask [T, B] bool -> [n]``: the learner's value of ``next_observation`` at the
            ``n`` masked steps (row-major order), continuing each from the state after that step.
            Called once, for the last step and every truncated step.
        discount: gamma in [0, 1].
        reward_scale: factor applied to the env rewards (the values are already in that scale).
        reward_clip: clip the env rewards to ``[-reward_clip, reward_clip]`` first (None: no clipping).
    """
    terminated = trajectory.terminated
    if trajectory.life_lost is not None:
        terminated = terminated | trajectory.life_lost
    truncated = trajectory.truncated & ~terminated
    needed = truncated.clone()
    needed[-1] = True
    next_values = torch.zeros(needed.shape, dtype=torch.float32, device=needed.device)
    next_values[needed] = value_of_next(needed).to(next_values.dtype)
    reward = trajectory.reward.to(next_values.dtype)
    if reward_clip is not None:
        reward = reward.clamp(-reward_clip, reward_clip)
    rewards = reward_scale * reward + discount * truncated * next_values
    discounts = discount * (~(terminated | trajectory.truncated)).to(rewards.dtype)
    return BootstrapTargets(discounts, rewards, next_values[-1])
