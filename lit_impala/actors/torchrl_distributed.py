"""torchrl's ``DistributedCollector`` with its sockets bound, its nodes admitted and its waits bounded: the one
module that touches torchrl's private distributed internals (torchrl 0.14).

Why it exists: torchrl 0.14's collector listens on every interface (a TCPStore rendezvous on ``tcp_port``, its
store on ``tcp_port + 1``, the weight scheme's store on ``tcp_port + 2`` at ``socket.gethostname()``'s
address), authenticates nothing, sends ``external`` nodes their env factory and policy as a pickle through
gloo (``scatter_object_list``: whoever claims to be the learner makes the node run code) and waits up to 1000
days (``MAX_TIME_TO_CONNECT``). ``BoundDistributedCollector`` keeps what torchrl does well (argument
handling, receive buffers sized by a pseudo-collector, ``DistributedWeightSyncScheme``, the store protocol,
``shutdown``) and replaces how nodes start and join (``_init_workers``):

1. one TCPStore, listening on a socket bound to ``bind_address`` (``master_listen_fd``), split by prefix into
   the process group's (``pg/``), the collector's (``collector/``) and the weight scheme's (``weights/``);
2. every node, whatever started it, runs ``actors.node.run_actor_node``: it joins through the
   ``actors.admission`` gate (both sides prove the secret before the node unpickles its settings), then
   joins the process group with gloo listening on the interface it reaches the learner from;
3. every wait has a deadline: ``join_timeout_s`` to join, ``node_timeout_s`` for the learner's store.

After admission the learner reads only store bytes and gloo tensors received into fixed buffers, never a
pickle. ``TORCHRL_INTERNALS`` lists every private name used here; ``tests/unit/test_torchrl_internals.py``
fails when torchrl changes one of them.
"""

from __future__ import annotations

import multiprocessing
import pickle
import socket
from datetime import timedelta

import torch
from tensordict import TensorDictBase
from torch.distributed import PrefixStore, TCPStore
from torchrl.collectors.distributed import DistributedCollector
from torchrl.weight_update import DistributedWeightSyncScheme

from lit_impala.actors.admission import AdmissionGate, listening_socket
from lit_impala.actors.node import run_actor_node
from lit_impala.actors.remote_network import gloo_listens_on, is_wildcard, reachable_host
from lit_impala.actors.rollout_check import structure_of

# ours -> torchrl's: "external" nodes are started by hand; torchrl calls that mode "submitit_delayed".
LAUNCHERS = {"mp": "mp", "submitit": "submitit", "external": "submitit_delayed"}

# (class, name) -> what we rely on; test_torchrl_internals checks each still exists with this meaning.
TORCHRL_INTERNALS = {
    (DistributedCollector, "_init_workers"): "overridden: starts and joins the nodes (called by __init__)",
    (DistributedCollector, "_make_container"): "builds the receive buffers _tensordict_out from a pseudo-collector",
    (DistributedCollector, "_tensordict_out"): "one locked receive buffer per node (gloo irecv target)",
    (DistributedCollector, "_store"): "the collector's store, set by _init_workers; read by shutdown",
    (DistributedCollector, "_weight_sync_schemes"): "model id -> scheme, made in __init__",
    (DistributedCollector, "_policy_to_send"): "the policy the nodes act with",
    (DistributedCollector, "_frames_per_batch_corrected"): "frames per node rollout",
    (DistributedWeightSyncScheme, "_make_store"): "overridden: our store, bound and with a timeout",
    (DistributedWeightSyncScheme, "_store_info"): "must be set by _make_store on the sender",
    (DistributedWeightSyncScheme, "_store"): "the scheme's store (weights acknowledgements)",
    (DistributedWeightSyncScheme, "_send_instruction"): "NODE_r_in <- update_weights / stop",
    (DistributedWeightSyncScheme, "_timeout"): "the store timeout the scheme was made with",
}

_LOST = b"down"  # what a node says when it stopped; torchrl's shutdown waits for it from every node


class BoundWeightSyncScheme(DistributedWeightSyncScheme):
    """torchrl's weight scheme on our store (``weights/`` prefix) instead of one of its own on every interface.

    Args:
        store: the learner's TCPStore (the learner side only; never pickled).
        store_port: its port, which the nodes connect to.
        timeout_s: how long a node's store operation waits for the learner.
    """

    def __init__(self, store: TCPStore, store_port: int, backend: str, timeout_s: float):
        super().__init__(backend=backend, sync=False, timeout=timeout_s)
        self._learner_store = store
        self._learner_store_port = store_port
        self.learner_host: str | None = None  # set on the node, before init_on_receiver: where it reached the learner

    def __getstate__(self):
        state = super().__getstate__()
        state["_learner_store"] = None
        return state

    def _make_store(self, is_master: bool, num_workers=None, store_info=None, base_tcp_port=None, max_retries=10):
        if is_master:
            self._store_info = {"host": None, "port": self._learner_store_port}  # host: the node's learner_host
            return PrefixStore("weights", self._learner_store)
        client = TCPStore(self.learner_host, store_info["port"], is_master=False,
                          timeout=timedelta(seconds=self._timeout))
        return PrefixStore("weights", client)


class BoundDistributedCollector(DistributedCollector):
    """``DistributedCollector`` whose sockets listen on ``bind_address`` only, whose nodes prove a shared secret
    before they get anything, and whose waits end.

    Args:
        create_env_fn: one env factory per node (picklable).
        policy: the learner's CPU copy of the acting policy (pickled to the nodes after admission).
        launcher: ``"mp"`` (node processes here), ``"submitit"`` (SLURM jobs) or ``"external"`` (started by hand).
        bind_address: where the admission gate, the store and the learner's gloo listen.
        port: the admission gate's port (None or 0: a free one, see ``port``).
        secret: the run's shared secret.
        join_timeout_s: every node must join within this; a node waits for the learner this long at most.
        node_timeout_s: the learner's store operations wait this long at most.
        node_host: the address "mp" and "submitit" nodes reach the learner at.
        **kwargs: ``DistributedCollector``'s other arguments (``frames_per_batch``, ``collector_kwargs``...).
    """

    def __init__(self, create_env_fn, policy, *, launcher: str, bind_address: str, port: int | None, secret: str,
                 join_timeout_s: float, node_timeout_s: float, node_host: str, **kwargs):
        self.jobs = []  # before anything can fail: whoever cleans up looks here
        self.bind_address = bind_address
        self.node_host = node_host
        self.join_timeout_s = join_timeout_s
        self._node_launcher = launcher
        self._node_secret = secret
        try:
            self._admission = AdmissionGate(bind_address, port, secret, len(create_env_fn))
        except OSError as error:
            raise ValueError(f"cannot listen for remote actors at {bind_address}:{port or 0} ({error}); "
                             "check data.remote_bind_address and data.remote_tcp_port") from None
        try:
            listener = listening_socket(bind_address, 0)
            store_port = listener.getsockname()[1]
            # TCPStore would listen on every interface: it takes our bound socket instead (and closes it).
            self._store_server = TCPStore(reachable_host(bind_address), store_port, None, True,
                                          timedelta(seconds=node_timeout_s), wait_for_workers=False,
                                          master_listen_fd=listener.detach())
            scheme = BoundWeightSyncScheme(self._store_server, store_port, kwargs.get("backend", "gloo"),
                                           join_timeout_s)
            super().__init__(create_env_fn, policy, launcher=LAUNCHERS[launcher], tcp_port=self._admission.port,
                             weight_sync_schemes={"policy": scheme}, **kwargs)
        except BaseException:
            self.release_store()  # nodes that joined see the learner gone at once, not after their timeout
            raise
        finally:
            self._admission.close()

    @property
    def port(self) -> int:
        """The admission gate's port (what ``external`` nodes are given as ``--port``)."""
        return self._admission.port

    # --- start and join (replaces torchrl's rendezvous) ---------------------------------------------------------

    def _init_workers(self) -> None:
        self.IPAddr = self.node_host
        self._make_container()  # the receive buffers first: each node is told the structure it must send
        fields = structure_of(self._tensordict_out[0])
        self._admission.open({rank: pickle.dumps(self._node_settings(rank, fields)) for rank in self._ranks()})
        self._launch_nodes()
        self._admission.wait(self.join_timeout_s, check=self._check_launched_nodes)
        self._admission.close()  # every node joined: nothing listens there any more
        with gloo_listens_on(self.bind_address):
            torch.distributed.init_process_group(
                self.backend, store=PrefixStore("pg", self._store_server), rank=0, world_size=self.num_workers + 1,
                timeout=timedelta(seconds=self.join_timeout_s),
            )
        self._store = PrefixStore("collector", self._store_server)
        self._store.set("TRAINER_status", b"alive")

    def _make_container(self) -> None:
        if getattr(self, "_tensordict_out", None) is None:  # __init__ calls it again after _init_workers
            super()._make_container()

    def _ranks(self) -> range:
        return range(1, self.num_workers + 1)

    def _node_settings(self, rank: int, fields: dict) -> dict:
        """What node ``rank`` receives once admitted (what torchrl's ``_run_collector`` is given)."""
        return {
            "world_size": self.num_workers + 1,
            "backend": self.backend,
            "store_port": self._store_server.port,
            "timeout_s": self.join_timeout_s,
            "env_make": self.env_constructors[rank - 1],
            "policy": self._policy_to_send,
            "policy_factory": self.policy_factory[rank - 1],
            "frames_per_batch": self._frames_per_batch_corrected,
            "collector_kwargs": self.collector_kwargs[rank - 1],
            "weight_sync_schemes": self._weight_sync_schemes,
            "rollout_fields": fields,
        }

    def _launch_nodes(self) -> None:
        if self._node_launcher == "external":
            return  # started by hand: python -m lit_impala.remote ...
        common = dict(learner=self.node_host, port=self.port, world_size=self.num_workers + 1,
                      secret=self._node_secret, join_timeout_s=self.join_timeout_s)
        if self._node_launcher == "mp":
            context = multiprocessing.get_context("spawn")  # never fork a learner that may hold CUDA
            for rank in self._ranks():
                job = context.Process(target=run_actor_node, kwargs=dict(common, rank=rank),
                                      name=f"lit_impala-remote-actor-{rank}")
                job.start()
                self.jobs.append(job)
            return
        import submitit  # noqa: PLC0415 -- optional dependency, only for this launcher

        executor = submitit.AutoExecutor(folder="log_test")  # torchrl's folder; the jobs' files hold the secret
        executor.update_parameters(**self.slurm_kwargs)
        for rank in self._ranks():
            self.jobs.append(executor.submit(run_actor_node, **common, rank=rank))

    def _check_launched_nodes(self) -> None:
        """Give up joining at once when a node the learner started ended before it joined."""
        for rank, job in zip(self._ranks(), self.jobs, strict=False):
            if rank in self._admission.joined:
                continue
            if isinstance(job, multiprocessing.process.BaseProcess) and job.exitcode is not None:
                raise RuntimeError(f"remote actor node {rank} (pid {job.pid}) exited with code {job.exitcode} "
                                   "before it joined (its error is above)")
            if not isinstance(job, multiprocessing.process.BaseProcess) and job.done():
                raise RuntimeError(f"remote actor node {rank} (SLURM job {job.job_id}) ended before it joined "
                                   f"({getattr(job, 'state', 'state unknown')})")

    # --- what actors.remote.RemoteActors uses -------------------------------------------------------------------

    @property
    def store(self):
        """The collector's store: ``NODE_r_in`` (instructions), ``NODE_r_status`` (``done``...), ``NODE_r_out``."""
        return self._store

    def receive_buffer(self, rank: int) -> TensorDictBase:
        """Node ``rank``'s fixed receive buffer ``[envs_per_actor, unroll_length]``."""
        return self._tensordict_out[rank - 1]

    def ask_to_receive_weights(self, rank: int) -> None:
        """``NODE_rank_in <- update_weights`` on the weight store: the node posts its receive for new weights."""
        self._weight_sync_schemes["policy"]._send_instruction("receive", worker_ids=rank - 1)

    def weights_acknowledged(self, rank: int) -> bool:
        """Whether node ``rank`` acknowledged the weights sent last (``NODE_rank_out: updated`` on the weight
        store); reads and clears the acknowledgement."""
        store, key = self._weight_sync_schemes["policy"]._store, f"NODE_{rank}_out"
        if not store.check([key]):
            return False
        acknowledgement = store.get(key)
        store.delete_key(key)
        return acknowledgement == b"updated"

    def stop_weight_receivers(self) -> None:
        """End the nodes' weight-receiver threads at once (a node's shutdown otherwise waits 5 s for each)."""
        for scheme in (self._weight_sync_schemes or {}).values():
            scheme._send_instruction("stop")

    def release_store(self) -> None:
        """Drop every reference to the store, so that it stops listening (once the last one is gone)."""
        self._store_server = self._store = None
        for scheme in (getattr(self, "_weight_sync_schemes", None) or {}).values():
            scheme._learner_store = scheme._store = None

    def mark_lost(self, rank: int) -> None:
        """torchrl's ``shutdown`` waits for every node's goodbye: a lost node never says it."""
        self._store.set(f"NODE_{rank}_out", _LOST)


def node_host_for(launcher: str, bind_address: str) -> str:
    """The address "mp" and "submitit" nodes reach the learner at: the bind address; for a wildcard, loopback
    ("mp") or this host name's address ("submitit")."""
    if launcher == "submitit" and is_wildcard(bind_address):
        return socket.gethostbyname(socket.gethostname())
    return reachable_host(bind_address)
