"""What travels from the actors to the learner: every TensorDict key, the keys a learner batch keeps,
and the one place where collector TensorDicts ``[B, T]`` become a time-major ``Trajectory`` ``[T, B]``.

The episode-boundary rules that turn a ``Trajectory`` into V-trace inputs are in ``core.episode_boundaries``.
"""

from __future__ import annotations

from typing import NamedTuple

from tensordict import TensorDictBase
from torch import Tensor

# --- written by the actors' env (torchrl transforms and our wrappers) ---------------------------------------
OBSERVATION_KEY = "observation"
IS_INIT_KEY = "is_init"  # torchrl InitTracker: this step's observation starts an episode
EPISODE_RETURN_KEY = "episode_reward"  # torchrl RewardSum: running return of the episode
EPISODE_LENGTH_KEY = "step_count"  # torchrl StepCounter: steps taken in the episode
LIFE_LOST_KEY = "life_lost"  # Atari with terminal_on_life_loss: a life was lost at this step (learning only)
NONFINITE_KEY = "nonfinite"  # bool [B, T], data.nonfinite_data drop (envs.finite): the env returned a NaN or inf
# here (replaced by 0); data.UnrollStream drops the unrolls holding one, so the learner never reads this key

# --- written by the actors' policy (actors.policy.ActingPolicy) ---------------------------------------------
ACTION_KEY = "action"  # what the env receives (continuous samples are clipped or squashed into bounds)
POLICY_SAMPLE_KEY = "policy_sample"  # what the distribution drew: the log-probs on both sides are of this
BEHAVIOUR_LOG_PROB_KEY = "behaviour_log_prob"  # log mu(a_t | x_t) of the policy that acted
BEHAVIOUR_VALUE_KEY = "behaviour_value"  # float32 [N, T]: V(x_t) under the weights that acted (PPO's old values)
POLICY_VERSION_KEY = "policy_version"  # int64: learner updates behind the weights that acted
CORE_STATE_KEYS = ("core_state_h", "core_state_c")  # LSTM state entering the step

# --- written by the dataset (data.UnrollStream) -------------------------------------------------------------
REPLAYED_KEY = "replayed"  # bool [B, T]: a second or later pass over this batch (data.passes_per_batch)

# Everything the learner reads from a collector batch; the dataset keeps only these keys
# (the core-state keys exist only for recurrent policies).
BATCH_KEYS = [
    OBSERVATION_KEY,
    IS_INIT_KEY,
    POLICY_SAMPLE_KEY,
    BEHAVIOUR_LOG_PROB_KEY,
    BEHAVIOUR_VALUE_KEY,
    POLICY_VERSION_KEY,
    *CORE_STATE_KEYS,
    ("next", OBSERVATION_KEY),
    ("next", "reward"),
    ("next", "terminated"),
    ("next", "truncated"),
    ("next", EPISODE_RETURN_KEY),
    ("next", EPISODE_LENGTH_KEY),
    ("next", LIFE_LOST_KEY),  # only Atari with terminal_on_life_loss
]


class Trajectory(NamedTuple):
    """A batch of unrolls, time-major. ``T`` steps, ``B`` unrolls."""

    observation: Tensor  # [T, B, *obs] x_t, what the actor saw before acting
    is_init: Tensor  # [T, B] bool, x_t is the first observation of an episode (recurrent state resets)
    action: Tensor  # [T, B, *sample] the policy's sample for a_t (what the log-probs are of)
    reward: Tensor  # [T, B] r_t, received for a_t
    terminated: Tensor  # [T, B] bool, the episode ended at t (no bootstrap)
    truncated: Tensor  # [T, B] bool, the episode was cut at t (bootstrap from next_observation)
    next_observation: Tensor  # [T, B, *obs] the real observation after a_t (final one at episode ends)
    behaviour_log_prob: Tensor  # [T, B] log mu(a_t | x_t) of the policy that acted
    policy_version: Tensor  # [T, B] int64, learner updates behind the weights that acted
    episode_return: Tensor  # [T, B] running return; the finished episode's return where done
    episode_length: Tensor  # [T, B] running length; the finished episode's length where done
    initial_core_state: tuple[Tensor, Tensor] | None  # ([B, H], [B, H]) the actor's state entering t=0
    life_lost: Tensor | None = None  # [T, B] bool, a life was lost at t: terminal for learning only
    behaviour_value: Tensor | None = None  # [T, B] V(x_t) under the weights that acted; None where not recorded
    replayed: bool = False  # a second or later pass over these frames (data.passes_per_batch): counted once

    @property
    def done(self) -> Tensor:
        """``[T, B]`` bool: an episode ended at step t, by termination or truncation."""
        return self.terminated | self.truncated


def is_replayed(batch: TensorDictBase) -> bool:
    """A second or later pass over the same frames (``data.passes_per_batch``): count them once."""
    return REPLAYED_KEY in batch.keys() and bool(batch.get(REPLAYED_KEY).any())


def as_trajectory(batch: Trajectory | TensorDictBase) -> Trajectory:
    """The learner's view of a batch: ``ImpalaDataModule`` serves ``Trajectory`` already (made once, on the learner's
    device); a collector TensorDict from another data module is made time-major here."""
    return batch if isinstance(batch, Trajectory) else to_time_major(batch)


def to_time_major(batch: TensorDictBase) -> Trajectory:
    """``[B, T]`` collector TensorDict -> time-major ``Trajectory`` (views, no copies where possible)."""

    def get(key, per_step_scalar: bool = False) -> Tensor:
        value = batch.get(key)
        if per_step_scalar and value.dim() == 3:
            value = value.squeeze(2)  # torchrl keeps a trailing [1] on rewards, done flags and counters
        return value.transpose(0, 1)

    initial_core_state = None
    if CORE_STATE_KEYS[0] in batch.keys():
        initial_core_state = tuple(batch.get(key)[:, 0] for key in CORE_STATE_KEYS)
    return Trajectory(
        observation=get(OBSERVATION_KEY),
        is_init=get(IS_INIT_KEY, per_step_scalar=True),
        action=get(POLICY_SAMPLE_KEY),
        reward=get(("next", "reward"), per_step_scalar=True),
        terminated=get(("next", "terminated"), per_step_scalar=True),
        truncated=get(("next", "truncated"), per_step_scalar=True),
        next_observation=get(("next", OBSERVATION_KEY)),
        behaviour_log_prob=get(BEHAVIOUR_LOG_PROB_KEY),
        policy_version=get(POLICY_VERSION_KEY),
        episode_return=get(("next", EPISODE_RETURN_KEY), per_step_scalar=True),
        episode_length=get(("next", EPISODE_LENGTH_KEY), per_step_scalar=True),
        initial_core_state=initial_core_state,
        life_lost=batch.get(("next", LIFE_LOST_KEY)).transpose(0, 1)
        if ("next", LIFE_LOST_KEY) in batch.keys(True)
        else None,
        behaviour_value=get(BEHAVIOUR_VALUE_KEY) if BEHAVIOUR_VALUE_KEY in batch.keys() else None,
        replayed=is_replayed(batch),
    )
