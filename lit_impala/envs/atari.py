"""Atari 2600 games (ALE ids such as ``ALE/Pong-v5``) with the DQN / IMPALA preprocessing.

``make_atari_env`` turns a raw ALE env into ``[frame_stack, 84, 84]`` uint8 observations, channels
first as the pixel encoders expect. Rewards stay raw (the game score): the learner clips them, so
logged returns are comparable with published scores. ale-py and OpenCV are optional (the ``atari``
extra) and imported only when an Atari env is built.
"""

from __future__ import annotations

import importlib
from typing import Any, TypedDict

import gymnasium as gym
import numpy as np

from lit_impala.schema import LIFE_LOST_KEY  # the info entry LifeLossInfo writes

ALE_ENTRY_POINT = "ale_py.env:AtariEnv"
INSTALL_HINT = 'pip install -e ".[atari]"'


class AtariOptions(TypedDict, total=False):
    """``data.atari_options``: any of ``make_atari_env``'s preprocessing options, typed so that the command line
    checks and converts them (``--data.atari_options.screen_size 84`` is the number 84, ``abc`` an error naming it)
    before any env or actor process starts."""

    noop_max: int
    frame_skip: int
    screen_size: int
    frame_stack: int
    terminal_on_life_loss: bool
    repeat_action_probability: float
    full_action_space: bool


def register_atari_envs(env_id: str) -> None:
    """Import ale-py (which registers the ``ALE/...`` ids with gymnasium) and OpenCV, or say how to install them.

    ``env_id`` only names the env in the error.
    """
    for module, package in (("ale_py", "ale-py"), ("cv2", "opencv-python-headless")):
        try:
            imported = importlib.import_module(module)
        except ImportError as error:
            raise ValueError(
                f"Env id {env_id!r} is an Atari game and needs {package}: {INSTALL_HINT} ({error})"
            ) from error
        if module == "ale_py":
            gym.register_envs(imported)


def is_atari_id(env_id: str) -> bool:
    """True for ``ALE/...`` ids and for any id registered with ale-py's entry point (e.g. ``PongNoFrameskip-v4``).

    An id gymnasium does not know yet makes this import ale-py when it is installed (its ids are
    registered on import); ids already registered, such as ``CartPole-v1``, never import it.
    """
    registered = env_id.split(":", 1)[-1]
    if registered.startswith("ALE/"):
        return True
    if registered not in gym.registry:
        try:
            gym.register_envs(importlib.import_module("ale_py"))
        except ImportError:
            return False
    spec = gym.registry.get(registered)
    return spec is not None and spec.entry_point == ALE_ENTRY_POINT


class NoopReset(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """After each reset, play a random number of no-ops, uniform in ``1..noop_max`` (DQN Nature's "up to 30").

    The count is drawn from the env's own ``np_random``, so ``reset(seed=s)`` fixes it. The no-ops
    are raw frames of the frameskip-1 base env (as in OpenAI baselines' ``NoopResetEnv`` and
    gymnasium's ``AtariPreprocessing``). Should the game end during them, the env is reset again.
    """

    def __init__(self, env: gym.Env, noop_max: int = 30):
        gym.utils.RecordConstructorArgs.__init__(self, noop_max=noop_max)
        gym.Wrapper.__init__(self, env)
        if noop_max < 1:
            raise ValueError(f"noop_max must be at least 1, got {noop_max} (leave the wrapper out to disable no-ops)")
        meanings = env.unwrapped.get_action_meanings()
        if meanings[0] != "NOOP":
            raise ValueError(f"no-op reset needs action 0 to be NOOP; the actions are {meanings}")
        self.noop_max = noop_max

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        observation, info = self.env.reset(seed=seed, options=options)
        for _ in range(int(self.env.unwrapped.np_random.integers(1, self.noop_max + 1))):
            observation, _, terminated, truncated, step_info = self.env.step(0)
            info.update(step_info)
            if terminated or truncated:
                observation, info = self.env.reset(options=options)
        return observation, info


class MaxPoolFrameSkip(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Repeat each action ``frame_skip`` frames; observe the pixel-wise max of the last two, resized.

    Input: a frameskip-1 env with grayscale ``[H, W]`` uint8 frames. Output: ``[screen_size,
    screen_size]`` uint8 (``cv2.resize`` with ``INTER_AREA``). The reward is the *sum* of the raw
    frame rewards, unclipped. The max removes the flicker of sprites drawn on alternate frames; it
    is taken over grayscale frames (Machado et al. 2018, Dopamine, gymnasium), where DQN Nature took
    it over RGB before converting. If the episode ends inside the skip, the observation pools the
    last two frames actually played, so a truncated episode bootstraps from its real final screen
    (gymnasium's ``AtariPreprocessing`` returns the previous step's frames there).
    """

    def __init__(self, env: gym.Env, frame_skip: int = 4, screen_size: int = 84):
        gym.utils.RecordConstructorArgs.__init__(self, frame_skip=frame_skip, screen_size=screen_size)
        gym.Wrapper.__init__(self, env)
        space = env.observation_space
        if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 2 and space.dtype == np.uint8):
            raise ValueError(f"MaxPoolFrameSkip needs grayscale [H, W] uint8 frames, got {space}")
        if frame_skip < 1 or screen_size < 1:
            raise ValueError(f"frame_skip and screen_size must be positive, got {frame_skip} and {screen_size}")
        self.frame_skip, self.screen_size = frame_skip, screen_size
        self.observation_space = gym.spaces.Box(0, 255, (screen_size, screen_size), dtype=np.uint8)

    def _resize(self, frame: np.ndarray) -> np.ndarray:
        import cv2  # optional dependency (the atari extra); already imported by make_atari_env

        return cv2.resize(frame, (self.screen_size, self.screen_size), interpolation=cv2.INTER_AREA)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        frame, info = self.env.reset(seed=seed, options=options)
        return self._resize(frame), info

    def step(self, action):
        total_reward, previous, frame = 0.0, None, None
        for _ in range(self.frame_skip):
            previous = frame
            frame, reward, terminated, truncated, info = self.env.step(action)
            total_reward += float(reward)
            if terminated or truncated:
                break
        pooled = frame if previous is None else np.maximum(previous, frame)
        return self._resize(pooled), total_reward, terminated, truncated, info


class LifeLossInfo(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """``info["life_lost"]``: True at a step where the ALE's life counter went down and the game goes on.

    The episode is *not* ended there: episodes (and logged returns) stay whole games, and the
    learner may treat ``life_lost`` as a terminal for its targets only. False after ``reset`` and
    at the game-over step (already a terminal).
    """

    def __init__(self, env: gym.Env):
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        self.lives = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        observation, info = self.env.reset(seed=seed, options=options)
        self.lives = self.env.unwrapped.ale.lives()
        info[LIFE_LOST_KEY] = False
        return observation, info

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        lives = self.env.unwrapped.ale.lives()
        info[LIFE_LOST_KEY] = bool(lives < self.lives and not terminated)
        self.lives = lives
        return observation, reward, terminated, truncated, info


def make_atari_env(
    env_id: str,
    *,
    noop_max: int = 30,
    frame_skip: int = 4,
    screen_size: int = 84,
    frame_stack: int = 4,
    terminal_on_life_loss: bool = False,
    repeat_action_probability: float = 0.0,
    full_action_space: bool = False,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
) -> gym.Env:
    """One ALE game with the DQN Nature / IMPALA preprocessing: ``[frame_stack, screen_size, screen_size]``
    uint8 frames.

    The defaults are those papers' settings (Mnih et al. 2015, Espeholt et al. 2018). Reward
    clipping, also theirs, is the learner's job: rewards here are the raw game score.

    Args:
        env_id: an ALE id, e.g. ``"ALE/Pong-v5"`` (any id registered by ale-py works).
        noop_max: up to this many random no-op frames after each reset (uniform in 1..noop_max);
            0: none, every episode starts from the same state.
        frame_skip: each action is repeated for this many frames; the reward is their sum and the
            observation the max of the last two (removes sprite flicker).
        screen_size: frames are resized to ``screen_size x screen_size`` grayscale.
        frame_stack: the observation holds this many most recent frames, oldest first (after a reset
            the first frame is repeated).
        terminal_on_life_loss: add ``info["life_lost"]`` at every step (see ``LifeLossInfo``); the
            episode still ends only at game over, so logged returns are whole-game scores.
        repeat_action_probability: sticky actions (Machado et al. 2018 recommend 0.25, ALE v5's
            default); 0.0, the papers' setting, turns them off.
        full_action_space: all 18 joystick actions instead of the game's minimal set (Pong: 6).
        max_episode_steps: truncate episodes after this many agent steps (each ``frame_skip``
            frames). The ALE's own limit stays: v5 ids truncate at 108,000 frames (30 minutes).
        render_mode: ``"rgb_array"``: ``render()`` returns the full-size ``[210, 160, 3]`` colour frame.

    Raises:
        ValueError: naming ``env_id`` and the install command when ale-py or OpenCV is missing.
    """
    register_atari_envs(env_id)
    # frameskip=1: MaxPoolFrameSkip skips and pools; grayscale frames from the ALE directly (its luminance palette)
    env = gym.make(
        env_id,
        frameskip=1,
        repeat_action_probability=repeat_action_probability,
        full_action_space=full_action_space,
        obs_type="grayscale",
        render_mode=render_mode,
    )
    if noop_max > 0:
        env = NoopReset(env, noop_max)
    env = MaxPoolFrameSkip(env, frame_skip, screen_size)
    if terminal_on_life_loss:
        env = LifeLossInfo(env)
    env = gym.wrappers.FrameStackObservation(env, frame_stack)  # [frame_stack, H, W]: channels first
    if max_episode_steps is not None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps)
    return env
