"""Checkpoints and resume: Ctrl-C ends a run after its current update with a consistent ``last.ckpt``,
``fit --ckpt_path last`` continues from it exactly, and ``test`` evaluates a checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import psutil
import pytest
import torch

from lit_impala.callbacks import EpisodeStats
from lit_impala.cli import cli_main
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")
FRAMES_PER_UPDATE = 20 * 32  # unroll_length x batch_size in cartpole.yaml
MAX_STEPS = 600  # the same in both runs: the LR schedule decays over it


class ResumeProbe(L.Callback):
    """Records the state a resumed run starts from, then stops it after ``steps`` updates."""

    def __init__(self, steps: int = 10):
        self.steps = steps
        self.start = None
        self.first_batch_min_version = None

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.start = {
            "global_step": trainer.global_step,
            "env_frames": EpisodeStats.of(trainer).env_frames,
            "lr": optimizer.param_groups[0]["lr"],
            "optimizer_state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                                for k, s in optimizer.state_dict()["state"].items()},
            "episode_returns": list(EpisodeStats.of(trainer).episode_returns),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_batch_min_version is None:
            self.first_batch_min_version = int(batch.policy_version.min())  # a time-major Trajectory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.start["global_step"] + self.steps:
            trainer.should_stop = True


def callbacks_arg(ckpt_dir, *extra) -> str:
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 20, "save_last": True}}
    return "--trainer.callbacks=" + json.dumps([checkpoint, *extra])


def common_args(ckpt_dir, *extra_callbacks) -> list[str]:
    return ["--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            callbacks_arg(ckpt_dir, *extra_callbacks), "--episode_stats.stop_at_return=null",
            f"--trainer.max_steps={MAX_STEPS}", "--data.envs_per_actor=16"]


def interrupt_run(tmp_path, ckpt_dir, signals=(("group", signal.SIGINT),)) -> tuple[int, str, float, list[int]]:
    """Start a fit; once the first periodic checkpoint exists, send ``signals`` (each to the whole
    process group, as Ctrl-C in a terminal does, or to the learner only)."""
    log_path = tmp_path / "run1.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "lit_impala", "fit", *common_args(ckpt_dir)], cwd=tmp_path,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
        children: set[int] = set()
        deadline = time.monotonic() + 240
        try:
            while not (ckpt_dir / "last.ckpt").exists():
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "no checkpoint written in time"
                children.update(c.pid for c in psutil.Process(process.pid).children(recursive=True))
                time.sleep(0.1)
            time.sleep(1.0)  # a few more updates past the periodic save
            children.update(c.pid for c in psutil.Process(process.pid).children(recursive=True))
            interrupted = time.monotonic()
            for target, signum in signals:
                if target == "group":
                    os.killpg(process.pid, signum)
                else:
                    process.send_signal(signum)
                time.sleep(0.05)
            code = process.wait(timeout=30)
            exit_s = time.monotonic() - interrupted
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    return code, log_path.read_text(), exit_s, sorted(children)


@pytest.mark.slow
def test_ctrl_c_then_resume_continues_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    code, output, exit_s, children = interrupt_run(tmp_path, ckpt_dir)

    # 1. Ctrl-C: the update in flight completes, then a clean stop within 15 s, no actor left behind.
    assert code == 128 + signal.SIGINT, output
    assert exit_s < 15, f"took {exit_s:.1f} s to stop after SIGINT\n{output}"
    assert children, "actor processes should have been running"
    time.sleep(1.0)
    alive = [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"actor processes left: {alive}"
    stopped = re.search(r"Training stopped after (\d+) updates and (\d+) env frames", output)
    assert stopped, output

    # 2. last.ckpt holds that final update, and its counts belong together.
    checkpoint = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert not list(ckpt_dir.glob("last-v*.ckpt")), "FinalCheckpoint refreshes last.ckpt, never a second copy"
    step, frames = checkpoint["global_step"], checkpoint["callbacks"]["EpisodeStats"]["env_frames"]
    assert (step, frames) == (int(stopped[1]), int(stopped[2]))
    assert step > 20 and frames == step * FRAMES_PER_UPDATE
    saved_lr = checkpoint["lr_schedulers"][0]["_last_lr"][0]
    assert saved_lr == pytest.approx(0.002 * (1 - step / MAX_STEPS))

    # 3. Resume: everything continues from the checkpoint, nothing restarts from scratch.
    probe_spec = {"class_path": "tests.integration.test_resume.ResumeProbe", "init_args": {"steps": 10}}
    cli = cli_main(["fit", *common_args(ckpt_dir, probe_spec), "--ckpt_path=last"])
    probe = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ResumeProbe))
    assert probe.start["global_step"] == step
    assert probe.start["env_frames"] == frames
    assert probe.start["lr"] == pytest.approx(saved_lr)
    assert probe.start["episode_returns"] == checkpoint["callbacks"]["EpisodeStats"]["episode_returns"]
    saved_state = checkpoint["optimizer_states"][0]["state"]
    assert saved_state.keys() == probe.start["optimizer_state"].keys()
    for index, state in saved_state.items():
        for name, value in state.items():
            torch.testing.assert_close(probe.start["optimizer_state"][index][name], value, rtol=0, atol=0)
    # The actors started from the restored weights, tagged with the restored update count.
    assert probe.first_batch_min_version >= step
    assert cli.trainer.global_step == step + 10
    assert EpisodeStats.of(cli.trainer).env_frames == frames + 10 * FRAMES_PER_UPDATE


@pytest.mark.slow
def test_test_subcommand_evaluates_a_trained_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    args = ["--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            callbacks_arg(ckpt_dir)]
    fit = cli_main(["fit", *args])
    assert EpisodeStats.of(fit.trainer).mean_return >= 475  # stopped by stop_at_return
    capsys.readouterr()
    cli_main(["test", *args, "--ckpt_path", str(ckpt_dir / "last.ckpt"), "--data.test_episodes=20"])
    printed = capsys.readouterr().out
    found = re.search(r"Test: mean return ([\d.]+) \+- ([\d.]+) \(std\) over 20 episodes", printed)
    assert found, printed
    # The run stopped at a mean return of 475 over its sampled episodes; argmax actions of the same weights
    # score 340-500 depending on the run (the actors' timing makes each run's weights differ). A random
    # or untrained policy scores ~10-25.
    assert float(found[1]) >= 250, printed


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals, exit_code",
    [((("learner", signal.SIGTERM),), 128 + signal.SIGTERM),  # a scheduler's stop: to the learner only
     ((("group", signal.SIGINT), ("group", signal.SIGINT)), None)],  # Ctrl-C twice: out at once
    ids=["sigterm", "ctrl-c-twice"],
)
def test_sigterm_and_a_second_ctrl_c_stop_cleanly(tmp_path, signals, exit_code):
    ckpt_dir = tmp_path / "checkpoints"
    code, output, exit_s, children = interrupt_run(tmp_path, ckpt_dir, signals)
    assert exit_s < 15, f"took {exit_s:.1f} s to stop\n{output}"
    if exit_code is not None:
        assert code == exit_code, output
        checkpoint = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["callbacks"]["EpisodeStats"]["env_frames"] == checkpoint["global_step"] * FRAMES_PER_UPDATE
    else:
        assert code != 0, output
    _, alive = psutil.wait_procs([psutil.Process(p) for p in children if psutil.pid_exists(p)], timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "processes left behind"


def _logged(csv_dir, name: str) -> dict[int, float]:
    """``name`` by step, as the CSVLogger wrote it."""
    import csv

    (metrics,) = list(csv_dir.rglob("metrics.csv"))
    with open(metrics) as file:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(file) if row.get(name)}


def _logged_lr(csv_dir) -> dict[int, float]:
    """``lr`` by step, as LearningRateMonitor logged it (the rate each update used)."""
    return _logged(csv_dir, "train/lr")


def test_extending_a_run_decays_the_learning_rate_over_the_new_budget(tmp_path):
    """The issue's scenario as typed: 40 updates, then the same run extended to 80 with --ckpt_path last. The
    restored schedule counted to 40 and trained the second half at lr 0; it now decays over the new budget."""
    from tests.cli_runner import run_lit_impala

    def fit(max_steps: int, *extra: str):
        args = ["fit", "--config", CONFIG, "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.save_dir={tmp_path / f'csv{max_steps}'}", "--trainer.log_every_n_steps=5",
                "--trainer.enable_progress_bar=false", "--episode_stats.stop_at_return=null", "--data.envs_per_actor=8",
                callbacks_arg(tmp_path / "ckpt"), f"--trainer.max_steps={max_steps}", *extra]
        run = run_lit_impala(args, tmp_path)
        assert run.returncode == 0, run.tail()
        return run

    fit(40)
    extended = fit(80, "--ckpt_path=last", "--model.lr=0.004")
    assert f"Resuming from {tmp_path / 'ckpt' / 'last.ckpt'} (update 40, 25,600 env frames)" in extended.stdout
    # LightningCLI applies the checkpoint's model hyper-parameters: a changed one is said, not dropped silently
    assert ("The checkpoint's model hyper-parameters apply; not used from this command's config: model.lr=0.004 "
            "(the checkpoint's: 0.002)") in extended.stdout
    said = [line for line in extended.stdout.splitlines() if line.startswith("Learning rate:")]
    assert said == ["Learning rate: the checkpoint's schedule decayed to 0 at update 40; this run's "
                    "(trainer.max_steps=80) decays to 0 at update 80, so it goes on at 0.001 from update 40, as in a "
                    "run given this budget from the start"], extended.stdout
    # The resumed run's log says, once, where it went on from; the first run's never does.
    assert _logged(tmp_path / "csv80", "progress/resumed_from_update") == {45: 40.0}  # at its first logged update
    assert _logged(tmp_path / "csv40", "progress/resumed_from_update") == {}
    first, second = _logged_lr(tmp_path / "csv40"), _logged_lr(tmp_path / "csv80")
    assert max(first) == 39 and first[39] == pytest.approx(0.002 / 40)  # the first run decayed to ~0 by its end
    steps = sorted(second)
    assert steps[0] > 40 and steps[-1] == 79 and len(steps) == 8, second
    rates = [second[step] for step in steps]
    assert all(rate > 0 for rate in rates) and rates == sorted(rates, reverse=True), second
    # a straight line to 0 at update 80: lr(step) = 0.002 * (1 - step / 80), as in a run given 80 from the start
    assert rates == pytest.approx([0.002 * (1 - step / 80) for step in steps])
