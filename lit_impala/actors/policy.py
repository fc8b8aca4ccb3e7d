"""The actor side: the behaviour policy torchrl's collector runs in each actor process.

``ActingPolicy`` holds a private CPU copy of the learner's network, refreshed from a
``WeightMailbox`` between steps, samples actions and records what the learner needs to correct for
the lag: the log-probability of each sample under the policy that drew it (``behaviour_log_prob``),
that policy's value estimate of the step (``behaviour_value``, for value-loss clipping), the version of
the weights that policy had (``policy_version``) and, for recurrent policies, the core state each step
started from.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from lit_impala.actors.mailbox import WeightMailbox
from lit_impala.schema import (
    ACTION_KEY,
    BEHAVIOUR_LOG_PROB_KEY,
    BEHAVIOUR_VALUE_KEY,
    CORE_STATE_KEYS,
    IS_INIT_KEY,
    OBSERVATION_KEY,
    POLICY_SAMPLE_KEY,
    POLICY_VERSION_KEY,
)

# An actor acts only with weights the learner published; it waits this long for the first ones.
FIRST_WEIGHTS_TIMEOUT_S = 120.0


class ActingPolicy(TensorDictModuleBase):
    """Behaviour policy over a batch of N envs, one step at a time.

    Reads ``observation [N, *obs]`` and ``is_init [N, 1]``; writes ``action``, ``policy_sample``,
    ``behaviour_log_prob [N]``, ``behaviour_value [N]`` (the network's ``baseline`` output of the same
    forward), ``policy_version [N]`` (int64: learner updates behind the weights that acted) and, with
    an LSTM core, ``core_state_h`` / ``core_state_c`` ``[N, H]``: the state carried into this step
    (before the reset that ``is_init`` implies, exactly what the learner is given for the first step
    of an unroll).

    Before each step it takes the newest complete snapshot from ``mailbox`` (if any): updates land
    between steps only, so one step never mixes two versions of the weights.
    """

    in_keys = [OBSERVATION_KEY, IS_INIT_KEY]
    out_keys = [ACTION_KEY, POLICY_SAMPLE_KEY, BEHAVIOUR_LOG_PROB_KEY, BEHAVIOUR_VALUE_KEY, POLICY_VERSION_KEY,
                *CORE_STATE_KEYS]

    def __init__(self, network: nn.Module, mailbox: WeightMailbox):
        super().__init__()
        self.network = network
        self.mailbox = mailbox
        self._sequence = 0
        self._version = 0
        self._owner_pid = None
        self._core_state: tuple[torch.Tensor, torch.Tensor] | None = None

    def _refresh_weights(self) -> None:
        if self._owner_pid != os.getpid():
            # However torchrl shipped this module, the weights we act with are ours alone.
            self.network = copy.deepcopy(self.network).requires_grad_(False)
            self._owner_pid = os.getpid()
            self._sequence = 0
        got = self.mailbox.read_into(self.network, self._sequence)
        deadline = None
        while got is None and self._sequence == 0:  # never act with weights the learner did not send
            deadline = deadline or time.monotonic() + FIRST_WEIGHTS_TIMEOUT_S
            if time.monotonic() > deadline:
                raise TimeoutError(f"no weights published to the actors within {FIRST_WEIGHTS_TIMEOUT_S} s")
            time.sleep(0.001)
            got = self.mailbox.read_into(self.network, self._sequence)
        if got is not None:
            self._sequence, self._version = got

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._refresh_weights()
        observation, is_init = step_inputs(tensordict)
        num_envs = observation.shape[0]

        core_state = None
        if self.network.use_lstm:
            core_state = self._core_state
            if core_state is None or core_state[0].shape[0] != num_envs:
                core_state = self.network.initial_state(num_envs)
            tensordict.set(CORE_STATE_KEYS[0], core_state[0])
            tensordict.set(CORE_STATE_KEYS[1], core_state[1])

        step = act(self.network, observation, is_init, core_state)
        self._core_state = step.next_core_state
        tensordict.set(ACTION_KEY, step.action)
        tensordict.set(POLICY_SAMPLE_KEY, step.sample)
        tensordict.set(BEHAVIOUR_LOG_PROB_KEY, step.log_prob)
        tensordict.set(BEHAVIOUR_VALUE_KEY, step.value)
        tensordict.set(POLICY_VERSION_KEY, torch.full((num_envs,), self._version, dtype=torch.int64))
        return tensordict


def step_inputs(tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
    """``observation [N, *obs]`` and ``is_init [N]`` (bool; all True when the env has no InitTracker yet)."""
    observation = tensordict.get(OBSERVATION_KEY)
    num_envs = observation.shape[0]
    is_init = tensordict.get(IS_INIT_KEY, None)
    return observation, torch.ones(num_envs, dtype=torch.bool) if is_init is None else is_init.reshape(num_envs)


class ActingStep(NamedTuple):
    """What a behaviour policy produced for N envs in one step."""

    action: torch.Tensor  # [N, *action]: what the envs receive
    sample: torch.Tensor  # [N, *sample]: what the distribution drew
    log_prob: torch.Tensor  # [N]: log mu(sample | observation)
    value: torch.Tensor  # [N]: V(observation), the network's baseline output in the same forward
    next_core_state: tuple[torch.Tensor, torch.Tensor] | None  # [N, H] each, LSTM only


@torch.no_grad()
def act(network: nn.Module, observation: torch.Tensor, is_init: torch.Tensor,
        core_state: tuple[torch.Tensor, torch.Tensor] | None) -> ActingStep:
    """One behaviour step of ``network`` for N envs: ``observation [N, *obs]``, ``is_init [N]`` (bool),
    ``core_state`` the LSTM state carried into the step (``[N, H]`` each; None without LSTM). Shared by
    per-actor inference (``ActingPolicy``) and the batched server (``actors.inference``)."""
    output = network(observation.unsqueeze(0), core_state, is_init.unsqueeze(0))  # T = 1
    params = output.policy_params[0]
    distribution = network.distribution
    sample = distribution.sample(params)
    next_core_state = None
    if output.core_states is not None:
        next_core_state = (output.core_states[0][0], output.core_states[1][0])
    return ActingStep(distribution.to_env_action(sample), sample, distribution.log_prob(params, sample),
                      output.baseline[0], next_core_state)


def _exit_when_orphaned(parent_pid: int, period_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(period_s)
    os._exit(1)  # the learner is gone: nobody will read what this actor produces


def prepare_actor_process() -> None:
    """Run first in each actor process: Ctrl-C is the learner's to handle, and an orphaned actor exits."""
    if multiprocessing.parent_process() is not None:
        # Ctrl-C reaches the whole process group; the learner owns the actors and shuts them down
        # itself after its last update (callbacks.GracefulInterrupt), so actors ignore SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A learner killed with SIGKILL cannot shut anything down: the actor notices it is orphaned. The process
        # the OS made it a child of: the learner (spawned) or the fork server (actors.preloaded_start), which ends
        # with the learner.
        threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True, name="orphan-watch").start()


def make_acting_policy(network_factory: Callable[[], nn.Module], mailbox: WeightMailbox) -> ActingPolicy:
    """Policy factory run inside each actor process: a fresh network that takes its weights from
    ``mailbox`` before its first step (module-level, so torchrl can pickle it into workers)."""
    prepare_actor_process()
    return ActingPolicy(network_factory(), mailbox)
