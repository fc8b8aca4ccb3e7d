"""Lightning callbacks: weight sync, episode statistics and the stop rule, evaluation, checkpoints, Ctrl-C,
progress display, phase times. ``ImpalaModule.configure_callbacks`` attaches the ones a run cannot do without."""

from lit_impala.callbacks.actor_sync import ActorWeightSync
from lit_impala.callbacks.checkpoints import CheckpointDirectoryLock, CheckpointFormat, FinalCheckpoint
from lit_impala.callbacks.episode_stats import EpisodeStats, Progress
from lit_impala.callbacks.evaluation import EvaluationCallback, TestReport
from lit_impala.callbacks.graceful_interrupt import GracefulInterrupt
from lit_impala.callbacks.phase_times import PhaseTimes
from lit_impala.callbacks.progress_bar import ProgressBar

__all__ = [
    "ActorWeightSync",
    "CheckpointDirectoryLock",
    "CheckpointFormat",
    "EpisodeStats",
    "EvaluationCallback",
    "FinalCheckpoint",
    "GracefulInterrupt",
    "PhaseTimes",
    "Progress",
    "ProgressBar",
    "TestReport",
]
