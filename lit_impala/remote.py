"""Remote actors: torchrl's ``DistributedCollector`` runs the actors on other hosts.

The local actors (``data.ImpalaDataModule``) read their weights from a ``WeightMailbox`` in POSIX
shared memory, which no other host can see. Here each actor is a torch.distributed *node* (ranks
1..N; the learner is rank 0) started by torchrl's ``DistributedCollector``: ``launcher="mp"``
starts the nodes as local processes (one machine, tests), ``"submitit"`` as SLURM jobs on other
hosts, ``"external"`` waits for nodes started by hand (``python -m lit_impala.remote``) on any
host that can reach the learner. Each node steps ``make_vector_env(env_id, envs_per_actor, seed)`` with a
``RemoteActingPolicy`` and sends each ``[envs_per_actor, unroll_length]`` rollout to the learner
as soon as it is done (``sync=False``: first finished, first served), which is what
``data.UnrollStream`` regroups into learner batches.

Weights travel with torchrl's own ``DistributedWeightSyncScheme`` (gloo send/recv, acknowledged
through a TCPStore). The version travels *with* them: ``RemoteActingPolicy`` keeps it in a
registered int64 buffer ``policy_version``, so it is part of the weights TensorDict torchrl sends,
and every step is tagged with the version of the weights the node last received.

Caveat (torchrl 0.14): a node receives weights in a background thread straight into its live
module (the receive buffer shares storage with the module's parameters), so, unlike the mailbox
path, a step that overlaps an update may act with partly updated weights. ``behaviour_log_prob``
is still the exact log-probability of the sampled action under the parameters that produced it
(one forward pass computes both), so V-trace stays correct; only that step's ``policy_version``
may be one update off.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.collectors import Collector
from torchrl.collectors.distributed import DistributedCollector
from torchrl.collectors.distributed.generic import _distributed_init_delayed
from torchrl.envs import EnvBase

from lit_impala.actor import ActingPolicy
from lit_impala.envs import actor_seeds, make_vector_env

log = logging.getLogger(__name__)

# ours -> torchrl's: "external" nodes are started by hand; torchrl calls that mode "submitit_delayed".
LAUNCHERS = {"mp": "mp", "submitit": "submitit", "external": "submitit_delayed"}

# DistributedCollector (torchrl 0.14) stops after ``total_frames`` and treats the usual "endless"
# -1 as "nothing to collect" (``while total_frames < self.total_frames``): endless is a huge count.
_ENDLESS_BATCHES = 2**40


class RemoteActingPolicy(ActingPolicy):
    """``ActingPolicy`` whose weights *and* version are written by torchrl's weight sync.

    Writes the same keys as ``ActingPolicy`` (``action``, ``policy_sample``, ``behaviour_log_prob``,
    ``policy_version`` and, with an LSTM core, ``core_state_h`` / ``core_state_c``). The version is
    the registered int64 buffer ``policy_version``, part of ``TensorDict.from_module(policy)``: the
    learner sets it together with the weights (``load_learner_weights``) and torchrl sends both.
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


def find_free_port(span: int = 3, attempts: int = 50) -> int:
    """A TCP port ``p`` with ``p .. p + span - 1`` free now: ``DistributedCollector`` rendezvous on
    ``p`` and puts its stores on ``p + 1`` and ``p + 2`` (those two move elsewhere if taken)."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        if port + span > 65536:
            continue
        try:
            for offset in range(1, span):
                with socket.socket() as probe:
                    probe.bind(("", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"found no {span} consecutive free TCP ports")


class RemoteActors:
    """Actor nodes that behave like our local collectors.

    Iterating yields one node's rollout ``[envs_per_actor, unroll_length]`` at a time (every
    ``iter()`` continues the same stream); ``publish_weights`` sends new weights to every node and
    returns once each node has them; ``shutdown`` stops the nodes (safe to call more than once).
    Built by ``make_remote_collector``.
    """

    def __init__(self, collector: DistributedCollector, policy: RemoteActingPolicy):
        self.collector = collector
        self.policy = policy  # the learner's CPU copy: what torchrl sends to the nodes
        self._rollouts: Iterator[TensorDictBase] | None = None

    def __iter__(self) -> Iterator[TensorDictBase]:
        if self.collector is None:
            raise RuntimeError("the remote actors were shut down")
        # A second torchrl iterator would post a second receive per node for the same messages
        # (the first one never waited on): keep one for the collector's whole life.
        if self._rollouts is None:
            self._rollouts = iter(self.collector)
        return self._rollouts

    def publish_weights(self, network: nn.Module, version: int) -> None:
        """Make ``network``'s weights, tagged ``version``, the ones every node acts with next."""
        self.policy.load_learner_weights(network, version)
        self.collector.update_policy_weights_(self.policy)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        collector, self.collector, self._rollouts = self.collector, None, None
        if collector is None:
            return
        try:
            _stop_weight_receivers(collector)
            collector.shutdown()
        finally:
            _reap(collector, timeout_s)


def _stop_weight_receivers(collector: DistributedCollector) -> None:
    # A node's weight receiver thread waits for its next instruction in a blocking TCPStore.get, and
    # the node's shutdown waits 5 s for that thread (torchrl 0.14): "stop" ends it at once.
    for scheme in (getattr(collector, "_weight_sync_schemes", None) or {}).values():
        try:
            scheme._send_instruction("stop")
        except Exception as error:  # noqa: BLE001 -- only a speed-up: shutdown works without it
            log.debug("could not stop the weight receivers early: %r", error)


def _reap(collector: DistributedCollector, timeout_s: float) -> None:
    """Leave no "mp" node and no process group behind (torchrl joins nodes for 10 s, then moves on)."""
    deadline = time.monotonic() + timeout_s
    for job in list(getattr(collector, "jobs", [])):
        if not isinstance(job, multiprocessing.process.BaseProcess) or job.pid is None:
            continue  # submitit jobs end with their node's function
        job.join(timeout=max(0.0, deadline - time.monotonic()))
        if job.is_alive():
            log.warning("remote actor process %s did not stop; terminating it", job.pid)
            job.terminate()
            job.join(timeout=5)
            if job.is_alive():
                job.kill()
                job.join()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def make_remote_collector(
    env_id: str,
    network: nn.Module,
    network_factory: Callable[[], nn.Module],
    *,
    num_actors: int,
    envs_per_actor: int,
    unroll_length: int,
    version: int = 0,
    seed: int = 0,
    rank: int = 0,
    env_options: dict | None = None,
    launcher: str = "mp",
    backend: str = "gloo",
    tcp_port: int | None = None,
    slurm_kwargs: dict | None = None,
) -> RemoteActors:
    """Start ``num_actors`` actor nodes with torchrl's ``DistributedCollector``.

    Args:
        env_id: gymnasium id (as for ``ImpalaDataModule``).
        network: the learner's network: the nodes start with its weights, tagged ``version``.
        network_factory: picklable callable building the same architecture (the learner's CPU copy,
            pickled to the nodes: ``lit_impala`` must be importable there).
        num_actors: actor nodes (torch.distributed world size ``num_actors + 1``), each stepping
            ``envs_per_actor`` envs with batched inference; more actors on a host = more nodes.
        envs_per_actor: envs stepped together on a node.
        unroll_length: T: each rollout a node sends is ``[envs_per_actor, unroll_length]``.
        version: learner update count of ``network``'s weights.
        seed, rank: one env seed per node, ``envs.actor_seeds(seed, num_actors, rank)``.
        env_options: further ``make_vector_env`` options (``max_episode_steps``, ``observation_key``...).
        launcher: ``"mp"``: the nodes are processes on this machine (localhost; tests);
            ``"submitit"``: one SLURM job per node (``slurm_kwargs`` go to
            ``submitit.AutoExecutor.update_parameters``; needs ``pip install submitit``);
            ``"external"``: this call blocks until ``num_actors`` nodes started by hand joined,
            each with ``python -m lit_impala.remote --learner HOST --port tcp_port --rank R
            --world-size num_actors+1`` (R = 1..num_actors), on any host that reaches this one.
        backend: torch.distributed backend for rollouts and weights (``"gloo"``: CPU tensors).
        tcp_port: rendezvous port on the learner's host (torchrl also uses the next two); None:
            a free one ("mp" and "submitit" only).

    The learner process becomes rank 0 of torch.distributed's *default* process group (torchrl's
    design), so it cannot also be a DDP rank: remote actors need a single-process learner.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {list(LAUNCHERS)}, got {launcher!r}")
    if launcher == "external" and tcp_port is None:
        raise ValueError('launcher="external" needs the tcp_port the nodes were told to join')
    if torch.distributed.is_initialized():
        raise RuntimeError(
            "remote actors make this process rank 0 of torch.distributed's default process group, "
            "but one is already initialized (a DDP learner?): use a single-process learner"
        )
    policy = RemoteActingPolicy(network_factory().to("cpu"))
    policy.load_learner_weights(network, version)
    env_options = dict(env_options or {})
    env_fns = [partial(make_remote_env, env_id, envs_per_actor, s, env_options) for s in actor_seeds(seed, num_actors, rank)]
    frames_per_batch = envs_per_actor * unroll_length
    # __new__ then __init__: if the rendezvous fails after nodes were launched, we still hold them.
    collector = DistributedCollector.__new__(DistributedCollector)
    try:
        collector.__init__(
            env_fns,
            policy,  # pickled to each node; torchrl sends its weights on update_policy_weights_
            frames_per_batch=frames_per_batch,
            total_frames=frames_per_batch * _ENDLESS_BATCHES,
            collector_class=Collector,  # one batched env per node
            collector_kwargs={"auto_register_policy_transforms": False},
            num_workers_per_collector=1,
            device="cpu",
            sync=False,
            backend=backend,
            launcher=LAUNCHERS[launcher],
            tcp_port=find_free_port() if tcp_port is None else tcp_port,
            slurm_kwargs=slurm_kwargs,
        )
    except BaseException:
        _reap(collector, timeout_s=0.0)
        raise
    return RemoteActors(collector, policy)


def run_actor_node(learner: str, port: int, rank: int, world_size: int, backend: str = "gloo") -> None:
    """Serve as actor node ``rank`` of a learner started with ``launcher="external"``.

    Joins the learner at ``learner:port``, receives the env factory and the policy from it
    (pickled: run nodes only for a learner you trust), collects until the learner shuts it down.
    """
    _distributed_init_delayed(rank, backend, learner, port, world_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_impala.remote", description=run_actor_node.__doc__)
    parser.add_argument("--learner", required=True, help="host name or IP address of the learner")
    parser.add_argument("--port", type=int, required=True, help="the learner's data.remote_tcp_port")
    parser.add_argument("--rank", type=int, required=True, help="this node's rank, 1 .. world size - 1")
    parser.add_argument("--world-size", type=int, required=True, help="number of actor nodes + 1 (the learner)")
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args(argv)
    if not 1 <= args.rank < args.world_size:
        parser.error(f"--rank must be in 1 .. {args.world_size - 1}")
    run_actor_node(args.learner, args.port, args.rank, args.world_size, args.backend)


if __name__ == "__main__":
    main()
