"""Evaluation: whole episodes of the current policy in a fresh env, their returns and a video.

``run_episodes`` and ``write_video`` are plain functions. ``EvaluationCallback`` runs them every
``every_n_steps`` learner updates in a background thread on a CPU snapshot of the weights, so the
learner never waits for an episode: torch releases the GIL inside its kernels and an env step is
short, so the thread costs the learner little. Results are logged later from the main thread (the
loggers are not thread-safe), at the step the evaluation was started at.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from lit_impala.envs import make_gym_env

VIDEO_KEY = "eval/video"


class EvalResult(NamedTuple):
    """What ``run_episodes`` returns."""

    returns: list[float]  # raw (unscaled) env reward summed over each episode
    lengths: list[int]  # env steps of each episode
    frames: np.ndarray | None  # uint8 [L, H, W, 3]: the first episode, one frame after reset + one per step; or None


# --- episodes -----------------------------------------------------------------------------------------


def _frames_to_array(frames: list[np.ndarray]) -> np.ndarray:
    """``L`` frames ``[H, W, 3]`` -> ``[L, H, W, 3]``, freeing the list as it copies: a 500-step
    CartPole episode is ~360 MB of frames, and ``np.stack`` would briefly hold it twice."""
    stacked = np.empty((len(frames), *frames[0].shape), dtype=np.uint8)
    for i in range(len(frames) - 1, -1, -1):
        stacked[i] = frames.pop()
    return stacked


def _render(env, env_id: str) -> np.ndarray:
    frame = env.render()
    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        raise ValueError(f"env {env_id!r} does not render rgb_array frames [H, W, 3] (got {type(frame).__name__})")
    return frame


@torch.no_grad()
def run_episodes(
    network: nn.Module,
    env_id: str,
    env_options: dict,
    num_episodes: int,
    deterministic: bool = True,
    seed: int = 0,
    record_video: bool = False,
    max_video_frames: int = 1000,
) -> EvalResult:
    """Play ``num_episodes`` whole episodes (to termination or truncation) with ``network``'s policy.

    One env ``make_gym_env(env_id, **env_options)`` is reset with ``seed`` before the first episode
    and without a seed afterwards, so the same seed gives the same sequence of start states. The
    network acts one observation at a time (``[T=1, B=1, *obs]``, as the actors do) on its own
    device, leaving its mode and weights untouched; an LSTM core state is carried across steps and
    reset at each episode start.

    Args:
        network: an ``ImpalaAgent`` (``forward``, ``distribution``, ``use_lstm``, ``initial_state``).
        env_id: gymnasium id.
        env_options: ``make_gym_env``'s keyword options (``ImpalaDataModule.env_options``).
        num_episodes: episodes to play, >= 1.
        deterministic: act with the distribution's mode (greedy); False: sample (from torch's global RNG).
        seed: the env's seed for the first reset.
        record_video: render the first episode: one frame after the reset and one after each step.
        max_video_frames: keep at most this many frames (the episode itself runs to its end).

    Returns:
        ``EvalResult``; ``frames`` is uint8 ``[min(lengths[0] + 1, max_video_frames), H, W, 3]`` when
        ``record_video``, else None.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    if max_video_frames < 1:
        raise ValueError(f"max_video_frames must be >= 1, got {max_video_frames}")
    distribution = network.distribution
    device = next(network.parameters()).device
    starts_episode = torch.ones(1, 1, dtype=torch.bool, device=device)  # is_init [T=1, B=1]
    continues_episode = torch.zeros_like(starts_episode)
    if record_video:
        # Off-screen frames need no display; without this, pygame's SDL complains on headless machines.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env = make_gym_env(env_id, render_mode="rgb_array" if record_video else None, **env_options)
    returns, lengths, frames = [], [], []
    try:
        for episode in range(num_episodes):
            observation, _ = env.reset(seed=seed if episode == 0 else None)
            recording = record_video and episode == 0
            if recording:
                frames.append(_render(env, env_id))
            core_state = network.initial_state(1, device) if network.use_lstm else None
            episode_return, length, done = 0.0, 0, False
            while not done:
                obs = torch.as_tensor(np.asarray(observation), device=device)[None, None]  # [1, 1, *obs]
                output = network(obs, core_state, starts_episode if length == 0 else continues_episode)
                params = output.policy_params[0]  # [1, P]
                sample = distribution.mode(params) if deterministic else distribution.sample(params)
                # [1, *sample_shape] -> [*sample_shape]: a Discrete env needs a 0-d integer, not [1]
                action = distribution.to_env_action(sample)[0].cpu().numpy()
                if output.core_states is not None:
                    core_state = (output.core_states[0][0], output.core_states[1][0])  # each [1, H]
                observation, reward, terminated, truncated, _ = env.step(action)
                episode_return += float(reward)
                length += 1
                done = terminated or truncated
                if recording and len(frames) < max_video_frames:
                    frames.append(_render(env, env_id))
            returns.append(episode_return)
            lengths.append(length)
    finally:
        env.close()
    return EvalResult(returns, lengths, _frames_to_array(frames) if frames else None)


# --- video --------------------------------------------------------------------------------------------


def _even_rgb(frames: np.ndarray) -> np.ndarray:
    """``[L, H, W]`` or ``[L, H, W, C]`` (C = 1, 3 or 4) -> uint8 RGB ``[L, H', W', 3]`` with H', W'
    rounded up to even by repeating the last row / column (H.264 in yuv420p needs even sizes)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or len(frames) == 0:
        raise ValueError(f"frames must be [L, H, W, C] with L >= 1 and C in (1, 3, 4), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    elif frames.shape[-1] == 4:
        frames = frames[..., :3]  # drop alpha
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return frames


def write_video(frames: np.ndarray, path: str | Path, fps: int = 30) -> Path:
    """Write ``frames`` uint8 ``[L, H, W, 3]`` as an H.264 mp4 at ``path``; returns ``path``.

    Atomic: encoded under a temporary name in the same directory, then renamed, so a reader (or
    W&B) never sees half a file. Parent directories are created. Odd sizes are padded to even.
    """
    import imageio.v2 as imageio  # imported here: only evaluation needs it (and its ffmpeg binary)

    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    frames = _even_rgb(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ffmpeg picks the container from the extension, so the temporary name ends in .mp4 too.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(handle)
    try:
        # macro_block_size=1: keep the frame size (imageio would otherwise resize to multiples of 16).
        with imageio.get_writer(temporary, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# --- the callback -------------------------------------------------------------------------------------


def summarize(result: EvalResult) -> dict[str, float]:
    """The scalars logged for one evaluation (population std: 0 for one episode)."""
    return {
        "eval/return_mean": statistics.fmean(result.returns),
        "eval/return_std": statistics.pstdev(result.returns),
        "eval/length_mean": statistics.fmean(result.lengths),
        "eval/episodes": float(len(result.returns)),
    }


def run_directory(trainer: L.Trainer) -> Path:
    """Where this run's files go: the W&B run's files directory if there is a ``WandbLogger``,
    else ``trainer.log_dir`` (the first logger's version directory), else ``default_root_dir``."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = getattr(logger.experiment, "dir", None)
            if run_dir:
                return Path(run_dir)
    return Path(trainer.log_dir or trainer.default_root_dir)


@dataclass
class _Evaluation:
    """One evaluation, started at learner step ``step``; the worker fills ``result`` or ``error``."""

    step: int
    video_path: Path | None  # where the video will be written, if one is recorded
    thread: threading.Thread | None = None
    result: EvalResult | None = None
    error: Exception | None = None


class EvaluationCallback(L.Callback):
    """Every ``every_n_steps`` learner updates, play ``num_episodes`` episodes with a snapshot of the
    weights in a background thread; log ``eval/return_mean``, ``eval/return_std``,
    ``eval/length_mean``, ``eval/episodes`` and a video of the first episode
    (``<run dir>/videos/eval_step{step:07d}.mp4``; W&B also gets it as ``eval/video``).

    At most one evaluation runs at a time: a trigger that finds one still running is skipped. Only
    global rank zero evaluates. Every evaluation uses the same env seed, so the returns at different
    steps are over the same start states (with ``deterministic``, a fixed policy gives fixed returns).
    An evaluation that fails (e.g. an env that cannot render) stops training with its error when it
    is collected: every later one would fail alike.

    Args:
        every_n_steps: evaluate after every this many learner updates (``trainer.global_step``).
        num_episodes: episodes per evaluation.
        deterministic: act greedily (the distribution's mode) rather than sample.
        record_video: record the first episode of each evaluation as an mp4.
        video_fps: frame rate of the video.
        seed: env seed of every evaluation's first reset.
        eval_at_end: at the end of training, wait for a running evaluation, then evaluate the final
            weights (unless an evaluation already started at the final step).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_episodes: int = 10,
        deterministic: bool = True,
        record_video: bool = True,
        video_fps: int = 30,
        seed: int = 12345,
        eval_at_end: bool = True,
    ):
        for name, value in (("every_n_steps", every_n_steps), ("num_episodes", num_episodes), ("video_fps", video_fps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.every_n_steps = every_n_steps
        self.num_episodes = num_episodes
        self.deterministic = deterministic
        self.record_video = record_video
        self.video_fps = video_fps
        self.seed = seed
        self.eval_at_end = eval_at_end
        self.last_result: EvalResult | None = None  # frames dropped once written to the video
        self.history: list[dict] = []  # one {step, return_mean, return_std, length_mean, video_path} per evaluation
        self._running: _Evaluation | None = None
        self._last_started_step: int | None = None

    # --- hooks (main thread) ---

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "env_options"):
            raise ValueError(f"EvaluationCallback needs an ImpalaDataModule (its env_id and env_options), got {datamodule!r}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        self._log_if_finished(trainer, wait=False)
        step = trainer.global_step
        due = step > 0 and step % self.every_n_steps == 0 and step != self._last_started_step
        if due and self._running is None:
            self._running = self._start(trainer, pl_module, step, background=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._log_if_finished(trainer, wait=True)
        if self.eval_at_end and trainer.global_step != self._last_started_step:
            self._running = self._start(trainer, pl_module, trainer.global_step, background=False)  # end of training: waiting is fine
            self._log_if_finished(trainer, wait=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Never join here: the run is failing and an episode may take long. The daemon thread dies with the process.
        self._running = None

    # --- helpers ---

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, background: bool) -> _Evaluation:
        """Snapshot the weights and evaluate them, in a daemon thread if ``background``."""
        network = copy.deepcopy(pl_module.network).cpu().eval().requires_grad_(False)  # private: training goes on
        datamodule = trainer.datamodule
        video_path = run_directory(trainer) / "videos" / f"eval_step{step:07d}.mp4" if self.record_video else None
        evaluation = _Evaluation(step, video_path)
        work = (evaluation, network, datamodule.hparams.env_id, dict(datamodule.env_options))
        self._last_started_step = step
        if background:
            evaluation.thread = threading.Thread(target=self._evaluate, args=work, name=f"evaluation-step{step}", daemon=True)
            evaluation.thread.start()
        else:
            self._evaluate(*work)
        return evaluation

    def _evaluate(self, evaluation: _Evaluation, network: nn.Module, env_id: str, env_options: dict) -> None:
        """Worker: play the episodes, write the video; results and errors go into ``evaluation``."""
        try:
            result = run_episodes(network, env_id, env_options, self.num_episodes, self.deterministic, self.seed,
                                  record_video=self.record_video)
            if result.frames is not None:
                write_video(result.frames, evaluation.video_path, self.video_fps)
            evaluation.result = result._replace(frames=None)  # hundreds of MB: not kept once encoded
        except Exception as error:  # noqa: BLE001 -- handed to the main thread, which raises it
            evaluation.error = error

    def _log_if_finished(self, trainer: L.Trainer, wait: bool) -> None:
        """Log the running evaluation if it is done (or, with ``wait``, once it is done)."""
        evaluation = self._running
        if evaluation is None or (not wait and evaluation.thread is not None and evaluation.thread.is_alive()):
            return
        if evaluation.thread is not None:
            evaluation.thread.join()
        self._running = None
        if evaluation.error is not None:
            raise RuntimeError(f"evaluation at step {evaluation.step} failed: {evaluation.error}") from evaluation.error
        metrics = summarize(evaluation.result)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=evaluation.step)
            if evaluation.video_path is not None and isinstance(logger, WandbLogger):
                # A file path: wandb copies the mp4 as is (no moviepy); fps is fixed in the file already.
                logger.log_video(VIDEO_KEY, videos=[str(evaluation.video_path)], step=evaluation.step,
                                 caption=[f"step {evaluation.step}"])
        self.last_result = evaluation.result
        self.history.append({
            "step": evaluation.step,
            "return_mean": metrics["eval/return_mean"],
            "return_std": metrics["eval/return_std"],
            "length_mean": metrics["eval/length_mean"],
            "video_path": evaluation.video_path,
        })
