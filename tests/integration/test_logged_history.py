"""What a run leaves behind, read the way a user reads it: the logged history ends where the run ended,
no return is logged before an episode has finished, and a run written to a file leaves a small log
that still shows progress."""

import csv
import re
import time

import pytest

from lit_impala.wandb_history import read_history
from tests.cli_runner import assert_all_gone, run_lit_impala
from tests.conftest import REPO

CARTPOLE = str(REPO / "configs" / "cartpole.yaml")
PENDULUM = str(REPO / "configs" / "pendulum.yaml")
SMALL = ["--data.num_actors=1", "--data.envs_per_actor=16"]


def csv_rows(directory) -> list[dict]:
    (metrics,) = directory.rglob("metrics.csv")
    return list(csv.DictReader(metrics.open()))


def wandb_returns(run_dir, within_s: float = 60.0) -> list[float]:
    """``episode/return`` rows of an offline W&B run; wandb's service may finish writing after the CLI exited."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            history = read_history(run_dir)
            if history or time.monotonic() > deadline:
                return [row["episode/return"] for row in history if "episode/return" in row]
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def reached(stdout: str) -> float:
    found = re.search(r"Reached a mean return of (-?[\d.]+) over the last", stdout)
    assert found, stdout[-3000:]
    return float(found[1])


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_a_run_stopped_by_stop_at_return_logs_the_stop_value_last(tmp_path, logger):
    # log_every_n_steps=7: the stop falls between two regular logging points (unless by chance on one)
    args = ["fit", "--config", CARTPOLE, "--episode_stats.stop_at_return=35", "--episode_stats.return_window=20",
            "--trainer.log_every_n_steps=7", *SMALL]
    if logger == "csv":
        args += [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path / 'csv'}",
        ]
    run = run_lit_impala(args, tmp_path)
    assert run.returncode == 0, run.tail()
    stop_value = reached(run.stdout)
    if logger == "csv":
        returns = [float(row["episode/return"]) for row in csv_rows(tmp_path / "csv") if row.get("episode/return")]
    else:
        (run_dir,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
        returns = wandb_returns(run_dir)
    assert returns, "no episode/return in the history"
    # the console prints the float64 mean to one decimal; the logger holds it as float32
    assert abs(returns[-1] - stop_value) <= 0.05 + 1e-4, f"last logged {returns[-1]}, stopped at {stop_value}"
    assert max(returns) == returns[-1] >= 35


def test_no_return_before_an_episode_ends_and_the_last_update_is_logged(tmp_path):
    # Pendulum episodes last 200 steps: none ends within 13 updates of 8 unrolls of 20 steps from 2 x 16 envs.
    run = run_lit_impala(["fit", "--config", PENDULUM, "--trainer.max_steps=13", "--trainer.log_every_n_steps=5",
                          "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                          f"--trainer.logger.save_dir={tmp_path / 'csv'}", "--trainer.callbacks=null"], tmp_path)
    assert run.returncode == 0, run.tail()
    assert "mean return of the last 0 episodes: none finished" in run.stdout, run.tail()
    rows = csv_rows(tmp_path / "csv")
    logged_steps = sorted({int(row["step"]) for row in rows if row.get("progress/env_frames")})
    assert logged_steps == [4, 9, 12], logged_steps  # every 5 updates, and the 13th (the last) too
    for key in ("episode/return", "return", "episode/length"):
        assert not any(row.get(key) for row in rows), f"{key} logged before any episode finished"
    last = next(row for row in rows if row.get("progress/env_frames") and int(row["step"]) == 12)
    assert float(last["progress/env_frames"]) == 13 * 8 * 20 and last["loss/total"], last
    # wall seconds of training, for curves against time (benchmarks.learning): rising from the first row
    seconds = [float(row["progress/train_s"]) for row in rows if row.get("progress/train_s")]
    assert len(seconds) == 3 and 0 < seconds[0] < seconds[1] < seconds[2] < 600, seconds


@pytest.mark.slow
def test_a_cartpole_run_written_to_a_file_leaves_a_small_log_that_shows_progress(tmp_path):
    """`python -m lit_impala fit --config configs/cartpole.yaml > log.txt 2>&1`: the shipped run, as shipped."""
    run = run_lit_impala(["fit", "--config", CARTPOLE], tmp_path, timeout_s=600, fresh=True)
    assert run.returncode == 0, run.tail()
    log = run.output
    assert len(log.encode()) <= 10_000, f"{len(log.encode())} bytes:\n{log[:3000]}"
    assert "\r" not in log, "carriage-return redraws in a log file"
    assert reached(run.stdout) >= 475
    assert "training: up to 782 updates" in run.stdout
    progress = re.findall(r"^update (\d+)/782 \(\d+%\) \| [\d,]+ env frames \| [\d.]+K? frames/s \| return [\d.]+",
                          run.stdout, flags=re.MULTILINE)
    assert progress, run.stdout
    stopped = re.search(r"Training stopped after (\d+) updates", run.stdout)
    assert stopped and int(progress[-1]) == int(stopped[1])  # the last progress line is the final update
    for noise in ("litlogger", "LeafSpec", "anonymous setting", "git root"):
        assert noise not in log, f"start-up noise: {noise}"
    assert_all_gone(run.descendants)
