"""Non-finite env data caught where the env produces it: a torchrl transform on every actor's envs (both
env backends) checks each step's reward and float observation, and each reset's observation.

``raise`` (default): ``NonFiniteEnvData`` naming the env, the actor, the sub-env, its step and what was not
finite. In an actor process (an ``error_file`` is given) its traceback goes to that file and the process
exits with the message as its one line on stderr; ``actors.local`` finds the file and stops the run at once
(a deterministic fault: no restart). ``drop``: the values are replaced by 0, the
sub-env's episode is truncated there (it resets), the step is marked ``NONFINITE_KEY`` and a warning is
logged; ``data.UnrollStream`` then drops every unroll holding a marked step, so none reaches the learner.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Literal

import torch
from tensordict import TensorDictBase
from torchrl.data import Categorical, Composite
from torchrl.envs import Transform

from lit_impala.schema import NONFINITE_KEY, OBSERVATION_KEY

log = logging.getLogger(__name__)

NonFiniteMode = Literal["raise", "drop"]
WARNING_INTERVAL_S = 60.0  # drop mode: at most one warning per actor this often (the others are counted)


class NonFiniteEnvData(RuntimeError):
    """An env returned a non-finite reward or observation (``data.nonfinite_data: raise``)."""


class _ActorExit(SystemExit):
    """Ends an actor process with one line on stderr (``multiprocessing`` prints a SystemExit's message only)."""


def nonfinite_report(traceback_text: str) -> str | None:
    """The message of a ``NonFiniteEnvData`` in an actor's traceback text, or None if it holds none."""
    prefix = f"{NonFiniteEnvData.__module__}.{NonFiniteEnvData.__qualname__}: "
    for line in reversed(traceback_text.splitlines()):
        if line.startswith(prefix):
            return line.removeprefix(prefix)
    return None


class FiniteCheck(Transform):
    """Checks every reward and float observation an env of batch size ``[num_envs]`` returns.

    Args:
        env_id: named in messages.
        mode: ``raise`` or ``drop`` (see the module docstring).
        actor: the actor's index, named in messages (None: not an actor, or unknown).
        error_file: an actor's error file (``actors.local`` reads it): ``raise`` leaves the traceback there,
            then ends the process (``SystemExit``); None: ``raise`` raises ``NonFiniteEnvData``.
    """

    def __init__(self, env_id: str, mode: NonFiniteMode = "raise", actor: int | None = None,
                 error_file: str | None = None):
        super().__init__()
        if mode not in ("raise", "drop"):
            raise ValueError(f"mode must be 'raise' or 'drop', got {mode!r}")
        self.env_id = env_id
        self.mode = mode
        self.actor = actor
        self.error_file = error_file
        self.steps: torch.Tensor | None = None  # [num_envs] steps each sub-env took since it was built
        self.dropped = 0  # drop mode: sub-env steps (or resets) marked so far ...
        self._unreported = 0  # ... and those no warning has named
        self._next_warning = 0.0

    # --- torchrl hooks ---

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        if self.steps is None:
            self.steps = torch.zeros(next_tensordict.batch_size, dtype=torch.int64)
        self.steps += 1
        observation = next_tensordict.get(OBSERVATION_KEY)
        reward = next_tensordict.get("reward")
        bad_observation = _nonfinite_rows(observation)
        bad_reward = _nonfinite_rows(reward)
        bad = bad_observation | bad_reward
        if bad.any():
            problems = [self._describe(i, "reward", reward) for i in bad_reward.nonzero().flatten().tolist()]
            problems += [self._describe(i, "observation", observation) for i in bad_observation.nonzero().flatten()
                         .tolist()]
            self._handle(problems)
            next_tensordict.set(OBSERVATION_KEY, _zero_nonfinite(observation))
            next_tensordict.set("reward", _zero_nonfinite(reward))
            # End the episode there: the sub-env resets and its next unroll starts clean.
            truncated = next_tensordict.get("truncated").clone()
            truncated[bad] |= ~next_tensordict.get("terminated")[bad]
            next_tensordict.set("truncated", truncated)
            next_tensordict.set("done", next_tensordict.get("done") | bad.reshape(truncated.shape))
        return next_tensordict.set(NONFINITE_KEY, bad)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        observation = tensordict_reset.get(OBSERVATION_KEY)
        bad = _nonfinite_rows(observation)
        reset = tensordict.get("_reset", None)
        if reset is not None:
            bad &= reset.reshape(bad.shape)  # the others keep the observation their last step checked
        if bad.any():
            self._handle([self._describe(i, "observation", observation, at="reset")
                          for i in bad.nonzero().flatten().tolist()])
            tensordict_reset.set(OBSERVATION_KEY, _zero_nonfinite(observation))
        return tensordict_reset.set(NONFINITE_KEY, bad)

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        observation_spec[NONFINITE_KEY] = Categorical(2, shape=observation_spec.shape, dtype=torch.bool,
                                                      device=observation_spec.device)
        return observation_spec

    # --- messages ---

    def _describe(self, sub_env: int, what: str, values: torch.Tensor, at: str = "step") -> str:
        row = values[sub_env].reshape(-1)
        wrong = row[~torch.isfinite(row)]
        kinds = ", ".join(sorted({str(v) for v in wrong.tolist()}))
        detail = f"{kinds}" if row.numel() == 1 else f"{kinds} in {wrong.numel()} of {row.numel()} components"
        step = 0 if self.steps is None else int(self.steps[sub_env])
        if at == "step":
            when = f"at its step {step}"
        else:
            when = "at its first reset" if step == 0 else f"at the reset after its step {step}"
        return f"sub-env {sub_env} returned a non-finite {what} ({detail}) {when}"

    def _who(self) -> str:
        return (f"actor {self.actor} of " if self.actor is not None else "") + f"env {self.env_id!r}"

    def _handle(self, problems: list[str]) -> None:
        """``problems``: one description per sub-env, all of this step (or reset)."""
        others = f" (and {len(problems) - 1} more sub-envs at the same step)" if len(problems) > 1 else ""
        message = f"{self._who()}: {problems[0]}{others}"
        if self.mode == "raise":
            if self.error_file is None:
                raise NonFiniteEnvData(message)
            try:
                raise NonFiniteEnvData(message)
            except NonFiniteEnvData:
                with open(self.error_file, "w") as f:
                    f.write(traceback.format_exc())
            # An actor process: the learner reads the file and stops the run with this message. The process
            # exits with the message as its one line on stderr, instead of a traceback of torchrl's frames.
            raise _ActorExit(f"{message}: this actor stops (data.nonfinite_data=raise)")
        self.dropped += len(problems)
        now = time.monotonic()
        if now >= self._next_warning:
            more = f"; {self._unreported} more since the last warning" if self._unreported else ""
            log.warning("%s: replaced by 0, the episode ends there and its unroll is dropped "
                        "(data.nonfinite_data=drop%s)", message, more)
            self._unreported = 0
            self._next_warning = now + WARNING_INTERVAL_S
        else:
            self._unreported += len(problems)


def _nonfinite_rows(values: torch.Tensor) -> torch.Tensor:
    """``[num_envs]`` bool: the sub-envs whose ``values [num_envs, ...]`` hold a NaN or an infinity."""
    if not values.is_floating_point():
        return torch.zeros(values.shape[0], dtype=torch.bool)  # uint8 pixels, integer states: always finite
    return ~torch.isfinite(values).reshape(values.shape[0], -1).all(-1)


def _zero_nonfinite(values: torch.Tensor) -> torch.Tensor:
    if not values.is_floating_point():
        return values
    return torch.where(torch.isfinite(values), values, torch.zeros((), dtype=values.dtype))
