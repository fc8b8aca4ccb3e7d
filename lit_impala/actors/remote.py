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

Every node joins through an admission gate that checks a shared secret before anything pickled crosses the
network, and every socket listens on ``data.remote_bind_address`` only (``actors.torchrl_distributed``). After
that the learner reads store bytes and tensors received into fixed buffers, and checks each rollout on
arrival (``actors.rollout_check``): a rollout with non-finite values, a log-probability above 0, a version
the learner never published or an action out of range is dropped with a warning naming its node, counted
in ``faults/rollouts_rejected``, and the node is asked for its next one.

A lost node (its process died, its SLURM job ended, or it answered nothing for ``node_timeout_s``)
is dropped with a warning naming it, and the run goes on with the others; when none is left, the
stream raises an error naming each lost node and why. A node cannot be restarted into a running
torch.distributed group (torchrl 0.14 has no way to), so a lost node stays lost for the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

from tensordict import TensorDict, TensorDictBase
from torch import nn

from lit_impala.actors.node import RemoteActingPolicy
from lit_impala.actors.remote_roster import NodeRoster, gloo_reason, reap
from lit_impala.actors.rollout_check import RolloutSpec, rollout_problem, structure_of

if TYPE_CHECKING:
    from lit_impala.actors.torchrl_distributed import BoundDistributedCollector

log = logging.getLogger(__name__)

_IDLE_SLEEP_S = 0.001  # between sweeps over the nodes when none had anything: don't burn the learner's core
_ACK_POLL_S = 0.0002  # between looks for the nodes' weight acknowledgements (they come within milliseconds)
_REJECTED_WARNINGS_AT_ONCE = 3  # warnings about a node's first dropped rollouts; then ...
_REJECTED_WARNING_EVERY_S = 10.0  # ... at most one per node this often


class RemoteActors:
    """Actor nodes that behave like our local collectors.

    Iterating yields one node's rollout ``[envs_per_actor, unroll_length]`` at a time (every
    ``iter()`` continues the same stream); ``publish_weights`` sends new weights to every node and
    returns once each node has them; ``shutdown`` stops the nodes (safe to call more than once).
    Built by ``actors.remote_launch.make_remote_collector``.

    Losing a node: ``nodes.lost`` maps each lost node's rank to why (``"node 2 (pid 4242): its process
    exited with code -9 (SIGKILL)"``); ``lost`` counts them. A node is lost when its process exits ("mp"
    launcher) or its SLURM job ends ("submitit"), seen within ``_HEALTH_CHECK_EVERY_S``; for every launcher (the only
    signs for nodes started by hand), when gloo finds its connection closed as the learner next talks
    to it, or when it delivers no rollout for ``node_timeout_s`` after being asked for one, or does not
    acknowledge new weights within ``node_timeout_s`` (hung, or its host is gone). A lost node
    gets a warning and is never asked again ("mp": its process is killed, should it still run); with
    none left, iterating or publishing raises ``RuntimeError`` naming each lost node.

    A rollout that fails ``rollout_check.rollout_problem`` (or that its node did not send because its
    structure differs from the receive buffer's) is dropped: ``faults/rollouts_rejected`` counts them, a warning
    (its first 3, then at most one every 10 s) names the node and the problem, and the node is asked for its next.

    Not torchrl's own iterator: ``DistributedCollector``'s async loop checks no node's liveness, so a dead or
    frozen node blocks it. This class speaks the same store protocol (``NODE_r_in``: ``continue``,
    ``NODE_r_status``: ``done`` or ``rejected: why``, rollouts by gloo send/recv; weights: ``update_weights``
    then an ``updated`` acknowledgement) but never blocks on one node. The torchrl internals it needs are behind
    ``actors.torchrl_distributed.BoundDistributedCollector``.
    """

    def __init__(self, collector: BoundDistributedCollector, policy: RemoteActingPolicy,
                 node_timeout_s: float = 60.0, version: int = 0, sample_sizes: tuple[int, ...] | None = None):
        self.collector = collector
        self.policy = policy  # the learner's CPU copy: what torchrl sends to the nodes
        self.node_timeout_s = node_timeout_s
        self.nodes = NodeRoster(getattr(collector, "jobs", None), collector.num_workers)
        self.restarts = 0  # a lost node cannot be restarted (see the module docstring)
        self.rollouts_rejected = 0  # rollouts dropped on arrival (or not sent by their node), see rollout_check
        self.spec = RolloutSpec(structure_of(collector.receive_buffer(1)), sample_sizes)
        self._latest_version = version  # the newest version published: no rollout can carry a later one
        self._rejected_warned: dict[int, tuple[int, float, int]] = {}  # rank -> (warnings, last's time, unwarned)
        self._rollouts: Iterator[TensorDictBase] | None = None
        self._asked_at: dict[int, float] = {}  # rank -> when it was last asked for a rollout
        self._receives: dict[int, list] = {}  # rank -> gloo works of the rollout it was asked for
        self._orphans: list = []  # gloo works to lost nodes: kept referenced until the group is destroyed
        self._last_served = 0

    @property
    def lost(self) -> int:
        """Nodes lost so far (``nodes.lost`` says which and why)."""
        return len(self.nodes.lost)

    def __iter__(self) -> Iterator[TensorDictBase]:
        if self.collector is None:
            raise RuntimeError("the remote actors were shut down")
        if not self.nodes.live:
            raise self.nodes.none_left_error()
        # One stream for the collector's whole life: a second one would post a second receive per
        # node for the same messages.
        if self._rollouts is None:
            self._rollouts = self._stream()
        return self._rollouts

    def _stream(self) -> Iterator[TensorDictBase]:
        for rank in list(self.nodes.live):
            self._ask(rank)
        while True:
            rank, rollout = self._next_delivery()
            yield rollout
            # As torchrl does: the node goes on only after the learner took its rollout (and, in
            # between, maybe published new weights), which keeps the policy lag low.
            if rank in self.nodes.live:
                self._ask(rank)

    def _ask(self, rank: int, post_receive: bool = True) -> None:
        """Post the receive for node ``rank``'s next rollout, then ask the node for it (the receive posted
        for a rollout the node did not send stays posted: ``post_receive=False``)."""
        if post_receive:
            try:
                # Raises at once if gloo already saw the node's connection close (it died).
                self._receives[rank] = self.collector.receive_buffer(rank).irecv(src=rank, return_premature=True)
            except RuntimeError as error:
                self.nodes.drop(rank, f"it cannot be reached ({gloo_reason(error)})")
                return
        # Before "continue": a "done" left from the node's previous round must never read as this one's.
        self.collector.store.set(f"NODE_{rank}_status", b"asked")
        self.collector.store.set(f"NODE_{rank}_in", b"continue")
        self._asked_at[rank] = time.monotonic()

    def _reject(self, rank: int, problem: str) -> None:
        """Count a dropped rollout of node ``rank``; warn about its first 3, then at most every 10 s per node."""
        self.rollouts_rejected += 1
        now = time.monotonic()
        warned, last, unwarned = self._rejected_warned.get(rank, (0, -_REJECTED_WARNING_EVERY_S, 0))
        if warned >= _REJECTED_WARNINGS_AT_ONCE and now - last < _REJECTED_WARNING_EVERY_S:
            self._rejected_warned[rank] = (warned, last, unwarned + 1)
            return
        self._rejected_warned[rank] = (warned + 1, now, 0)
        more = f"; {unwarned} more dropped from it since the last warning" if unwarned else ""
        log.warning("dropped a rollout from remote actor %s: %s; training goes on (faults/rollouts_rejected: %d%s)",
                    self.nodes.name(rank), problem, self.rollouts_rejected, more)

    def _receive(self, rank: int) -> TensorDictBase | None:
        """Node ``rank``'s rollout, whose send is complete; None if it never arrived (node dropped) or is
        unfit to learn from (dropped and counted; the node is asked for its next)."""
        deadline = time.monotonic() + self.node_timeout_s
        try:
            for work in self._receives.pop(rank):
                # Bounded: a node that froze mid-transfer must not hold the learner for the group's timeout.
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
        except RuntimeError as error:
            self.nodes.drop(rank, f"its rollout did not arrive ({gloo_reason(error)})")
            return None
        rollout = self.collector.receive_buffer(rank).clone()
        problem = rollout_problem(rollout, self.spec, self._latest_version)
        if problem is None:
            return rollout
        self._reject(rank, problem)
        self._ask(rank)
        return None

    def _next_delivery(self) -> tuple[int, TensorDictBase]:
        """Wait for the next rollout, polling the live nodes round-robin; drop lost ones on the way."""
        store = self.collector.store
        while True:
            self.nodes.check_health()
            if not self.nodes.live:
                raise self.nodes.none_left_error()
            now = time.monotonic()
            order = [r for r in self.nodes.live if r > self._last_served] + [
                r for r in self.nodes.live if r <= self._last_served
            ]
            for rank in order:
                status = store.get(f"NODE_{rank}_status")
                if status == b"done":  # the node's send is complete
                    rollout = self._receive(rank)
                    if rollout is None:
                        break
                    self._last_served = rank
                    return rank, rollout
                if status.startswith(b"rejected: "):  # the node did not send it: its receive stays posted
                    self._reject(rank, status[len(b"rejected: "):].decode(errors="replace"))
                    self._ask(rank, post_receive=False)
                    break
                silent_s = now - self._asked_at[rank]
                if silent_s > self.node_timeout_s:
                    self.nodes.drop(rank, f"silent for {silent_s:.1f} s: no rollout since it was asked for one "
                                     f"(remote_node_timeout_s={self.node_timeout_s:g})")
                    break
            else:
                time.sleep(_IDLE_SLEEP_S)

    def publish_weights(self, network: nn.Module, version: int) -> None:
        """Make ``network``'s weights, tagged ``version``, the ones every live node acts with next.

        Returns once each live node acknowledged them; a node that does not within
        ``node_timeout_s`` (or dies meanwhile) is dropped instead.
        """
        self.policy.load_learner_weights(network, version)
        self._latest_version = max(self._latest_version, version)
        self.nodes.check_health(force=True)
        if not self.nodes.live:
            raise self.nodes.none_left_error()
        weights = TensorDict.from_module(self.policy)  # what torchrl's scheme.send would extract
        sends: dict[int, list] = {}
        for rank in list(self.nodes.live):
            try:
                self.collector.ask_to_receive_weights(rank)  # NODE_r_in: update_weights
                # Not waited on here: gloo's send only completes once the node posted its receive.
                sends[rank] = weights.isend(rank, return_early=True)
            except RuntimeError as error:
                self.nodes.drop(rank, f"sending it new weights failed ({gloo_reason(error)})")
        started = time.monotonic()
        while sends:
            for rank in list(sends):
                if self.collector.weights_acknowledged(rank):
                    works = sends.pop(rank)
                    try:
                        for work in works:
                            work.wait()  # already complete: the node has the weights
                    except RuntimeError as error:
                        self.nodes.drop(rank, f"sending it new weights failed ({gloo_reason(error)})")
            if not sends:
                break
            self.nodes.check_health()
            silent_s = time.monotonic() - started
            for rank in list(sends):
                if rank in self.nodes.live and silent_s > self.node_timeout_s:
                    self.nodes.drop(rank, f"silent for {silent_s:.1f} s: no acknowledgement of new weights "
                                     f"(remote_node_timeout_s={self.node_timeout_s:g})")
                if rank not in self.nodes.live:
                    self._orphans.append(sends.pop(rank))
            time.sleep(_ACK_POLL_S)
        if not self.nodes.live:
            raise self.nodes.none_left_error()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        collector = self.collector
        if collector is None:
            return
        try:
            self.nodes.check_health(force=True)
            try:
                collector.stop_weight_receivers()
            except Exception as error:  # noqa: BLE001 -- only a speed-up: shutdown works without it
                log.debug("could not stop the weight receivers early: %r", error)
            for rank in self.nodes.lost:
                collector.mark_lost(rank)
            collector.shutdown()
        finally:
            self.collector, self._rollouts = None, None
            reap(collector, timeout_s)
            collector.release_store()  # stops listening
            self._receives.clear()
            self._orphans.clear()
