"""A small env with a dict observation (an image and a vector) and an action mask, importable by actor processes
as ``tests.masked_envs:MaskedTarget-v0``.

Each step the image ``[5, 5, 1]`` (uint8) lights one of the four cells next to its centre: the target ``t`` (up,
right, down, left); the vector entry ``shift`` (``Discrete(2)``, one-hot in the agent's observation) says whether the
rewarded action is ``t`` or the one after it, ``(t + shift) % 4``: neither part alone is enough. ``action_mask``
(``MultiBinary(4)``) marks two actions legal, the rewarded one and one other drawn at random. Reward 1 for the rewarded
action, 0 otherwise; episodes end after ``EPISODE_STEPS`` steps, so a return is at most 10. Acting uniformly over the
legal actions earns 5 per episode, over all actions 2.5.

An illegal action is counted, not refused (the env goes on, reward 0): with ``MASKED_TARGET_LOG_DIR`` set, each env
writes ``{steps, illegal}`` at each episode's end to a JSON file of its own there, which a test sums over every
actor process.
"""

from __future__ import annotations

import json
import os
import uuid

import gymnasium as gym
import numpy as np

EPISODE_STEPS = 10
LOG_DIR_ENV = "MASKED_TARGET_LOG_DIR"
TARGET_CELLS = ((1, 2), (2, 3), (3, 2), (2, 1))  # up, right, down, left of the centre (2, 2)


class MaskedTarget(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None):
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (5, 5, 1), dtype=np.uint8),
            "shift": gym.spaces.Discrete(2),
            "action_mask": gym.spaces.MultiBinary(4),
        })
        self.action_space = gym.spaces.Discrete(4)
        self.render_mode = render_mode
        self.steps_taken = 0
        self.illegal_actions = 0
        self._episode_step = 0
        self._log_file = None
        if os.environ.get(LOG_DIR_ENV):
            self._log_file = os.path.join(os.environ[LOG_DIR_ENV], f"{os.getpid()}-{uuid.uuid4().hex}.json")

    def _draw(self) -> dict:
        target, shift = self.np_random.integers(4), self.np_random.integers(2)
        self._rewarded = int((target + shift) % 4)
        image = np.zeros((5, 5, 1), dtype=np.uint8)
        image[TARGET_CELLS[target]] = 255
        other = self.np_random.choice([a for a in range(4) if a != self._rewarded])
        self._legal = np.zeros(4, dtype=np.int8)
        self._legal[[self._rewarded, other]] = 1
        self._image = image
        return {"image": image, "shift": int(shift), "action_mask": self._legal.copy()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._episode_step = 0
        return self._draw(), {}

    def step(self, action):
        action = int(action)
        self.steps_taken += 1
        self._episode_step += 1
        if not self._legal[action]:
            self.illegal_actions += 1
        reward = float(action == self._rewarded)
        terminated = self._episode_step >= EPISODE_STEPS
        if terminated and self._log_file is not None:
            # Whole files only: the actors may be stopped in the middle of a write at the end of a run.
            partial = f"{self._log_file}.partial"
            with open(partial, "w") as f:
                json.dump({"steps": self.steps_taken, "illegal": self.illegal_actions}, f)
            os.replace(partial, self._log_file)
        return self._draw(), reward, terminated, False, {}

    def render(self):
        return np.repeat(np.repeat(self._image, 32, axis=0), 32, axis=1).repeat(3, axis=2)


def illegal_action_counts(log_dir) -> tuple[int, int]:
    """``(steps, illegal actions)`` summed over every env that logged to ``log_dir``."""
    logs = [json.loads(path.read_text()) for path in log_dir.glob("*.json")]
    return sum(log["steps"] for log in logs), sum(log["illegal"] for log in logs)


if "MaskedTarget-v0" not in gym.registry:
    gym.register("MaskedTarget-v0", entry_point=MaskedTarget)
