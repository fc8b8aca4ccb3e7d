"""The actors' batched env: step every sub-env, reset the finished ones and keep the episode keys, in one call.

torchrl's way to the same data is a base env under ``TransformedEnv(FiniteCheck, InitTracker, RewardSum,
StepCounter)`` stepped by ``EnvBase.step_and_maybe_reset``: every step goes through the transforms, the spec
checks and, whenever a sub-env finished, a partial reset merged back with ``TensorDict.where``: about 1 ms of
Python per actor step whatever the number of envs, where 128 envpool CartPoles and the policy's forward take 0.4 ms
(a whole actor step through torchrl's collector: 2.6 ms that way, 1.5 ms with this class; docs/performance.md).
``EpisodeEnv`` gives the collector the same two tensordicts (the step with its ``"next"``, and the root of the
next step) with a few tensor operations, over a ``VectorEnv`` of either backend:

* ``("next", ...)``: the step's real observation (the final one when the sub-env finished), its reward and end
  flags, ``is_init`` False, ``episode_reward`` and ``step_count`` of the episode so far (the finished
  episode's at a ``done`` step), ``nonfinite`` (``envs.finite``), ``life_lost`` where asked;
* the next root: the same, except that finished sub-envs are reset: their first observation, ``is_init`` True,
  return and length 0, end flags False.

``tests/unit/test_episode_env.py`` checks it against torchrl's own transforms, key by key and step by step, for
both backends and through torchrl's collector.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import gymnasium as gym
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, TensorSpec, Unbounded
from torchrl.envs import EnvBase
from torchrl.envs.libs.gym import _gym_to_torchrl_spec_transform, set_gym_backend

from lit_impala.envs.finite import FiniteCheck
from lit_impala.schema import (
    EPISODE_LENGTH_KEY,
    EPISODE_RETURN_KEY,
    IS_INIT_KEY,
    LIFE_LOST_KEY,
    NONFINITE_KEY,
    OBSERVATION_KEY,
)

_END_KEYS = ("done", "terminated", "truncated")


class VectorStep(NamedTuple):
    """What ``N`` sub-envs returned for one step, in sub-env order."""

    observation: torch.Tensor  # [N, *obs], a tensor of its own (not a view of the backend's buffer)
    reward: torch.Tensor  # [N] float32
    terminated: torch.Tensor  # [N] bool
    truncated: torch.Tensor  # [N] bool
    life_lost: torch.Tensor | None  # [N] bool: a life lost that is not the game over; None unless reported


class VectorEnv(Protocol):
    """``N`` sub-envs of one backend, stepped together, reset all or some (``envs.factory`` has one per backend)."""

    num_envs: int
    reports_life_loss: bool
    observation_spec: TensorSpec  # of the batched observation [N, *obs], as torchrl's GymWrapper gives it
    action_spec: TensorSpec  # of the batched action

    def step(self, action: torch.Tensor) -> VectorStep: ...

    def reset(self, mask: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
        """``[N, *obs]``: the first observation of every sub-env ``mask [N]`` (bool; None: all) selects, and the
        current one of the others."""

    def seed(self, seed: int | None) -> None: ...

    def close(self) -> None: ...


def gym_wrapper_spec(space: gym.Space, categorical: bool = False) -> TensorSpec:
    """The torchrl spec torchrl's ``GymWrapper`` gives a gymnasium ``space`` (``categorical``: discrete actions as
    indices), so that the sub-envs of every backend are described as ``GymWrapper`` describes a gymnasium env.

    The one use of a torchrl private name outside ``actors.torchrl_distributed``: torchrl 0.14 converts spaces only
    in ``torchrl.envs.libs.gym._gym_to_torchrl_spec_transform`` (GymWrapper's own conversion) and has no public
    function for it. ``tests/unit/test_torchrl_internals.py`` checks that it still gives what GymWrapper gives.
    """
    with set_gym_backend("gymnasium"):
        return _gym_to_torchrl_spec_transform(space, categorical_action_encoding=categorical)


class EpisodeEnv(EnvBase):
    """``vector``'s sub-envs as one torchrl env of batch size ``[N]``, with the keys and episode boundaries of
    torchrl's ``InitTracker``, ``RewardSum`` (as ``episode_reward``) and ``StepCounter`` after ``check``.

    Args:
        vector: the sub-envs.
        check: what to do with a non-finite reward or observation (``envs.finite``).
    """

    def __init__(self, vector: VectorEnv, check: FiniteCheck):
        num_envs = vector.num_envs
        super().__init__(batch_size=torch.Size([num_envs]))
        self.vector = vector
        self.check = check
        flag = Categorical(2, shape=(num_envs, 1), dtype=torch.bool)
        observations = Composite(observation=vector.observation_spec, shape=self.batch_size)
        if vector.reports_life_loss:
            observations[LIFE_LOST_KEY] = Categorical(2, shape=self.batch_size, dtype=torch.bool)
        observations[NONFINITE_KEY] = Categorical(2, shape=self.batch_size, dtype=torch.bool)
        observations[IS_INIT_KEY] = flag.clone()
        observations[EPISODE_RETURN_KEY] = Unbounded(shape=(num_envs, 1))
        observations[EPISODE_LENGTH_KEY] = Bounded(0, torch.iinfo(torch.int64).max, shape=(num_envs, 1),
                                                   dtype=torch.int64)
        self.observation_spec = observations
        self.action_spec = vector.action_spec
        self.reward_spec = Unbounded(shape=(num_envs, 1))
        self.done_spec = Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=self.batch_size)
        self._column = (num_envs, 1)

    # --- torchrl's hooks: env.reset() and env.step() ---

    def _reset(self, tensordict: TensorDictBase | None = None, seed: int | None = None, **kwargs) -> TensorDictBase:
        mask = None if tensordict is None else tensordict.get("_reset", None)
        mask = None if mask is None or bool(mask.all()) else mask.reshape(-1)
        # Every sub-env's first step: torchrl's EnvBase.reset keeps the rows a partial reset (a ``_reset`` mask)
        # leaves alone.
        out = self._first_steps(self.vector.reset(mask, seed=seed))
        return self.check._reset(TensorDict({} if mask is None else {"_reset": mask}, batch_size=self.batch_size), out)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        step = self.vector.step(tensordict.get(self.action_key))
        terminated = step.terminated.reshape(self._column)
        truncated = step.truncated.reshape(self._column)
        reward = step.reward.reshape(self._column)
        out = TensorDict(
            {
                OBSERVATION_KEY: step.observation,
                "reward": reward,
                "terminated": terminated,
                "truncated": truncated,
                "done": terminated | truncated,
            },
            batch_size=self.batch_size,
        )
        if step.life_lost is not None:
            out.set(LIFE_LOST_KEY, step.life_lost)
        out = self.check._step(tensordict, out)  # may end a sub-env's episode (nonfinite_data: drop)
        # The reward is added after the check, as RewardSum after FiniteCheck: a dropped NaN is never summed.
        out.set(IS_INIT_KEY, torch.zeros(self._column, dtype=torch.bool))
        out.set(EPISODE_RETURN_KEY, tensordict.get(EPISODE_RETURN_KEY) + out.get("reward"))
        out.set(EPISODE_LENGTH_KEY, tensordict.get(EPISODE_LENGTH_KEY) + 1)
        return out

    # --- what torchrl's collector calls at every step ---

    def step_and_maybe_reset(self, tensordict: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        """``(tensordict with its "next", the root of the next step)``: ``EnvBase.step_and_maybe_reset``'s result
        (the step, ``step_mdp``, the reset of the finished sub-envs), computed directly."""
        step = self._step(tensordict)
        tensordict.set("next", step)
        root = step.exclude("reward")
        root.set(self.action_key, tensordict.get(self.action_key))
        done = step.get("done").reshape(-1)
        if bool(done.any()):
            root = self._restart(root, done)
        return tensordict, root

    def _restart(self, root: TensorDictBase, done: torch.Tensor) -> TensorDictBase:
        """``root`` with the sub-envs ``done [N]`` (bool) selects reset: their first observation (checked),
        ``is_init`` True, return and length 0, end flags and ``life_lost`` False; the others unchanged."""
        column = done.reshape(self._column)
        first = TensorDict({OBSERVATION_KEY: self.vector.reset(done)}, batch_size=self.batch_size)
        root.update(self.check._reset(TensorDict({"_reset": done}, batch_size=self.batch_size), first))
        root.set(IS_INIT_KEY, column)
        root.set(EPISODE_RETURN_KEY, torch.where(column, 0.0, root.get(EPISODE_RETURN_KEY)))
        root.set(EPISODE_LENGTH_KEY, torch.where(column, 0, root.get(EPISODE_LENGTH_KEY)))
        for key in _END_KEYS:
            root.set(key, root.get(key) & ~column)
        if self.vector.reports_life_loss:
            root.set(LIFE_LOST_KEY, root.get(LIFE_LOST_KEY) & ~done)
        return root

    def _first_steps(self, observation: torch.Tensor) -> TensorDictBase:
        out = TensorDict(
            {
                OBSERVATION_KEY: observation,
                IS_INIT_KEY: torch.ones(self._column, dtype=torch.bool),
                EPISODE_RETURN_KEY: torch.zeros(self._column),
                EPISODE_LENGTH_KEY: torch.zeros(self._column, dtype=torch.int64),
                **{key: torch.zeros(self._column, dtype=torch.bool) for key in _END_KEYS},
            },
            batch_size=self.batch_size,
        )
        if self.vector.reports_life_loss:
            out.set(LIFE_LOST_KEY, torch.zeros(self.batch_size, dtype=torch.bool))
        return out

    def _set_seed(self, seed: int | None) -> None:
        self.vector.seed(seed)

    def close(self, *, raise_if_closed: bool = True) -> None:
        self.vector.close()
        super().close(raise_if_closed=raise_if_closed)
