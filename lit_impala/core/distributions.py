"""Action distributions over a policy head's output ``params [..., P]``: sample, mode, log-prob, entropy.

Small picklable plain-Python objects (no parameters, no state), so the actors and the learner build the
same one from the env's action space and evaluate exactly the same distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import gymnasium
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SQUASHES = ("clip", "tanh")
# log std is clamped to [e^-5, e^2] ~ [0.0067, 7.4]: a std collapsing towards 0 makes the log-prob of
# any other action (e.g. an older actor's sample) explode and with it the importance ratio rho; an
# exploding std only adds noise that clip/tanh throws away at the action bounds.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class ActionDistribution:
    """Interface of every action distribution; ``params`` is the policy head's output ``[..., P]``.

    A *sample* is the value whose log-probability the learner scores (what the actors record); the
    env receives ``to_env_action(sample)``. Leading dims ``[...]`` are arbitrary, e.g. ``[T, B]``.
    """

    sample_dtype: torch.dtype

    @property
    def param_size(self) -> int:
        """P, the size of the last dim of ``params``."""
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (without the leading dims)."""
        raise NotImplementedError

    def sample(self, params: Tensor) -> Tensor:
        """A random sample ``[..., *sample_shape]`` (no gradient)."""
        raise NotImplementedError

    def mode(self, params: Tensor) -> Tensor:
        """The deterministic (greedy) action ``[..., *sample_shape]``, in the same space as ``sample``."""
        raise NotImplementedError

    def log_prob(self, params: Tensor, sample: Tensor) -> Tensor:
        """Log-probability (or log-density) of ``sample`` ``[..., *sample_shape]`` -> ``[...]``."""
        raise NotImplementedError

    def entropy(self, params: Tensor) -> Tensor:
        """Entropy ``[...]``."""
        raise NotImplementedError

    def to_env_action(self, sample: Tensor) -> Tensor:
        """What the env receives for ``sample``; identity unless overridden."""
        return sample


# --- categorical helpers shared by Categorical and MultiCategorical -----------------------------------


def _categorical_sample(logits: Tensor) -> Tensor:
    """Gumbel-max: argmax(logits + Gumbel noise) ~ Categorical(softmax(logits)), any leading dims."""
    # Clamping away from 0 keeps -log(-log u) finite; rand_like already excludes 1.
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    return torch.argmax(logits - torch.log(-torch.log(uniform)), dim=-1)


def _categorical_log_prob(logits: Tensor, action: Tensor) -> Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, action.long().unsqueeze(-1)).squeeze(-1)


def _categorical_entropy(logits: Tensor) -> Tensor:
    log_probs = torch.log_softmax(logits, dim=-1)
    # A masked action (logit -inf) has p log p = 0 * -inf = nan; clamping keeps its term at 0.
    log_probs = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
    return -(log_probs.exp() * log_probs).sum(-1)


@dataclass
class Categorical(ActionDistribution):
    """One discrete action out of ``num_actions``; ``params`` are logits ``[..., num_actions]``,
    a sample is an int64 index ``[...]``."""

    num_actions: int
    sample_dtype = torch.int64

    def __post_init__(self):
        if int(self.num_actions) < 1:
            raise ValueError(f"Categorical needs num_actions >= 1, got {self.num_actions}")
        self.num_actions = int(self.num_actions)

    @property
    def param_size(self) -> int:
        return self.num_actions

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return ()

    @torch.no_grad()
    def sample(self, params: Tensor) -> Tensor:
        return _categorical_sample(params)

    def mode(self, params: Tensor) -> Tensor:
        return torch.argmax(params, dim=-1)

    def log_prob(self, params: Tensor, sample: Tensor) -> Tensor:
        return _categorical_log_prob(params, sample)

    def entropy(self, params: Tensor) -> Tensor:
        return _categorical_entropy(params)


@dataclass
class MultiCategorical(ActionDistribution):
    """Independent discrete actions, component i out of ``nvec[i]`` (gymnasium ``MultiDiscrete``).

    ``params`` are the components' logits concatenated, ``[..., sum(nvec)]``; a sample is int64
    ``[..., len(nvec)]``; log-prob and entropy are sums over components (independence).
    """

    nvec: list[int]
    sample_dtype = torch.int64

    def __post_init__(self):
        self.nvec = [int(n) for n in self.nvec]
        if not self.nvec or min(self.nvec) < 1:
            raise ValueError(f"MultiCategorical needs a non-empty nvec of sizes >= 1, got {self.nvec}")

    @property
    def param_size(self) -> int:
        return sum(self.nvec)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (len(self.nvec),)

    def _split(self, params: Tensor) -> tuple[Tensor, ...]:
        return torch.split(params, self.nvec, dim=-1)

    @torch.no_grad()
    def sample(self, params: Tensor) -> Tensor:
        return torch.stack([_categorical_sample(logits) for logits in self._split(params)], dim=-1)

    def mode(self, params: Tensor) -> Tensor:
        return torch.stack([torch.argmax(logits, dim=-1) for logits in self._split(params)], dim=-1)

    def log_prob(self, params: Tensor, sample: Tensor) -> Tensor:
        terms = [_categorical_log_prob(logits, sample[..., i]) for i, logits in enumerate(self._split(params))]
        return torch.stack(terms, dim=-1).sum(-1)

    def entropy(self, params: Tensor) -> Tensor:
        return torch.stack([_categorical_entropy(logits) for logits in self._split(params)], dim=-1).sum(-1)


def _as_float_list(value: float | Sequence[float] | np.ndarray, size: int, name: str) -> list[float]:
    values = np.broadcast_to(np.asarray(value, dtype=np.float64), (size,))
    if not np.all(np.isfinite(values)):
        raise ValueError(f"DiagGaussian needs finite {name} bounds, got {values.tolist()}")
    return [float(v) for v in values]


@dataclass
class DiagGaussian(ActionDistribution):
    """A ``D``-dim continuous action from a diagonal Gaussian, mapped into the box ``[low, high]``.

    ``params [..., 2D] = (mean, log_std)``. A sample is the *unbounded* Gaussian draw ``u [..., D]``:
    actors and learner score the same ``u`` under ``N(mean, std)``, so the importance ratio is exact.
    The env receives ``to_env_action(u)``:

    - ``squash="clip"``: ``clamp(u, low, high)``; ``log_prob`` is the Gaussian log-density of ``u``.
    - ``squash="tanh"``: ``low + (tanh(u) + 1) / 2 * (high - low)``; ``log_prob`` adds the change of
      variables ``-sum log|da/du|`` so it is the log-density of the env action. That term does not
      depend on ``params``, so it cancels in ``log_rho`` and has no gradient. ``entropy`` stays the
      Gaussian's (the squashed density has no closed-form entropy; the usual approximation, as in SAC).

    Args:
        action_dim: D.
        low, high: the action box's bounds, scalars or length-D sequences (stored as float lists).
        squash: ``"clip"`` or ``"tanh"``, how ``u`` is mapped into the box.
    """

    action_dim: int
    low: list[float]
    high: list[float]
    squash: str = "clip"
    sample_dtype = torch.float32

    def __post_init__(self):
        self.action_dim = int(self.action_dim)
        if self.action_dim < 1:
            raise ValueError(f"DiagGaussian needs action_dim >= 1, got {self.action_dim}")
        if self.squash not in SQUASHES:
            raise ValueError(f"unknown squash {self.squash!r}; valid: {', '.join(SQUASHES)}")
        self.low = _as_float_list(self.low, self.action_dim, "low")
        self.high = _as_float_list(self.high, self.action_dim, "high")
        if not all(lo < hi for lo, hi in zip(self.low, self.high, strict=False)):
            raise ValueError(f"DiagGaussian needs low < high, got low={self.low}, high={self.high}")

    @property
    def param_size(self) -> int:
        return 2 * self.action_dim

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.action_dim,)

    def mean_and_log_std(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """``params [..., 2D] -> (mean [..., D], log_std [..., D])``, log_std clamped to a stable range."""
        mean, log_std = params.chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    @torch.no_grad()
    def sample(self, params: Tensor) -> Tensor:
        mean, log_std = self.mean_and_log_std(params)
        return mean + log_std.exp() * torch.randn_like(mean)

    def mode(self, params: Tensor) -> Tensor:
        return self.mean_and_log_std(params)[0]

    def log_prob(self, params: Tensor, sample: Tensor) -> Tensor:
        mean, log_std = self.mean_and_log_std(params)
        z = (sample - mean) * torch.exp(-log_std)
        log_prob = (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)
        if self.squash == "tanh":
            # log|da/du| = log(scale) + log(1 - tanh(u)^2), the latter as 2 (log 2 - u - softplus(-2u)),
            # which stays finite where tanh(u) rounds to +-1.
            log_scale = torch.log(self._bound(self.high, sample) - self._bound(self.low, sample)) - math.log(2.0)
            log_det = log_scale + 2.0 * (math.log(2.0) - sample - F.softplus(-2.0 * sample))
            log_prob = log_prob - log_det.sum(-1)
        return log_prob

    def entropy(self, params: Tensor) -> Tensor:
        _, log_std = self.mean_and_log_std(params)
        return (0.5 + _HALF_LOG_2PI + log_std).sum(-1)

    def to_env_action(self, sample: Tensor) -> Tensor:
        low, high = self._bound(self.low, sample), self._bound(self.high, sample)
        if self.squash == "clip":
            return torch.clamp(sample, low, high)
        return low + (torch.tanh(sample) + 1.0) / 2.0 * (high - low)

    @staticmethod
    def _bound(bound: list[float], like: Tensor) -> Tensor:
        return torch.as_tensor(bound, dtype=like.dtype, device=like.device)


def make_distribution(action_space: gymnasium.spaces.Space, squash: str = "clip") -> ActionDistribution:
    """The distribution for a gymnasium action space: Discrete, MultiDiscrete or a 1-D finite Box.

    Args:
        action_space: the env's (single, not vectorised) action space.
        squash: for a Box, how the Gaussian sample is mapped into the bounds: ``"clip"`` or ``"tanh"``.
    """
    if squash not in SQUASHES:
        raise ValueError(f"unknown squash {squash!r}; valid: {', '.join(SQUASHES)}")
    spaces = gymnasium.spaces
    # A non-zero `start` would need an offset between our 0-based samples and the env's actions.
    if isinstance(action_space, spaces.Discrete):
        if int(action_space.start) != 0:
            raise ValueError(f"unsupported action space {action_space}: Discrete with start != 0")
        return Categorical(int(action_space.n))
    if isinstance(action_space, spaces.MultiDiscrete):
        if action_space.nvec.ndim != 1 or np.any(action_space.start != 0):
            raise ValueError(f"unsupported action space {action_space}: MultiDiscrete must be 1-D with start 0")
        return MultiCategorical(action_space.nvec.tolist())
    if isinstance(action_space, spaces.Box):
        if len(action_space.shape) != 1 or not action_space.is_bounded("both"):
            raise ValueError(f"unsupported action space {action_space}: Box must be 1-D with finite bounds")
        return DiagGaussian(action_space.shape[0], action_space.low.tolist(), action_space.high.tolist(), squash)
    raise ValueError(f"unsupported action space {action_space}: expected Discrete, MultiDiscrete or a 1-D finite Box")
