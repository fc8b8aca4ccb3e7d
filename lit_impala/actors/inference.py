"""Batched policy inference: actor processes only step envs; one policy copy in the learner's process acts for
all of them, on a chosen device (the learner's GPU when it has one).

Built on torchrl 0.14 pieces: torchrl's ``InferenceServer`` (a thread in the learner process that drains
requests, runs them as one batch and answers each caller) serving actor processes that are still torchrl's
``MultiAsyncCollector`` workers. The one piece of our own is the transport (``actors.inference_transport``:
torchrl's ``MPTransport`` clients do not survive the way torchrl hands policy factories to its workers). Each
actor's policy is a ``ServedPolicy``: it sends ``observation [N, *obs]`` and ``is_init [N]`` of its N envs and
writes back what ``ActingPolicy`` writes. So unrolls are assembled exactly as with per-actor inference: fixed-length
``[N, T]`` unrolls per actor, torchrl's episode boundaries untouched.

Not torchrl's ``AsyncBatchedCollector``: it yields single transitions, not ``[N, T]`` unrolls per env, and its
``policy=`` shares the learner's module, so an unpublished optimizer step would reach the acting policy. Here the
server owns a private copy that changes only in ``publish`` (under its lock, between two batches), and the version
it acts with is written next to every action in the same locked forward.
"""

from __future__ import annotations

import copy

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn
from torchrl.modules.inference_server import InferenceServer

from lit_impala.actors.inference_transport import SocketClient, SocketTransport
from lit_impala.actors.policy import ActingPolicy, act, prepare_actor_process, step_inputs
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

NEXT_CORE_STATE_KEYS = ("next_core_state_h", "next_core_state_c")  # server -> actor only, LSTM

# After the first request of a batch, the server waits at most this long for the other actors' requests:
# short next to one env step of a pixel task, long enough to gather actors that step in lockstep.
BATCH_WAIT_S = 0.002


class ServedNetwork(nn.Module):
    """The inference server's policy: a private copy of the learner's network on ``device``, tagged ``version``.

    Called by the server with the requests of k actors stacked, ``[k, N]``; acts for all ``k * N`` envs in
    one forward and answers ``[k, N]`` (on the CPU, for the trip back to the actor processes).
    """

    def __init__(self, network: nn.Module, version: int, device: torch.device):
        super().__init__()
        self.network = copy.deepcopy(network).to(device).requires_grad_(False)
        self.device = device
        self.version = version

    @torch.no_grad()
    def load(self, network: nn.Module, version: int) -> None:
        """Take ``network``'s weights (any device) and ``version``; the server calls this under its model lock."""
        self.network.load_state_dict(network.state_dict())
        self.version = version

    @torch.no_grad()
    def forward(self, requests: TensorDictBase) -> TensorDictBase:
        k, n = requests.batch_size
        flat = requests.contiguous().reshape(k * n).to(self.device, non_blocking=True)
        core_state = None
        if self.network.use_lstm:
            core_state = (flat.get(CORE_STATE_KEYS[0]), flat.get(CORE_STATE_KEYS[1]))
        step = act(self.network, flat.get(OBSERVATION_KEY), flat.get(IS_INIT_KEY), core_state)
        reply = TensorDict(
            {
                ACTION_KEY: step.action,
                POLICY_SAMPLE_KEY: step.sample,
                BEHAVIOUR_LOG_PROB_KEY: step.log_prob,
                BEHAVIOUR_VALUE_KEY: step.value,
                POLICY_VERSION_KEY: torch.full((k * n,), self.version, dtype=torch.int64, device=self.device),
            },
            batch_size=[k * n],
            device=self.device,
        )
        if step.next_core_state is not None:
            reply.set(NEXT_CORE_STATE_KEYS[0], step.next_core_state[0])
            reply.set(NEXT_CORE_STATE_KEYS[1], step.next_core_state[1])
        return reply.reshape(k, n).to("cpu")


class InferenceService:
    """torchrl's ``InferenceServer`` running a ``ServedNetwork`` in a thread of this process, with one client
    per actor."""

    def __init__(self, network: nn.Module, version: int, device: torch.device, num_clients: int):
        self.model = ServedNetwork(network, version, device)
        self.transport = SocketTransport()
        self.clients = [self.transport.client() for _ in range(num_clients)]
        self.server = InferenceServer(
            self.model,
            self.transport,
            max_batch_size=num_clients,
            min_batch_size=num_clients,
            timeout=BATCH_WAIT_S,
            policy_version_key=None,  # ServedNetwork writes the version it acted with itself
        ).start()

    def publish(self, network: nn.Module, version: int) -> None:
        """Serve ``network``'s weights tagged ``version`` from the next batch on (never during one)."""
        self.server.update_model(lambda served: served.load(network, version), mark_weight_update=False)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.transport.close()


class ServedPolicy(TensorDictModuleBase):
    """An actor's behaviour policy when inference is batched: same keys in and out as ``ActingPolicy``, but the
    forward happens in the learner's ``InferenceService``. The actor keeps only its envs' LSTM state."""

    in_keys = ActingPolicy.in_keys
    out_keys = ActingPolicy.out_keys

    def __init__(self, client: SocketClient, use_lstm: bool, lstm_hidden_dim: int):
        super().__init__()
        self.client = client
        self.use_lstm = use_lstm
        self.lstm_hidden_dim = lstm_hidden_dim
        self._core_state: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        observation, is_init = step_inputs(tensordict)
        num_envs = observation.shape[0]
        request = TensorDict({OBSERVATION_KEY: observation, IS_INIT_KEY: is_init}, batch_size=[num_envs])
        if self.use_lstm:
            if self._core_state is None or self._core_state[0].shape[0] != num_envs:
                zeros = torch.zeros(num_envs, self.lstm_hidden_dim)
                self._core_state = (zeros, zeros.clone())
            for key, state in zip(CORE_STATE_KEYS, self._core_state, strict=True):
                request.set(key, state)
                tensordict.set(key, state)  # the state carried into this step, as ActingPolicy records it
        reply = self.client(request)
        if self.use_lstm:
            self._core_state = (reply.get(NEXT_CORE_STATE_KEYS[0]), reply.get(NEXT_CORE_STATE_KEYS[1]))
        for key in (ACTION_KEY, POLICY_SAMPLE_KEY, BEHAVIOUR_LOG_PROB_KEY, BEHAVIOUR_VALUE_KEY, POLICY_VERSION_KEY):
            tensordict.set(key, reply.get(key))
        return tensordict


def make_served_policy(client: SocketClient, use_lstm: bool, lstm_hidden_dim: int) -> ServedPolicy:
    """Policy factory run inside each actor process (module-level, so torchrl can pickle it into workers)."""
    prepare_actor_process()
    return ServedPolicy(client, use_lstm, lstm_hidden_dim)
