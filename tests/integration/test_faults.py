"""Faults that must never hang a run, orphan a process or reach the actors' weights."""

import json
import os

import lightning as L
import psutil
import pytest
import torch

from lit_impala.cli import cli_main
from lit_impala.data import ImpalaDataModule
from lit_impala.learner import ImpalaModule
from tests.cli_runner import is_actor_process
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")


class InitialWeights(L.Callback):
    """Keeps a copy of the weights training started from (class attribute: the CLI builds the instance)."""

    weights: dict = {}

    def on_train_start(self, trainer, pl_module):
        InitialWeights.weights = {k: v.detach().clone() for k, v in pl_module.network.state_dict().items()}


def spawned_children() -> list[psutil.Process]:
    return [p for p in psutil.Process(os.getpid()).children(recursive=True) if is_actor_process(p)]


def test_nonfinite_updates_are_skipped_then_stop_the_run_with_the_last_finite_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_on_exception": True}},
        {"class_path": "tests.integration.test_faults.InitialWeights"},
    ]
    with pytest.raises(
        RuntimeError, match=r"3 updates in a row had a non-finite loss \(model.max_nonfinite_updates=3\)"
    ):
        cli_main([
            "fit", "--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=" + json.dumps(callbacks), "--data.envs_per_actor=8",
            "--model.reward_scale=1e39",  # overflows float32: every return, value target and loss is inf / nan
            "--model.max_nonfinite_updates=3",
        ])
    # The checkpoint written on the error holds exactly the weights training started from: no
    # non-finite update ever reached them (and so never reached the actors, who only get these).
    checkpoint = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), map_location="cpu", weights_only=False)
    saved = {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items()}
    assert saved.keys() == InitialWeights.weights.keys()
    for name, value in InitialWeights.weights.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert checkpoint["global_step"] == 2  # two skipped updates counted; the third raised before completing
    assert not spawned_children(), "actor processes left behind"


class SometimesNonFinite(ImpalaModule):
    """Every ``every``-th update's gradient is NaN (the loss it reports is finite)."""

    def __init__(self, every: int, **kwargs):
        super().__init__(**kwargs)
        self.every = every

    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        if (self.global_step + 1) % self.every == 0:
            output["loss"] = output["loss"] * float("nan")
        return output


def test_a_few_nonfinite_updates_are_skipped_and_counted(tmp_path):
    data = ImpalaDataModule(env_id="CartPole-v1", num_actors=1, envs_per_actor=8, seed=0)
    model = SometimesNonFinite(every=4, observation_shape=data.observation_shape, action_space=data.action_space)
    trainer = L.Trainer(
        max_steps=12,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    assert trainer.global_step == 12
    assert model.nonfinite_updates == 3  # updates 4, 8 and 12: skipped, and training went on
    assert all(torch.isfinite(p).all() for p in model.network.parameters())
    assert not spawned_children()


@pytest.mark.parametrize("inference", ["actor", "server"])
def test_actors_exit_when_the_learner_is_killed(tmp_path, inference):
    """SIGKILL leaves the learner no chance to shut its actors down: they must notice by themselves."""
    import signal
    import subprocess
    import sys
    import time

    command = [
        sys.executable,
        "-m",
        "lit_impala",
        "fit",
        "--config",
        CONFIG,
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=null",
        "--episode_stats.stop_at_return=null",
        "--data.envs_per_actor=8",
        f"--data.inference={inference}",
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        actors: list[psutil.Process] = []
        while len(actors) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "the actors never started"
            actors = [p for p in psutil.Process(process.pid).children(recursive=True) if is_actor_process(p)]
            time.sleep(0.2)
        time.sleep(3.0)  # training under way
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        killed = time.monotonic()
        gone, alive = psutil.wait_procs(actors, timeout=10)
        assert not alive, f"actors still alive 10 s after the learner was killed: {[p.pid for p in alive]}"
        assert time.monotonic() - killed < 10
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
