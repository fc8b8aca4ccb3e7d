"""Starting remote actor nodes: torchrl's ``DistributedCollector`` (bound, admitted and with deadlines:
``actors.torchrl_distributed``) behind ``actors.remote.RemoteActors``.

``launcher="mp"`` starts the nodes as local processes (one machine, tests), ``"submitit"`` as SLURM jobs,
``"external"`` waits for nodes started by hand (``python -m lit_impala.remote``) on any host that can
reach the learner.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchrl.collectors import Collector

from lit_impala.actors.admission import new_secret, secret_from_environment
from lit_impala.actors.node import DEFAULT_JOIN_TIMEOUT_S, RemoteActingPolicy, make_remote_env
from lit_impala.actors.pool import ActorSpec
from lit_impala.actors.remote import RemoteActors
from lit_impala.actors.remote_network import default_bind_address
from lit_impala.actors.remote_roster import reap
from lit_impala.actors.rollout_check import sample_sizes_of
from lit_impala.actors.torchrl_distributed import LAUNCHERS, BoundDistributedCollector, node_host_for


def find_free_port(span: int = 1, attempts: int = 50) -> int:
    """A TCP port ``p`` with ``p .. p + span - 1`` free now (for ``external`` nodes' ``--port``, chosen ahead)."""
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


def check_launch_settings(launcher: str, tcp_port: int | None, bind_address: str | None, secret: str | None) -> None:
    """``ValueError`` naming what a launcher lacks: ``external`` nodes are told where to join by hand, so the learner
    needs that port and address given, and the shared secret in ``LIT_IMPALA_REMOTE_SECRET``. Called by the data
    module before anything starts, and by ``make_remote_collector`` for Python callers."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"remote_launcher must be one of {list(LAUNCHERS)}, got {launcher!r}")
    if launcher != "external":
        return
    if tcp_port is None:
        raise ValueError("remote_launcher: external needs remote_tcp_port (the port the actors connect to)")
    if bind_address is None:
        raise ValueError("remote_launcher: external needs remote_bind_address, the address of this host the "
                         "actors connect to (127.0.0.1 when they run here, 0.0.0.0 for every interface)")
    if secret is None:
        secret_from_environment()  # set and long enough


def make_remote_collector(
    spec: ActorSpec,
    network: nn.Module,
    network_factory: Callable[[], nn.Module],
    *,
    version: int = 0,
    launcher: str = "mp",
    backend: str = "gloo",
    tcp_port: int | None = None,
    bind_address: str | None = None,
    secret: str | None = None,
    slurm_kwargs: dict | None = None,
    node_timeout_s: float = 60.0,
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S,
) -> RemoteActors:
    """Start ``spec.num_actors`` actor nodes with torchrl's ``DistributedCollector``.

    Args:
        spec: one node per actor (torch.distributed world size ``num_actors + 1``), each stepping
            ``envs_per_actor`` envs with batched inference and sending ``[envs_per_actor, unroll_length]``
            rollouts; one env seed per node (``spec.actor_seeds()``); ``env_options`` go to ``make_vector_env``.
        network: the learner's network: the nodes start with its weights, tagged ``version``.
        network_factory: picklable callable building the same architecture (the learner's CPU copy,
            pickled to the nodes: ``lit_impala`` must be importable there).
        version: learner update count of ``network``'s weights.
        launcher: ``"mp"``: the nodes are processes on this machine (localhost; tests);
            ``"submitit"``: one SLURM job per node (``slurm_kwargs`` go to
            ``submitit.AutoExecutor.update_parameters``; needs ``pip install submitit``);
            ``"external"``: this call blocks until ``num_actors`` nodes started by hand joined,
            each with ``LIT_IMPALA_REMOTE_SECRET=... python -m lit_impala.remote --learner bind_address
            --port tcp_port --rank R --world-size num_actors+1`` (R = 1..num_actors), on any host that reaches
            this one.
        backend: torch.distributed backend for rollouts and weights (``"gloo"``: CPU tensors).
        tcp_port: the admission port on ``bind_address`` (the store and gloo listen on free ports of the same
            address); None: a free one ("mp" and "submitit" only).
        bind_address: the address every socket of the learner listens on; None: ``127.0.0.1`` ("mp"), this
            host name's address ("submitit"); "external" needs one (``0.0.0.0``: every interface).
        secret: the secret every node must prove (see ``actors.admission``); None: a new one per call ("mp",
            "submitit"), ``LIT_IMPALA_REMOTE_SECRET`` ("external").
        node_timeout_s: a node that delivers no rollout for this long after being asked for one, or
            does not acknowledge new weights within it, is lost (see ``RemoteActors``).
        join_timeout_s: every node must join within this (else ``TimeoutError`` naming the missing ranks);
            a node waits this long at most for the learner at any point (then it ends with an error).

    The learner process becomes rank 0 of torch.distributed's *default* process group (torchrl's
    design), so it cannot also be a DDP rank: remote actors need a single-process learner.
    """
    check_launch_settings(launcher, tcp_port, bind_address, secret)
    bind_address = bind_address or default_bind_address(launcher)
    if secret is None:
        secret = secret_from_environment() if launcher == "external" else new_secret()
    for name, seconds in (("node_timeout_s", node_timeout_s), ("join_timeout_s", join_timeout_s)):
        if not seconds > 0:
            raise ValueError(f"{name} must be > 0 (seconds), got {seconds!r}")
    if torch.distributed.is_initialized():
        raise RuntimeError(
            "remote actors make this process rank 0 of torch.distributed's default process group, "
            "but one is already initialized (a DDP learner?): use a single-process learner"
        )
    policy = RemoteActingPolicy(network_factory().to("cpu"))
    policy.load_learner_weights(network, version)
    env_options = dict(spec.env_options or {})
    env_fns = [partial(make_remote_env, spec.env_id, spec.envs_per_actor, s, env_options) for s in spec.actor_seeds()]
    frames_per_batch = spec.frames_per_rollout
    # __new__ then __init__: if joining fails after nodes were launched, we still hold them.
    collector = BoundDistributedCollector.__new__(BoundDistributedCollector)
    try:
        collector.__init__(
            env_fns,
            policy,  # pickled to each node once admitted; RemoteActors.publish_weights sends its new weights
            launcher=launcher,
            bind_address=bind_address,
            port=tcp_port,
            secret=secret,
            join_timeout_s=join_timeout_s,
            node_timeout_s=node_timeout_s,
            node_host=node_host_for(launcher, bind_address),
            frames_per_batch=frames_per_batch,
            total_frames=-1,  # endless: our own loop never reads it
            collector_class=Collector,  # one batched env per node
            collector_kwargs={"auto_register_policy_transforms": False},
            num_workers_per_collector=1,
            device="cpu",
            sync=False,
            backend=backend,
            slurm_kwargs=slurm_kwargs,
        )
    except BaseException:
        reap(collector, timeout_s=0.0)
        raise
    return RemoteActors(collector, policy, node_timeout_s, version,
                        sample_sizes_of(getattr(network, "distribution", None)))
