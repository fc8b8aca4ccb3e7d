"""Training progress: env frames, the recent episodes, speed, and the stop rule, over all DDP ranks.

``EpisodeStats`` counts what each applied update consumed (its batch's or minibatch's frames and finished episodes),
sums it over the DDP ranks once per update, logs it, and stops training once the mean return of the
recent episodes reaches ``stop_at_return``. Its counts are saved in checkpoints (``state_dict``), so a
resumed run goes on counting where it stopped.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import NamedTuple

import lightning as L
import torch

from lit_impala.callbacks.histograms import log_histograms
from lit_impala.config import PositiveInt, check_arguments
from lit_impala.schema import Trajectory, as_trajectory


class Progress(NamedTuple):
    """Training progress over all ranks: frames consumed and the recent-episode window of each rank."""

    env_frames: float
    episodes: int
    mean_return: float
    mean_length: float
    windows_full: bool  # every rank has ``return_window`` finished episodes


def is_log_step(trainer: L.Trainer) -> bool:
    """Whether this update's metrics are logged (Lightning's rule, ``trainer.log_every_n_steps``; the last update's
    too, since ``EpisodeStats`` sets ``trainer.should_stop`` then): the learner and ``EpisodeStats`` log together."""
    return trainer.should_stop or trainer.global_step % max(1, trainer.log_every_n_steps) == 0


class EpisodeStats(L.Callback):
    """Frames, episode returns and lengths, frames/s, and the stop rule.

    Logged every ``trainer.log_every_n_steps`` updates and at the last one, whatever ended the run:
    ``progress/env_frames``, ``progress/frames_per_second``, ``progress/updates_per_second``,
    ``progress/data_wait_fraction``, ``progress/train_s`` (wall seconds since this process's first update began,
    for curves against wall time), ``episode/return`` and ``episode/length`` (once an episode has finished; sums
    over DDP ranks), their histograms (this rank's episodes), ``faults/actor_restarts``, ``faults/actors_lost``,
    ``faults/rollouts_rejected`` (remote rollouts that failed the checks on arrival), ``faults/unrolls_dropped``
    (``data.nonfinite_data: drop``) and ``policy_lag/unrolls_dropped`` (``data.max_policy_lag``); ``frames``, ``fps``
    and ``return`` in the progress bar only.
    ``trainer.max_steps`` reached also sets ``trainer.should_stop``, so that Lightning writes the last update's row
    to the loggers. An episode whose return or length is not finite never enters the window (the attribute
    ``nonfinite_episodes`` counts them).

    Args:
        stop_at_return: stop training once the mean return of the last ``return_window`` episodes of
            every rank reaches this value (None: run to ``trainer.max_steps``). Every rank takes the
            decision at the same update: the figures are global.
        return_window: number of recent episodes (per rank) the mean return is taken over.
    """

    def __init__(self, stop_at_return: float | None = None, return_window: PositiveInt = 100):
        check_arguments(EpisodeStats.__init__, locals())
        self.stop_at_return = stop_at_return
        self.return_window = return_window
        self.env_frames = 0  # env steps consumed by this rank's learner
        self.episode_returns: deque[float] = deque(maxlen=return_window)
        self.episode_lengths: deque[float] = deque(maxlen=return_window)
        self.nonfinite_episodes = 0  # finished episodes left out of the window for a NaN or infinite return
        self.progress: Progress | None = None  # over all ranks, as of the last update
        self.target_reached = False  # stop_at_return was reached (the run stops at this update)
        self._clock: tuple[float, float, int, float] | None = None  # (time, frames, step, waited) at the last log
        self._batch_end_time: float | None = None
        self._train_start: float | None = None  # when this process asked for its first batch
        self._data_wait_s = 0.0  # learner time spent waiting for the actors' next batch
        self._restored = False  # counts came from a checkpoint
        self._resumed_from: int | None = None  # the update a resumed run went on from, until it is logged once

    @staticmethod
    def of(trainer: L.Trainer) -> EpisodeStats | None:
        """The trainer's ``EpisodeStats`` callback, if it has one."""
        return next((callback for callback in trainer.callbacks if isinstance(callback, EpisodeStats)), None)

    @property
    def mean_return(self) -> float:
        """Mean return of this rank's last ``return_window`` finished episodes (nan before the first)."""
        return sum(self.episode_returns) / len(self.episode_returns) if self.episode_returns else math.nan

    # --- hooks ---

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.perf_counter()
        if self._restored:
            self._resumed_from = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning fetched this batch just before: the gap since the last update is data wait.
        if self._batch_end_time is not None:
            self._data_wait_s += time.perf_counter() - self._batch_end_time
        # The batch's frames and episodes count, and whether this update is the last is decided, before the update:
        # every hook after it (the learner's logging, checkpoints) sees the same should_stop, whatever their order.
        self._count(as_trajectory(batch))
        progress = self.progress = self._across_ranks(trainer, pl_module.device)
        update = trainer.global_step + 1  # the update this batch makes
        target = self.stop_at_return
        if target is not None and progress.windows_full and progress.mean_return >= target:
            pl_module.print(
                f"Reached a mean return of {progress.mean_return:.1f} over the last {progress.episodes} episodes "
                f"(target {target}) after {int(progress.env_frames)} env frames and {update} updates: stopping."
            )
            trainer.should_stop = self.target_reached = True
        if trainer.max_steps is not None and 0 < trainer.max_steps <= update:
            # Lightning writes a step's metrics to the loggers every log_every_n_steps or when should_stop is
            # set: setting it now makes the last update's row reach the loggers (the run ends either way).
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._batch_end_time = now
        if is_log_step(trainer):
            self._log(trainer, pl_module, self.progress, now)

    def _count(self, trajectory: Trajectory) -> None:
        # The batch is time-major (ImpalaDataModule.on_after_batch_transfer). A repeat pass over the same
        # frames (data.passes_per_batch) adds nothing; the first pass's minibatches each add their own unrolls.
        if not trajectory.replayed:
            self.env_frames += trajectory.reward.numel()
            done = trajectory.done
            if done.any():
                # A non-finite return would make the window's mean NaN until it leaves (no stop rule): skipped.
                finite = torch.isfinite(trajectory.episode_return) & torch.isfinite(trajectory.episode_length.float())
                self.nonfinite_episodes += int((done & ~finite).sum())
                self.episode_returns.extend(trajectory.episode_return[done & finite].tolist())
                self.episode_lengths.extend(trajectory.episode_length[done & finite].tolist())

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, progress: Progress, now: float) -> None:
        datamodule = trainer.datamodule
        metrics = {
            "progress/env_frames": progress.env_frames,
            "faults/actor_restarts": float(getattr(datamodule, "actor_restarts", 0)),
            "faults/actors_lost": float(getattr(datamodule, "actors_lost", 0)),
            "faults/rollouts_rejected": float(getattr(datamodule, "rollouts_rejected", 0)),
            "faults/unrolls_dropped": float(getattr(datamodule, "unrolls_dropped", 0)),
            "policy_lag/unrolls_dropped": float(getattr(datamodule, "unrolls_too_old", 0)),
        }
        if self._train_start is not None:
            metrics["progress/train_s"] = now - self._train_start
        if self._resumed_from is not None:  # once per resume, to the loggers directly (a self.log value would
            # stay in every later row): where the curve goes on after a stop
            resumed = {"progress/resumed_from_update": float(self._resumed_from)}
            for logger in pl_module.loggers:
                logger.log_metrics(resumed, step=trainer.global_step)
            self._resumed_from = None
        if self._clock is not None and now > self._clock[0]:
            then, frames, step, waited = self._clock
            metrics["progress/frames_per_second"] = (progress.env_frames - frames) / (now - then)
            metrics["progress/updates_per_second"] = (trainer.global_step - step) / (now - then)
            metrics["progress/data_wait_fraction"] = (self._data_wait_s - waited) / (now - then)
            # The progress bar's short names, for the bar only: a logger has each quantity once, under its full name.
            pl_module.log("fps", metrics["progress/frames_per_second"], prog_bar=True, logger=False)
        self._clock = (now, progress.env_frames, trainer.global_step, self._data_wait_s)
        if progress.episodes:  # no return before an episode has finished (0 would read as a real return)
            metrics["episode/return"] = progress.mean_return
            metrics["episode/length"] = progress.mean_length
            log_histograms(  # this rank's episodes
                pl_module.loggers,
                {"episode/return_hist": list(self.episode_returns), "episode/length_hist": list(self.episode_lengths)},
                trainer.global_step,
            )
            pl_module.log("return", progress.mean_return, prog_bar=True, logger=False)
        pl_module.log_dict(metrics)
        pl_module.log("frames", progress.env_frames, prog_bar=True, logger=False)

    def _across_ranks(self, trainer: L.Trainer, device: torch.device) -> Progress:
        """Env frames and recent episodes summed over all DDP ranks (one all-reduce per update, none
        without DDP), so every rank logs the same global figures and takes the same stop decision."""
        local = torch.tensor(
            [
                self.env_frames,
                sum(self.episode_returns),
                len(self.episode_returns),
                sum(self.episode_lengths),
                float(len(self.episode_returns) == self.return_window),
            ],
            dtype=torch.float64,
        )
        if trainer.world_size > 1:
            local = trainer.strategy.reduce(local.to(device), reduce_op="sum").cpu()
        frames, return_sum, episodes, length_sum, full = local.tolist()
        return Progress(
            env_frames=frames,
            episodes=int(episodes),
            mean_return=return_sum / episodes if episodes else math.nan,
            mean_length=length_sum / episodes if episodes else math.nan,
            windows_full=int(full) == trainer.world_size,
        )

    # --- checkpoints ---

    def state_dict(self) -> dict:
        return {
            "env_frames": self.env_frames,
            "episode_returns": list(self.episode_returns),
            "episode_lengths": list(self.episode_lengths),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = True
        self.env_frames = int(state_dict.get("env_frames", 0))
        self.episode_returns.extend(state_dict.get("episode_returns", []))
        self.episode_lengths.extend(state_dict.get("episode_lengths", []))
