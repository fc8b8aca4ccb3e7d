"""What a run shows: every metric of the off-policy picture reaches W&B and TensorBoard alike, with
histograms, an evaluation video, and frames / frames/s / return in the progress bar."""

import json
import time

import pytest

from lit_impala.cli import cli_main
from lit_impala.wandb_history import read_history
from tests.conftest import REPO
from tests.unit.test_docs import documented_metrics

CONFIG = str(REPO / "configs" / "cartpole.yaml")

# Everything the learner logs (issue: metrics that explain off-policy learning).
SCALARS = [
    "progress/env_frames", "progress/frames_per_second", "progress/updates_per_second",
    "episode/return", "episode/length",
    "policy_lag/mean", "policy_lag/max",
    "rho/mean", "rho/min", "rho/max", "rho/ess",
    "rho/clipped_by_rho_bar", "rho/clipped_by_c_bar", "rho/clipped_by_pg_rho_bar",
    "loss/total", "loss/policy", "loss/baseline", "loss/entropy", "train/entropy", "train/value_mean",
    "train/grad_norm", "train/lr", "progress/data_wait_fraction",
    "eval/return_mean", "eval/return_std", "eval/length_mean", "eval/episodes",
]
HISTOGRAMS = ["episode/return_hist", "episode/length_hist"]


def run(tmp_path, *logger_args):
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True}},
        {"class_path": "lit_impala.callbacks.EvaluationCallback",
         "init_args": {"every_n_steps": 10, "num_episodes": 2, "record_video": True}},
    ]
    return cli_main([
        "fit", "--config", CONFIG, *logger_args,
        "--trainer.max_steps=30", "--trainer.log_every_n_steps=5", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=" + json.dumps(callbacks),
        "--episode_stats.stop_at_return=null", "--data.envs_per_actor=8",
    ])


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)


def wandb_keys(tmp_path) -> tuple[set[str], list[dict], object]:
    cli = run(tmp_path, f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb_runs'}")
    assert {"frames", "fps", "return"} <= set(cli.trainer.progress_bar_metrics), cli.trainer.progress_bar_metrics
    cli.trainer.logger.experiment.finish()
    run_dir = next((tmp_path / "wandb_runs" / "wandb").glob("offline-run-*"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # under CPU load wandb may write records after finish() returns
        history = read_history(run_dir)
        keys = set().union(*history) if history else set()
        if "eval/video/_type" in keys and "eval/return_mean" in keys:
            break
        time.sleep(0.5)
    return keys, history, run_dir


def test_wandb_history_has_every_metric_histograms_and_an_eval_video(tmp_path):
    keys, history, run_dir = wandb_keys(tmp_path)
    missing = [k for k in SCALARS if k not in keys]
    assert not missing, f"missing from the W&B history: {missing}; logged: {sorted(keys)}"
    # Every name the run logged is in README.md#seeing-what-the-agent-does (tests/unit/test_docs.py: the other way).
    media = {k.removesuffix("/_type") for k in keys if k.endswith("/_type")}  # a histogram or video: name/_type, ...
    logged = {k for k in keys if not k.startswith("_") and not any(k.startswith(m + "/") for m in media)} | media
    undocumented = logged - documented_metrics() - {"trainer/global_step", "epoch"}  # W&B's and Lightning's own
    assert not undocumented, f"logged but not in README.md#seeing-what-the-agent-does: {sorted(undocumented)}"
    for name in HISTOGRAMS:
        types = [row[f"{name}/_type"] for row in history if f"{name}/_type" in row]
        assert types and types[0] == "histogram", name
    videos = [row for row in history if row.get("eval/video/_type")]
    assert videos, "no eval/video in the W&B history"
    assert list((run_dir / "files" / "media" / "videos").rglob("*.mp4")), "the eval video was not stored in the run"
    # The values mean something: fractions are fractions, the lag is non-negative, ESS in (0, 1].
    rows = {k: [row[k] for row in history if k in row] for k in SCALARS}
    assert all(0 < v <= 1 + 1e-6 for v in rows["rho/ess"])
    assert all(0 <= v <= 1 for k in SCALARS if k.startswith("rho/clipped") for v in rows[k])
    assert all(0 <= v <= 1 for v in rows["progress/data_wait_fraction"])
    assert all(v >= 0 for v in rows["policy_lag/max"])
    assert max(rows["progress/env_frames"]) == 30 * 20 * 32


def test_tensorboard_gets_the_same_scalars(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="reading TensorBoard logs needs tensorboard"
    )
    run(tmp_path, "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path / 'tb'}")
    event_dirs = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    assert len(event_dirs) == 1
    event_dir = event_dirs.pop()
    accumulator = event_accumulator.EventAccumulator(str(event_dir), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    missing = [k for k in SCALARS if k not in scalars]
    assert not missing, f"missing from the TensorBoard events: {missing}; logged: {sorted(scalars)}"
    assert set(HISTOGRAMS) <= set(accumulator.Tags()["histograms"])
    assert list((event_dir / "videos").glob("eval_step*.mp4")), "the eval video is saved next to the run"
