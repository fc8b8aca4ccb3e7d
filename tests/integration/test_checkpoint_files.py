"""Checkpoints that survive any kill and a requeue that always finds one: runs SIGKILLed while they write a
checkpoint, with ``$TMPDIR`` on another filesystem than the checkpoints (the cluster layout that tore
``last.ckpt`` with Lightning's own save), resume from an intact checkpoint every time; a torn newest checkpoint
falls back to the previous one; ``last`` with nothing to load starts fresh; a second run of the same config
cannot take the first one's checkpoint directory; a finished run requeued says there is nothing left to do."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from lit_impala.checkpoint_io import PARTIAL_SUFFIX, read_checkpoint
from tests.cli_runner import assert_all_gone, run_lit_impala
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")
SHM = Path("/dev/shm")


def fit_args(ckpt_dir: Path, *extra: str) -> list[str]:
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(ckpt_dir), "every_n_train_steps": 1, "save_last": True}}
    # A checkpoint every update, of a ~8 MB network (weights and RMSprop state): most of the run's time is spent
    # writing checkpoints, so a kill lands inside a write.
    return ["fit", "--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=" + json.dumps([checkpoint]), "--episode_stats.stop_at_return=null",
            "--model.hidden_dim=1024", "--model.feature_dim=1024", "--data.num_actors=1", "--data.envs_per_actor=8",
            "--ckpt_path=last", *extra]


def partial_files(directory: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(directory) if entry.name.endswith(PARTIAL_SUFFIX)]
    except FileNotFoundError:
        return []


def kill_during_a_write(args: list[str], cwd: Path, ckpt_dir: Path, env: dict, min_saves: int = 4,
                        timeout_s: float = 120.0, meanwhile=None) -> tuple[str, bool]:
    """Start ``fit``; once it has written ``min_saves`` checkpoints (and ``meanwhile(process)`` returned),
    SIGKILL it (the learner, as a scheduler's ``kill -9`` does) the moment a checkpoint is being written; its
    actors notice and exit. Returns its output and whether the kill landed inside a write."""
    log_path = cwd / "killed.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "lit_impala", *args], cwd=cwd, stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + timeout_s
        seen: set[str] = set()
        while len(seen) < min_saves:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"fewer than {min_saves} writes seen:\n{log_path.read_text()}"
            seen.update(partial_files(ckpt_dir))
            time.sleep(0.0005)
        if meanwhile is not None:
            meanwhile(process)
        children = psutil.Process(process.pid).children(recursive=True)
        while not partial_files(ckpt_dir):  # the next write
            assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()
        process.kill()
        process.wait(timeout=30)
        inside = bool(partial_files(ckpt_dir))
        assert_all_gone({child.pid for child in children}, within_s=15)  # orphaned actors exit by themselves
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return log_path.read_text(), inside


@pytest.mark.slow
@pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm (a tmpfs) to put $TMPDIR on another filesystem")
def test_requeued_after_kills_during_checkpoint_writes_a_run_always_resumes_from_an_intact_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    scratch = Path(tempfile.mkdtemp(dir=SHM, prefix="lit_impala_tmpdir_"))
    assert os.stat(scratch).st_dev != os.stat(tmp_path).st_dev, "TMPDIR must be another filesystem"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch), "WANDB_DIR": str(tmp_path)}
    try:
        # 1. A requeue script's first start: nothing to resume yet, which is said in one line.
        output, inside = kill_during_a_write(fit_args(ckpt_dir, "--trainer.max_steps=100000"), tmp_path, ckpt_dir, env)
        kills_inside_a_write = int(inside)
        assert f"--ckpt_path last: no checkpoint in '{ckpt_dir}': starting fresh" in output, output
        assert "save_last=True" not in output, "Lightning's misleading hint"

        # 2. Killed again and again, each time while a checkpoint is being written: every checkpoint file left
        #    is complete, and the next start resumes from the newest one. During the first of these runs a second
        #    run of the same config is started: it cannot take the checkpoint directory.
        def second_run_is_refused(first: subprocess.Popen) -> None:
            second = run_lit_impala(fit_args(ckpt_dir, "--trainer.max_steps=100000"), tmp_path, env=env)
            assert second.returncode == 2, second.tail()
            assert second.stderr.strip().splitlines()[-1] == (
                f"error: checkpoint directory '{ckpt_dir}' is in use by another run (pid {first.pid} on "
                f"{os.uname().nodename}): two runs would resume from and overwrite each other's checkpoints. Wait for "
                "it to end, or give this run its own directory (the ModelCheckpoint callback's dirpath)"), second.tail()
            assert second.spawned_actors == 0, "refused before any actor started"
            assert first.poll() is None, "the first run goes on"

        last_step = 0
        for attempt in range(2):
            for path in ckpt_dir.glob("*.ckpt"):
                checkpoint = read_checkpoint(path)  # raises UnreadableCheckpoint for a torn file
                # complete and consistent: the frame count belongs to the same update as the weights
                assert checkpoint["callbacks"]["EpisodeStats"]["env_frames"] == checkpoint["global_step"] * 20 * 32
            newest = max(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
            step = read_checkpoint(newest)["global_step"]
            assert step > last_step
            last_step = step
            output, inside = kill_during_a_write(fit_args(ckpt_dir, "--trainer.max_steps=100000"), tmp_path, ckpt_dir,
                                                 env, meanwhile=second_run_is_refused if attempt == 0 else None)
            kills_inside_a_write += inside
            resumed = re.search(rf"Resuming from {re.escape(str(ckpt_dir))}/\S+ \(update (\d+),", output)
            assert resumed and int(resumed[1]) == step, output
        assert kills_inside_a_write >= 2, "the kills should land while a checkpoint is being written"
        # Lightning's save staged each checkpoint as a file in $TMPDIR (fsspec's mkstemp): none is there now. (The
        # killed runs' multiprocessing and actor scratch directories are, which nothing can remove on SIGKILL.)
        staged = [path for path in scratch.iterdir() if path.is_file()]
        assert not staged, "nothing is staged in $TMPDIR"

        # 3. The newest checkpoint torn (a kill during a copy by other tools): skipped with a warning naming it,
        #    and the run resumes from the previous one, finishes, and leaves no partial file behind.
        by_age = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        newest, previous = by_age[-1], by_age[-2]
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        os.utime(newest)
        previous_step = read_checkpoint(previous)["global_step"]
        finish = fit_args(ckpt_dir, f"--trainer.max_steps={previous_step + 3}")
        run = run_lit_impala(finish, tmp_path, env=env)
        assert run.returncode == 0, run.tail()
        assert f"checkpoint '{newest}' cannot be read" in run.stderr and "skipped, trying an older one" in run.stderr
        assert f"Resuming from {previous} (update {previous_step}," in run.stdout, run.tail()
        assert f"Training stopped after {previous_step + 3} updates" in run.stdout, run.tail()
        assert not partial_files(ckpt_dir), "the run that took the directory removes what killed writers left"
        assert_all_gone(run.descendants)

        # 4. The same command again (a requeued job that had finished): nothing left to do, said, and exit 0.
        again = run_lit_impala(finish, tmp_path, env=env)
        assert again.returncode == 0, again.tail()
        assert (f"The checkpoint is at update {previous_step + 3} and trainer.max_steps is {previous_step + 3}: "
                "nothing left to train (a larger --trainer.max_steps extends the run)") in again.stdout, again.tail()
        assert f"Training stopped after {previous_step + 3} updates" in again.stdout, again.tail()
        assert again.spawned_actors == 0, "no actor starts for a budget already reached"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
