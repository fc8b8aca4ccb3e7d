"""The actors: a torchrl multi-process collector streamed to the learner as an ``IterableDataset``.

``ImpalaDataModule`` owns the collector (built in ``setup``, per rank, after Lightning launches) and
the ``WeightMailbox`` the learner publishes into; ``UnrollStream`` regroups what the actors send into
learner batches of ``batch_size`` unrolls of ``unroll_length`` steps, ``[B, T]``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial

import lightning as L
import numpy as np
import torch
from tensordict import TensorDictBase
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torchrl.collectors import MultiAsyncCollector, MultiSyncCollector
from torchrl.weight_update import NoWeightSyncScheme

from lit_impala.actor import make_acting_policy
from lit_impala.envs import action_space_spec, actor_seeds, describe_env, make_vector_env
from lit_impala.remote import LAUNCHERS, make_remote_collector
from lit_impala.trajectory import BATCH_KEYS
from lit_impala.weights import WeightMailbox

log = logging.getLogger(__name__)


def _identity(batch):
    return batch


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _Rollouts:
    """Iterable view of ``ImpalaDataModule.rollouts`` (restarts failed actors)."""

    def __init__(self, data: ImpalaDataModule):
        self.data = data

    def __iter__(self) -> Iterator[TensorDictBase]:
        return self.data.rollouts()


class UnrollStream(IterableDataset):
    """Endless stream of learner batches ``[batch_size, unroll_length]`` from a torchrl collector.

    Each collector item is one actor's ``[envs_per_actor, unroll_length]`` rollout; unrolls are
    regrouped (never dropped, never reused) into batches of exactly ``batch_size``.
    """

    def __init__(self, rollouts, batch_size: int):
        self.rollouts = rollouts  # a collector, or anything iterable yielding its rollouts
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[TensorDictBase]:
        pending: list[TensorDictBase] = []
        num_pending = 0
        for rollout in self.rollouts:
            pending.append(rollout.select(*BATCH_KEYS, strict=False))  # core states: recurrent only
            num_pending += rollout.batch_size[0]
            while num_pending >= self.batch_size:
                unrolls = pending[0] if len(pending) == 1 else torch.cat(pending, 0)
                yield unrolls[: self.batch_size]
                rest = unrolls[self.batch_size :]
                num_pending = rest.batch_size[0]
                pending = [rest] if num_pending else []


class ImpalaDataModule(L.LightningDataModule):
    """Actor processes stepping gymnasium envs, streamed as off-policy unrolls.

    Args:
        env_id: gymnasium id; observations: a vector or an image; actions: Discrete,
            MultiDiscrete or a 1-D Box. ``"module:EnvId"`` imports ``module`` first (e.g.
            ``minigrid:MiniGrid-Empty-5x5-v0``).
        num_actors: actor processes, each stepping ``envs_per_actor`` envs with batched inference.
        envs_per_actor: envs stepped together in one actor (a gymnasium ``SyncVectorEnv``).
        unroll_length: T, steps per unroll (the paper's n).
        batch_size: B, unrolls per learner batch.
        seed: base env seed; each actor (and each DDP rank) gets a distinct seed derived from it.
            None (default): the run's seed (``seed_everything``, read via ``torch.initial_seed()``).
        max_episode_steps: override the env's time limit (episodes are *truncated* there); None
            keeps the registered limit (500 for CartPole-v1).
        observation_key: for dict observations, the entry the agent sees (MiniGrid: ``image``).
        hide_observation_indices: components of a vector observation hidden from the agent, e.g.
            ``[1, 3]`` hides CartPole's two velocities (a memory task).
        sync_actors: ``False`` (IMPALA): the learner takes rollouts in the order actors finish
            them (torchrl ``MultiAsyncCollector``); ``True``: all actors finish a round together
            (``MultiSyncCollector``), for debugging and for on-policy comparisons.
        test_episodes: full episodes ``test`` runs on a fresh env (seeded from ``seed``).
        atari_options: for ALE ids, keyword arguments of ``lit_impala.atari.make_atari_env``
            (``noop_max``, ``frame_skip``, ``screen_size``, ``frame_stack``, ``terminal_on_life_loss``,
            ``repeat_action_probability``, ``full_action_space``); defaults are the IMPALA paper's.
        actors: ``local`` (actor processes on this machine, a torchrl ``MultiAsyncCollector``, weights
            through shared memory) or ``remote`` (torchrl's ``DistributedCollector``: each actor is a
            torch.distributed node, possibly on another host; see ``lit_impala.remote``).
        remote_launcher: ``mp`` (nodes as local processes), ``submitit`` (SLURM jobs) or ``external``
            (nodes started by hand with ``python -m lit_impala.remote``).
        remote_tcp_port: the learner's port for remote actors (None: a free one; needed for ``external``).
        remote_backend: torch.distributed backend between learner and remote actors.
        slurm_kwargs: ``submitit.AutoExecutor`` parameters for ``remote_launcher: submitit``.
        max_actor_restarts: local actors: when an actor process dies (killed, or its env raised), all
            actors are restarted with the current weights and training goes on, this many times in the
            run; then the run stops with an error naming the env and showing the actor's traceback.
    """

    def __init__(
        self,
        env_id: str = "CartPole-v1",
        num_actors: int = 2,
        envs_per_actor: int = 32,
        unroll_length: int = 20,
        batch_size: int = 32,
        seed: int | None = None,
        max_episode_steps: int | None = None,
        observation_key: str | None = None,
        hide_observation_indices: list[int] | None = None,
        sync_actors: bool = False,
        test_episodes: int = 20,
        atari_options: dict | None = None,
        actors: str = "local",
        remote_launcher: str = "mp",
        remote_tcp_port: int | None = None,
        remote_backend: str = "gloo",
        slurm_kwargs: dict | None = None,
        max_actor_restarts: int = 3,
    ):
        super().__init__()
        for name in ("num_actors", "envs_per_actor", "unroll_length", "batch_size", "test_episodes"):
            _positive_int(name, locals()[name])
        if max_episode_steps is not None:
            _positive_int("max_episode_steps", max_episode_steps)
        if not isinstance(max_actor_restarts, int) or max_actor_restarts < 0:
            raise ValueError(f"max_actor_restarts must be an integer >= 0, got {max_actor_restarts!r}")
        if actors not in ("local", "remote"):
            raise ValueError(f"actors must be 'local' or 'remote', got {actors!r}")
        if actors == "remote":
            if remote_launcher not in LAUNCHERS:
                raise ValueError(f"remote_launcher must be one of {list(LAUNCHERS)}, got {remote_launcher!r}")
            if sync_actors:
                raise ValueError("sync_actors: true is for local actors; remote actors always deliver as they finish")
            if remote_launcher == "external" and remote_tcp_port is None:
                raise ValueError("remote_launcher: external needs remote_tcp_port (the port the actors connect to)")
        self.save_hyperparameters()
        # Checked here, before any actor process exists; the facts flow into the model via the CLI.
        self.env_options = {
            "max_episode_steps": max_episode_steps,
            "observation_key": observation_key,
            "hide_observation_indices": hide_observation_indices,
            **({"atari_options": atari_options} if atari_options is not None else {}),
        }
        self.env_facts = describe_env(env_id, **self.env_options)
        self.collector = None
        self.mailbox: WeightMailbox | None = None
        self.actor_restarts = 0
        self._actor_recipe: tuple | None = None  # (network_factory, rank): what a restart needs
        self._error_dir: str | None = None

    @property
    def env_seed(self) -> int:
        """The base env seed in use (``seed``, or the run's seed when ``seed`` is None)."""
        return self.hparams.seed if self.hparams.seed is not None else torch.initial_seed()

    @property
    def observation_shape(self) -> list[int]:
        """Shape of one observation (channels-first for images); linked into the model."""
        return list(self.env_facts.observation_shape)

    @property
    def action_space(self) -> dict:
        """The env's action space as plain data (see ``envs.action_space_spec``); linked into the model."""
        return action_space_spec(self.env_facts.action_space)

    def start_actors(
        self, network: nn.Module, network_factory: Callable[[], nn.Module], version: int = 0, rank: int = 0
    ) -> None:
        """Create the weight mailbox, publish ``network``'s weights and start the actor processes.

        Args:
            network: the learner's network; its current weights are what the actors start with.
            network_factory: picklable callable building the same architecture (run in each actor).
            version: learner update count of ``network``'s weights.
            rank: DDP rank, so each rank's actors get their own env seeds.
        """
        if self.collector is not None:
            return
        hp = self.hparams
        if hp.actors == "remote":
            if self.trainer is not None and self.trainer.world_size > 1:
                raise ValueError("remote actors need a single learner process (torchrl's DistributedCollector makes "
                                 "the learner rank 0 of the default process group, which DDP also needs)")
            self.collector = make_remote_collector(
                hp.env_id, network, network_factory,
                num_actors=hp.num_actors, envs_per_actor=hp.envs_per_actor, unroll_length=hp.unroll_length,
                version=version, seed=self.env_seed, rank=rank, env_options=self.env_options,
                launcher=hp.remote_launcher, backend=hp.remote_backend, tcp_port=hp.remote_tcp_port,
                slurm_kwargs=hp.slurm_kwargs,
            )
            return
        self.mailbox = WeightMailbox(network)
        # Before the workers exist: torchrl runs the policy once while building each worker.
        self.mailbox.publish(network, version)
        self._actor_recipe = (network_factory, rank)
        self._error_dir = tempfile.mkdtemp(prefix="lit_impala_actors_")
        self._start_collector()

    def _start_collector(self) -> None:
        """The local actor processes, reading their weights from the (existing) mailbox."""
        hp = self.hparams
        network_factory, rank = self._actor_recipe
        collector_cls = MultiSyncCollector if hp.sync_actors else MultiAsyncCollector
        env_fns = [
            partial(make_vector_env, hp.env_id, hp.envs_per_actor, seed, error_file=self._error_file(i), **self.env_options)
            for i, seed in enumerate(actor_seeds(self.env_seed, hp.num_actors, rank))
        ]
        try:
            self.collector = collector_cls(
                env_fns,
                policy_factory=partial(make_acting_policy, network_factory, self.mailbox),
                frames_per_batch=hp.envs_per_actor * hp.unroll_length,
                total_frames=-1,
                # Weights travel through our mailbox only; see lit_impala/weights.py for why.
                weight_sync_schemes={"policy": NoWeightSyncScheme()},
                storing_device="cpu",
                env_device="cpu",
                policy_device="cpu",
                num_sub_threads=1,
                auto_register_policy_transforms=False,
                **({"cat_results": 0} if hp.sync_actors else {}),
            )
        except BaseException:
            self.stop_actors()
            raise

    def _error_file(self, actor: int) -> str:
        return os.path.join(self._error_dir, f"actor{actor}.traceback")

    def rollouts(self) -> Iterator[TensorDictBase]:
        """The actors' rollouts, one ``[envs_per_actor, unroll_length]`` TensorDict at a time.

        torchrl raises as soon as an actor process dies. Local actors are then restarted (all of them,
        with the newest published weights and version: the mailbox outlives them) up to
        ``max_actor_restarts`` times in the run, and the stream goes on.
        """
        while True:
            try:
                yield from self.collector
                return
            except RuntimeError as error:
                if self.hparams.actors != "local" or self.mailbox is None:
                    raise
                why = self._actor_tracebacks() or f"{error} (no Python traceback: killed or crashed)"
                if self.actor_restarts >= self.hparams.max_actor_restarts:
                    raise RuntimeError(
                        f"an actor stepping {self.hparams.env_id!r} failed again after {self.actor_restarts} restarts "
                        f"(data.max_actor_restarts={self.hparams.max_actor_restarts}); stopping.\n{why}"
                    ) from error
                self.actor_restarts += 1
                log.warning("an actor stepping %r failed; restarting the actors (%d of %d):\n%s",
                            self.hparams.env_id, self.actor_restarts, self.hparams.max_actor_restarts, why)
                self._stop_collector()
                self._clear_actor_tracebacks()
                self._start_collector()

    def _actor_tracebacks(self) -> str:
        texts = []
        for name in sorted(os.listdir(self._error_dir)) if self._error_dir else []:
            with open(os.path.join(self._error_dir, name)) as f:
                texts.append(f"{name.removesuffix('.traceback')} of env {self.hparams.env_id!r} raised:\n{f.read()}")
        return "\n".join(texts)

    def _clear_actor_tracebacks(self) -> None:
        for name in os.listdir(self._error_dir):
            os.remove(os.path.join(self._error_dir, name))

    def _stop_collector(self) -> None:
        collector, self.collector = self.collector, None
        if collector is not None:
            try:
                collector.shutdown()
            except Exception as error:  # never let a failed shutdown hide the original error
                log.warning("collector shutdown raised %r", error)

    def publish_weights(self, network: nn.Module, version: int) -> None:
        """Make ``network``'s weights (tagged ``version``) the ones actors act with from their next step."""
        if self.mailbox is not None:
            self.mailbox.publish(network, version)
        else:  # remote actors: torchrl's distributed weight sync, the version inside the weights
            self.collector.publish_weights(network, version)

    def stop_actors(self) -> None:
        """Shut the actor processes down and free the mailbox; safe to call more than once."""
        self._stop_collector()
        if self._error_dir is not None:
            shutil.rmtree(self._error_dir, ignore_errors=True)
            self._error_dir = None
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None

    def train_dataloader(self) -> DataLoader:
        # The actors start here, not in setup(): Lightning restores a checkpoint after setup() and
        # before asking for the dataloader, so the first unrolls are acted with the restored weights
        # and tagged with the restored update count.
        if self.collector is None:
            module = self.trainer.lightning_module
            self.start_actors(module.network, module.network_factory, module.global_step, self.trainer.global_rank)
        # The collector is already parallel: num_workers=0 (worker copies would never get new
        # weights), batch_size=None and an identity collate (batches are ready-made TensorDicts).
        # A CUDA learner: page-locked batches, so training_step's .to(device, non_blocking=True) is
        # an asynchronous copy.
        to_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            UnrollStream(_Rollouts(self), self.hparams.batch_size),
            batch_size=None,
            num_workers=0,
            collate_fn=_identity,
            pin_memory=to_cuda,
        )

    def test_dataloader(self) -> DataLoader:
        # One item per test episode: its env seed (the episodes run in ImpalaModule.test_step).
        seeds = [int(s) for s in np.random.SeedSequence([self.env_seed, 7]).generate_state(self.hparams.test_episodes)]
        return DataLoader(seeds, batch_size=None, num_workers=0)

    def teardown(self, stage: str) -> None:
        self.stop_actors()

    def on_exception(self, exception: BaseException) -> None:
        # Lightning calls this (not teardown) on an error or Ctrl-C: never leave actors behind.
        self.stop_actors()
