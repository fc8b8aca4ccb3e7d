"""The learner: a ``LightningModule`` whose ``training_step`` is IMPALA's V-trace actor-critic update.

It only learns: the network recipe, the update, the guard against non-finite updates, and the optimizer.
Weight sync, progress and the stop rule, evaluation and run control are callbacks (``configure_callbacks``
attaches the ones a run cannot do without).
"""

from __future__ import annotations

import copy
import logging
import math
from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from tensordict import TensorDictBase
from torch import Tensor

from lit_impala.callbacks import (
    ActorWeightSync,
    CheckpointDirectoryLock,
    CheckpointFormat,
    EpisodeStats,
    FinalCheckpoint,
    GracefulInterrupt,
    TestReport,
)
from lit_impala.callbacks.episode_stats import is_log_step
from lit_impala.config import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt, check_arguments
from lit_impala.core import vtrace
from lit_impala.core.diagnostics import UpdateTensors, update_metrics
from lit_impala.core.distributions import make_distribution
from lit_impala.core.episode_boundaries import bootstrap_steps, learning_terminations, vtrace_step_inputs
from lit_impala.core.losses import LossTerms, impala_loss, normalize_advantages
from lit_impala.core.networks import ImpalaAgent
from lit_impala.core.observation_parts import parts_from_spec
from lit_impala.envs.factory import action_space_from_spec
from lit_impala.play import EpisodeSpec, PlayedEpisodes, TestEpisode, play_episodes
from lit_impala.schedule import budget_problem, fit_to_budget, linear_schedule, linear_value
from lit_impala.schema import Trajectory, as_trajectory

log = logging.getLogger(__name__)
# A recorded test episode keeps at most this many frames: 5.5 minutes at 30 frames/s, ~1 GB of Atari's 210x160 RGB
# frames held until written.
TEST_VIDEO_FRAMES = 10_000


class ImpalaModule(L.LightningModule):
    """IMPALA learner (Espeholt et al. 2018). Defaults are the paper's.

    The arguments come in groups, in this order: the env facts (linked from the data module by the CLI),
    the network, the V-trace targets and loss, the optimizer (RMSprop, as in the paper, or Adam).

    Args:
        observation_shape: shape of one observation (linked from the data module).
        action_space: the env's action space as plain data (linked from the data module).
        observation_parts: a dict observation's layout (linked from the data module; None for a plain one): the
            observation is then packed into one vector, and the network reads each part with an encoder suited to
            it and masks the logits with an action-mask part (``core.observation_parts``, ``data.action_mask_key``).
        encoder: ``mlp`` for vectors; ``resnet`` (the paper's deep ResNet) or ``nature`` (DQN's
            CNN) for images.
        hidden_dim: width of the MLP encoder's first hidden layer.
        feature_dim: width of the encoder's output, read by the core or the heads.
        use_lstm: add an LSTM core; actors carry its state across unrolls and reset it at
            episode starts.
        lstm_hidden_dim: size of the LSTM state.
        init_fn: weight init: ``orthogonal``, ``xavier_uniform`` or ``identity`` (PyTorch default).
        policy_init_scale: gain of the policy head's init (small: near-uniform first policy).
        value_init_scale: gain of the value head's init.
        action_squash: continuous actions: ``clip`` the Gaussian sample to the bounds, or ``tanh``
            squash it; log-probs on both sides are of the same distribution either way.
        log_std_init: initial log standard deviation of a Gaussian policy.
        state_dependent_std: the Gaussian's std comes from the network (default: a free parameter).
        normalize_observations: normalise vector observations with running mean/std (learnt by
            the learner from the finite observations of applied updates, shipped to the actors with the
            weights, saved in checkpoints).
        shared_encoder: the value head reads the policy's encoder (the paper); False: the value has an
            encoder of its own, the same shape (PPO baselines on MuJoCo do this). Not with ``use_lstm``.
        discount: gamma, the per-step discount.
        reward_scale: rewards are multiplied by this for learning only (logged returns stay raw).
        reward_clip: rewards are clipped to ``[-reward_clip, reward_clip]`` for learning only, before
            ``reward_scale`` (Atari: 1.0); None: no clipping.
        baseline_coef: weight of the value (baseline) loss ``0.5 * (vs - V)^2``.
        ent_coef: weight of the entropy bonus (at the start of training, with ``ent_coef_final``).
        ent_coef_final: None (the paper): ``ent_coef`` throughout. A number: the weight goes linearly from
            ``ent_coef`` to this over ``trainer.max_steps`` (as the learning rate decays), so that a policy
            explores widely early and is free to become nearly deterministic late.
        clip_rho_threshold: rho-bar, clips the importance weights of the value targets (None: no clip).
        clip_c_threshold: c-bar, clips the trace coefficients (None: no clip).
        clip_pg_rho_threshold: clips the importance weights of the policy gradient (None: no clip).
        lambda_: trace coefficient c_t = lambda_ * min(c-bar, rho_t).
        policy_clip: None (the paper): the policy-gradient term is V-trace's. A number eps (PPO's 0.2): PPO's
            clipped surrogate on the V-trace advantages (APPO), so that several updates on one batch
            (``data.passes_per_batch``) stay within a ratio of ``1 +- eps`` of the policy that acted.
        pg_target: what the policy-gradient advantage bootstraps from when ``lambda_ < 1``: ``paper``
            (q_t = r_t + gamma_t * v_{t+1}; the paper, TorchBeast, scalable_agent, seed_rl) or ``rlax``
            (q_t = r_t + gamma_t * (lambda_ * v_{t+1} + (1 - lambda_) * V(x_{t+1})); rlax, Acme). Equal at lambda_ 1.
        normalize_advantages: the policy gradient's advantages are normalised to mean 0, std 1 over each
            batch (PPO's per-minibatch normalisation): the policy step no longer follows the rewards' scale.
        value_normalization: ``none`` (the paper); ``running`` (Sample Factory's ``normalize_returns``) or
            ``popart`` (PopArt, Hessel et al. 2019): the value head learns the V-trace targets in units of their
            running mean and std, and the policy gradient's advantages are divided by that std (as PopArt's are),
            so neither step follows the returns' scale; ``popart`` also rescales the head at each update of the
            statistics so that its values stay as they were (``core.value_normalization``). The statistics learn
            from applied updates, after their loss.
        value_norm_beta: step size of those running statistics (PopArt's beta).
        value_clip: None (the paper), or eps: PPO's clipped value loss around the value the actors computed
            (``behaviour_value``), in the value head's units (normalised ones with ``value_normalization``).
        loss_reduction: ``sum`` over time and batch (paper) or ``mean``.
        optimizer: ``rmsprop`` (the paper) or ``adam`` (PPO's and Sample Factory's; pair it with
            ``loss_reduction: mean``).
        lr: learning rate at the start of training.
        lr_decay: decay the learning rate linearly to 0 over ``trainer.max_steps``.
        rmsprop_alpha: RMSprop smoothing constant (TensorFlow's ``decay``).
        rmsprop_eps: RMSprop epsilon; 0.01 as in the paper, assumes ``loss_reduction: sum``.
        rmsprop_momentum: RMSprop momentum.
        adam_eps: Adam's epsilon (CleanRL's 1e-5).
        max_grad_norm: clip the global gradient norm to this value (None: no clipping).
        max_nonfinite_updates: an update whose loss or gradient is not finite is skipped (the weights,
            and so the actors, never see it; counted in ``faults/nonfinite_updates``); this many in a row
            stop the run with an error (and the on-exception checkpoint holds the last finite weights).
    """

    def __init__(
        self,
        observation_shape: list[int],
        action_space: dict,
        encoder: Literal["mlp", "resnet", "nature", "rllib", "minatar"] = "mlp",
        hidden_dim: PositiveInt = 64,
        feature_dim: PositiveInt = 64,
        use_lstm: bool = False,
        lstm_hidden_dim: PositiveInt = 128,
        init_fn: Literal["orthogonal", "xavier_uniform", "identity"] = "orthogonal",
        policy_init_scale: float = 0.01,
        value_init_scale: float = 1.0,
        action_squash: Literal["clip", "tanh"] = "clip",
        log_std_init: float = 0.0,
        state_dependent_std: bool = False,
        normalize_observations: bool = False,
        shared_encoder: bool = True,
        discount: ClosedUnitInterval = 0.99,
        reward_scale: PositiveFloat = 1.0,
        reward_clip: PositiveFloat | None = None,
        baseline_coef: NonNegativeFloat = 0.5,
        ent_coef: NonNegativeFloat = 0.01,
        ent_coef_final: NonNegativeFloat | None = None,
        clip_rho_threshold: PositiveFloat | None = 1.0,
        clip_c_threshold: PositiveFloat | None = 1.0,
        clip_pg_rho_threshold: PositiveFloat | None = 1.0,
        lambda_: ClosedUnitInterval = 1.0,
        policy_clip: PositiveFloat | None = None,
        pg_target: Literal["paper", "rlax"] = "paper",
        normalize_advantages: bool = False,
        value_normalization: Literal["none", "running", "popart"] = "none",
        value_norm_beta: ClosedUnitInterval = 3e-4,
        value_clip: PositiveFloat | None = None,
        loss_reduction: Literal["sum", "mean"] = "sum",
        optimizer: Literal["rmsprop", "adam"] = "rmsprop",
        lr: PositiveFloat = 6e-4,
        lr_decay: bool = True,
        rmsprop_alpha: ClosedUnitInterval = 0.99,
        rmsprop_eps: NonNegativeFloat = 0.01,
        rmsprop_momentum: NonNegativeFloat = 0.0,
        adam_eps: PositiveFloat = 1e-5,
        max_grad_norm: PositiveFloat | None = 40.0,
        max_nonfinite_updates: PositiveInt = 10,
        observation_parts: list[dict] | None = None,
    ):
        super().__init__()
        check_arguments(ImpalaModule.__init__, locals())
        if not 0 < value_norm_beta <= 1:
            raise ValueError(f"value_norm_beta must be in (0, 1] (the statistics' step), got {value_norm_beta}")
        if not all(size >= 1 for size in observation_shape):
            raise ValueError(f"observation_shape must be positive, got {observation_shape}")
        self.save_hyperparameters()
        # A picklable recipe for this architecture: the actors build their own copy from it.
        self.network_factory = partial(
            ImpalaAgent,
            observation_shape=tuple(observation_shape),
            distribution=make_distribution(action_space_from_spec(action_space), squash=action_squash),
            encoder=encoder,
            hidden_dim=hidden_dim,
            feature_dim=feature_dim,
            use_lstm=use_lstm,
            lstm_hidden_dim=lstm_hidden_dim,
            init_fn=init_fn,
            policy_init_scale=policy_init_scale,
            value_init_scale=value_init_scale,
            log_std_init=log_std_init,
            state_dependent_std=state_dependent_std,
            normalize_observations=normalize_observations,
            shared_encoder=shared_encoder,
            normalize_values=value_normalization != "none",
            value_norm_beta=value_norm_beta,
            observation_parts=None if observation_parts is None else parts_from_spec(observation_parts),
        )
        self.network = self.network_factory()
        self.nonfinite_updates = 0  # updates skipped for a non-finite loss or gradient, in total ...
        self._consecutive_nonfinite = 0  # ... and in a row
        # Within one Lightning closure (training_step, backward, configure_gradient_clipping, then optimizer_step):
        self._step_loss: Tensor | None = None  # this update's loss, for the guard against non-finite updates
        self._new_observations: Tensor | None = None  # this batch's [T, B, *obs], for the normaliser ...
        self._new_value_targets: Tensor | None = None  # ... and its V-trace targets [T, B], for the value's ...
        self._update_applied = False  # ... once the guard let the update through
        self._grad_norm = torch.zeros(())
        self.checkpoint_step: int | None = None  # update count of the checkpoint loaded (`test` reports it)

    def configure_callbacks(self):
        trainer = self.trainer
        callbacks = [ActorWeightSync(), FinalCheckpoint(), GracefulInterrupt(), CheckpointFormat(), TestReport(),
                     CheckpointDirectoryLock()]
        if EpisodeStats.of(trainer) is None:  # the CLI adds a configured one (the `episode_stats` section)
            callbacks.append(EpisodeStats())
        if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="step"))  # logs `train/lr` (the scheduler's name)
        return callbacks

    # --- learning ---------------------------------------------------------------------------------

    def training_step(self, batch: Trajectory | TensorDictBase, batch_idx: int) -> dict:
        """One V-trace update on a time-major batch ``[T, B]`` (as ``ImpalaDataModule`` serves it on the learner's
        device; another data module's collector TensorDict is made time-major here): the loss, and as ``"update"``
        its diagnostics (``UpdateTensors``), which ``on_train_batch_end`` logs."""
        hp = self.hparams
        trajectory = as_trajectory(batch)
        # 1. learner forward: from the core state the actors started the unroll with, resetting
        #    it at the same episode starts they did
        output = self.network(trajectory.observation, trajectory.initial_core_state, trajectory.is_init)
        distribution = self.network.distribution
        target_log_prob = distribution.log_prob(output.policy_params, trajectory.action)  # [T, B]
        entropy = distribution.entropy(output.policy_params)  # [T, B]

        # 2. V-trace targets (no grad)
        terminated = learning_terminations(trajectory.terminated, trajectory.life_lost)
        targets = vtrace_step_inputs(
            trajectory.reward, terminated, trajectory.truncated, self._next_values(trajectory, output, terminated),
            hp.discount, hp.reward_scale, hp.reward_clip,
        )
        log_rhos = target_log_prob.detach() - trajectory.behaviour_log_prob
        vtrace_returns = vtrace.from_importance_weights(
            log_rhos, targets.discounts, targets.rewards, output.baseline.detach(), targets.bootstrap_value,
            clip_rho_threshold=hp.clip_rho_threshold,
            clip_pg_rho_threshold=hp.clip_pg_rho_threshold,
            clip_c_threshold=hp.clip_c_threshold,
            lambda_=hp.lambda_,
            pg_target=hp.pg_target,
        )

        # 3. loss terms, with the advantages and values in the units the options ask for
        pg_advantages = vtrace_returns.pg_advantages
        if self.network.value_normalizer is not None:
            # PopArt's policy gradient is in the same units as its value loss: scale-free as well.
            pg_advantages = pg_advantages / self.network.value_normalizer.std.to(pg_advantages.dtype)
        if hp.normalize_advantages:
            pg_advantages = normalize_advantages(pg_advantages)
        values, value_targets, behaviour_values = self._values_for_loss(output.baseline, vtrace_returns.vs, trajectory)
        terms = impala_loss(
            target_log_prob, entropy, values, vtrace_returns._replace(vs=value_targets, pg_advantages=pg_advantages),
            hp.baseline_coef, self.entropy_coefficient(), hp.loss_reduction,
            behaviour_log_prob=trajectory.behaviour_log_prob, policy_clip=hp.policy_clip,
            behaviour_values=behaviour_values, value_clip=hp.value_clip,
        )

        # 4. what is logged (on_train_batch_end) and what the statistics learn from
        if not trajectory.replayed:
            # Merged in optimizer_step if this update is applied: once per batch, after its loss.
            if self.network.normalizer is not None:
                self._new_observations = trajectory.observation
            if self.network.value_normalizer is not None:
                self._new_value_targets = vtrace_returns.vs
        self._step_loss = terms.total.detach()
        update = UpdateTensors(
            log_rhos=log_rhos,
            policy_lag=(self.global_step - trajectory.policy_version).float(),
            terms=LossTerms(*(term.detach() for term in terms)),
            entropy=entropy.detach(),
            baseline=output.baseline.detach(),
        )
        return {"loss": terms.total, "update": update}

    def entropy_coefficient(self) -> float:
        """The entropy bonus's weight at this update: ``ent_coef``, or on the line to ``ent_coef_final`` at
        ``trainer.max_steps`` (a function of the update count alone, so a resumed run is on the same line)."""
        hp = self.hparams
        if hp.ent_coef_final is None:
            return hp.ent_coef
        return linear_value(hp.ent_coef, hp.ent_coef_final, self.global_step, self.trainer.max_steps)

    def _values_for_loss(self, values: Tensor, value_targets: Tensor, trajectory: Trajectory):
        """``(values, value_targets, behaviour_values)``, each ``[T, B]``, in the value head's units: normalised by
        the value statistics when ``value_normalization`` is on (the loss and its clip are then scale-free).
        ``behaviour_values`` is None unless ``value_clip`` needs it."""
        behaviour_values = None
        if self.hparams.value_clip is not None:
            behaviour_values = trajectory.behaviour_value
            if behaviour_values is None:
                raise RuntimeError("model.value_clip needs the actors' behaviour_value, which this batch lacks")
        normalizer = self.network.value_normalizer
        if normalizer is None:
            return values, value_targets, behaviour_values
        if behaviour_values is not None:
            behaviour_values = normalizer.normalize(behaviour_values)
        return normalizer.normalize(values), normalizer.normalize(value_targets), behaviour_values

    @torch.no_grad()
    def _next_values(self, trajectory: Trajectory, output, terminated: Tensor) -> Tensor:
        """``[T, B]``: V(next_observation_t) where the targets bootstrap (``core.episode_boundaries.bootstrap_steps``),
        continuing from the core state after step t; 0 elsewhere."""
        needed = bootstrap_steps(terminated, trajectory.truncated)
        core_state = None if output.core_states is None else tuple(s[needed] for s in output.core_states)
        next_values = torch.zeros(needed.shape, dtype=torch.float32, device=needed.device)
        next_values[needed] = self.network.step_value(trajectory.next_observation[needed], core_state).float()
        return next_values

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # EpisodeStats decided before the update whether it is the last (should_stop), which is_log_step reads.
        update = outputs.get("update") if isinstance(outputs, dict) else None
        if update is not None and is_log_step(self.trainer):
            self._log_update(update)

    def _log_update(self, update: UpdateTensors) -> None:
        """The learning metrics of this update: losses, importance weights, policy lag, gradient norm."""
        hp = self.hparams
        metrics = update_metrics(update, hp.clip_rho_threshold, hp.clip_c_threshold, hp.clip_pg_rho_threshold)
        for name, (value, reduce_fx) in metrics.items():  # DDP: synced over ranks; no-op on one device
            self.log(name, value, batch_size=update.log_rhos.shape[1], sync_dist=True, reduce_fx=reduce_fx)
        self.log_dict({"train/grad_norm": float(self._grad_norm),
                       "faults/nonfinite_updates": float(self.nonfinite_updates)})
        if hp.ent_coef_final is not None:  # the weight from here on, as the learning rate is
            self.log("train/ent_coef", self.entropy_coefficient())

    # --- the guard against non-finite updates -------------------------------------------------------

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        self._update_applied = False
        # The closure: training_step, backward, then configure_gradient_clipping (which may refuse the update).
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        observations, self._new_observations = self._new_observations, None
        value_targets, self._new_value_targets = self._new_value_targets, None
        if value_targets is not None:
            self._update_value_statistics(value_targets)
        if self._update_applied and observations is not None:
            # The observation statistics learn from applied updates only, after their loss (which used the
            # statistics the actors acted with), and from finite rows only: what ships to the actors and lands
            # in checkpoints stays finite.
            rows = self.network.vector_parts(observations.flatten(0, 1))
            self.network.normalizer.update(rows[torch.isfinite(rows).flatten(1).all(-1)])

    def _update_value_statistics(self, value_targets: Tensor) -> None:
        # Every rank merges every rank's targets (a collective, so before the applied check): the statistics,
        # and PopArt's rescaled head, stay identical across DDP ranks.
        gathered = self.all_gather(value_targets) if self.trainer.world_size > 1 else value_targets
        if not self._update_applied:
            return
        targets = gathered.flatten()
        head = self.network.baseline_head if self.hparams.value_normalization == "popart" else None
        self.network.value_normalizer.update(targets[torch.isfinite(targets)], head)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # After backward, before the optimizer step: the one place to refuse an update.
        parameters = [p for p in self.network.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        loss, self._step_loss = self._step_loss, None
        loss_is_finite = loss is None or bool(torch.isfinite(loss))
        if not (loss_is_finite and torch.isfinite(grad_norm)):
            self._skip_nonfinite_update(grad_norm, loss_is_finite)
            return
        self._consecutive_nonfinite = 0
        self._update_applied = True
        # The clip is a model hyper-parameter here (the paper's 40); the norm is logged either way.
        max_norm = self.hparams.max_grad_norm or gradient_clip_val or math.inf
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, grad_norm)
        self._grad_norm = grad_norm

    def _skip_nonfinite_update(self, grad_norm: Tensor, loss_is_finite: bool) -> None:
        # No gradient, no step: RMSprop leaves parameters without .grad (and their state) untouched.
        for parameter in self.network.parameters():
            parameter.grad = None
        self.nonfinite_updates += 1
        self._consecutive_nonfinite += 1
        what = "loss" if not loss_is_finite else "gradient"
        log.warning("update %d skipped: non-finite %s", self.global_step + 1,
                    what if not loss_is_finite else f"gradient (norm {float(grad_norm)})")
        if self._consecutive_nonfinite >= self.hparams.max_nonfinite_updates:
            raise RuntimeError(
                f"{self._consecutive_nonfinite} updates in a row had a non-finite {what} (model.max_nonfinite_updates="
                f"{self.hparams.max_nonfinite_updates}); stopping. None of them reached the weights or the actors: "
                "the weights are those of the last finite update. Look at the rewards' scale (model.reward_scale, "
                "model.reward_clip), model.lr and model.max_grad_norm."
            )

    # --- optimizer --------------------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adam":
            # fused: one kernel for all parameters (a third of the time of the loop over them on CPU)
            optimizer = torch.optim.Adam(self.network.parameters(), lr=hp.lr, eps=hp.adam_eps, fused=True)
        else:
            optimizer = torch.optim.RMSprop(
                self.network.parameters(),
                lr=hp.lr,
                alpha=hp.rmsprop_alpha,
                eps=hp.rmsprop_eps,
                momentum=hp.rmsprop_momentum,
            )
        # trainer.max_steps, not estimated_stepping_batches: the latter would start the actors to
        # measure an endless dataloader. Linear to 0 over the run (the paper), or constant.
        if problem := budget_problem(self.trainer.max_steps, hp.lr_decay, hp.ent_coef_final):
            raise ValueError(problem)
        schedule = linear_schedule(optimizer, self.trainer.max_steps, hp.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr"}}

    def on_train_start(self) -> None:
        # After a checkpoint was restored: its schedule counts to the budget of the run that wrote it.
        if self.trainer.lr_scheduler_configs and self.global_step > 0:
            schedule = self.trainer.lr_scheduler_configs[0].scheduler
            changed = fit_to_budget(schedule, self.global_step, self.trainer.max_steps, self.hparams.lr_decay)
            if changed:
                self.print(changed)

    # --- test: one whole episode per test batch, with the (checkpoint's) weights --------------------

    def test_step(self, episode: TestEpisode, batch_idx: int) -> PlayedEpisodes:
        return play_episodes(copy.deepcopy(self.network).cpu().eval(), EpisodeSpec.of(self.trainer), num_episodes=1,
                             seed=int(episode.seed), record_video=episode.record_video,
                             max_video_frames=TEST_VIDEO_FRAMES)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_step = checkpoint.get("global_step")
