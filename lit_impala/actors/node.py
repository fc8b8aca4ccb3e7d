"""What runs on a remote actor host: the acting policy whose weights torchrl's weight sync writes, the env
factory each node builds, and the node itself (``run_actor_node``; ``python -m lit_impala.remote`` for nodes
started by hand).

The learner side (``actors.torchrl_distributed``) starts nodes itself with the "mp" and "submitit" launchers;
with "external" each host runs ``LIT_IMPALA_REMOTE_SECRET=... python -m lit_impala.remote --learner HOST
--port P --rank R --world-size N+1``. Every node first joins through the admission gate
(``actors.admission``): it unpickles nothing before the learner proved it holds the shared secret.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import sys
import time
from datetime import timedelta

import torch
from torch import nn
from torch.distributed import PrefixStore, TCPStore
from torchrl.collectors import Collector
from torchrl.envs import EnvBase

from lit_impala.actors.admission import AdmissionError, join_learner, secret_from_environment
from lit_impala.actors.policy import ActingPolicy
from lit_impala.actors.remote_network import gloo_listens_on
from lit_impala.actors.rollout_check import structure_problem
from lit_impala.envs.factory import make_vector_env

log = logging.getLogger(__name__)

DEFAULT_JOIN_TIMEOUT_S = 300.0
_MAX_STATUS_BYTES = 1000  # what a node writes into the store about a rollout it did not send


class RemoteActingPolicy(ActingPolicy):
    """``ActingPolicy`` whose weights *and* version are written by torchrl's weight sync.

    Writes the same keys as ``ActingPolicy`` (``action``, ``policy_sample``, ``behaviour_log_prob``,
    ``behaviour_value``, ``policy_version`` and, with an LSTM core, ``core_state_h`` / ``core_state_c``).
    The version is the registered int64 buffer ``policy_version``, part of ``TensorDict.from_module(policy)``:
    the learner sets it together with the weights (``load_learner_weights``) and torchrl sends both.
    """

    def __init__(self, network: nn.Module):
        super().__init__(network.requires_grad_(False), mailbox=None)
        self.register_buffer("policy_version", torch.zeros((), dtype=torch.int64))

    def _refresh_weights(self) -> None:
        # No mailbox: torchrl's weight receiver writes straight into self.network and the buffer.
        self._version = int(self.policy_version)

    @torch.no_grad()
    def load_learner_weights(self, network: nn.Module, version: int) -> None:
        """Copy ``network``'s weights (any device) into this CPU copy and tag them ``version``."""
        self.network.load_state_dict(network.state_dict())
        self.policy_version.fill_(version)


def _is_actor_node() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_rank() != 0


def make_remote_env(env_id: str, num_envs: int, seed: int | None, env_options: dict) -> EnvBase:
    """``make_vector_env`` as run by each node (module-level: it is pickled to the nodes).

    torchrl also builds one copy in the learner (rank 0) to size its receive buffers.
    """
    if _is_actor_node():
        torch.set_num_threads(1)  # as for local actors: one thread per actor
        if multiprocessing.parent_process() is not None:
            # Started by the "mp" launcher: Ctrl-C reaches the learner's whole process group, and
            # the learner stops its nodes itself after its last update (as for local actors).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return make_vector_env(env_id, num_envs, seed, **env_options)


def run_actor_node(learner: str, port: int, rank: int, world_size: int, secret: str | None = None,
                   join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> None:
    """Serve as actor node ``rank`` of the learner whose admission gate is at ``learner:port``.

    Joins through the gate (proving ``secret``, by default ``LIT_IMPALA_REMOTE_SECRET``; waiting up to
    ``join_timeout_s`` for the learner to listen), receives its env factory, policy and store port, joins the
    process group (gloo listening on the interface this host reaches the learner from), then collects until
    the learner shuts it down. Every wait for the learner ends after the learner's ``remote_join_timeout_s``:
    a node whose learner is gone or hung raises ``RuntimeError`` instead of waiting for ever.
    """
    secret = secret_from_environment() if secret is None else secret
    settings, local_address = join_learner(learner, port, rank, secret, join_timeout_s)
    if settings["world_size"] != world_size:
        raise AdmissionError(f"the learner has {settings['world_size'] - 1} actor nodes (world size "
                             f"{settings['world_size']}), this node was started with --world-size {world_size}")
    timeout = timedelta(seconds=settings["timeout_s"])
    client = TCPStore(learner, settings["store_port"], is_master=False, timeout=timeout)
    with gloo_listens_on(local_address):
        torch.distributed.init_process_group(settings["backend"], store=PrefixStore("pg", client), rank=rank,
                                             world_size=world_size, timeout=timeout)
    try:
        _collect(rank, learner, PrefixStore("collector", client), settings)
    finally:
        torch.distributed.destroy_process_group()


def _collect(rank: int, learner: str, store, settings: dict) -> None:
    """The node's loop: torchrl's ``_run_collector`` (same store protocol, unchanged on the learner's side)
    with two changes: a rollout whose structure differs from the learner's receive buffer is not sent (a
    message of another size aborts the learner inside gloo) but reported as ``NODE_r_status: rejected: why``;
    and a learner silent for ``timeout_s`` ends the node with an error naming it."""
    collector = Collector(
        settings["env_make"], policy=settings["policy"], policy_factory=settings["policy_factory"],
        frames_per_batch=settings["frames_per_batch"], total_frames=-1, split_trajs=False, return_same_td=True,
        **settings["collector_kwargs"],
    )
    schemes = settings["weight_sync_schemes"]
    for model_id, scheme in schemes.items():
        scheme.learner_host = learner
        scheme.init_on_receiver(model_id=model_id, context=collector, worker_idx=rank)
        scheme.connect()
    status = f"NODE_{rank}_status"
    problems_told: set[str] = set()
    while True:
        instruction = _next_instruction(store, rank, learner, settings["timeout_s"])
        if instruction == b"continue":
            store.set(status, b"busy")
            rollout = collector.next()
            problem = structure_problem(rollout, settings["rollout_fields"])
            if problem is not None:
                if problem not in problems_told:
                    problems_told.add(problem)
                    log.warning("node %d: not sending a rollout the learner cannot receive: %s", rank, problem)
                store.set(status, b"rejected: " + problem.encode()[:_MAX_STATUS_BYTES])
            elif store.get("TRAINER_status") == b"alive":
                rollout.isend(dst=0)
                store.set(status, b"done")
        elif instruction == b"shutdown":
            for scheme in schemes.values():
                scheme.shutdown()
            collector.shutdown()
            store.set(f"NODE_{rank}_out", b"down")
            return
        else:
            log.warning("node %d: ignoring an unknown instruction %r from the store", rank, instruction[:100])


def _next_instruction(store, rank: int, learner: str, timeout_s: float) -> bytes:
    key = f"NODE_{rank}_in"
    started = time.monotonic()
    try:
        instruction = store.get(key)  # waits up to the store's timeout
        store.delete_key(key)
    except RuntimeError as error:  # DistStoreError (timeout), DistNetworkError (the learner closed)
        waited = time.monotonic() - started
        raise RuntimeError(f"node {rank}: no instruction from the learner at {learner} for {waited:.0f} s (it is "
                           f"gone or hung; remote_join_timeout_s={timeout_s:g}): stopping ({error})") from None
    return instruction


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_impala.remote``: a failure to join is one ``error: ...`` line (exit 1; a missing or
    short secret: exit 2, before any connection)."""
    parser = argparse.ArgumentParser(prog="python -m lit_impala.remote", description=run_actor_node.__doc__)
    parser.add_argument("--learner", required=True, help="the learner's data.remote_bind_address (host or IP)")
    parser.add_argument("--port", type=int, required=True, help="the learner's data.remote_tcp_port")
    parser.add_argument("--rank", type=int, required=True, help="this node's rank, 1 .. world size - 1")
    parser.add_argument("--world-size", type=int, required=True, help="number of actor nodes + 1 (the learner)")
    parser.add_argument("--join-timeout", type=float, default=DEFAULT_JOIN_TIMEOUT_S,
                        help="seconds to wait for the learner to admit this node")
    args = parser.parse_args(argv)
    if not 1 <= args.rank < args.world_size:
        parser.error(f"--rank must be in 1 .. {args.world_size - 1}")
    try:
        secret = secret_from_environment()
    except ValueError as error:
        parser.error(str(error).replace("remote_launcher: external needs", "a node needs"))
    try:
        run_actor_node(args.learner, args.port, args.rank, args.world_size, secret, args.join_timeout)
    except (AdmissionError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
