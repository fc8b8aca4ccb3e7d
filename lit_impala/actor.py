"""The actor side: the behaviour policy torchrl's collector runs in each actor process.

``ActingPolicy`` holds a private CPU copy of the learner's network, refreshed from a
``WeightMailbox`` between steps, samples actions and records what the learner needs to correct for
the lag: the log-probability of each action under the policy that took it (``behaviour_log_prob``)
and the version of the weights that policy had (``policy_version``).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from lit_impala.weights import WeightMailbox

# An actor acts only with weights the learner published; it waits this long for the first ones.
FIRST_WEIGHTS_TIMEOUT_S = 120.0

OBSERVATION_KEY = "observation"
ACTION_KEY = "action"
BEHAVIOUR_LOG_PROB_KEY = "behaviour_log_prob"
POLICY_VERSION_KEY = "policy_version"


class ActingPolicy(TensorDictModuleBase):
    """Behaviour policy: ``observation [B, obs]`` -> ``action [B]``, ``behaviour_log_prob [B]``,
    ``policy_version [B]`` (int64: the learner update count of the weights that acted).

    Before each step it takes the newest complete snapshot from ``mailbox`` (if any): updates land
    between steps only, so one step never mixes two versions of the weights.
    """

    in_keys = [OBSERVATION_KEY]
    out_keys = [ACTION_KEY, BEHAVIOUR_LOG_PROB_KEY, POLICY_VERSION_KEY]

    def __init__(self, network: nn.Module, mailbox: WeightMailbox):
        super().__init__()
        self.network = network
        self.mailbox = mailbox
        self._sequence = 0
        self._version = 0
        self._owner_pid = None

    def _refresh_weights(self) -> None:
        if self._owner_pid != os.getpid():
            # However torchrl shipped this module, the weights we act with are ours alone.
            self.network = copy.deepcopy(self.network).requires_grad_(False)
            self._owner_pid = os.getpid()
            self._sequence = 0
        got = self.mailbox.read_into(self.network, self._sequence)
        deadline = time.monotonic() + FIRST_WEIGHTS_TIMEOUT_S
        while got is None and self._sequence == 0:  # never act with weights the learner did not send
            if time.monotonic() > deadline:
                raise TimeoutError(f"no weights published to the actors within {FIRST_WEIGHTS_TIMEOUT_S} s")
            time.sleep(0.001)
            got = self.mailbox.read_into(self.network, self._sequence)
        if got is not None:
            self._sequence, self._version = got

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        self._refresh_weights()
        logits = self.network(tensordict.get(OBSERVATION_KEY)).policy_logits
        log_probs = torch.log_softmax(logits, dim=-1)
        # Gumbel-max sampling: same distribution as Categorical(logits).sample(), one fused op.
        gumbel = -torch.log(-torch.log(torch.rand_like(log_probs)))
        action = torch.argmax(log_probs + gumbel, dim=-1)
        tensordict.set(ACTION_KEY, action)
        tensordict.set(BEHAVIOUR_LOG_PROB_KEY, log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1))
        tensordict.set(POLICY_VERSION_KEY, torch.full(action.shape, self._version, dtype=torch.int64))
        return tensordict


def make_acting_policy(network_factory: Callable[[], nn.Module], mailbox: WeightMailbox) -> ActingPolicy:
    """Policy factory run inside each actor process: a fresh network that takes its weights from
    ``mailbox`` before its first step (module-level, so torchrl can pickle it into workers)."""
    return ActingPolicy(network_factory(), mailbox)
