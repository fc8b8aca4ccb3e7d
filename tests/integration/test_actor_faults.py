"""Actor faults, really caused: an actor process killed mid-run, an env that raises in step."""

import json
import os
import time

import lightning as L
import psutil
import pytest

from lit_impala.cli import cli_main
from tests.cli_runner import is_actor_process
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")


def spawned_children() -> list[psutil.Process]:
    return [p for p in psutil.Process(os.getpid()).children(recursive=True) if is_actor_process(p)]


class KillOneActor(L.Callback):
    """SIGKILLs one actor process at update ``at_step`` (once), and remembers which."""

    killed_pid: int | None = None

    def __init__(self, at_step: int = 5):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step and KillOneActor.killed_pid is None:
            victim = spawned_children()[0]
            KillOneActor.killed_pid = victim.pid
            victim.kill()


def run_args(tmp_path, *extra, callbacks=()):
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_on_exception": True}}
    return ["fit", "--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=" + json.dumps([checkpoint, *callbacks]), "--episode_stats.stop_at_return=null",
            "--data.envs_per_actor=8", *extra]


@pytest.mark.parametrize("inference", ["actor", "server"])
def test_a_killed_actor_is_restarted_and_training_goes_on(tmp_path, monkeypatch, caplog, inference):
    monkeypatch.chdir(tmp_path)
    KillOneActor.killed_pid = None
    cli = cli_main(
        run_args(
            tmp_path,
            "--trainer.max_steps=25",
            f"--data.inference={inference}",
            callbacks=[{"class_path": "tests.integration.test_actor_faults.KillOneActor", "init_args": {"at_step": 5}}],
        )
    )
    assert KillOneActor.killed_pid is not None
    assert cli.trainer.global_step == 25  # training went on to the end
    assert cli.datamodule.actor_restarts == 1
    assert "restarting the actors (1 of 3) within 3600 s" in caplog.text
    assert (
        not psutil.pid_exists(KillOneActor.killed_pid)
        or psutil.Process(KillOneActor.killed_pid).status() == psutil.STATUS_ZOMBIE
    )
    assert not spawned_children()


def test_an_env_that_keeps_raising_stops_the_run_with_its_traceback_and_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        cli_main(run_args(tmp_path, "--trainer.max_steps=100000", "--data.env_id=tests.faulty_envs:FaultyCartPole-v0",
                          "--data.max_actor_restarts=1"))
    message = str(error.value)
    assert "'tests.faulty_envs:FaultyCartPole-v0' failed again after 1 restarts within 3600 s" in message
    assert "(data.max_actor_restarts=1, data.actor_restart_window_s=3600.0)" in message
    assert "boom: FaultyCartPole failed at step 300" in message  # the env's own traceback
    assert "Traceback" in message and "faulty_envs.py" in message
    assert time.monotonic() - start < 120  # no hang
    assert list((tmp_path / "ckpt").glob("*.ckpt")), "a checkpoint is written before stopping"
    assert not spawned_children()
