"""Dict observations on the env side: read a gymnasium ``Dict`` space into observation parts, and pack each
observation into the one float32 vector that travels to the learner (``core.observation_parts`` says why).

Each entry becomes a part the network reads in its own way:
- a 3-D ``Box`` is an image: channels-last ``[H, W, C]`` (C of 1, 3 or 4, or boolean cells as MinAtar's) is made
  channels-first; uint8 or boolean cells are pixels 0-255 (booleans as 0 / 255);
- any other ``Box`` is a vector (flattened); a ``Discrete(n)`` is one-hot ``[n]``, a ``MultiDiscrete`` the one-hots
  of its components; a ``MultiBinary`` is a vector of 0 / 1;
- the entry named by ``action_mask_key`` (a ``MultiBinary(n)`` or a 1-D ``Box`` of 0 / 1, one per logit) is the
  action mask: 1 where the action is legal.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from lit_impala.core.observation_parts import ObservationPart, flat_size

_SPACES = gym.spaces


def _is_channels_last(space: gym.spaces.Box) -> bool:
    return space.dtype == np.bool_ or space.shape[-1] in (1, 3, 4)


def dict_observation_parts(space: gym.spaces.Dict, action_mask_key: str | None = None) -> tuple[ObservationPart, ...]:
    """The parts of a ``Dict`` observation space, in its key order; ``ValueError`` naming an entry no part fits."""
    if action_mask_key is not None and action_mask_key not in space.spaces:
        raise ValueError(f"action_mask_key {action_mask_key!r} is not an entry of the observation space {space}")
    parts = []
    for name, entry in space.spaces.items():
        if name == action_mask_key:
            if not (isinstance(entry, _SPACES.MultiBinary) or isinstance(entry, _SPACES.Box)) or len(entry.shape) != 1:
                raise ValueError(f"action mask {name!r} must be a MultiBinary(n) or a 1-D Box of 0 / 1, got {entry}")
            parts.append(ObservationPart(name, entry.shape, "mask"))
        elif isinstance(entry, _SPACES.Box) and len(entry.shape) == 3:
            shape = (entry.shape[2], entry.shape[0], entry.shape[1]) if _is_channels_last(entry) else entry.shape
            parts.append(ObservationPart(name, tuple(int(s) for s in shape), "image",
                                         pixels=entry.dtype in (np.uint8, np.bool_)))
        elif isinstance(entry, (_SPACES.Box, _SPACES.MultiBinary)):
            parts.append(ObservationPart(name, (int(np.prod(entry.shape)),), "vector"))
        elif isinstance(entry, _SPACES.Discrete):
            parts.append(ObservationPart(name, (int(entry.n),), "vector"))
        elif isinstance(entry, _SPACES.MultiDiscrete) and entry.nvec.ndim == 1:
            parts.append(ObservationPart(name, (int(entry.nvec.sum()),), "vector"))
        else:
            raise ValueError(f"observation entry {name!r} is a {entry}; supported entries: Box, Discrete, "
                             "MultiDiscrete (1-D), MultiBinary")
    return tuple(parts)


def _pack_entry(value, entry: gym.Space, part: ObservationPart) -> np.ndarray:
    if part.kind == "image":
        value = np.asarray(value)
        if value.shape != part.shape:  # channels-last
            value = np.moveaxis(value, -1, 0)
        return (value.astype(np.float32) * (255.0 if value.dtype == np.bool_ else 1.0)).reshape(-1)
    if isinstance(entry, _SPACES.Discrete):
        one_hot = np.zeros(part.size, dtype=np.float32)
        one_hot[int(value) - int(entry.start)] = 1.0
        return one_hot
    if isinstance(entry, _SPACES.MultiDiscrete):
        one_hots = [np.eye(int(n), dtype=np.float32)[int(v) - int(s)]
                    for v, n, s in zip(np.asarray(value), entry.nvec, entry.start, strict=True)]
        return np.concatenate(one_hots)
    return np.asarray(value, dtype=np.float32).reshape(-1)


class PackDictObservation(gym.ObservationWrapper):
    """A ``Dict`` observation -> one float32 vector ``[D]``, its parts' values in ``parts`` order
    (``dict_observation_parts``); ``dict_space`` keeps the space it packs."""

    def __init__(self, env: gym.Env, action_mask_key: str | None = None):
        super().__init__(env)
        self.dict_space = env.observation_space
        self.parts = dict_observation_parts(self.dict_space, action_mask_key)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (flat_size(self.parts),), dtype=np.float32)

    def observation(self, observation):
        return np.concatenate([_pack_entry(observation[part.name], self.dict_space[part.name], part)
                               for part in self.parts])
