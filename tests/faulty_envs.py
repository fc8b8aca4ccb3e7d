"""Envs that fail on purpose, importable by actor processes as ``tests.faulty_envs:<id>``."""

import gymnasium as gym
from gymnasium.envs.classic_control import CartPoleEnv

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
