"""The actors, streamed to the learner as an ``IterableDataset``: the ``LightningDataModule``.

``ImpalaDataModule`` holds the run's env and actor configuration, reads the env facts the learner's
network needs (before any actor process exists), starts an actor pool (``actors.local.LocalActors`` or
``actors.remote.RemoteActors``, one interface: ``actors.pool.ActorPool``) once Lightning has launched and
restored the learner, and serves its rollouts through ``UnrollStream`` as learner batches of
``batch_size`` unrolls of ``unroll_length`` steps, ``[B, T]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from tensordict import TensorDictBase
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lit_impala.actors.local import LocalActors
from lit_impala.actors.pool import ActorPool, ActorSpec
from lit_impala.actors.remote_launch import check_launch_settings, make_remote_collector
from lit_impala.config import NonNegativeInt, PositiveFloat, PositiveInt, check_arguments
from lit_impala.envs.atari import AtariOptions
from lit_impala.envs.factory import EnvBackend, action_space_spec, describe_env
from lit_impala.play import EpisodeSpec, TestEpisode
from lit_impala.schema import BATCH_KEYS, NONFINITE_KEY, POLICY_VERSION_KEY, REPLAYED_KEY, Trajectory, to_time_major


def _identity(batch):
    return batch


def minibatch_indices(batch_size: int, minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One pass's minibatches: a random permutation of the unrolls ``0 .. batch_size - 1`` split into
    ``minibatches`` index tensors ``[batch_size / minibatches]``, each unroll in exactly one. Whole unrolls
    (never steps) so that V-trace keeps each unroll's time order and an LSTM its initial state."""
    return list(torch.randperm(batch_size, generator=generator).chunk(minibatches))


class UnrollStream(IterableDataset):
    """Endless stream of learner batches ``[batch_size, unroll_length]`` from a torchrl collector.

    Each collector item is one actor's ``[envs_per_actor, unroll_length]`` rollout; unrolls are
    regrouped into batches of exactly ``batch_size``. An unroll holding a step its env marked non-finite
    (``NONFINITE_KEY``, ``data.nonfinite_data: drop``) is dropped first, and counted in ``faults/unrolls_dropped``;
    no other is. Each batch is gone over ``passes`` times in a row, each pass as ``minibatches`` minibatches
    ``[batch_size / minibatches, unroll_length]`` of whole unrolls in a fresh random order (drawn from a
    generator seeded with ``seed``); with one minibatch a pass is the batch itself, in arrival order. Every
    minibatch of a pass after the first carries ``REPLAYED_KEY`` True, so that the first pass's minibatches
    count the batch's frames, episodes and observation statistics exactly once.

    With ``max_policy_lag`` N, an unroll whose first (oldest) step was acted with weights more than N versions behind
    ``latest_version()`` (the newest weights published to the actors) when its batch is formed is dropped, and
    counted in ``unrolls_too_old`` (Sample Factory's ``max_policy_lag``). The learner may take one more update
    before it learns from the batch (Lightning fetches the next batch ahead), and each further pass over a batch is
    one update later again.
    """

    def __init__(self, rollouts, batch_size: int, passes: int = 1, minibatches: int = 1, seed: int = 0,
                 max_policy_lag: int | None = None, latest_version: Callable[[], int] | None = None):
        if batch_size % minibatches:
            raise ValueError(f"batch_size {batch_size} does not split into {minibatches} minibatches of whole unrolls")
        if max_policy_lag is not None and latest_version is None:
            raise ValueError("max_policy_lag needs latest_version, the version of the newest published weights")
        self.rollouts = rollouts  # a collector, or anything iterable yielding its rollouts
        self.batch_size = batch_size
        self.passes = passes
        self.minibatches = minibatches
        self.seed = seed
        self.max_policy_lag = max_policy_lag
        self.latest_version = latest_version
        self.unrolls_dropped = 0
        self.unrolls_too_old = 0

    def __iter__(self) -> Iterator[TensorDictBase]:
        # Seeded per iteration: the same rollouts give the same minibatches.
        generator = torch.Generator().manual_seed(self.seed)
        for batch in self._batches():
            for learning_pass in range(self.passes):
                replayed = learning_pass > 0
                if self.minibatches == 1:  # the batch itself (no gather): a repeat shares its frames
                    yield batch.copy().set(REPLAYED_KEY, torch.full(batch.batch_size, replayed))
                    continue
                for index in minibatch_indices(self.batch_size, self.minibatches, generator):
                    minibatch = batch[index]  # a gather: its own tensors, free to tag
                    yield minibatch.set(REPLAYED_KEY, torch.full(minibatch.batch_size, replayed))

    def _batches(self) -> Iterator[TensorDictBase]:
        pending: list[TensorDictBase] = []
        num_pending = 0
        for rollout in self.rollouts:
            rollout = self._without_nonfinite_unrolls(rollout)
            pending.append(rollout.select(*BATCH_KEYS, strict=False))  # core states: recurrent only
            num_pending += rollout.batch_size[0]
            while num_pending >= self.batch_size:
                unrolls = pending[0] if len(pending) == 1 else torch.cat(pending, 0)
                unrolls = self._without_stale_unrolls(unrolls)  # now: the unrolls left from a batch age too
                if unrolls.batch_size[0] < self.batch_size:
                    num_pending = unrolls.batch_size[0]
                    pending = [unrolls] if num_pending else []
                    break
                yield unrolls[: self.batch_size]
                rest = unrolls[self.batch_size :]
                num_pending = rest.batch_size[0]
                pending = [rest] if num_pending else []

    def _without_stale_unrolls(self, rollout: TensorDictBase) -> TensorDictBase:
        """``rollout [n, T]`` less its unrolls begun more than ``max_policy_lag`` versions behind the newest weights."""
        if self.max_policy_lag is None or rollout.batch_size[0] == 0:
            return rollout
        oldest = rollout.get(POLICY_VERSION_KEY)[:, 0].reshape(-1)  # versions only grow along an unroll
        stale = (self.latest_version() - oldest) > self.max_policy_lag  # [n]
        num_stale = int(stale.sum())
        if num_stale == 0:
            return rollout
        self.unrolls_too_old += num_stale
        return rollout[~stale]

    def _without_nonfinite_unrolls(self, rollout: TensorDictBase) -> TensorDictBase:
        """``rollout [n, T]`` less its unrolls holding a marked step (in the observation, or after the action)."""
        keys = rollout.keys(True)
        marks = [rollout.get(key) for key in (NONFINITE_KEY, ("next", NONFINITE_KEY)) if key in keys]
        if not marks:
            return rollout
        dropped = torch.stack([mark.reshape(rollout.batch_size) for mark in marks]).any(0).any(-1)  # [n]
        num_dropped = int(dropped.sum())
        if num_dropped == 0:
            return rollout
        self.unrolls_dropped += num_dropped
        return rollout[~dropped]


@runtime_checkable
class ActorsLearner(Protocol):
    """What the data module needs of the ``LightningModule`` it feeds, to start the actors: the network whose
    weights they act with (published after every update by ``callbacks.ActorWeightSync``) and a picklable recipe
    that builds the same network in an actor process. ``ImpalaModule`` is one."""

    network: nn.Module
    network_factory: Callable[[], nn.Module]


class ImpalaDataModule(L.LightningDataModule):
    """Actor processes stepping gymnasium envs, streamed as off-policy unrolls.

    Args:
        env_id: gymnasium id; observations: a vector or an image; actions: Discrete,
            MultiDiscrete or a 1-D Box. ``"module:EnvId"`` imports ``module`` first (e.g.
            ``minigrid:MiniGrid-Empty-5x5-v0``).
        num_actors: actor processes, each stepping ``envs_per_actor`` envs.
        envs_per_actor: envs stepped together in one actor (a gymnasium ``SyncVectorEnv``, or one envpool).
        unroll_length: T, steps per unroll (the paper's n).
        batch_size: B, unrolls per learner batch.
        passes_per_batch: updates the learner takes on each batch, one after the other. 1 (the paper):
            every frame is learnt from once. More reuses the frames while the actors fill the next batch
            (as APPO's ``num_sgd_iter`` or Sample Factory's ``num_epochs``): V-trace corrects for the
            policy moving between the passes, and the extra updates count in ``trainer.max_steps`` while the
            batch's frames and episodes count once.
        minibatches_per_pass: each pass over a batch is split into this many minibatches of
            ``batch_size / minibatches_per_pass`` whole unrolls, in a fresh random order each pass (as PPO's
            ``num_minibatches`` or Sample Factory's ``num_batches_per_epoch``); ``batch_size`` must be a multiple
            of it. Each minibatch is one learner update, so ``trainer.max_steps`` counts batches x
            ``passes_per_batch`` x ``minibatches_per_pass``. Whole unrolls keep V-trace's time order and an
            LSTM's initial state. The order is drawn from ``seed`` (and the DDP rank): a run is reproducible.
        seed: base env seed; each actor (and each DDP rank) gets a distinct seed derived from it.
            None (default): the run's seed (``seed_everything``, read via ``torch.initial_seed()``).
        max_episode_steps: override the env's time limit (episodes are *truncated* there); None
            keeps the registered limit (500 for CartPole-v1).
        observation_key: for dict observations, the one entry the agent sees (MiniGrid: ``image``). None (default):
            the agent sees every entry, each through an encoder suited to it (images through ``model.encoder``,
            vectors, one-hot ``Discrete`` entries and ``MultiBinary`` ones through the MLP; ``envs.dict_observation``).
        action_mask_key: for dict observations, the entry that holds the legal actions (1 legal, 0 not; one per
            action, ``MultiBinary(n)``), as RLlib's and Sample Factory's action-masking envs give it. The policy's
            logits are masked with it on the actors and the learner alike: illegal actions are never sampled, and
            the behaviour and target log-probs are of the same masked distribution.
        hide_observation_indices: components of a vector observation hidden from the agent, e.g.
            ``[1, 3]`` hides CartPole's two velocities (a memory task).
        sync_actors: ``False`` (IMPALA): the learner takes rollouts in the order actors finish
            them (torchrl ``MultiAsyncCollector``); ``True``: all actors finish a round together
            (``MultiSyncCollector``), for debugging and for on-policy comparisons.
        test_episodes: full episodes ``test`` runs on a fresh env (seeded from ``seed``), each return printed.
        test_videos: ``test`` records its first this many episodes as mp4 files (``videos/test_episode<k>.mp4`` in the
            run's directory; at most 10,000 frames each), for any env that renders ``rgb_array`` frames.
        eval_deterministic: ``test`` and ``callbacks.EvaluationCallback`` act with the policy's mode
            (argmax / mean); False samples from it (the usual evaluation of a stochastic Atari policy).
        sync_every: publish the learner's weights to the actors after every this many updates.
        max_policy_lag: None (the paper): V-trace corrects every unroll, however old. N: an unroll whose oldest step
            was acted with weights more than N versions (learner updates) behind the newest ones published to the
            actors when its batch is formed is dropped, and counted in ``policy_lag/unrolls_dropped``
            (Sample Factory's ``max_policy_lag``). For LSTMs and continuous actions, whose importance weights
            degrade fastest with lag. The learner may take one more update before it learns from a batch
            (Lightning fetches one ahead), and each extra pass (``passes_per_batch``) is one update more.
        atari_options: for ALE ids, keyword arguments of ``envs.atari.make_atari_env``
            (``noop_max``, ``frame_skip``, ``screen_size``, ``frame_stack``, ``terminal_on_life_loss``,
            ``repeat_action_probability``, ``full_action_space``); defaults are the IMPALA paper's.
        actors: ``local`` (actor processes on this machine, a torchrl ``MultiAsyncCollector``, weights
            through shared memory) or ``remote`` (torchrl's ``DistributedCollector``: each actor is a
            torch.distributed node, possibly on another host; see ``actors.remote``).
        remote_launcher: ``mp`` (nodes as local processes), ``submitit`` (SLURM jobs) or ``external``
            (nodes started by hand with ``python -m lit_impala.remote``; they and the learner need the same secret
            in the environment variable ``LIT_IMPALA_REMOTE_SECRET``, at least 32 characters).
        remote_tcp_port: the port remote actor nodes join the learner at, on ``remote_bind_address`` (None: a free
            one; needed for ``external``). The store and gloo listen on free ports of the same address.
        remote_bind_address: the address every socket of the learner for remote actors listens on. None:
            ``127.0.0.1`` for ``mp`` (nothing outside this host can connect), this host name's address for
            ``submitit``; ``external`` needs one (the address the nodes reach; ``0.0.0.0``: every interface).
            Each node proves a shared secret before it gets anything (README.md#security).
        remote_backend: torch.distributed backend between learner and remote actors.
        slurm_kwargs: ``submitit.AutoExecutor`` parameters for ``remote_launcher: submitit``.
        remote_node_timeout_s: a remote actor node that delivers no rollout for this many seconds after
            being asked for one, or does not acknowledge new weights within them, is lost (a node whose
            process or SLURM job ends is lost at once). A lost node is named in a warning and training
            goes on with the others (``faults/actors_lost`` counts them); with none left the run stops with an
            error naming each one. Nodes cannot be restarted into a running run (torchrl 0.14).
        remote_join_timeout_s: every remote actor node must join within this many seconds (else the run stops
            with an error naming the missing ranks); a node waits this long at most for the learner at any
            point (keep it above the learner's longest pause, e.g. evaluation), then it ends by itself.
        env_backend: what steps the actors' envs: ``gymnasium`` (``SyncVectorEnv``, any gymnasium id) or
            ``envpool`` (C++ vectorised envs, ``pip install -e ".[envpool]"``: Atari, classic control, MuJoCo;
            the same episode boundaries, see ``envs.envpool``). Evaluation and ``test`` use gymnasium.
        inference: where the behaviour policy runs for local actors. ``actor`` (default): each actor process
            has its own CPU copy and acts for its ``envs_per_actor`` envs in one forward. ``server``: actor
            processes only step envs; one copy in the learner's process acts for all of them in one batched
            forward on ``inference_device`` (torchrl's ``InferenceServer``, see ``actors.inference``): built
            for a learner with a GPU, where per-actor CPU copies of a large network are the limit.
        inference_device: device of the served policy (``inference: server``); None: the learner's device.
        max_actor_restarts: local actors: when an actor process dies (killed, or its env raised), all
            actors are restarted with the current weights and training goes on, this many times within
            ``actor_restart_window_s``; one more stops the run with an error naming the env and showing the
            actor's traceback.
        actor_restart_window_s: seconds over which ``max_actor_restarts`` counts restarts (older ones no longer
            count: 3 per hour lets a long run on a flaky node live, and stops an env that keeps crashing);
            None: over the whole run.
        nonfinite_data: what a NaN or infinite reward or float observation from an env does (checked in the
            actor, at every step and reset). ``raise``: the run stops at once with an error naming the env,
            the actor, the sub-env and its step (no restart: the env would do it again). ``drop``: the values
            are replaced by 0 for the actor, that episode ends there, the actor logs a warning, and every unroll
            holding such a step is dropped before batching (``faults/unrolls_dropped``): the learner, its observation
            statistics and the episode statistics never see them.
    """

    def __init__(
        self,
        env_id: str = "CartPole-v1",
        num_actors: PositiveInt = 2,
        envs_per_actor: PositiveInt = 32,
        unroll_length: PositiveInt = 20,
        batch_size: PositiveInt = 32,
        passes_per_batch: PositiveInt = 1,
        minibatches_per_pass: PositiveInt = 1,
        seed: int | None = None,
        max_episode_steps: PositiveInt | None = None,
        observation_key: str | None = None,
        action_mask_key: str | None = None,
        hide_observation_indices: list[int] | None = None,
        sync_actors: bool = False,
        test_episodes: PositiveInt = 20,
        test_videos: NonNegativeInt = 0,
        eval_deterministic: bool = True,
        sync_every: PositiveInt = 1,
        max_policy_lag: NonNegativeInt | None = None,
        atari_options: AtariOptions | None = None,
        env_backend: EnvBackend = "gymnasium",
        actors: Literal["local", "remote"] = "local",
        remote_launcher: Literal["mp", "submitit", "external"] = "mp",
        remote_tcp_port: PositiveInt | None = None,
        remote_bind_address: str | None = None,
        remote_backend: str = "gloo",
        slurm_kwargs: dict | None = None,
        remote_node_timeout_s: PositiveFloat = 60.0,
        remote_join_timeout_s: PositiveFloat = 300.0,
        inference: Literal["actor", "server"] = "actor",
        inference_device: str | None = None,
        max_actor_restarts: NonNegativeInt = 3,
        actor_restart_window_s: PositiveFloat | None = 3600.0,
        nonfinite_data: Literal["raise", "drop"] = "raise",
    ):
        super().__init__()
        check_arguments(ImpalaDataModule.__init__, locals())
        if batch_size % minibatches_per_pass:
            raise ValueError(f"batch_size {batch_size} does not split into minibatches_per_pass={minibatches_per_pass} "
                             "minibatches of whole unrolls: batch_size must be a multiple of minibatches_per_pass")
        if actors == "remote" and sync_actors:
            raise ValueError("sync_actors: true is for local actors; remote actors always deliver as they finish")
        if actors == "remote" and inference == "server":
            raise ValueError("inference: server is for local actors; remote actors run their own copy of the policy")
        if inference_device is not None:
            try:
                torch.device(inference_device)
            except RuntimeError as error:
                raise ValueError(f"inference_device: {inference_device!r} is not a torch device ({error})") from None
            if inference == "actor":
                raise ValueError("inference_device is for inference: server (actors always act on their CPU)")
        if actors == "remote":
            check_launch_settings(remote_launcher, remote_tcp_port, remote_bind_address, secret=None)
        self.save_hyperparameters()
        # Checked here, before any actor process exists; the facts flow into the model via the CLI.
        self.env_options = {
            "max_episode_steps": max_episode_steps,
            "observation_key": observation_key,
            "action_mask_key": action_mask_key,
            "hide_observation_indices": hide_observation_indices,
            **({"atari_options": atari_options} if atari_options is not None else {}),
        }
        self.env_facts = describe_env(env_id, backend=env_backend, **self.env_options)
        if env_backend != "gymnasium":
            # What the learner's network is built for must be what the gymnasium envs of evaluation give.
            gymnasium_facts = describe_env(env_id, **self.env_options)
            if gymnasium_facts != self.env_facts:
                raise ValueError(f"env {env_id!r} differs between the {env_backend} backend ({self.env_facts}) and "
                                 f"gymnasium, which evaluation uses ({gymnasium_facts})")
        self.actors: ActorPool | None = None
        self._unroll_stream: UnrollStream | None = None
        self._published_version = 0  # of the newest weights the actors were given
        self._ended_pools: tuple[int, int, int] = (0, 0, 0)  # (restarts, lost, rejected) of pools already shut down

    @property
    def episode_spec(self) -> EpisodeSpec:
        """Where ``test`` and ``EvaluationCallback`` play whole episodes: this run's env on gymnasium."""
        return EpisodeSpec(self.hparams.env_id, dict(self.env_options), self.hparams.eval_deterministic)

    @property
    def env_seed(self) -> int:
        """The base env seed in use (``seed``, or the run's seed when ``seed`` is None)."""
        return self.hparams.seed if self.hparams.seed is not None else torch.initial_seed()

    @property
    def observation_shape(self) -> list[int]:
        """Shape of one observation (channels-first for images); linked into the model."""
        return list(self.env_facts.observation_shape)

    @property
    def observation_parts(self) -> list[dict] | None:
        """A dict observation's layout as plain data (``core.observation_parts``), None for a plain observation;
        linked into the model."""
        parts = self.env_facts.observation_parts
        return None if parts is None else [part.to_spec() for part in parts]

    @property
    def action_space(self) -> dict:
        """The env's action space as plain data (see ``envs.factory.action_space_spec``); linked into the model."""
        return action_space_spec(self.env_facts.action_space)

    @property
    def actor_restarts(self) -> int:
        """Local actor restarts so far in this run (they outlive the pool)."""
        return self._ended_pools[0] + (self.actors.restarts if self.actors is not None else 0)

    @property
    def actors_lost(self) -> int:
        """Remote actor nodes lost so far in this run (see ``remote_node_timeout_s``)."""
        return self._ended_pools[1] + (self.actors.lost if self.actors is not None else 0)

    @property
    def rollouts_rejected(self) -> int:
        """Remote actors' rollouts dropped so far in this run (non-finite values... see ``actors.rollout_check``)."""
        return self._ended_pools[2] + getattr(self.actors, "rollouts_rejected", 0)

    @property
    def unrolls_dropped(self) -> int:
        """Unrolls dropped for holding non-finite env data so far (``nonfinite_data: drop``)."""
        return self._unroll_stream.unrolls_dropped if self._unroll_stream is not None else 0

    @property
    def unrolls_too_old(self) -> int:
        """Unrolls dropped for a policy lag over ``max_policy_lag``."""
        return self._unroll_stream.unrolls_too_old if self._unroll_stream is not None else 0

    def start_actors(self, network: nn.Module, network_factory, version: int = 0, rank: int = 0) -> None:
        """Start the actor pool, acting with ``network``'s weights tagged ``version``.

        Args:
            network: the learner's network; its current weights are what the actors start with.
            network_factory: picklable callable building the same architecture (run in each actor).
            version: learner update count of ``network``'s weights.
            rank: DDP rank, so each rank's actors get their own env seeds.
        """
        if self.actors is not None:
            return
        hp = self.hparams
        self._published_version = version
        spec = ActorSpec(hp.env_id, hp.num_actors, hp.envs_per_actor, hp.unroll_length, self.env_seed, rank,
                         {**self.env_options, "backend": hp.env_backend, "nonfinite_data": hp.nonfinite_data})
        if hp.actors == "remote":
            self.actors = make_remote_collector(
                spec, network, network_factory, version=version, launcher=hp.remote_launcher, backend=hp.remote_backend,
                tcp_port=hp.remote_tcp_port, bind_address=hp.remote_bind_address, slurm_kwargs=hp.slurm_kwargs,
                node_timeout_s=hp.remote_node_timeout_s, join_timeout_s=hp.remote_join_timeout_s,
            )
        else:
            self.actors = LocalActors(spec, network, network_factory, version=version, sync_actors=hp.sync_actors,
                                      max_restarts=hp.max_actor_restarts, restart_window_s=hp.actor_restart_window_s,
                                      inference=hp.inference,
                                      inference_device=hp.inference_device)

    def publish_weights(self, network: nn.Module, version: int) -> None:
        """Make ``network``'s weights (tagged ``version``) the ones actors act with from their next step."""
        self.actors.publish_weights(network, version)
        self._published_version = version

    def stop_actors(self) -> None:
        """Shut the actor processes down; safe to call more than once."""
        actors, self.actors = self.actors, None
        if actors is not None:
            self._ended_pools = (self._ended_pools[0] + actors.restarts, self._ended_pools[1] + actors.lost,
                                 self._ended_pools[2] + getattr(actors, "rollouts_rejected", 0))
            actors.shutdown()

    def train_dataloader(self) -> DataLoader:
        # The actors start here, not in setup(): Lightning restores a checkpoint after setup() and
        # before asking for the dataloader, so the first unrolls are acted with the restored weights
        # and tagged with the restored update count.
        trainer = self.trainer
        if trainer is not None and trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
            return DataLoader([], batch_size=None)  # the checkpoint already reached the budget: no actor starts
        if self.actors is None:
            module = self.trainer.lightning_module
            if not isinstance(module, ActorsLearner):
                raise TypeError(f"ImpalaDataModule feeds a LightningModule with a network and a network_factory (see "
                                f"data.ActorsLearner; ImpalaModule is one), got {type(module).__name__}")
            self.start_actors(module.network, module.network_factory, module.global_step, self.trainer.global_rank)
        # The actors are already parallel: num_workers=0 (worker copies would never get new
        # weights), batch_size=None and an identity collate (batches are ready-made TensorDicts).
        # A CUDA learner: page-locked batches, so training_step's .to(device, non_blocking=True) is
        # an asynchronous copy.
        to_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        hp = self.hparams
        # The minibatch order has its own stream of the env seed, distinct per rank (as the actors' seeds are).
        rank = trainer.global_rank if trainer is not None else 0
        order_seed = int(np.random.SeedSequence([self.env_seed, rank, 11]).generate_state(1)[0])
        self._unroll_stream = UnrollStream(_PoolRollouts(self), hp.batch_size, hp.passes_per_batch,
                                           hp.minibatches_per_pass, seed=order_seed, max_policy_lag=hp.max_policy_lag,
                                           latest_version=lambda: self._published_version)
        return DataLoader(
            self._unroll_stream,
            batch_size=None,
            num_workers=0,
            collate_fn=_identity,
            pin_memory=to_cuda,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, TensorDictBase):
            return batch.to(device, non_blocking=True)  # Lightning's default moves a TensorDict blocking
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> Trajectory | int:
        # A training batch [B, T] becomes the time-major Trajectory [T, B] once, on the learner's device, before any
        # batch hook: EpisodeStats (on_train_batch_start) and training_step read the same one. A test batch is an
        # episode seed.
        return to_time_major(batch) if isinstance(batch, TensorDictBase) else batch

    def test_dataloader(self) -> DataLoader:
        # One item per test episode: its env seed, and whether it is recorded (played in ImpalaModule.test_step).
        hp = self.hparams
        seeds = [int(s) for s in np.random.SeedSequence([self.env_seed, 7]).generate_state(hp.test_episodes)]
        episodes = [TestEpisode(seed, record_video=k < hp.test_videos) for k, seed in enumerate(seeds)]
        return DataLoader(episodes, batch_size=None, num_workers=0, collate_fn=_identity)

    def teardown(self, stage: str) -> None:
        self.stop_actors()

    def on_exception(self, exception: BaseException) -> None:
        # Lightning calls this (not teardown) on an error or Ctrl-C: never leave actors behind.
        self.stop_actors()


class _PoolRollouts:
    """The data module's current actor pool, iterable (the pool exists only once training starts)."""

    def __init__(self, data: ImpalaDataModule):
        self.data = data

    def __iter__(self) -> Iterator[TensorDictBase]:
        return iter(self.data.actors)
