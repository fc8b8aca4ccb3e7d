"""Evaluation: whole episodes with real gymnasium envs and real networks, mp4 videos, and the callback
through the real entry point (CSV and offline W&B loggers)."""

import csv
import json
import os
import re
import threading
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from lit_impala.callbacks import EvaluationCallback
from lit_impala.cli import cli_main
from lit_impala.learner import ImpalaModule
from lit_impala.play import EpisodeSpec, EpisodesStopped, PlayedEpisodes, play_episodes
from lit_impala.video import write_video
from lit_impala.wandb_history import read_history
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")
CARTPOLE = {"observation_shape": [4], "action_space": {"type": "discrete", "n": 2}}
PENDULUM = {"observation_shape": [3], "action_space": {"type": "box", "low": [-2.0], "high": [2.0]}}
CARTPOLE_EPISODES = EpisodeSpec("CartPole-v1")  # greedy


def agent(use_lstm=False, **spec):
    torch.manual_seed(0)
    return ImpalaModule(**(spec or CARTPOLE), use_lstm=use_lstm).network


def read_mp4(path):
    """(number of frames, (width, height)) of an mp4, decoded by imageio's ffmpeg plugin."""
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        return reader.count_frames(), reader.get_meta_data()["size"]


# --- play_episodes ---------------------------------------------------------------------------------------


def test_cartpole_episodes_return_one_per_step_and_repeat_with_the_seed():
    network = agent()
    result = play_episodes(network, CARTPOLE_EPISODES, num_episodes=3, seed=7)
    assert isinstance(result, PlayedEpisodes) and result.frames is None
    assert len(result.returns) == len(result.lengths) == 3
    assert all(isinstance(r, float) for r in result.returns) and all(isinstance(n, int) for n in result.lengths)
    assert result.returns == [float(n) for n in result.lengths]  # CartPole: reward 1 per step
    assert all(1 <= n <= 500 for n in result.lengths)
    assert play_episodes(network, CARTPOLE_EPISODES, num_episodes=3, seed=7) == result  # greedy + same seed
    assert network.training  # the caller's module is left as it was


def test_a_set_stop_event_ends_play_at_the_next_step():
    stop = threading.Event()
    stop.set()
    with pytest.raises(EpisodesStopped, match="stopped in episode 1 of 3"):
        play_episodes(agent(), CARTPOLE_EPISODES, num_episodes=3, stop=stop)
    assert play_episodes(agent(), CARTPOLE_EPISODES, num_episodes=1, stop=threading.Event()).lengths  # unset: plays


def test_env_options_reach_the_env():
    spec = EpisodeSpec("CartPole-v1", {"max_episode_steps": 5}, deterministic=False)
    result = play_episodes(agent(), spec, num_episodes=2)
    assert all(n <= 5 for n in result.lengths)


def test_video_is_one_frame_after_reset_and_one_per_step_capped():
    network = agent()
    result = play_episodes(network, CARTPOLE_EPISODES, num_episodes=2, seed=3, record_video=True)
    assert result.frames.dtype == np.uint8
    assert result.frames.shape == (result.lengths[0] + 1, 400, 600, 3)  # first episode only
    assert result.frames.max() > 0
    capped = play_episodes(network, CARTPOLE_EPISODES, num_episodes=1, seed=3, record_video=True, max_video_frames=4)
    assert capped.frames.shape[0] == 4 and capped.lengths[0] == result.lengths[0]  # the episode still runs to its end


def test_lstm_agent_runs_episodes():
    result = play_episodes(agent(use_lstm=True), CARTPOLE_EPISODES, num_episodes=2)
    assert len(result.returns) == 2 and result.returns == [float(n) for n in result.lengths]


def test_pendulum_box_actions_run_a_whole_episode():
    result = play_episodes(agent(**PENDULUM), EpisodeSpec("Pendulum-v1", deterministic=False), num_episodes=1)
    assert result.lengths == [200]  # truncated by the time limit
    assert result.returns[0] < 0  # Pendulum's reward is a cost


# --- write_video ----------------------------------------------------------------------------------------


def test_write_video_is_a_readable_mp4(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, size=(6, 40, 60, 3), dtype=np.uint8)
    path = write_video(frames, tmp_path / "nested" / "dir" / "clip.mp4", fps=10)
    assert path == tmp_path / "nested" / "dir" / "clip.mp4"
    assert path.read_bytes()[4:8] == b"ftyp"
    assert read_mp4(path) == (6, (240, 160))  # enlarged 4x: a side under 160 pixels
    assert [p.name for p in path.parent.iterdir()] == ["clip.mp4"]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # as any file the user creates


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_write_video_pads_odd_sizes_to_even(tmp_path):
    frames = np.full((3, 161, 201, 3), 200, dtype=np.uint8)
    assert read_mp4(write_video(frames, tmp_path / "odd.mp4")) == (3, (202, 162))


def test_write_video_enlarges_a_small_grid_into_sharp_blocks(tmp_path):
    grid = np.zeros((2, 10, 10, 3), dtype=np.uint8)
    grid[:, 2, 7] = (255, 0, 0)  # one red cell
    path = write_video(grid, tmp_path / "grid.mp4", fps=10)
    assert read_mp4(path) == (2, (160, 160))  # 16x, the smallest whole factor reaching 160 pixels
    with imageio.get_reader(str(path), format="FFMPEG") as reader:
        frame = reader.get_data(0).astype(int)
    assert frame[2 * 16 + 8, 7 * 16 + 8, 0] > 200 and frame[2 * 16 + 8, 7 * 16 + 8, 1:].max() < 60  # red cell
    assert frame[5 * 16 + 8, 5 * 16 + 8].max() < 30  # the rest stays black


def test_a_minatar_episode_is_recorded_in_colour_not_black():
    """MinAtar renders float frames in [0, 1]: recorded as uint8 0-255 (a cast alone would make every pixel 0)."""
    pytest.importorskip("minatar", reason="MinAtar needs the minatar extra: pip install -e '.[minatar]'")
    from lit_impala.envs.factory import action_space_spec, describe_env
    from lit_impala.learner import ImpalaModule

    facts = describe_env("MinAtar/Breakout-v1")
    network = ImpalaModule(list(facts.observation_shape), action_space_spec(facts.action_space),
                           encoder="minatar").network
    played = play_episodes(network, EpisodeSpec("MinAtar/Breakout-v1"), num_episodes=1, record_video=True,
                           max_video_frames=20)
    assert played.frames.dtype == np.uint8 and played.frames.shape[1:] == (10, 10, 3)
    assert played.frames.max() > 200  # the paddle, ball and bricks in colour (a plain cast: every pixel 0)


# --- bad arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_steps": 0}, "every_n_steps must be a PositiveInt, got 0"),
        ({"num_episodes": -2}, "num_episodes must be a PositiveInt, got -2"),
        ({"video_fps": 0}, "video_fps must be a PositiveInt, got 0"),
    ],
)
def test_callback_names_a_bad_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvaluationCallback(**kwargs)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_episodes must be >= 1, got 0"):
        play_episodes(agent(), CARTPOLE_EPISODES, num_episodes=0)
    with pytest.raises(ValueError, match=r"got shape \(4, 4\)"):
        write_video(np.zeros((4, 4), dtype=np.uint8), tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="fps must be >= 1, got 0"):
        write_video(np.zeros((1, 4, 4, 3), dtype=np.uint8), tmp_path / "bad.mp4", fps=0)


# --- the callback in a real fit -------------------------------------------------------------------------


def fit_with_evaluation(*extra):
    callbacks = [{"class_path": "lit_impala.callbacks.EvaluationCallback",
                  "init_args": {"every_n_steps": 10, "num_episodes": 2}}]
    cli = cli_main([
        "fit", "--config", CONFIG,
        "--trainer.max_steps=20",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        "--episode_stats.stop_at_return=null",
        "--data.num_actors=1",
        "--data.envs_per_actor=8",
        "--data.unroll_length=10",
        "--data.batch_size=4",
        *extra,
    ])
    (evaluation,) = [c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback)]
    return cli, evaluation


def check_history(evaluation, run_dir, printed):
    steps = [row["step"] for row in evaluation.history]
    # 10 may still be running at 20 (then the trigger at 20 is skipped); the end of training then stops it unfinished,
    # says so, and evaluates step 20.
    stopped = "Evaluation of step 10 stopped unfinished, not logged" in printed
    assert steps == ([20] if stopped else [10, 20]), (steps, printed)
    for row in evaluation.history:
        assert row["video_path"] == run_dir / "videos" / f"eval_step{row['step']:07d}.mp4"
        assert row["video_path"].read_bytes()[4:8] == b"ftyp"
        assert 1 <= row["length_mean"] <= 500 and row["return_mean"] == row["length_mean"]
    assert len(evaluation.last_result.returns) == 2 and evaluation.last_result.frames is None


def test_callback_logs_to_csv_and_writes_videos(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli, evaluation = fit_with_evaluation(
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"
    )
    assert cli.trainer.global_step == 20
    log_dir = tmp_path / "lightning_logs" / "version_0"
    check_history(evaluation, log_dir, capsys.readouterr().out)
    steps = [row["step"] for row in evaluation.history]
    with open(log_dir / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["eval/return_mean"]]
    assert [int(row["step"]) for row in rows] == steps
    for row in rows:
        assert float(row["eval/episodes"]) == 2 and float(row["eval/return_std"]) >= 0
    assert sorted(p.name for p in (log_dir / "videos").iterdir()) == [f"eval_step{step:07d}.mp4" for step in steps]


def test_callback_logs_to_offline_wandb_with_videos(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli, evaluation = fit_with_evaluation(
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.offline=true",
        "--trainer.logger.project=lit_impala",
        f"--trainer.logger.save_dir={tmp_path}",
    )
    run_files = Path(cli.trainer.logger.experiment.dir)
    check_history(evaluation, run_files, capsys.readouterr().out)
    steps = [row["step"] for row in evaluation.history]
    cli.trainer.logger.experiment.finish()  # flush: in a `fit` process, exiting does this
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert run_files.resolve() == (run_dir / "files").resolve()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # under CPU load wandb's service may write records after finish()
        history = read_history(run_dir)
        videos = [row for row in history if "eval/video/videos" in row]
        if len(videos) == len(steps):
            break
        time.sleep(0.5)
    scalars = [row for row in history if "eval/return_mean" in row]
    assert [row["trainer/global_step"] for row in scalars] == steps
    assert [row["trainer/global_step"] for row in videos] == steps
    logged = [row["eval/video/videos"][0]["path"] for row in videos]
    assert all(path.startswith("media/videos/eval/") and path.endswith(".mp4") for path in logged)
    for path in logged:  # wandb copies the mp4 into the run's media folder as it is
        assert (run_files / path).read_bytes()[4:8] == b"ftyp"


def test_the_test_command_prints_each_episode_and_records_the_first_ones(tmp_path):
    """Watching a trained agent: ``test`` with a checkpoint prints every episode's return and writes the first
    ``data.test_videos`` episodes as mp4 files, one frame after the reset and one per step."""
    from tests.cli_runner import run_lit_impala
    from tests.integration.test_checkpoint_formats import FORMAT_1  # a CartPole checkpoint at update 30

    run = run_lit_impala(["test", "--config", CONFIG, "--trainer.logger=false", "--data.test_episodes=3",
                          "--data.test_videos=2", "--data.eval_deterministic=false", f"--ckpt_path={FORMAT_1}"],
                         tmp_path)
    assert run.returncode == 0, run.tail()
    episodes = re.findall(r"Test episode (\d): return ([\d.]+), (\d+) steps(?:, video (\S+))?", run.stdout)
    assert [int(number) for number, *_ in episodes] == [1, 2, 3], run.tail()
    assert [bool(video) for *_, video in episodes] == [True, True, False]
    for _, episode_return, steps, video in episodes[:2]:
        assert float(episode_return) == int(steps)  # CartPole: +1 per step
        assert read_mp4(Path(video))[0] == int(steps) + 1, video
        assert Path(video).parent == tmp_path / "videos"
    assert "(sampled actions)" in run.stdout


def test_the_end_of_training_stops_an_evaluation_of_earlier_weights(tmp_path):
    """As typed: an evaluation still running when training ends is stopped unfinished with one line, not waited
    for; the final weights are evaluated and logged, and the process exits 0 with nothing left running. An
    evaluation of 1000 episodes (an untrained CartPole policy: ~10-50 steps each, seconds of play) started at step 10
    is still running two updates later, at the end."""
    from tests.cli_runner import assert_all_gone, run_lit_impala

    callbacks = [{"class_path": "lit_impala.callbacks.EvaluationCallback",
                  "init_args": {"every_n_steps": 10, "num_episodes": 1000, "record_video": False}}]
    run = run_lit_impala(["fit", "--config", CONFIG, "--trainer.max_steps=12", "--trainer.enable_checkpointing=false",
                          "--trainer.enable_progress_bar=false", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                          f"--trainer.logger.save_dir={tmp_path}", f"--trainer.callbacks={json.dumps(callbacks)}",
                          "--episode_stats.stop_at_return=null", "--data.envs_per_actor=8"], tmp_path, timeout_s=300)
    assert run.returncode == 0, run.tail()
    assert "Evaluation of step 10 stopped unfinished, not logged: training ended, the final weights are evaluated " \
           "instead" in run.stdout, run.tail()
    assert "Traceback" not in run.output
    assert_all_gone(run.descendants)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["eval/return_mean"]]
    assert [(int(row["step"]), float(row["eval/episodes"])) for row in rows] == [(12, 1000.0)]
