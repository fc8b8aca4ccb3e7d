"""Evaluation during training: whole episodes of the current policy in a fresh env, every N updates.

``EvaluationCallback`` runs ``play.play_episodes`` (and ``video.write_video``) in a background thread
on a CPU snapshot of the weights, so the learner never waits for an episode: torch releases the GIL
inside its kernels and an env step is short, so the thread costs the learner little. Results are logged
later from the main thread (the loggers are not thread-safe), at the step the evaluation was started at.

Not torchrl's ``Evaluator``: its collector carries the env's state from one evaluation to the next (not the
same seeded start states each time), and its videos go to torchrl's loggers, not Lightning's.
"""

from __future__ import annotations

import copy
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torch import nn

from lit_impala import interrupts
from lit_impala.config import PositiveInt, check_arguments
from lit_impala.play import EpisodeSpec, EpisodesStopped, PlayedEpisodes, play_episodes
from lit_impala.video import write_video

VIDEO_KEY = "eval/video"


def summarize(returns: list[float], lengths: list[int], prefix: str) -> dict[str, float]:
    """The scalars logged for whole episodes, ``eval/...`` during training, ``test/...`` by ``test`` (population
    std: 0 for one episode)."""
    return {
        f"{prefix}/return_mean": statistics.fmean(returns),
        f"{prefix}/return_std": statistics.pstdev(returns),
        f"{prefix}/length_mean": statistics.fmean(lengths),
        f"{prefix}/episodes": float(len(returns)),
    }


def run_directory(trainer: L.Trainer) -> Path:
    """Where this run's files go: the W&B run's files directory if there is a ``WandbLogger``,
    else the first logger's version directory (``log_dir``, or ``save_dir``), else ``default_root_dir``.

    Safe on one rank alone: no collective operation. (``Trainer.log_dir`` broadcasts from rank 0, so
    calling it from rank-0-only code under DDP waits forever for the other ranks.)
    """
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = getattr(logger.experiment, "dir", None)
            if isinstance(run_dir, str) and run_dir:  # on ranks > 0 the experiment is a dummy
                return Path(run_dir)
    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def _interrupted(trainer: L.Trainer) -> bool:
    """Training ended on Ctrl-C / SIGTERM (``lit_impala.interrupts``)."""
    return interrupts.received() is not None


@dataclass
class _Evaluation:
    """One evaluation, started at learner step ``step``; the worker fills ``result`` or ``error``."""

    step: int
    video_path: Path | None  # where the video will be written, if one is recorded
    thread: threading.Thread | None = None
    result: PlayedEpisodes | None = None
    error: Exception | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # set: give up, the final evaluation replaces it
    stopped: bool = False  # it gave up unfinished: nothing is logged for it


class EvaluationCallback(L.Callback):
    """Every ``every_n_steps`` learner updates, play ``num_episodes`` episodes with a snapshot of the
    weights in a background thread; log ``eval/return_mean``, ``eval/return_std``,
    ``eval/length_mean``, ``eval/episodes`` and a video of the first episode
    (``<run dir>/videos/eval_step{step:07d}.mp4``; W&B also gets it as ``eval/video``).

    At most one evaluation runs at a time: a trigger that finds one still running is skipped. Only
    global rank zero evaluates, and none of this callback's code is a collective operation, so under
    DDP the other ranks never wait for it. Every evaluation uses the same env seed, so the returns at
    different steps are over the same start states (acting deterministically, as ``data.eval_deterministic``
    says by default, a fixed policy gives fixed returns). An evaluation that fails (e.g. an env that cannot
    render) stops training with its error when it is collected: every later one would fail alike.

    The evaluation of the final weights starts when training ends (``on_train_end``), in the background while the
    actors shut down and the final checkpoint is written, and is logged in ``teardown``: the run's exit waits for
    the longer of the two only. An evaluation of earlier weights still running then is stopped unfinished and not
    logged (a line says so): the final weights' evaluation replaces it, so the user waits for one evaluation at the
    end, not two (on 2 cores a CartPole evaluation with its video takes 2-5 s). Being on rank zero alone and in a
    thread, it holds no other rank. It is skipped when training failed or was interrupted by Ctrl-C / SIGTERM (the
    user asked to stop).

    Args:
        every_n_steps: evaluate after every this many learner updates (``trainer.global_step``).
        num_episodes: episodes per evaluation.
        record_video: record the first episode of each evaluation as an mp4.
        video_fps: frame rate of the video.
        seed: env seed of every evaluation's first reset.
        eval_at_end: at the end of training, stop a running evaluation of earlier weights and evaluate the final
            weights (unless an evaluation already started at the final step, or the run was interrupted: then a
            running evaluation is waited for and logged). False: a running evaluation is waited for and logged.
    """

    def __init__(
        self,
        every_n_steps: PositiveInt = 500,
        num_episodes: PositiveInt = 10,
        record_video: bool = True,
        video_fps: PositiveInt = 30,
        seed: int = 12345,
        eval_at_end: bool = True,
    ):
        check_arguments(EvaluationCallback.__init__, locals())
        self.every_n_steps = every_n_steps
        self.num_episodes = num_episodes
        self.record_video = record_video
        self.video_fps = video_fps
        self.seed = seed
        self.eval_at_end = eval_at_end
        self.last_result: PlayedEpisodes | None = None  # frames dropped once written to the video
        self.history: list[dict] = []  # one {step, return_mean, return_std, length_mean, video_path} per evaluation
        self._running: _Evaluation | None = None
        self._last_started_step: int | None = None

    # --- hooks (main thread) ---

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        EpisodeSpec.of(trainer)  # at the start, not at the first evaluation: a data module without one is an error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        self._log_if_finished(trainer, wait=False)
        step = trainer.global_step
        due = step > 0 and step % self.every_n_steps == 0 and step != self._last_started_step
        if due and self._running is None:
            self._running = self._start(trainer, pl_module, step, background=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final weights are evaluated in the background while the actors shut down and the final checkpoint is
        # written: the user waits for the longer of the two, not for both. teardown collects it.
        if not trainer.is_global_zero:
            return
        final_due = self.eval_at_end and trainer.global_step != self._last_started_step and not _interrupted(trainer)
        if final_due and self._running is not None:
            self._running.stop.set()  # the final weights' evaluation replaces it (the class docstring says why)
        self._log_if_finished(trainer, wait=True)
        if final_due:
            self._running = self._start(trainer, pl_module, trainer.global_step, background=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls teardown after a run that ended normally only (on_exception otherwise); the data module's
        # teardown (the actors' shutdown) comes before this one.
        if stage != "fit" or not trainer.is_global_zero:
            return
        self._log_if_finished(trainer, wait=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Never join here: the run is failing and an episode may take long. The daemon thread dies with the process;
        # until then it stops at its next step.
        if self._running is not None:
            self._running.stop.set()
        self._running = None

    # --- helpers ---

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, background: bool) -> _Evaluation:
        """Snapshot the weights and evaluate them, in a daemon thread if ``background``."""
        network = copy.deepcopy(pl_module.network).cpu().eval().requires_grad_(False)  # private: training goes on
        video_path = run_directory(trainer) / "videos" / f"eval_step{step:07d}.mp4" if self.record_video else None
        evaluation = _Evaluation(step, video_path)
        work = (evaluation, network, EpisodeSpec.of(trainer))
        self._last_started_step = step
        if background:
            evaluation.thread = threading.Thread(
                target=self._evaluate, args=work, name=f"evaluation-step{step}", daemon=True
            )
            evaluation.thread.start()
        else:
            self._evaluate(*work)
        return evaluation

    def _evaluate(self, evaluation: _Evaluation, network: nn.Module, spec: EpisodeSpec) -> None:
        """Worker: play the episodes, write the video; results and errors go into ``evaluation``."""
        try:
            result = play_episodes(network, spec, self.num_episodes, self.seed, record_video=self.record_video,
                                   stop=evaluation.stop)
            if evaluation.stop.is_set():
                raise EpisodesStopped("stopped before its video was written")
            if result.frames is not None:
                write_video(result.frames, evaluation.video_path, self.video_fps)
            evaluation.result = result._replace(frames=None)  # hundreds of MB: not kept once encoded
        except EpisodesStopped:
            evaluation.stopped = True
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
        if evaluation.stopped:
            trainer.lightning_module.print(f"Evaluation of step {evaluation.step} stopped unfinished, not logged: "
                                           f"training ended, the final weights are evaluated instead")
            return
        metrics = summarize(evaluation.result.returns, evaluation.result.lengths, "eval")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=evaluation.step)
            if evaluation.video_path is not None and isinstance(logger, WandbLogger):
                # A file path: wandb copies the mp4 as is (no moviepy); fps is fixed in the file already.
                logger.log_video(VIDEO_KEY, videos=[str(evaluation.video_path)], step=evaluation.step,
                                 caption=[f"step {evaluation.step}"])
        self.last_result = evaluation.result
        self.history.append({"step": evaluation.step, **{name.removeprefix("eval/"): value for name, value in
                                                         metrics.items() if name != "eval/episodes"},
                             "video_path": evaluation.video_path})


class TestReport(L.Callback):
    """``test``: prints each episode ``ImpalaModule.test_step`` plays (one per test batch) as it ends, writes the
    recorded ones (``data.test_videos``) as ``videos/test_episode<k>.mp4`` in the run's directory, then logs
    ``test/return_mean``, ``test/return_std``, ``test/length_mean``, ``test/episodes`` and prints them."""

    def __init__(self, video_fps: PositiveInt = 30):
        self.video_fps = video_fps

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.videos: list[Path] = []

    def on_test_batch_end(self, trainer, pl_module, outputs: PlayedEpisodes, batch, batch_idx, dataloader_idx=0):
        self.returns.extend(outputs.returns)
        self.lengths.extend(outputs.lengths)
        video = ""
        if outputs.frames is not None:
            path = write_video(outputs.frames, run_directory(trainer) / "videos" / f"test_episode{batch_idx:03d}.mp4",
                               self.video_fps)
            self.videos.append(path)
            video = f", video {path}"
        pl_module.print(f"Test episode {batch_idx + 1}: return {outputs.returns[0]:.1f}, {outputs.lengths[0]} steps"
                        + video)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = summarize(self.returns, self.lengths, "test")
        pl_module.log_dict(metrics)
        mean, std = metrics["test/return_mean"], metrics["test/return_std"]
        deterministic = EpisodeSpec.of(trainer).deterministic
        step = pl_module.checkpoint_step if pl_module.checkpoint_step is not None else trainer.global_step
        pl_module.print(
            f"Test: mean return {mean:.1f} +- {std:.1f} (std) over {len(self.returns)} episodes "
            f"({'deterministic' if deterministic else 'sampled'} actions), weights of update {step}."
        )
