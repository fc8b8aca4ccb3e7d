"""Data-parallel learners through Lightning DDP on CPU (gloo): 2 ranks, each with its own actors; every
shipped config, with its own callbacks, starts and ends cleanly on 2 ranks."""

import hashlib
import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest
import yaml

from lit_impala.callbacks import EpisodeStats
from lit_impala.checkpoint_io import read_checkpoint
from tests.cli_runner import assert_all_gone, run_lit_impala
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole_ddp.yaml")


class RankReport(L.Callback):
    """Writes, per rank, what the test compares: a digest of the final weights and of the first
    observations this rank's actors produced."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.first_observations = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_observations is None:
            self.first_observations = batch.observation.numpy().tobytes()  # the time-major Trajectory

    def on_train_end(self, trainer, pl_module):
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.network.parameters())
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "weights": hashlib.sha256(weights).hexdigest(),
            "first_observations": hashlib.sha256(self.first_observations).hexdigest(),
            "local_env_frames": EpisodeStats.of(trainer).env_frames,
            "local_episodes": len(EpisodeStats.of(trainer).episode_returns),
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)


@pytest.mark.slow
def test_two_cpu_ranks_learn_cartpole_with_identical_weights(tmp_path):
    callbacks = [
        {"class_path": "tests.integration.test_ddp.RankReport", "init_args": {"out_dir": str(tmp_path)}},
        # rank 0 evaluates in a background thread while both ranks train on
        {"class_path": "lit_impala.callbacks.EvaluationCallback",
         "init_args": {"every_n_steps": 50, "num_episodes": 2, "record_video": False}},
    ]
    command = [
        sys.executable, "-m", "lit_impala", "fit", "--config", CONFIG,
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=" + json.dumps(callbacks),
        "--trainer.max_steps=1500", "--episode_stats.stop_at_return=195", "--data.envs_per_actor=32",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in reports)
    # Same number of updates on both ranks (no hang, no early exit of one), identical weights (DDP).
    assert reports[0]["global_step"] == reports[1]["global_step"] < 1500, output[-3000:]
    assert reports[0]["weights"] == reports[1]["weights"]
    # Each rank's actors are seeded per rank: their episodes differ.
    assert reports[0]["first_observations"] != reports[1]["first_observations"]
    # Stopped because the mean return over both ranks' last 100 episodes reached 195; frames are the sum.
    reached = [line for line in completed.stdout.splitlines() if line.startswith("Reached a mean return")]
    assert len(reached) == 1, output[-3000:]  # printed once, by rank 0
    found = re.match(r"Reached a mean return of ([\d.]+) .* after (\d+) env frames", reached[0])
    assert found and float(found[1]) >= 195, reached[0]
    assert int(found[2]) == sum(r["local_env_frames"] for r in reports)
    stopped = re.search(r"Training stopped after (\d+) updates and (\d+) env frames", completed.stdout)
    assert stopped and int(stopped[2]) == sum(r["local_env_frames"] for r in reports), output[-3000:]


def shipped_configs() -> list[str]:
    """Every config as a user gives it: each is whole (a family config with its callbacks; no per-env overlays)."""
    configs = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert "callbacks" in (yaml.safe_load(path.read_text()).get("trainer") or {}), f"{path.name} is not whole"
        configs.append(path.name)
    return configs


SHIPPED_CONFIGS = shipped_configs()
TWO_CPU_RANKS = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
TINY = ["--data.num_actors=1", "--data.envs_per_actor=2", "--data.unroll_length=5", "--data.batch_size=2"]


def shipped_callbacks(config: str) -> dict[str, dict]:
    callbacks = yaml.safe_load((REPO / "configs" / config).read_text())["trainer"]["callbacks"]
    return {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in callbacks}


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_shipped_config_with_its_callbacks_ends_cleanly_on_two_ranks(config, tmp_path):
    """Evaluation (with video), checkpoints and W&B offline, as shipped: no rank may wait on another at the end."""
    given = ["--config", str(REPO / "configs" / config)]
    # A tiny batch, but split as the config splits it (mujoco.yaml: 8 minibatches of whole unrolls).
    data = yaml.safe_load((REPO / "configs" / config).read_text()).get("data") or {}
    minibatches = data.get("minibatches_per_pass", 1)
    tiny = [*TINY, f"--data.batch_size={max(2, minibatches)}"]
    run = run_lit_impala(["fit", *given, *TWO_CPU_RANKS, "--trainer.max_steps=3", *tiny], tmp_path, timeout_s=240)
    assert run.returncode == 0, run.tail()
    assert run.wall_s < 120, f"{run.wall_s:.0f} s"
    assert "Training stopped after 3 updates" in run.stdout, run.tail()
    assert "Traceback" not in run.output, run.tail()
    assert_all_gone(run.descendants)
    callbacks = shipped_callbacks(config)
    checkpoints = tmp_path / callbacks["ModelCheckpoint"]["dirpath"]
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt"], sorted(checkpoints.iterdir())
    # Tensors and plain data only: it loads without unpickling anything (what --ckpt_path does by default).
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 3
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*")), "W&B offline run missing"
    if "EvaluationCallback" in callbacks and callbacks["EvaluationCallback"].get("record_video", True):
        # the final weights, evaluated by rank 0 after the last collective
        assert list(tmp_path.rglob("eval_step0000003.mp4")), "no evaluation video of the final weights"


@pytest.mark.slow
def test_ctrl_c_under_ddp_with_the_shipped_config_stops_every_rank(tmp_path):
    run = run_lit_impala(["fit", "--config", str(REPO / "configs" / "cartpole.yaml"), *TWO_CPU_RANKS,
                          "--trainer.max_steps=100000", "--episode_stats.stop_at_return=null", *TINY],
                         tmp_path, timeout_s=240, interrupt_after_s=15)
    assert run.returncode == 130, run.tail()
    assert run.interrupted_after_s is not None and run.interrupted_after_s < 30, run.tail()
    assert "SIGINT: stopping after this update" in run.stderr, run.tail()
    assert (tmp_path / "runs" / "checkpoints" / "cartpole" / "last.ckpt").is_file()
    assert not list(tmp_path.rglob("eval_step*.mp4")), "an interrupted run skips the final evaluation"
    assert_all_gone(run.descendants)


@pytest.mark.slow
def test_ctrl_c_while_the_ranks_start_still_stops_every_rank_after_one_update(tmp_path):
    """Ctrl-C reaches every process of the group: a rank or an actor still importing used to die of it, and
    Lightning's launcher then SIGKILLed every rank (exit -9, no checkpoint). Here it lands as soon as the
    first child process exists, long before the first update."""
    run = run_lit_impala(["fit", "--config", str(REPO / "configs" / "cartpole.yaml"), *TWO_CPU_RANKS,
                          "--trainer.max_steps=100000", "--episode_stats.stop_at_return=null", *TINY],
                         tmp_path, timeout_s=240, interrupt_after_s=0)
    assert run.returncode == 130, run.tail()
    assert "Traceback" not in run.stderr, run.tail()
    assert "SIGINT: stopping after this update" in run.stderr, run.tail()
    assert (tmp_path / "runs" / "checkpoints" / "cartpole" / "last.ckpt").is_file()
    assert_all_gone(run.descendants)


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_ranks_start_stops_at_once(tmp_path):
    run = run_lit_impala(["fit", "--config", str(REPO / "configs" / "cartpole.yaml"), *TWO_CPU_RANKS,
                          "--trainer.max_steps=100000", "--episode_stats.stop_at_return=null", *TINY],
                         tmp_path, timeout_s=240, interrupt_after_s=3, interrupt_times=2)
    assert run.returncode != 0, run.tail()
    assert run.interrupted_after_s is not None and run.interrupted_after_s < 20, run.tail()
    assert_all_gone(run.descendants)


@pytest.mark.slow
def test_shipped_callbacks_with_a_csv_logger_end_cleanly_on_two_ranks(tmp_path):
    """Without W&B the run directory came from Trainer.log_dir, a broadcast, called by rank 0 alone: this hung."""
    run = run_lit_impala(["fit", "--config", str(REPO / "configs" / "cartpole.yaml"), *TWO_CPU_RANKS,
                          "--trainer.max_steps=3", *TINY, "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                          f"--trainer.logger.save_dir={tmp_path / 'csv'}"], tmp_path, timeout_s=240)
    assert run.returncode == 0, run.tail()
    assert list((tmp_path / "csv").rglob("videos/eval_step0000003.mp4")), run.tail()
    assert_all_gone(run.descendants)
