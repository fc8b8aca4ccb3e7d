"""Gymnasium wrappers our env factories add: observation layout, hidden components, dict entries, and
the error report an actor leaves behind when its envs raise."""

from __future__ import annotations

import traceback

import gymnasium as gym
import numpy as np
from gymnasium.vector import VectorEnv, VectorWrapper


class ChannelsFirst(gym.ObservationWrapper):
    """``[H, W, C]`` images -> ``[C, H, W]``, keeping the dtype (uint8 pixels stay uint8)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(
            low=np.moveaxis(space.low, -1, 0), high=np.moveaxis(space.high, -1, 0), dtype=space.dtype
        )

    def observation(self, observation):
        return np.ascontiguousarray(np.moveaxis(observation, -1, 0))


class BooleanImageAsPixels(gym.ObservationWrapper):
    """Boolean ``[H, W, C]`` images (MinAtar's object channels) -> uint8 ``[C, H, W]`` pixels, 0 or 255:
    one byte per cell travels to the learner, and every pixel encoder reads them as it reads frames."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        height, width, channels = env.observation_space.shape
        self.observation_space = gym.spaces.Box(0, 255, (channels, height, width), dtype=np.uint8)

    def observation(self, observation):
        return np.ascontiguousarray(np.moveaxis(observation, -1, 0)).astype(np.uint8) * np.uint8(255)


class HideObservationComponents(gym.ObservationWrapper):
    """Drop components of a vector observation (e.g. CartPole's velocities: a memory task)."""

    def __init__(self, env: gym.Env, hidden: list[int]):
        super().__init__(env)
        space = env.observation_space
        self.keep = np.array([i for i in range(space.shape[0]) if i not in set(hidden)])
        self.observation_space = gym.spaces.Box(low=space.low[self.keep], high=space.high[self.keep], dtype=space.dtype)

    def observation(self, observation):
        return observation[self.keep]


class SelectObservationKey(gym.ObservationWrapper):
    """Keep one entry of a dict observation (e.g. MiniGrid's ``image``)."""

    def __init__(self, env: gym.Env, key: str):
        super().__init__(env)
        self.key = key
        self.observation_space = env.observation_space[key]

    def observation(self, observation):
        return observation[self.key]


class ReportErrors(VectorWrapper):
    """Writes the traceback of an exception raised by the envs to ``error_file`` before re-raising it:
    the actor process dies, and the learner reads the file to say why (see ``actors.local.LocalActors``)."""

    def __init__(self, env: VectorEnv, error_file: str):
        super().__init__(env)
        self.error_file = error_file

    @property
    def autoreset_mode(self):  # read by torchrl's GymWrapper
        return self.env.autoreset_mode

    def _report(self) -> None:
        with open(self.error_file, "w") as f:
            f.write(traceback.format_exc())

    def step(self, actions):
        try:
            return self.env.step(actions)
        except Exception:
            self._report()
            raise

    def reset(self, **kwargs):
        try:
            return self.env.reset(**kwargs)
        except Exception:
            self._report()
            raise
