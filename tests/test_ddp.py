"""Data-parallel learners through Lightning DDP on CPU (gloo): 2 ranks, each with its own actors."""

import hashlib
import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest

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
            self.first_observations = batch["observation"].numpy().tobytes()

    def on_train_end(self, trainer, pl_module):
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.network.parameters())
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "weights": hashlib.sha256(weights).hexdigest(),
            "first_observations": hashlib.sha256(self.first_observations).hexdigest(),
            "local_env_frames": pl_module.env_frames,
            "local_episodes": len(pl_module.episode_returns),
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)


@pytest.mark.slow
def test_two_cpu_ranks_learn_cartpole_with_identical_weights(tmp_path):
    callbacks = [{"class_path": "tests.test_ddp.RankReport", "init_args": {"out_dir": str(tmp_path)}}]
    command = [
        sys.executable, "-m", "lit_impala", "fit", "--config", CONFIG,
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=" + json.dumps(callbacks),
        "--trainer.max_steps=1500", "--model.stop_at_return=195", "--data.envs_per_actor=32",
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
