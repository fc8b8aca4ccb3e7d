"""Actor processes on this machine: torchrl's multi-process collector, weights through a shared-memory
mailbox, and restarts when an actor dies.

Each actor process steps ``envs_per_actor`` envs (one batched torchrl env) and sends
``[envs_per_actor, unroll_length]`` rollouts as it finishes them (``MultiAsyncCollector``; ``MultiSyncCollector``
when ``sync_actors``). Its policy runs either in the actor, a private CPU copy per actor (``inference="actor"``),
or batched for all actors in the learner's process on ``inference_device`` (``"server"``, ``actors.inference``).
An env that raises leaves its traceback in a file, so that the learner can say why an actor died.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.collectors import MultiAsyncCollector, MultiSyncCollector
from torchrl.weight_update import NoWeightSyncScheme

from lit_impala.actors.inference import InferenceService, make_served_policy
from lit_impala.actors.mailbox import WeightMailbox
from lit_impala.actors.policy import make_acting_policy
from lit_impala.actors.pool import ActorSpec
from lit_impala.envs.factory import make_vector_env
from lit_impala.envs.finite import NonFiniteEnvData, nonfinite_report

log = logging.getLogger(__name__)


class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds (None: in the whole run): a flaky
    node that loses an actor once a day keeps training for weeks, an env that keeps crashing stops the run.

    Args:
        max_restarts: restarts allowed within the window.
        window_s: seconds a restart counts against the budget; None: for ever.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, max_restarts: int, window_s: float | None = 3600.0, clock: Callable[[], float] = time.monotonic):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.clock = clock
        self._times: deque[float] = deque()  # of the restarts still in the window, oldest first

    @property
    def window_text(self) -> str:
        return "in the run" if self.window_s is None else f"within {self.window_s:g} s"

    def used(self) -> int:
        """Restarts within the window, as of now."""
        if self.window_s is not None:
            while self._times and self._times[0] <= self.clock() - self.window_s:
                self._times.popleft()
        return len(self._times)

    def take(self) -> bool:
        """Count one restart now if the budget allows it (True), else False."""
        if self.used() >= self.max_restarts:
            return False
        self._times.append(self.clock())
        return True


def _stopping(report: str) -> str:
    return (f"{report}. Stopping: data.nonfinite_data=raise (with data.nonfinite_data=drop such steps end their "
            "episode and their unrolls are dropped, and training goes on).")


class LocalActors:
    """``spec.num_actors`` actor processes (an ``actors.pool.ActorPool``).

    When an actor process dies (killed, or its env raised), torchrl raises at once; all actors are then
    restarted with the newest published weights and version (the mailbox outlives them), up to
    ``max_restarts`` times within any ``restart_window_s`` seconds (``RestartBudget``), and the stream goes
    on. After that, a ``RuntimeError`` names the env and shows the actor's traceback. An actor stopped by
    non-finite env data (``envs.finite``) is not restarted: the same env would do it again; its
    ``NonFiniteEnvData`` is raised here at once.

    Args:
        spec: the env, processes, envs per process, steps per rollout and seeds (``env_options`` go to
            ``make_vector_env``: ``backend``, ``nonfinite_data``, ...).
        network: the learner's network: the actors start with its weights, tagged ``version``.
        network_factory: picklable callable building the same architecture (run in each actor).
        sync_actors: all actors finish a round together (``MultiSyncCollector``), for debugging.
        max_restarts: restarts allowed within ``restart_window_s``.
        restart_window_s: the window restarts are counted over, in seconds (None: the whole run).
        inference: ``"actor"``: each actor runs its own CPU copy of the policy, weights through the mailbox;
            ``"server"``: one copy in this process serves all actors in batches (``actors.inference``).
        inference_device: where the served copy runs (``"server"`` only); None: ``network``'s device.
    """

    lost = 0  # a dead local actor is restarted, never given up on

    def __init__(
        self,
        spec: ActorSpec,
        network: nn.Module,
        network_factory: Callable[[], nn.Module],
        *,
        version: int = 0,
        sync_actors: bool = False,
        max_restarts: int = 3,
        restart_window_s: float | None = 3600.0,
        inference: str = "actor",
        inference_device: str | torch.device | None = None,
    ):
        self.env_id = spec.env_id
        self.restarts = 0  # in this pool's life
        self.restart_budget = RestartBudget(max_restarts, restart_window_s)
        self._collector = None
        self.mailbox = None
        self.inference = None
        if inference == "server":
            # The served copy starts from `network` and changes only in publish_weights; kept for restarts.
            self._served = dict(network=network, version=version, num_clients=spec.num_actors,
                                device=torch.device(inference_device or next(network.parameters()).device))
            lstm_hidden_dim = network.core.hidden_size if network.use_lstm else 0
            self._policy_factories = lambda clients: [
                partial(make_served_policy, client, network.use_lstm, lstm_hidden_dim) for client in clients
            ]
        else:
            self.mailbox = WeightMailbox(network)
            # Before the workers exist: torchrl runs the policy once while building each worker.
            self.mailbox.publish(network, version)
            self._policy_factories = lambda _: partial(make_acting_policy, network_factory, self.mailbox)
        self._error_dir = tempfile.mkdtemp(prefix="lit_impala_actors_")
        env_fns = [
            partial(make_vector_env, spec.env_id, spec.envs_per_actor, actor_seed, error_file=self._error_file(i),
                    actor=i, **(spec.env_options or {}))
            for i, actor_seed in enumerate(spec.actor_seeds())
        ]
        self._make_collector = partial(
            MultiSyncCollector if sync_actors else MultiAsyncCollector,
            env_fns,
            # MultiSyncCollector splits its frames_per_batch over the actors (MultiAsyncCollector's is per actor):
            # each actor's share is still a whole [envs_per_actor, unroll_length] rollout.
            frames_per_batch=spec.frames_per_rollout * (len(env_fns) if sync_actors else 1),
            total_frames=-1,
            # Weights travel through our mailbox only; see actors/mailbox.py for why.
            weight_sync_schemes={"policy": NoWeightSyncScheme()},
            storing_device="cpu",
            env_device="cpu",
            policy_device="cpu",
            num_sub_threads=1,
            auto_register_policy_transforms=False,
            **({"cat_results": 0} if sync_actors else {}),
        )
        self._start()

    def _start(self) -> None:
        try:
            clients = None
            if self.mailbox is None:
                # A fresh server and queues for each set of actor processes (see InferenceService).
                self.inference = InferenceService(**self._served)
                clients = self.inference.clients
            self._collector = self._make_collector(policy_factory=self._policy_factories(clients))
        except BaseException as error:
            report = self._nonfinite_report()  # a non-finite first observation: torchrl re-raises it here
            self.shutdown()
            if report is not None:
                raise NonFiniteEnvData(_stopping(report)) from error
            raise

    def __iter__(self) -> Iterator[TensorDictBase]:
        while True:
            try:
                yield from self._collector
                return
            except RuntimeError as error:
                report = self._nonfinite_report()
                if report is not None:
                    raise NonFiniteEnvData(_stopping(report)) from error
                why = self._actor_tracebacks() or f"{error} (no Python traceback: killed or crashed)"
                budget = self.restart_budget
                if not budget.take():
                    raise RuntimeError(
                        f"an actor stepping {self.env_id!r} failed again after {budget.used()} restarts "
                        f"{budget.window_text} (data.max_actor_restarts={budget.max_restarts}, "
                        f"data.actor_restart_window_s={budget.window_s}); stopping.\n{why}"
                    ) from error
                self.restarts += 1
                log.warning("an actor stepping %r failed; restarting the actors (%d of %d) %s:\n%s",
                            self.env_id, budget.used(), budget.max_restarts, budget.window_text, why)
                self._stop_collector()
                self._clear_actor_tracebacks()
                self._start()

    def publish_weights(self, network: nn.Module, version: int) -> None:
        if self.inference is not None:
            self.inference.publish(network, version)
            self._served.update(network=self.inference.model.network, version=version)  # what a restart serves
        else:
            self.mailbox.publish(network, version)

    def shutdown(self) -> None:
        """Stop the actor processes and free the mailbox; safe to call more than once."""
        self._stop_collector()
        if self._error_dir is not None:
            shutil.rmtree(self._error_dir, ignore_errors=True)
            self._error_dir = None
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None

    def _stop_collector(self) -> None:
        collector, self._collector = self._collector, None
        if collector is not None:
            try:
                collector.shutdown()
            except Exception as error:  # never let a failed shutdown hide the original error
                log.warning("collector shutdown raised %r", error)
        inference, self.inference = self.inference, None
        if inference is not None:
            inference.shutdown()

    def _error_file(self, actor: int) -> str:
        return os.path.join(self._error_dir, f"actor{actor}.traceback")

    def _actor_tracebacks(self) -> str:
        texts = []
        for name in sorted(os.listdir(self._error_dir)) if self._error_dir else []:
            with open(os.path.join(self._error_dir, name)) as f:
                texts.append(f"{name.removesuffix('.traceback')} of env {self.env_id!r} raised:\n{f.read()}")
        return "\n".join(texts)

    def _nonfinite_report(self) -> str | None:
        return nonfinite_report(self._actor_tracebacks())

    def _clear_actor_tracebacks(self) -> None:
        for name in os.listdir(self._error_dir):
            os.remove(os.path.join(self._error_dir, name))
