"""Picklable env factories: a gymnasium id -> one torchrl env holding several sub-envs, by env backend.

``BACKENDS`` is the registry of env backends (``data.env_backend``): for each name, how to read an env's spaces
in this process (``describe_env``) and how to build the batched torchrl env an actor steps (``make_vector_env``).
Evaluation, ``test`` and videos play single gymnasium envs (``make_gym_env``) whatever the backend, since only
gymnasium renders; the data module checks that a backend describes an env as gymnasium does.

Each backend's ``make`` gives ``envs_per_actor`` sub-envs (an ``envs.episodes.VectorEnv``), which
``envs.episodes.EpisodeEnv`` steps, resets and keeps the episode keys of. The gymnasium backend steps them in one
gymnasium ``SyncVectorEnv`` with autoreset *disabled* (no extra processes; ``envs.gymnasium_vector``), envpool in
its C++ pool (``envs.envpool``). Both give the same keys and episode boundaries: ``("next", "observation")`` is
always the real final observation of a step (needed to bootstrap truncated episodes), and no phantom transition
appears between episodes; ``tests/unit/test_envs.py`` checks each backend.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from lit_impala.core.observation_parts import ObservationPart, flat_size
from lit_impala.envs.atari import is_atari_id, make_atari_env, register_atari_envs
from lit_impala.envs.dict_observation import PackDictObservation, dict_observation_parts
from lit_impala.envs.envpool import EnvpoolVector, describe_envpool_env, make_envpool_env
from lit_impala.envs.episodes import EpisodeEnv, VectorEnv
from lit_impala.envs.finite import FiniteCheck, NonFiniteMode
from lit_impala.envs.gymnasium_vector import GymnasiumVector
from lit_impala.envs.wrappers import (
    BooleanImageAsPixels,
    ChannelsFirst,
    HideObservationComponents,
    ReportErrors,
    SelectObservationKey,
)

EnvBackend = Literal["gymnasium", "envpool"]  # the names of BACKENDS, as a type the CLI checks and shows


class EnvFacts(NamedTuple):
    """What the learner's network must know about an env, read once from its spaces."""

    env_id: str
    observation_shape: tuple[int, ...]  # channels-first for images; (D,) for a packed dict observation
    observation_dtype: str  # "float32" or "uint8" (pixels travel as uint8)
    action_space: gym.Space
    observation_parts: tuple[ObservationPart, ...] | None = None  # a dict observation's layout (packed in D)

    @property
    def is_image(self) -> bool:
        return len(self.observation_shape) == 3


def _import_env_module(env_id: str) -> None:
    # "module:EnvId" is gymnasium's way to register third-party envs; import before reading the registry.
    if ":" in env_id:
        module = env_id.split(":", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(
                f"Env id {env_id!r} needs the module {module!r}, which cannot be imported: {error}"
            ) from error
    elif is_atari_id(env_id):
        register_atari_envs(env_id)  # ALE ids exist in gymnasium's registry once ale-py is imported
    elif env_id.startswith("MinAtar/"):
        try:
            import minatar.gym
        except ImportError as error:
            raise ValueError(f'Env id {env_id!r} needs the minatar package: pip install -e ".[minatar]"') from error
        if env_id not in gym.registry:
            minatar.gym.register_envs()


def make_gym_env(
    env_id: str,
    max_episode_steps: int | None = None,
    observation_key: str | None = None,
    hide_observation_indices: list[int] | None = None,
    check_env: bool = True,
    render_mode: str | None = None,
    atari_options: dict | None = None,
    action_mask_key: str | None = None,
) -> gym.Env:
    """One gymnasium env with the observation wrappers the options ask for.

    Args:
        env_id: gymnasium id; ``"module:EnvId"`` imports ``module`` first (e.g. ``minigrid:MiniGrid-Empty-5x5-v0``).
        max_episode_steps: override the registered time limit (episodes are *truncated* there).
        observation_key: for dict observations, the entry the agent sees.
        hide_observation_indices: components of a vector observation hidden from the agent.
        check_env: keep gymnasium's ``PassiveEnvChecker``. Actor copies drop it: it is one more Python
            call per env step, and the same env was already built with it by ``describe_env``.
        render_mode: gymnasium's ``render_mode``, e.g. ``"rgb_array"`` for ``env.render()`` to return
            ``[H, W, 3]`` uint8 frames (evaluation videos); None (default): the env does not render.
        atari_options: for Atari ids (``ALE/Pong-v5``), ``make_atari_env``'s preprocessing options, e.g.
            ``{"terminal_on_life_loss": True}``; None: the DQN / IMPALA defaults (``[4, 84, 84]`` uint8
            frames). Atari envs are built by ``make_atari_env`` whether or not this is given.
        action_mask_key: for dict observations, the entry holding the legal actions (1 / 0 per action).

    A dict observation without ``observation_key`` is packed whole into one float32 vector
    (``envs.dict_observation.PackDictObservation``); the network reads its parts again.
    """
    _import_env_module(env_id)
    atari = is_atari_id(env_id)
    if atari:
        env = make_atari_env(
            env_id, max_episode_steps=max_episode_steps, render_mode=render_mode, **(atari_options or {})
        )
    elif atari_options:
        raise ValueError(f"atari_options {atari_options!r} were given for {env_id!r}, which is not an Atari (ALE) env")
    else:
        kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
        env = gym.make(env_id, disable_env_checker=not check_env, render_mode=render_mode, **kwargs)
    if observation_key is not None:
        if (
            not isinstance(env.observation_space, gym.spaces.Dict)
            or observation_key not in env.observation_space.spaces
        ):
            env.close()
            raise ValueError(
                f"observation_key {observation_key!r} is not an entry of {env_id!r}'s observation space "
                f"{env.observation_space}"
            )
        if action_mask_key is not None:
            env.close()
            raise ValueError(f"action_mask_key {action_mask_key!r} needs the whole dict observation; observation_key "
                             f"{observation_key!r} keeps one entry of it")
        env = SelectObservationKey(env, observation_key)
    elif isinstance(env.observation_space, gym.spaces.Dict):
        try:
            return PackDictObservation(env, action_mask_key)
        except ValueError:
            env.close()
            raise
    if action_mask_key is not None:
        env.close()
        raise ValueError(f"action_mask_key {action_mask_key!r} is for dict observations; {env_id!r} has "
                         f"{env.observation_space}")
    space = env.observation_space
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.dtype == np.bool_:
        env = BooleanImageAsPixels(env)  # MinAtar: [10, 10, C] bool -> [C, 10, 10] uint8
    elif not atari and isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.shape[-1] in (1, 3, 4):
        env = ChannelsFirst(env)  # Atari frame stacks are already [C, H, W]
    if hide_observation_indices:
        if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
            env.close()
            raise ValueError(f"hide_observation_indices needs a vector observation; {env_id!r} has {space}")
        bad = [i for i in hide_observation_indices if not 0 <= i < space.shape[0]]
        if bad:
            env.close()
            raise ValueError(
                f"hide_observation_indices {bad} are outside {env_id!r}'s observation of size {space.shape[0]}"
            )
        env = HideObservationComponents(env, hide_observation_indices)
    return env


def describe_env(env_id: str, backend: EnvBackend = "gymnasium", **options) -> EnvFacts:
    """Build one env in this process with ``backend``, check it is supported and return its facts.

    Raises ``ValueError`` naming the id for an unknown env, and naming the space for an observation
    or action space no agent here handles. Called before any actor process starts.
    """
    try:
        obs_space, act_space = BACKENDS[backend].spaces(env_id, **options)
    except ValueError:
        raise
    except Exception as error:  # e.g. a missing optional dependency of the env
        raise ValueError(f"Env {env_id!r} could not be created ({backend}): {type(error).__name__}: {error}") from error
    return _facts(env_id, obs_space, act_space, options.get("action_mask_key"))


def gymnasium_spaces(env_id: str, **options) -> tuple[gym.Space, gym.Space]:
    """The gymnasium backend's ``spaces``: one env made and closed in this process."""
    _import_env_module(env_id)
    registered = env_id.split(":", 1)[-1]
    if registered not in gym.registry:
        close = difflib.get_close_matches(registered, list(gym.registry), n=3)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(f"Unknown gymnasium env id {env_id!r}.{hint}")
    env = make_gym_env(env_id, **options)
    try:
        # A packed dict observation is described by its dict space: the facts hold its parts.
        return getattr(env, "dict_space", env.observation_space), env.action_space
    finally:
        env.close()


def _facts(env_id: str, obs_space: gym.Space, act_space: gym.Space, action_mask_key: str | None = None) -> EnvFacts:
    parts = None
    if isinstance(obs_space, gym.spaces.Dict):
        parts = dict_observation_parts(obs_space, action_mask_key)
    elif not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) in (1, 3)):
        raise ValueError(
            f"Env {env_id!r} has observation space {obs_space}; supported: a 1-D Box (vector), an image Box [H, W, C]"
            " or a Dict of those (and Discrete, MultiBinary)."
        )
    if isinstance(act_space, gym.spaces.Box):
        if len(act_space.shape) != 1 or not (np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all()):
            raise ValueError(
                f"Env {env_id!r} has action space {act_space}; a continuous action space must be a 1-D Box with "
                "finite bounds."
            )
    elif not isinstance(act_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        raise ValueError(f"Env {env_id!r} has action space {act_space}; supported: Discrete, MultiDiscrete, 1-D Box.")
    if parts is not None:
        if any(part.kind == "mask" for part in parts) and isinstance(act_space, gym.spaces.Box):
            raise ValueError(f"Env {env_id!r}: an action mask is for discrete actions; its action space is {act_space}")
        return EnvFacts(env_id, (flat_size(parts),), "float32", act_space, parts)
    dtype = "uint8" if obs_space.dtype == np.uint8 else "float32"
    return EnvFacts(env_id, tuple(int(d) for d in obs_space.shape), dtype, act_space)


def make_vector_env(
    env_id: str,
    num_envs: int,
    seed: int | None = None,
    error_file: str | None = None,
    backend: EnvBackend = "gymnasium",
    nonfinite_data: NonFiniteMode = "raise",
    actor: int | None = None,
    **options,
) -> EpisodeEnv:
    """``num_envs`` copies of ``env_id`` as one batched torchrl env of batch size ``[num_envs]``
    (``envs.episodes.EpisodeEnv``).

    Each step is checked first (``envs.finite.FiniteCheck``): a non-finite reward or observation raises or is
    dropped there (``nonfinite_data``; messages name ``actor``). Then the keys of torchrl's ``InitTracker``
    (``is_init``: the observation starts an episode, so recurrent actors reset their state), ``RewardSum`` and
    ``StepCounter`` (running episode return and length; at a ``done`` step they hold the finished episode's).
    With ``error_file``, an exception from the envs, or the check's, leaves its traceback there. ``backend``: a
    name of ``BACKENDS``.
    """
    check = FiniteCheck(env_id, nonfinite_data, actor, error_file)
    env = EpisodeEnv(BACKENDS[backend].make(env_id, num_envs, seed, error_file, **options), check)
    if seed is not None:
        env.set_seed(seed)  # gymnasium seeds its envs here; envpool seeded them when it made them
    return env


def gymnasium_vector_env(env_id: str, num_envs: int, seed: int | None, error_file: str | None,
                         **options) -> GymnasiumVector:
    """The gymnasium backend's ``make``: a ``SyncVectorEnv`` of ``make_gym_env`` envs, autoreset disabled (seeded
    by ``make_vector_env``). With Atari's ``terminal_on_life_loss`` the learner treats a lost life as the end of an
    episode (the game itself goes on, and so does the logged return): ``envs.atari.LifeLossInfo`` puts the flag in
    the step info."""
    vector_env = SyncVectorEnv(
        [partial(make_gym_env, env_id, check_env=False, **options) for _ in range(num_envs)],
        autoreset_mode=AutoresetMode.DISABLED,
    )
    if error_file is not None:
        vector_env = ReportErrors(vector_env, error_file)
    return GymnasiumVector(vector_env, bool((options.get("atari_options") or {}).get("terminal_on_life_loss")))


def envpool_vector_env(env_id: str, num_envs: int, seed: int | None, error_file: str | None,
                       **options) -> EnvpoolVector:
    """The envpool backend's ``make`` (its C++ errors reach the actor's own error report)."""
    return make_envpool_env(env_id, num_envs, seed, **options)


class Backend(NamedTuple):
    """An env backend: how to read an env's spaces here and how to build the batched env an actor steps."""

    spaces: Callable[..., tuple[gym.Space, gym.Space]]  # (env_id, **env options) -> (observation, action) spaces
    make: Callable[..., VectorEnv]  # (env_id, num_envs, seed, error_file, **env options) -> num_envs sub-envs
    install: str  # what to install for it


BACKENDS: dict[str, Backend] = {
    "gymnasium": Backend(gymnasium_spaces, gymnasium_vector_env, "gymnasium (always there)"),
    "envpool": Backend(describe_envpool_env, envpool_vector_env, 'pip install -e ".[envpool]"'),
}


def actor_seeds(seed: int, num_actors: int, rank: int = 0) -> list[int]:
    """Distinct, reproducible env seeds for each actor (and each DDP rank)."""
    return [int(s) for s in np.random.SeedSequence([seed, rank]).generate_state(num_actors)]


def action_space_spec(space: gym.Space) -> dict:
    """A plain-data description of an action space (what the CLI links into the model)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.MultiDiscrete):
        return {"type": "multi_discrete", "nvec": [int(n) for n in space.nvec]}
    if isinstance(space, gym.spaces.Box):
        return {"type": "box", "low": space.low.astype(float).tolist(), "high": space.high.astype(float).tolist()}
    raise ValueError(f"unsupported action space {space}")


def action_space_from_spec(spec: dict) -> gym.Space:
    """Inverse of ``action_space_spec``."""
    kind = spec.get("type")
    if kind == "discrete":
        return gym.spaces.Discrete(spec["n"])
    if kind == "multi_discrete":
        return gym.spaces.MultiDiscrete(spec["nvec"])
    if kind == "box":
        return gym.spaces.Box(np.array(spec["low"], dtype=np.float32), np.array(spec["high"], dtype=np.float32))
    raise ValueError(f"unknown action space spec {spec!r}: 'type' must be discrete, multi_discrete or box")
