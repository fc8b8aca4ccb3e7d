"""Whole episodes of a policy in a fresh env: their returns, lengths and, if asked, the first one's frames.

Used by ``test`` (``ImpalaModule.test_step``) and by ``callbacks.EvaluationCallback``. What they need of a run is
one ``EpisodeSpec``, which the data module provides (``ImpalaDataModule.episode_spec``): ``EpisodeSpec.of(trainer)``.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from lit_impala.envs.factory import make_gym_env


class EpisodeSpec(NamedTuple):
    """Where whole episodes are played and how the policy acts there: the env (always a gymnasium env, which
    renders, whatever backend the actors step) and whether it acts greedily."""

    env_id: str  # gymnasium id
    env_options: dict | None = None  # make_gym_env's keyword options (ImpalaDataModule.env_options)
    deterministic: bool = True  # act with the distribution's mode (greedy); False: sample (torch's global RNG)

    @staticmethod
    def of(trainer) -> EpisodeSpec:
        """The run's spec, from its data module; ``ValueError`` naming what was found instead."""
        spec = getattr(trainer.datamodule, "episode_spec", None)
        if not isinstance(spec, EpisodeSpec):
            raise ValueError("test and EvaluationCallback play episodes of the env the data module names in its "
                             f"episode_spec (ImpalaDataModule has one); got the data module {trainer.datamodule!r}")
        return spec


class TestEpisode(NamedTuple):
    """One episode ``test`` plays (an item of ``ImpalaDataModule.test_dataloader``): its env seed, and whether it is
    recorded as an mp4."""

    seed: int
    record_video: bool = False


class PlayedEpisodes(NamedTuple):
    """What ``play_episodes`` returns."""

    returns: list[float]  # raw (unscaled) env reward summed over each episode
    lengths: list[int]  # env steps of each episode
    frames: np.ndarray | None  # uint8 [L, H, W, 3]: the first episode, one frame after reset + one per step; or None


class EpisodesStopped(Exception):
    """``play_episodes`` was asked to stop (its ``stop`` event was set) before its episodes were over."""


def _frames_to_array(frames: list[np.ndarray]) -> np.ndarray:
    """``L`` frames ``[H, W, 3]`` -> ``[L, H, W, 3]``, freeing the list as it copies: a 500-step
    CartPole episode is ~360 MB of frames, and ``np.stack`` would briefly hold it twice."""
    stacked = np.empty((len(frames), *frames[0].shape), dtype=np.uint8)
    for i in range(len(frames) - 1, -1, -1):
        stacked[i] = frames.pop()
    return stacked


def _render(env, env_id: str) -> np.ndarray:
    """The env's ``rgb_array`` frame as uint8 ``[H, W, 3]``; a float frame (MinAtar's, in [0, 1]) is scaled to 0-255."""
    frame = env.render()
    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        raise ValueError(f"env {env_id!r} does not render rgb_array frames [H, W, 3] (got {type(frame).__name__})")
    if np.issubdtype(frame.dtype, np.floating):
        return (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)
    return frame


@torch.no_grad()
def play_episodes(
    network: nn.Module,
    spec: EpisodeSpec,
    num_episodes: int,
    seed: int = 0,
    record_video: bool = False,
    max_video_frames: int = 1000,
    stop: threading.Event | None = None,
) -> PlayedEpisodes:
    """Play ``num_episodes`` whole episodes (to termination or truncation) with ``network``'s policy.

    One env ``make_gym_env(spec.env_id, **spec.env_options)`` is reset with ``seed`` before the first episode
    and without a seed afterwards, so the same seed gives the same sequence of start states. The
    network acts one observation at a time (``[T=1, B=1, *obs]``, as the actors do) on its own
    device, leaving its mode and weights untouched; an LSTM core state is carried across steps and
    reset at each episode start.

    Args:
        network: an ``ImpalaAgent`` (``forward``, ``distribution``, ``use_lstm``, ``initial_state``).
        spec: the env, its options, and greedy or sampled actions.
        num_episodes: episodes to play, >= 1.
        seed: the env's seed for the first reset.
        record_video: render the first episode: one frame after the reset and one after each step.
        max_video_frames: keep at most this many frames (the episode itself runs to its end).
        stop: checked before each step; once it is set, ``EpisodesStopped`` is raised (the env is closed).

    Returns:
        ``PlayedEpisodes``; ``frames`` is uint8 ``[min(lengths[0] + 1, max_video_frames), H, W, 3]`` when
        ``record_video``, else None.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    if max_video_frames < 1:
        raise ValueError(f"max_video_frames must be >= 1, got {max_video_frames}")
    distribution = network.distribution
    device = next(network.parameters()).device
    starts_episode = torch.ones(1, 1, dtype=torch.bool, device=device)  # is_init [T=1, B=1]
    continues_episode = torch.zeros_like(starts_episode)
    if record_video:
        # Off-screen frames need no display; without this, pygame's SDL complains on headless machines.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env_id, deterministic = spec.env_id, spec.deterministic
    env = make_gym_env(env_id, render_mode="rgb_array" if record_video else None, **(spec.env_options or {}))
    returns, lengths, frames = [], [], []
    try:
        for episode in range(num_episodes):
            observation, _ = env.reset(seed=seed if episode == 0 else None)
            recording = record_video and episode == 0
            if recording:
                frames.append(_render(env, env_id))
            core_state = network.initial_state(1, device) if network.use_lstm else None
            episode_return, length, done = 0.0, 0, False
            while not done:
                if stop is not None and stop.is_set():
                    raise EpisodesStopped(f"stopped in episode {episode + 1} of {num_episodes}")
                obs = torch.as_tensor(np.asarray(observation), device=device)[None, None]  # [1, 1, *obs]
                output = network(obs, core_state, starts_episode if length == 0 else continues_episode)
                params = output.policy_params[0]  # [1, P]
                sample = distribution.mode(params) if deterministic else distribution.sample(params)
                # [1, *sample_shape] -> [*sample_shape]: a Discrete env needs a 0-d integer, not [1]
                action = distribution.to_env_action(sample)[0].cpu().numpy()
                if output.core_states is not None:
                    core_state = (output.core_states[0][0], output.core_states[1][0])  # each [1, H]
                observation, reward, terminated, truncated, _ = env.step(action)
                episode_return += float(reward)
                length += 1
                done = terminated or truncated
                if recording and len(frames) < max_video_frames:
                    frames.append(_render(env, env_id))
            returns.append(episode_return)
            lengths.append(length)
    finally:
        env.close()
    return PlayedEpisodes(returns, lengths, _frames_to_array(frames) if frames else None)
