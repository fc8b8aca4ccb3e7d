"""Checkpoints of earlier formats still resume and test; a format from the future is refused by name.

``tests/data/format1_cartpole_step30.ckpt`` was written by lit_impala 0.1 (format 1: progress under
``"impala"``, stop_at_return / return_window / sync_every / test_deterministic among the model's
hyper-parameters): 30 updates of configs/cartpole.yaml with 1 actor x 8 envs, 19,200 env frames, its
W&B run id ``0dca3mws``.
"""

import re
import shutil

import torch

from tests.cli_runner import run_lit_impala
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")
FORMAT_1 = REPO / "tests" / "data" / "format1_cartpole_step30.ckpt"
SMALL = ["--data.num_actors=1", "--data.envs_per_actor=8", "--episode_stats.stop_at_return=null"]


def test_a_format_1_checkpoint_resumes_and_continues_its_wandb_run(tmp_path):
    checkpoint = tmp_path / "old.ckpt"
    shutil.copy(FORMAT_1, checkpoint)
    callbacks = '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "ckpt"}}]'
    run = run_lit_impala(["fit", "--config", CONFIG, *SMALL, "--trainer.max_steps=33", f"--ckpt_path={checkpoint}",
                          "--trainer.callbacks=" + callbacks], tmp_path)
    assert run.returncode == 0, run.tail()
    # 30 updates and 19,200 frames from the checkpoint, then 3 updates of 640 frames; its 100 episodes kept
    assert "Training stopped after 33 updates and 21120 env frames; mean return of the last 100 episodes" in run.stdout
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*-0dca3mws")), "the W&B run did not continue"


def test_a_format_1_checkpoint_is_tested(tmp_path):
    run = run_lit_impala(["test", "--config", CONFIG, "--trainer.logger=false", "--data.test_episodes=3",
                          f"--ckpt_path={FORMAT_1}"], tmp_path)
    assert run.returncode == 0, run.tail()
    assert re.search(r"Test: mean return [\d.]+ \+- [\d.]+ \(std\) over 3 episodes \(deterministic actions\), "
                     r"weights of update 30\.", run.stdout), run.tail()


def test_a_checkpoint_of_a_later_format_is_refused_by_name(tmp_path):
    checkpoint = torch.load(FORMAT_1, map_location="cpu", weights_only=False)
    checkpoint["lit_impala"] = {"format": 99}
    path = tmp_path / "future.ckpt"
    torch.save(checkpoint, path)
    run = run_lit_impala(["fit", "--config", CONFIG, *SMALL, f"--ckpt_path={path}"], tmp_path)
    assert run.returncode == 2, run.tail()
    assert f"error: checkpoint '{path}' has format 99; this version of lit_impala reads formats 1 to 2" in run.stderr
    assert run.spawned_actors == 0


def test_a_checkpoint_is_read_once_per_command(tmp_path, monkeypatch):
    """Its hyper-parameters, its W&B run, the check that it fits, Lightning's restore: all from one read."""
    from lit_impala.cli import cli_main

    monkeypatch.chdir(tmp_path)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, *args, **kwargs: reads.append(str(path)) or real_load(
        path, *args, **kwargs))
    cli = cli_main(["test", "--config", CONFIG, "--trainer.logger=false", "--data.test_episodes=2",
                    f"--ckpt_path={FORMAT_1}"])
    assert cli.model.checkpoint_step == 30  # the weights of that checkpoint were tested
    assert reads == [str(FORMAT_1)]
