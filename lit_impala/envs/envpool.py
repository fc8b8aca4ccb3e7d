"""envpool as an env backend (``data.env_backend: envpool``): C++ vectorised envs stepped in one call.

The envs come out as the gymnasium backend's do (``factory.make_vector_env``): the same keys, the same
episode boundaries. envpool resets a finished env *inside its next step* (that step ignores the action
and returns the first observation with reward 0): left alone, that is one phantom transition (last
observation -> first observation) between episodes. Here finished envs are reset explicitly
(``envs.episodes.EpisodeEnv`` calls envpool's partial reset, after which the next step is a real step),
exactly as with gymnasium's disabled autoreset: ``("next", "observation")`` at a ``done`` step is the
real final observation.

Atari options map onto envpool's own preprocessing; the differences from ``envs.atari``:
docs/performance.md#env-backends-gymnasium-or-envpool.
"""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from lit_impala.envs.episodes import VectorStep, gym_wrapper_spec

# envs.atari.make_atari_env's options -> envpool's Atari config.
_ATARI_OPTIONS = {
    "noop_max": "noop_max",
    "frame_skip": "frame_skip",
    "frame_stack": "stack_num",
    "repeat_action_probability": "repeat_action_probability",
    "full_action_space": "full_action_space",
}


def import_envpool():
    """The envpool module (ValueError with the install command when it is missing)."""
    # envpool 1.2.5's import sets MPLBACKEND=Agg (and MPLCONFIGDIR) in os.environ for the whole process and
    # every process it starts: a notebook kernel started afterwards would draw nothing inline. Undo that.
    environment = dict(os.environ)
    try:
        import envpool
    except ImportError as error:
        raise ValueError(
            f'env_backend envpool needs the envpool package: pip install -e ".[envpool]" ({error})'
        ) from error
    finally:
        for name in set(os.environ) - set(environment):
            del os.environ[name]
        os.environ.update(environment)
    return envpool


def envpool_task_id(env_id: str) -> str:
    """envpool's name for a gymnasium id (``ALE/Pong-v5`` -> ``Pong-v5``); ValueError naming it if envpool has none."""
    envpool = import_envpool()
    task_id = env_id.removeprefix("ALE/")
    known = envpool.list_all_envs()
    if task_id not in known:
        close = difflib.get_close_matches(task_id, known, n=3)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(f"env_backend envpool has no env {env_id!r}.{hint}")
    return task_id


def envpool_config(
    env_id: str,
    max_episode_steps: int | None = None,
    atari_options: dict | None = None,
    observation_key: str | None = None,
    hide_observation_indices: list[int] | None = None,
    action_mask_key: str | None = None,
) -> tuple[str, dict[str, Any], bool]:
    """``(task_id, envpool.make keyword arguments, whether life losses are reported)`` for the options the
    gymnasium backend takes; ValueError naming an option envpool cannot honour."""
    if observation_key is not None or hide_observation_indices or action_mask_key is not None:
        raise ValueError("observation_key, hide_observation_indices and action_mask_key are gymnasium-backend "
                         "options; use env_backend gymnasium for them")
    task_id = envpool_task_id(env_id)
    fields = import_envpool().make_spec(task_id).config._fields
    kwargs: dict[str, Any] = {}
    if max_episode_steps is not None:
        if "max_episode_steps" not in fields:
            raise ValueError(f"env_backend envpool cannot set max_episode_steps for {env_id!r}")
        kwargs["max_episode_steps"] = max_episode_steps
    atari = "stack_num" in fields and "noop_max" in fields
    if not atari:
        if atari_options:
            raise ValueError(f"atari_options {atari_options!r} were given for {env_id!r}, which is not an Atari env")
        return task_id, kwargs, False
    options = dict(atari_options or {})
    life_loss = bool(options.pop("terminal_on_life_loss", False))
    screen_size = options.pop("screen_size", 84)
    unknown = sorted(set(options) - set(_ATARI_OPTIONS))
    if unknown:
        raise ValueError(f"atari_options {unknown} have no envpool equivalent (known: "
                         f"{sorted([*_ATARI_OPTIONS, 'screen_size', 'terminal_on_life_loss'])})")
    kwargs.update({_ATARI_OPTIONS[name]: value for name, value in options.items()})
    # envs.atari's defaults where envpool's differ: the papers' settings, raw score, no FIRE at reset.
    kwargs.setdefault("repeat_action_probability", 0.0)
    kwargs.update(img_height=screen_size, img_width=screen_size, reward_clip=False, episodic_life=False,
                  use_fire_reset=False)
    return task_id, kwargs, life_loss


def _float32_actions(space: gym.Space) -> gym.Space:
    # envpool declares MuJoCo's continuous actions float64; gymnasium (and so evaluation) float32.
    if isinstance(space, gym.spaces.Box) and space.dtype == np.float64:
        return gym.spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32), dtype=np.float32)
    return space


def describe_envpool_env(env_id: str, **options) -> tuple[gym.Space, gym.Space]:
    """Observation and action spaces of one envpool env (what ``describe_env`` checks)."""
    task_id, kwargs, _ = envpool_config(env_id, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")
        env = import_envpool().make(task_id, env_type="gymnasium", num_envs=1, **kwargs)
    try:
        return env.observation_space, _float32_actions(env.action_space)
    finally:
        env.close()


class EnvpoolVector:
    """An envpool env (sync mode: every step steps all ``num_envs``) as the ``envs.episodes.VectorEnv`` of
    ``EpisodeEnv``, which gives it the keys and shapes of ``GymWrapper`` on a gymnasium vector env.

    Not torchrl's ``MultiThreadedEnvWrapper``: it leaves finished envs to envpool's in-step reset (the
    phantom transition), and it needs ``treevalue`` and the old ``gym`` package, which envpool 1.2.5
    no longer uses. With ``report_life_loss``, ``life_lost`` is derived from envpool's ``lives``.
    """

    def __init__(self, env, report_life_loss: bool = False):
        self.num_envs = int(env.config["num_envs"])
        self.reports_life_loss = report_life_loss
        self._env = env
        self._in_order = np.arange(self.num_envs)
        self._lives: torch.Tensor | None = None
        self._observation: torch.Tensor | None = None
        action_spec = gym_wrapper_spec(_float32_actions(env.action_space), categorical=True)
        observation_spec = gym_wrapper_spec(env.observation_space)
        self.action_spec = action_spec.expand(self.num_envs, *action_spec.shape)
        self.observation_spec = observation_spec.expand(self.num_envs, *observation_spec.shape)

    def _by_env(self, values: np.ndarray, env_id: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``values`` in sub-env order (sync mode returns them in order; kept general), as a tensor of its own."""
        values = torch.tensor(values, dtype=dtype)  # a copy: what envpool returns may be its reused buffer
        if np.array_equal(env_id, self._in_order):
            return values
        out = torch.empty_like(values)
        out[torch.as_tensor(env_id)] = values
        return out

    def reset(self, mask: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
        if mask is None or self._observation is None:
            observation, info = self._env.reset()
            self._observation = self._by_env(observation, info["env_id"])
            self._lives = None
        else:
            # Partial reset: envpool then steps these envs normally (no reset inside the next step).
            env_ids = torch.nonzero(mask.reshape(-1)).squeeze(-1).numpy()
            if len(env_ids):
                observation, info = self._env.reset(env_ids)
                self._observation = self._observation.clone()
                self._observation[torch.as_tensor(info["env_id"])] = torch.as_tensor(observation)
        return self._observation

    def step(self, action: torch.Tensor) -> VectorStep:
        observation, reward, terminated, truncated, info = self._env.step(action.cpu().numpy())
        env_id = info["env_id"]
        self._observation = self._by_env(observation, env_id)
        terminated = self._by_env(terminated, env_id, torch.bool)
        life_lost = None
        if self.reports_life_loss:
            lives = self._by_env(info["lives"], env_id, torch.int64)
            # As envs.atari.LifeLossInfo: a life lost that is not the game over
            life_lost = torch.zeros(self.num_envs, dtype=torch.bool) if self._lives is None else lives < self._lives
            life_lost &= ~terminated
            self._lives = lives
        return VectorStep(self._observation, self._by_env(reward, env_id, torch.float32), terminated,
                          self._by_env(truncated, env_id, torch.bool), life_lost)

    def seed(self, seed: int | None) -> None:
        pass  # envpool seeds at construction (make_envpool_env); env i gets seed + i

    def close(self) -> None:
        self._env.close()


def make_envpool_env(env_id: str, num_envs: int, seed: int | None = None, **options) -> EnvpoolVector:
    """``num_envs`` envpool envs stepped by one thread."""
    task_id, kwargs, life_loss = envpool_config(env_id, **options)
    # One thread per actor process: the actors are already processes, one per core.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")  # envpool's Box bounds
        env = import_envpool().make(task_id, env_type="gymnasium", num_envs=num_envs, batch_size=num_envs,
                                    num_threads=1, seed=int(np.uint32(seed or 0)) % (2**31 - num_envs), **kwargs)
    return EnvpoolVector(env, report_life_loss=life_loss)
