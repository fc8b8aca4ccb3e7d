"""The learner: a ``LightningModule`` whose ``training_step`` is IMPALA's V-trace actor-critic update.

``training_step``: time-major trajectory -> learner forward -> V-trace targets (no grad) -> loss
terms -> log. After every optimizer step ``ActorWeightSync`` publishes the new weights to the actors.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from functools import partial
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from tensordict import TensorDictBase
from torch import Tensor

from lit_impala import vtrace
from lit_impala.callbacks import ActorWeightSync, FinalCheckpoint, GracefulInterrupt
from lit_impala.distributions import make_distribution
from lit_impala.envs import action_space_from_spec
from lit_impala.evaluation import run_episodes
from lit_impala.histograms import log_histograms
from lit_impala.losses import REDUCTIONS, impala_loss
from lit_impala.networks import ImpalaAgent
from lit_impala.trajectory import bootstrap_targets, to_time_major


log = logging.getLogger(__name__)


class Progress(NamedTuple):
    """Training progress over all ranks: frames consumed and the recent-episode window of each rank."""

    env_frames: float
    episodes: int
    mean_return: float
    mean_length: float
    windows_full: bool  # every rank has ``return_window`` finished episodes


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class ImpalaModule(L.LightningModule):
    """IMPALA learner (Espeholt et al. 2018). Defaults are the paper's.

    Args:
        observation_shape: shape of one observation (linked from the data module).
        action_space: the env's action space as plain data (linked from the data module).
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
            the learner, shipped to the actors with the weights, saved in checkpoints).
        discount: gamma, the per-step discount in [0, 1].
        reward_scale: rewards are multiplied by this for learning only (logged returns stay raw).
        reward_clip: rewards are clipped to ``[-reward_clip, reward_clip]`` for learning only, before
            ``reward_scale`` (Atari: 1.0); None: no clipping.
        baseline_coef: weight of the value (baseline) loss ``0.5 * (vs - V)^2``.
        ent_coef: weight of the entropy bonus.
        clip_rho_threshold: rho-bar, clips the importance weights of the value targets (None: no clip).
        clip_c_threshold: c-bar, clips the trace coefficients (None: no clip).
        clip_pg_rho_threshold: clips the importance weights of the policy gradient (None: no clip).
        lambda_: trace coefficient c_t = lambda_ * min(c-bar, rho_t), in [0, 1].
        lr: RMSprop learning rate at the start of training.
        lr_decay: decay the learning rate linearly to 0 over ``trainer.max_steps``.
        rmsprop_alpha: RMSprop smoothing constant (TensorFlow's ``decay``).
        rmsprop_eps: RMSprop epsilon; 0.01 as in the paper, assumes ``loss_reduction: sum``.
        rmsprop_momentum: RMSprop momentum.
        max_grad_norm: clip the global gradient norm to this value (None: no clipping).
        loss_reduction: ``sum`` over time and batch (paper) or ``mean``.
        sync_every: publish weights to the actors every this many learner updates.
        max_nonfinite_updates: an update whose loss or gradient is not finite is skipped (the weights,
            and so the actors, never see it; counted in ``nonfinite_updates``); this many in a row
            stop the run with an error (and the on-exception checkpoint holds the last finite weights).
        stop_at_return: stop training once the mean return of the last ``return_window`` episodes
            reaches this value (None: run to ``trainer.max_steps``).
        return_window: number of recent episodes the logged mean return is taken over.
        test_deterministic: ``test`` acts with the policy's mode (argmax / mean) rather than samples.
    """

    def __init__(
        self,
        observation_shape: list[int],
        action_space: dict,
        encoder: str = "mlp",
        hidden_dim: int = 64,
        feature_dim: int = 64,
        use_lstm: bool = False,
        lstm_hidden_dim: int = 128,
        init_fn: str = "orthogonal",
        policy_init_scale: float = 0.01,
        value_init_scale: float = 1.0,
        action_squash: str = "clip",
        log_std_init: float = 0.0,
        state_dependent_std: bool = False,
        normalize_observations: bool = False,
        discount: float = 0.99,
        reward_scale: float = 1.0,
        reward_clip: float | None = None,
        baseline_coef: float = 0.5,
        ent_coef: float = 0.01,
        clip_rho_threshold: float | None = 1.0,
        clip_c_threshold: float | None = 1.0,
        clip_pg_rho_threshold: float | None = 1.0,
        lambda_: float = 1.0,
        lr: float = 6e-4,
        lr_decay: bool = True,
        rmsprop_alpha: float = 0.99,
        rmsprop_eps: float = 0.01,
        rmsprop_momentum: float = 0.0,
        max_grad_norm: float | None = 40.0,
        loss_reduction: str = "sum",
        sync_every: int = 1,
        max_nonfinite_updates: int = 10,
        stop_at_return: float | None = None,
        return_window: int = 100,
        test_deterministic: bool = True,
    ):
        super().__init__()
        _check(all(d >= 1 for d in observation_shape), f"observation_shape must be positive, got {observation_shape}")
        _check(min(hidden_dim, feature_dim, lstm_hidden_dim) >= 1, f"hidden_dim, feature_dim and lstm_hidden_dim must be >= 1, got {hidden_dim}, {feature_dim}, {lstm_hidden_dim}")
        _check(0.0 <= discount <= 1.0, f"discount must be in [0, 1], got {discount}")
        _check(reward_scale > 0, f"reward_scale must be > 0, got {reward_scale}")
        _check(reward_clip is None or reward_clip > 0, f"reward_clip must be > 0 or null (no clipping), got {reward_clip}")
        _check(0.0 <= lambda_ <= 1.0, f"lambda_ must be in [0, 1], got {lambda_}")
        for name in ("clip_rho_threshold", "clip_c_threshold", "clip_pg_rho_threshold", "max_grad_norm"):
            value = locals()[name]
            _check(value is None or value > 0, f"{name} must be > 0 or null (no clipping), got {value}")
        _check(lr > 0, f"lr must be > 0, got {lr}")
        _check(baseline_coef >= 0 and ent_coef >= 0, f"baseline_coef and ent_coef must be >= 0, got {baseline_coef}, {ent_coef}")
        _check(loss_reduction in REDUCTIONS, f"loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
        _check(sync_every >= 1, f"sync_every must be >= 1, got {sync_every}")
        _check(max_nonfinite_updates >= 1, f"max_nonfinite_updates must be >= 1, got {max_nonfinite_updates}")
        _check(return_window >= 1, f"return_window must be >= 1, got {return_window}")
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
        )
        self.network = self.network_factory()
        self.env_frames = 0  # env steps consumed by this learner; saved in checkpoints
        self.episode_returns: deque[float] = deque(maxlen=return_window)
        self.episode_lengths: deque[float] = deque(maxlen=return_window)
        self._grad_norm = torch.zeros(())
        self._clock: tuple[float, int, int, float] | None = None  # (time, env_frames, step, waited) at the last log
        self._batch_end_time: float | None = None
        self._data_wait_s = 0.0  # learner time spent waiting for the actors' next batch
        self._batch_frames, self._batch_episodes = 0, ([], [])  # this update's, counted once it is applied
        self.progress: Progress | None = None  # over all ranks, as of the last update
        self.nonfinite_updates = 0  # updates skipped for a non-finite loss or gradient, in total ...
        self._consecutive_nonfinite = 0  # ... and in a row
        self._loss_is_finite = True
        self._checkpoint_step: int | None = None  # update count of the checkpoint loaded (for `test`)

    def configure_callbacks(self):
        return [ActorWeightSync(self.hparams.sync_every), FinalCheckpoint(), GracefulInterrupt()]

    # --- learning ---------------------------------------------------------------------------------

    def training_step(self, batch: TensorDictBase, batch_idx: int) -> Tensor:
        hp = self.hparams
        # 1. time-major trajectory [T, B]
        trajectory = to_time_major(batch.to(self.device, non_blocking=True))
        T, B = trajectory.reward.shape

        # 2. learner forward: from the core state the actors started the unroll with, resetting
        #    it at the same episode starts they did
        output = self.network(trajectory.observation, trajectory.initial_core_state, trajectory.is_init)
        distribution = self.network.distribution
        target_log_prob = distribution.log_prob(output.policy_params, trajectory.action)  # [T, B]
        entropy = distribution.entropy(output.policy_params)  # [T, B]

        # 3. V-trace targets (no grad)
        def value_of_next(mask: Tensor) -> Tensor:
            # V(next observation) continuing from the core state after that step
            core_state = None if output.core_states is None else tuple(s[mask] for s in output.core_states)
            return self.network.step_value(trajectory.next_observation[mask], core_state)

        targets = bootstrap_targets(trajectory, value_of_next, hp.discount, hp.reward_scale, hp.reward_clip)
        log_rhos = target_log_prob.detach() - trajectory.behaviour_log_prob
        vtrace_returns = vtrace.from_importance_weights(
            log_rhos=log_rhos,
            discounts=targets.discounts,
            rewards=targets.rewards,
            values=output.baseline.detach(),
            bootstrap_value=targets.bootstrap_value,
            clip_rho_threshold=hp.clip_rho_threshold,
            clip_c_threshold=hp.clip_c_threshold,
            clip_pg_rho_threshold=hp.clip_pg_rho_threshold,
            lambda_=hp.lambda_,
        )

        # 4. loss terms
        terms = impala_loss(
            target_log_prob, entropy, output.baseline, vtrace_returns, hp.baseline_coef, hp.ent_coef, hp.loss_reduction
        )

        # 5. statistics and logs
        if self.network.normalizer is not None:
            # After this batch's loss, so the loss used the statistics the actors acted with.
            self.network.normalizer.update(trajectory.observation.flatten(0, 1))
        # Counted in optimizer_step, once the update is applied: a checkpoint (even one a callback
        # writes in on_train_batch_end) never holds the frames of an update whose weights it lacks.
        self._batch_frames = T * B
        self._batch_episodes = self._finished_episodes(trajectory)
        if self._should_log():
            rhos = log_rhos.exp()
            lag = (self.global_step - trajectory.policy_version).float()
            weight_stats = importance_weight_stats(rhos, hp.clip_rho_threshold, hp.clip_c_threshold, hp.clip_pg_rho_threshold)
            # DDP: extremes over all ranks, everything else the mean over ranks (no-op on one device).
            self.log("policy_lag/max", lag.max(), batch_size=B, sync_dist=True, reduce_fx="max")
            self.log("rho/max", weight_stats.pop("rho/max"), batch_size=B, sync_dist=True, reduce_fx="max")
            self.log("rho/min", weight_stats.pop("rho/min"), batch_size=B, sync_dist=True, reduce_fx="min")
            self.log_dict(
                {
                    **weight_stats,
                    "loss/total": terms.total.detach(),
                    "loss/policy": terms.policy.detach(),
                    "loss/baseline": terms.baseline.detach(),
                    "loss/entropy": terms.entropy.detach(),
                    "entropy": entropy.detach().mean(),
                    "policy_lag/mean": lag.mean(),
                    "value/mean": output.baseline.detach().mean(),
                },
                batch_size=B,
                sync_dist=True,
            )
        self._loss_is_finite = bool(torch.isfinite(terms.total))
        return terms.total

    @staticmethod
    def _finished_episodes(trajectory) -> tuple[list[float], list[float]]:
        done = trajectory.done
        if not done.any():
            return [], []
        return trajectory.episode_return[done].tolist(), trajectory.episode_length[done].tolist()

    def _should_log(self) -> bool:
        return self.global_step % max(1, self.trainer.log_every_n_steps) == 0

    @property
    def mean_return(self) -> float:
        """Mean return of the last ``return_window`` finished episodes (nan before the first)."""
        return sum(self.episode_returns) / len(self.episode_returns) if self.episode_returns else math.nan

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.env_frames += self._batch_frames
        self.episode_returns.extend(self._batch_episodes[0])
        self.episode_lengths.extend(self._batch_episodes[1])
        self._batch_frames, self._batch_episodes = 0, ([], [])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # After backward, before the optimizer step: the one place to refuse an update.
        parameters = [p for p in self.network.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        if not (self._loss_is_finite and torch.isfinite(grad_norm)):
            self._skip_nonfinite_update(grad_norm)
            return
        self._consecutive_nonfinite = 0
        # The clip is a model hyper-parameter here (the paper's 40); the norm is logged either way.
        max_norm = self.hparams.max_grad_norm or gradient_clip_val or math.inf
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, grad_norm)
        self._grad_norm = grad_norm

    def _skip_nonfinite_update(self, grad_norm: Tensor) -> None:
        # No gradient, no step: RMSprop leaves parameters without .grad (and their state) untouched.
        for parameter in self.network.parameters():
            parameter.grad = None
        self.nonfinite_updates += 1
        self._consecutive_nonfinite += 1
        log.warning("update %d skipped: non-finite %s", self.global_step + 1,
                    "loss" if not self._loss_is_finite else f"gradient (norm {float(grad_norm)})")
        if self._consecutive_nonfinite >= self.hparams.max_nonfinite_updates:
            raise RuntimeError(
                f"{self._consecutive_nonfinite} updates in a row had a non-finite "
                f"{'loss' if not self._loss_is_finite else 'gradient'} (model.max_nonfinite_updates="
                f"{self.hparams.max_nonfinite_updates}); stopping. None of them reached the weights or the actors: "
                "the weights are those of the last finite update. Look at the rewards' scale (model.reward_scale, "
                "model.reward_clip), model.lr and model.max_grad_norm."
            )

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Lightning fetched this batch just before: the gap since the last step is data wait.
        now = time.perf_counter()
        if self._batch_end_time is not None:
            self._data_wait_s += now - self._batch_end_time

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Runs after the optimizer step: global_step already counts this update.
        now = time.perf_counter()
        self._batch_end_time = now
        progress = self.progress = self._progress_across_ranks()
        if self._should_log():
            metrics = {
                "nonfinite_updates": float(self.nonfinite_updates),
                "actor_restarts": float(getattr(self.trainer.datamodule, "actor_restarts", 0)),
                "env_frames": progress.env_frames,
                "grad_norm": float(self._grad_norm),
                "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            }
            if self._clock is not None and now > self._clock[0]:
                then, frames, step, waited = self._clock
                metrics["frames_per_second"] = (progress.env_frames - frames) / (now - then)
                metrics["updates_per_second"] = (self.global_step - step) / (now - then)
                metrics["time/data_wait_fraction"] = (self._data_wait_s - waited) / (now - then)
                self.log("fps", metrics["frames_per_second"], prog_bar=True)
            self._clock = (now, progress.env_frames, self.global_step, self._data_wait_s)
            if progress.episodes:
                metrics["episode/return"] = progress.mean_return
                metrics["episode/length"] = progress.mean_length
                log_histograms(  # this rank's episodes
                    self.loggers,
                    {"episode/return_hist": list(self.episode_returns), "episode/length_hist": list(self.episode_lengths)},
                    self.global_step,
                )
            self.log_dict(metrics, prog_bar=False)
            self.log("return", progress.mean_return if progress.episodes else 0.0, prog_bar=True)
            self.log("frames", progress.env_frames, prog_bar=True)
        target = self.hparams.stop_at_return
        if target is not None and progress.windows_full and progress.mean_return >= target:
            self.print(
                f"Reached a mean return of {progress.mean_return:.1f} over the last {progress.episodes} episodes "
                f"(target {target}) after {int(progress.env_frames)} env frames and {self.global_step} updates: stopping."
            )
            self.trainer.should_stop = True  # the same decision on every rank: progress is global

    def _progress_across_ranks(self) -> Progress:
        """Env frames and recent episodes summed over all DDP ranks (one all-reduce per update, none
        without DDP), so every rank logs the same global figures and takes the same stop decision."""
        local = torch.tensor(
            [
                self.env_frames,
                sum(self.episode_returns),
                len(self.episode_returns),
                sum(self.episode_lengths),
                float(len(self.episode_returns) == self.hparams.return_window),
            ],
            dtype=torch.float64,
        )
        if self.trainer.world_size > 1:
            local = self.trainer.strategy.reduce(local.to(self.device), reduce_op="sum").cpu()
        frames, return_sum, episodes, length_sum, full = local.tolist()
        return Progress(
            env_frames=frames,
            episodes=int(episodes),
            mean_return=return_sum / episodes if episodes else math.nan,
            mean_length=length_sum / episodes if episodes else math.nan,
            windows_full=int(full) == self.trainer.world_size,
        )

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.RMSprop(
            self.network.parameters(), lr=hp.lr, alpha=hp.rmsprop_alpha, eps=hp.rmsprop_eps, momentum=hp.rmsprop_momentum
        )
        if not hp.lr_decay:
            return optimizer
        # trainer.max_steps, not estimated_stepping_batches: the latter would start the actors to
        # measure an endless dataloader.
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            raise ValueError(f"lr_decay needs trainer.max_steps >= 1 to decay over, got {total_steps}")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_linear_decay, total_steps=total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- test: full episodes on a fresh env with the (checkpoint's) weights -------------------------

    def on_test_epoch_start(self) -> None:
        self._test_returns: list[float] = []
        self._test_lengths: list[int] = []

    def test_step(self, episode_seed: int, batch_idx: int) -> None:
        data = self.trainer.datamodule
        result = run_episodes(
            copy.deepcopy(self.network).cpu().eval(),
            data.hparams.env_id,
            data.env_options,
            num_episodes=1,
            deterministic=self.hparams.test_deterministic,
            seed=int(episode_seed),
        )
        self._test_returns.extend(result.returns)
        self._test_lengths.extend(result.lengths)

    def on_test_epoch_end(self) -> None:
        returns = torch.tensor(self._test_returns, dtype=torch.float64)
        mean, std = returns.mean().item(), returns.std(unbiased=False).item()
        self.log_dict(
            {"test/return_mean": mean, "test/return_std": std, "test/length_mean": sum(self._test_lengths) / len(self._test_lengths),
             "test/episodes": float(len(self._test_returns))}
        )
        self.print(
            f"Test: mean return {mean:.1f} +- {std:.1f} (std) over {len(self._test_returns)} episodes "
            f"({'deterministic' if self.hparams.test_deterministic else 'sampled'} actions), "
            f"weights of update {self._checkpoint_step if self._checkpoint_step is not None else self.global_step}."
        )

    # --- checkpoint state beyond the weights and optimizer -----------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["impala"] = {
            "env_frames": self.env_frames,
            "episode_returns": list(self.episode_returns),
            "episode_lengths": list(self.episode_lengths),
            # A resumed run continues the same W&B run (see cli.ImpalaCLI.before_fit).
            "wandb_run_id": next((lg.experiment.id for lg in self.loggers if isinstance(lg, WandbLogger)), None),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._checkpoint_step = checkpoint.get("global_step")
        state = checkpoint.get("impala", {})
        self.env_frames = int(state.get("env_frames", 0))
        self.episode_returns.extend(state.get("episode_returns", []))
        self.episode_lengths.extend(state.get("episode_lengths", []))


def importance_weight_stats(
    rhos: Tensor, rho_bar: float | None, c_bar: float | None, pg_rho_bar: float | None
) -> dict[str, Tensor]:
    """How off-policy a batch is, from its importance weights ``rhos = pi / mu``, ``[T, B]``.

    ``rho/clipped_by_*``: fraction of steps whose weight each threshold cuts (0 when it is None).
    ``rho/ess``: effective sample size ``(sum rho)^2 / (N sum rho^2)`` in (0, 1]: 1 when every weight
    is equal (on-policy), small when a few steps carry all the weight.
    """
    rhos = rhos.detach().float()

    def clipped(threshold: float | None) -> Tensor:
        return (rhos > threshold).float().mean() if threshold is not None else rhos.new_zeros(())

    return {
        "rho/mean": rhos.mean(),
        "rho/min": rhos.min(),
        "rho/max": rhos.max(),
        "rho/clipped_by_rho_bar": clipped(rho_bar),
        "rho/clipped_by_c_bar": clipped(c_bar),
        "rho/clipped_by_pg_rho_bar": clipped(pg_rho_bar),
        "rho/ess": rhos.sum().square() / (rhos.numel() * rhos.square().sum()).clamp_min(1e-12),
    }


def _linear_decay(step: int, total_steps: int) -> float:
    return max(0.0, 1.0 - step / total_steps)
