"""Episode-boundary rules: the per-step discounts, rewards and bootstrap value V-trace needs.

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

Pure tensor functions: the caller computes the values of the next observations that
``bootstrap_steps`` asks for, and hands them to ``vtrace_step_inputs``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class VtraceStepInputs(NamedTuple):
    """V-trace's per-step inputs after applying the episode-boundary rules (all gradient-free)."""

    discounts: Tensor  # [T, B] gamma, or 0 where the episode ended at t
    rewards: Tensor  # [T, B] r_t, plus gamma * V(final observation) where truncated at t
    bootstrap_value: Tensor  # [B] V(next_observation_{T-1})


def learning_terminations(terminated: Tensor, life_lost: Tensor | None) -> Tensor:
    """``[T, B]`` bool: where learning treats the episode as terminated (a lost life counts, if given)."""
    return terminated if life_lost is None else terminated | life_lost


def bootstrap_steps(terminated: Tensor, truncated: Tensor) -> Tensor:
    """``[T, B]`` bool: the steps whose next observation's value the targets need: every truncated
    (and not terminated) step, and the last step. ``terminated`` as from ``learning_terminations``."""
    needed = truncated & ~terminated
    needed[-1] = True
    return needed


@torch.no_grad()
def vtrace_step_inputs(
    reward: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    next_values: Tensor,
    discount: float,
    reward_scale: float = 1.0,
    reward_clip: float | None = None,
) -> VtraceStepInputs:
    """Discounts, rewards and bootstrap value for V-trace.

    Args:
        reward: ``[T, B]`` env rewards.
        terminated: ``[T, B]`` bool, ``learning_terminations`` (lost lives included).
        truncated: ``[T, B]`` bool, the env's truncations (time limits).
        next_values: ``[T, B]`` V(next_observation_t) at ``bootstrap_steps(terminated, truncated)``, any
            value elsewhere (it is not read), in the scale of ``reward_scale``.
        discount: gamma in [0, 1].
        reward_scale: factor applied to the env rewards (the values are already in that scale).
        reward_clip: clip the env rewards to ``[-reward_clip, reward_clip]`` first (None: no clipping).
    """
    truncated_only = truncated & ~terminated
    next_values = next_values.to(torch.float32)
    reward = reward.to(next_values.dtype)
    if reward_clip is not None:
        reward = reward.clamp(-reward_clip, reward_clip)
    rewards = reward_scale * reward + discount * torch.where(truncated_only, next_values, 0.0)
    discounts = discount * (~(terminated | truncated)).to(rewards.dtype)
    return VtraceStepInputs(discounts, rewards, next_values[-1])
