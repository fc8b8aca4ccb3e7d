"""Is a rollout from a remote actor node fit to learn from? Pure checks, no I/O.

A rollout is a TensorDict ``[N, T]`` (``N = envs_per_actor`` envs, ``T = unroll_length`` steps) with the keys of
``schema`` (``observation [N, T, *obs]``, ``behaviour_log_prob [N, T]``, ``behaviour_value [N, T]``,
``policy_version [N, T]`` int64, ``policy_sample [N, T, *sample]``, ``("next", "reward") [N, T]`` ...). The
learner receives every rollout into fixed buffers of that structure (every key the acting policy writes is
required), so what it checks on arrival is the values (every float must be finite, ``behaviour_value``
included); each node checks the structure of its rollout before it sends it (a message of
another size would abort the learner inside gloo), with the same ``structure_problem``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from tensordict import TensorDictBase

from lit_impala.core.distributions import ActionDistribution, Categorical, MultiCategorical
from lit_impala.schema import BEHAVIOUR_LOG_PROB_KEY, OBSERVATION_KEY, POLICY_SAMPLE_KEY, POLICY_VERSION_KEY

LOG_PROB_TOLERANCE = 1e-5  # a log-probability above 0 by more than float error is corrupt


class RolloutSpec(NamedTuple):
    """What every rollout must look like.

    fields: leaf key -> (shape, dtype), e.g. ``"observation": ((8, 20, 4), torch.float32)``.
    sample_sizes: for discrete actions, the number of choices of each component of ``policy_sample``
        (``(2,)`` for CartPole; a sample must be in ``0 .. size - 1``); None for continuous actions, whose
        ``behaviour_log_prob`` is a log-density and may be positive.
    """

    fields: dict
    sample_sizes: tuple[int, ...] | None = None


def sample_sizes_of(distribution: ActionDistribution) -> tuple[int, ...] | None:
    """``RolloutSpec.sample_sizes`` for the policy's action distribution (None: continuous)."""
    if isinstance(distribution, Categorical):
        return (distribution.num_actions,)
    if isinstance(distribution, MultiCategorical):
        return tuple(distribution.nvec)
    return None


def structure_of(rollout: TensorDictBase) -> dict:
    """``{leaf key: (shape, dtype)}`` of ``rollout`` (plain data: it travels to the nodes)."""
    return {key: (tuple(value.shape), value.dtype) for key, value in rollout.items(True, True)}


def structure_problem(rollout: TensorDictBase, fields: dict) -> str | None:
    """Why ``rollout``'s keys, shapes or dtypes differ from ``fields`` (``structure_of`` of the expected
    rollout), or None."""
    got = structure_of(rollout)
    missing, extra = [k for k in fields if k not in got], [k for k in got if k not in fields]
    if missing or extra:
        return f"keys differ: missing {missing}, unexpected {extra}"
    differ = [key for key, (shape, dtype) in fields.items() if got[key] != (tuple(shape), dtype)]
    if not differ:
        return None
    key = OBSERVATION_KEY if OBSERVATION_KEY in differ else differ[0]
    (shape, dtype), more = fields[key], f" (and {len(differ) - 1} more fields differ)" if len(differ) > 1 else ""
    if got[key][0] != tuple(shape):
        return f"{_name(key)} has shape {list(got[key][0])}, expected {list(shape)}{more}"
    return f"{_name(key)} has dtype {got[key][1]}, expected {dtype}{more}"


def rollout_problem(rollout: TensorDictBase, spec: RolloutSpec, latest_version: int) -> str | None:
    """Why ``rollout`` must not be learnt from, or None: a structure that differs from ``spec``, a
    non-finite float, a discrete ``behaviour_log_prob`` above 0, a ``policy_version`` outside
    ``0 .. latest_version`` (the learner's latest published update), a discrete ``policy_sample`` out of range."""
    problem = structure_problem(rollout, spec.fields)
    if problem is not None:
        return problem
    for key, value in rollout.items(True, True):
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            return f"{_name(key)} has {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf)"
    if spec.sample_sizes is not None:
        log_prob = rollout.get(BEHAVIOUR_LOG_PROB_KEY)
        above = log_prob > LOG_PROB_TOLERANCE
        if above.any():
            return (f"{BEHAVIOUR_LOG_PROB_KEY} is above 0 (a log-probability) at {int(above.sum())} steps, "
                    f"up to {float(log_prob.max()):.3g}")
        sample = rollout.get(POLICY_SAMPLE_KEY)
        sizes = torch.tensor(spec.sample_sizes)
        if sample.shape[-1:] != sizes.shape and len(spec.sample_sizes) > 1:
            return f"{POLICY_SAMPLE_KEY} has {sample.shape[-1]} components, expected {len(spec.sample_sizes)}"
        if (sample < 0).any() or (sample >= sizes).any():
            return f"{POLICY_SAMPLE_KEY} is outside 0 .. {[n - 1 for n in spec.sample_sizes]} at some steps"
    version = rollout.get(POLICY_VERSION_KEY)
    if (version < 0).any() or (version > latest_version).any():
        return (f"{POLICY_VERSION_KEY} {int(version.min())} .. {int(version.max())} is outside 0 .. {latest_version} "
                "(the learner's updates so far)")
    return None


def _name(key) -> str:
    return ".".join(key) if isinstance(key, tuple) else str(key)
