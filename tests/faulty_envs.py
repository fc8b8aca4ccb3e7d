"""Envs that fail on purpose (raise, or return NaN), importable by actor processes as ``tests.faulty_envs:<id>``."""

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv, PendulumEnv

FAIL_AT_STEP = 300  # env steps into the env's life, across episodes


class FaultyCartPole(CartPoleEnv):
    """CartPole that raises from ``step`` after ``FAIL_AT_STEP`` steps."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps_taken = 0

    def step(self, action):
        self.steps_taken += 1
        if self.steps_taken >= FAIL_AT_STEP:
            raise RuntimeError(f"boom: FaultyCartPole failed at step {self.steps_taken}")
        return super().step(action)


if "FaultyCartPole-v0" not in gym.registry:
    gym.register("FaultyCartPole-v0", entry_point=FaultyCartPole, max_episode_steps=500)


NONFINITE_AT_STEP = 100  # env steps into the env's life, across episodes (Pendulum's episodes last 200)


class NaNObservationPendulum(PendulumEnv):
    """Pendulum (float observations: ``normalize_observations`` applies) whose observation is NaN in one
    component at its ``NONFINITE_AT_STEP``-th step, once."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps_taken = 0

    def step(self, action):
        self.steps_taken += 1
        observation, reward, terminated, truncated, info = super().step(action)
        if self.steps_taken == NONFINITE_AT_STEP:
            observation = observation.copy()
            observation[1] = np.nan
        return observation, reward, terminated, truncated, info


class NaNRewardCartPole(CartPoleEnv):
    """CartPole whose reward is NaN at its ``NONFINITE_AT_STEP``-th step, once."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps_taken = 0

    def step(self, action):
        self.steps_taken += 1
        observation, reward, terminated, truncated, info = super().step(action)
        return observation, np.nan if self.steps_taken == NONFINITE_AT_STEP else reward, terminated, truncated, info


class NaNResetPendulum(PendulumEnv):
    """Pendulum whose first observation is NaN at a reset made after exactly ``nan_at_step`` steps of its life
    (200: the reset after its first episode; 0: its first reset, and the seeding one before it)."""

    def __init__(self, nan_at_step: int = 200, **kwargs):
        super().__init__(**kwargs)
        self.nan_at_step = nan_at_step
        self.steps_taken = 0

    def step(self, action):
        self.steps_taken += 1
        return super().step(action)

    def reset(self, **kwargs):
        observation, info = super().reset(**kwargs)
        return np.full_like(observation, np.nan) if self.steps_taken == self.nan_at_step else observation, info


for _id, _entry_point, _steps, _kwargs in [
    ("NaNObservationPendulum-v0", NaNObservationPendulum, 200, {}),
    ("NaNRewardCartPole-v0", NaNRewardCartPole, 500, {}),
    ("NaNResetPendulum-v0", NaNResetPendulum, 200, {"nan_at_step": 200}),
    ("NaNFirstResetPendulum-v0", NaNResetPendulum, 200, {"nan_at_step": 0}),
]:
    if _id not in gym.registry:
        gym.register(_id, entry_point=_entry_point, max_episode_steps=_steps, kwargs=_kwargs)
