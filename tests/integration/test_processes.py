"""No actor process outlives a run: after success, after an error in training_step, after Ctrl-C."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tests.conftest import REPO

BASE_ARGS = [
    "fit", "--config", str(REPO / "configs" / "cartpole.yaml"),
    "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
    "--trainer.callbacks=null", "--data.num_actors=2", "--data.envs_per_actor=4", "--data.batch_size=4",
]


def run_and_watch(command, tmp_path, interrupt_after_s=None, timeout_s=120):
    """Run ``command`` in a new session; return (exit code, output, every descendant pid ever seen)."""
    log = open(tmp_path / "out.log", "w+")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    seen, start, interrupted_at = set(), time.monotonic(), None
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            seen.update(child.pid for child in parent.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        elapsed = time.monotonic() - start
        if interrupt_after_s is not None and interrupted_at is None and len(seen) >= 2 and elapsed > interrupt_after_s:
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
            interrupted_at = time.monotonic()
        if elapsed > timeout_s:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"run did not finish in {timeout_s} s")
        time.sleep(0.1)
    exit_s = None if interrupted_at is None else time.monotonic() - interrupted_at
    log.seek(0)
    return process.returncode, log.read(), seen, exit_s


def assert_all_gone(pids, within_s=10.0):
    deadline = time.monotonic() + within_s
    alive = pids
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.2)
    pytest.fail(f"processes left alive: {[psutil.Process(p).cmdline() for p in alive if psutil.pid_exists(p)]}")


@pytest.mark.parametrize("inference", ["actor", "server"])
def test_no_actor_left_after_a_normal_run(tmp_path, inference):
    code, output, seen, _ = run_and_watch(
        [sys.executable, "-m", "lit_impala", *BASE_ARGS, "--trainer.max_steps=40", f"--data.inference={inference}"],
        tmp_path,
    )
    assert code == 0, output
    assert len(seen) >= 2, "the actors should have been seen running"
    assert_all_gone(seen)


def test_no_actor_left_after_an_error_in_training_step(tmp_path):
    script = tmp_path / "exploding.py"
    script.write_text(textwrap.dedent("""
        from lit_impala.cli import ImpalaCLI
        from lit_impala.data import ImpalaDataModule
        from lit_impala.learner import ImpalaModule

        class ExplodingModule(ImpalaModule):
            def training_step(self, batch, batch_idx):
                if self.global_step == 5:
                    raise RuntimeError("boom at step 5")
                return super().training_step(batch, batch_idx)

        if __name__ == "__main__":
            ImpalaCLI(ExplodingModule, ImpalaDataModule)
    """))
    code, output, seen, _ = run_and_watch(
        [sys.executable, str(script), *BASE_ARGS, "--trainer.max_steps=100"], tmp_path
    )
    assert code != 0
    assert "boom at step 5" in output
    assert len(seen) >= 2
    assert_all_gone(seen)


@pytest.mark.parametrize("inference", ["actor", "server"])
def test_no_actor_left_after_ctrl_c(tmp_path, inference):
    code, output, seen, exit_s = run_and_watch(
        [sys.executable, "-m", "lit_impala", *BASE_ARGS, "--trainer.max_steps=1000000",
         f"--data.inference={inference}"],
        tmp_path, interrupt_after_s=8,
    )
    assert exit_s is not None and exit_s < 15, f"took {exit_s} s to stop after SIGINT:\n{output}"
    assert code != 0
    assert len(seen) >= 2
    assert_all_gone(seen)
