"""envpool as an env backend (``data.env_backend: envpool``): C++ vectorised envs stepped in one call.

The envs come out as the gymnasium backend's do (``factory.make_vector_env``): the same keys, the same
episode boundaries. envpool resets a finished env *inside its next step* (that step ignores the action
and returns the first observation with reward 0): left alone, that is one phantom transition (last
observation -> first observation) between episodes. Here torchrl resets finished envs explicitly
(``reset`` with a ``_reset`` mask: envpool's partial reset, after which the next step is a real step),
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
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Categorical, Composite, TensorSpec, Unbounded
from torchrl.envs import EnvBase
from torchrl.envs.libs.gym import _gym_to_torchrl_spec_transform, set_gym_backend

from lit_impala.schema import LIFE_LOST_KEY

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


def gym_wrapper_spec(space: gym.Space, categorical: bool = False) -> TensorSpec:
    """The torchrl spec torchrl's ``GymWrapper`` gives a gymnasium ``space`` (``categorical``: discrete actions as
    indices), so that the envpool backend describes an env exactly as the gymnasium backend does.

    The one use of a torchrl private name outside ``actors.torchrl_distributed``: torchrl 0.14 converts spaces only
    in ``torchrl.envs.libs.gym._gym_to_torchrl_spec_transform`` (GymWrapper's own conversion) and has no public
    function for it. ``tests/unit/test_torchrl_internals.py`` checks that it still gives what GymWrapper gives.
    """
    with set_gym_backend("gymnasium"):
        return _gym_to_torchrl_spec_transform(space, categorical_action_encoding=categorical)


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


class EnvpoolEnv(EnvBase):
    """An envpool env (sync mode: every step steps all ``num_envs``) as a torchrl env with the keys and
    shapes of ``GymWrapper`` on a gymnasium vector env.

    Not torchrl's ``MultiThreadedEnvWrapper``: it leaves finished envs to envpool's in-step reset (the
    phantom transition), and it needs ``treevalue`` and the old ``gym`` package, which envpool 1.2.5
    no longer uses. With ``report_life_loss``, ``life_lost`` is derived from envpool's ``lives``.
    """

    def __init__(self, env, report_life_loss: bool = False):
        num_envs = int(env.config["num_envs"])
        super().__init__(batch_size=torch.Size([num_envs]))
        self._env = env
        self._report_life_loss = report_life_loss
        self._lives: torch.Tensor | None = None
        self._observation = None
        action_spec = gym_wrapper_spec(_float32_actions(env.action_space), categorical=True)
        observation_spec = gym_wrapper_spec(env.observation_space)
        self.action_spec = action_spec.expand(num_envs, *action_spec.shape)
        self.observation_spec = Composite(observation=observation_spec.expand(num_envs, *observation_spec.shape),
                                          shape=self.batch_size)
        if report_life_loss:
            self.observation_spec[LIFE_LOST_KEY] = Categorical(2, shape=self.batch_size, dtype=torch.bool)
        self.reward_spec = Unbounded(shape=(num_envs, 1))
        flag = Categorical(2, shape=(num_envs, 1), dtype=torch.bool)
        self.done_spec = Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=self.batch_size)

    def _reset(self, tensordict: TensorDictBase | None, **kwargs) -> TensorDictBase:
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None or self._observation is None:
            observation, _ = self._env.reset()
            self._observation = torch.as_tensor(observation).clone()
        else:
            # Partial reset: envpool then steps these envs normally (no reset inside the next step).
            env_ids = torch.nonzero(reset.reshape(-1)).squeeze(-1).numpy()
            if len(env_ids):
                observation, info = self._env.reset(env_ids)
                self._observation[torch.as_tensor(info["env_id"])] = torch.as_tensor(observation)
        out = self.full_done_spec.zero()
        out.set("observation", self._observation.clone())
        if self._report_life_loss:
            out.set(LIFE_LOST_KEY, torch.zeros(self.batch_size, dtype=torch.bool))
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get(self.action_key).cpu().numpy()
        observation, reward, terminated, truncated, info = self._env.step(action)
        order = torch.as_tensor(info["env_id"])  # sync mode returns envs in order; kept general
        self._observation = torch.empty_like(self._observation)
        self._observation[order] = torch.as_tensor(observation)
        terminated_t = torch.zeros(self.batch_size, dtype=torch.bool)
        truncated_t = torch.zeros(self.batch_size, dtype=torch.bool)
        reward_t = torch.zeros(self.batch_size, dtype=torch.float32)
        terminated_t[order] = torch.as_tensor(terminated, dtype=torch.bool)
        truncated_t[order] = torch.as_tensor(truncated, dtype=torch.bool)
        reward_t[order] = torch.as_tensor(reward, dtype=torch.float32)
        out = TensorDict(
            {
                "observation": self._observation.clone(),
                "reward": reward_t.unsqueeze(-1),
                "terminated": terminated_t.unsqueeze(-1),
                "truncated": truncated_t.unsqueeze(-1),
                "done": (terminated_t | truncated_t).unsqueeze(-1),
            },
            batch_size=self.batch_size,
        )
        if self._report_life_loss:
            lives = torch.empty(self.batch_size, dtype=torch.int64)
            lives[order] = torch.as_tensor(info["lives"], dtype=torch.int64)
            # As envs.atari.LifeLossInfo: a life lost that is not the game over
            lost = torch.zeros(self.batch_size, dtype=torch.bool) if self._lives is None else lives < self._lives
            lost &= ~terminated_t
            self._lives = lives
            out.set(LIFE_LOST_KEY, lost)
        return out

    def _set_seed(self, seed: int | None) -> None:
        pass  # envpool seeds at construction (make_envpool_env); env i gets seed + i

    def close(self, *, raise_if_closed: bool = True) -> None:
        self._env.close()
        super().close(raise_if_closed=raise_if_closed)


def make_envpool_env(env_id: str, num_envs: int, seed: int | None = None, **options) -> EnvBase:
    """``num_envs`` envpool envs stepped by one thread, as one torchrl env of batch size ``[num_envs]``."""
    task_id, kwargs, life_loss = envpool_config(env_id, **options)
    # One thread per actor process: the actors are already processes, one per core.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")  # envpool's Box bounds
        env = import_envpool().make(task_id, env_type="gymnasium", num_envs=num_envs, batch_size=num_envs,
                                    num_threads=1, seed=int(np.uint32(seed or 0)) % (2**31 - num_envs), **kwargs)
    return EnvpoolEnv(env, report_life_loss=life_loss)
