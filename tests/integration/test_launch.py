"""The launcher as typed (``python -m lit_impala.launch``): CartPole seeds 2 at a time with the shipped config, each in
its own directory, with its table; the same command again reuses them; submitit's local executor; Ctrl-C; and
bad input as one line and exit 2 before anything runs. No process is left behind in any of them."""

import json
import re
import signal

import psutil
import pytest

from tests.cli_runner import assert_all_gone, run_lit_impala
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")


def short(max_steps: int = 8) -> list[str]:
    """A short CartPole run with the shipped config's callbacks (checkpoints, evaluation): a few updates, 8 envs."""
    return ["--set", f"trainer.max_steps={max_steps}", "--set", "trainer.logger=false", "--set",
            "trainer.enable_progress_bar=false", "--set", "data.num_actors=1", "--set", "data.envs_per_actor=8"]


MODULE = "lit_impala.launch"


class FitCounter:
    """Watches the launcher: the most ``fit`` processes it had running at once, and the most that had started a
    child process (a fit does once its Ctrl-C shield is on: ``lit_impala.interrupts``)."""

    def __init__(self):
        self.most = self.most_shielded = 0

    def __call__(self, launcher: psutil.Process) -> None:
        try:
            fits = [child for child in launcher.children() if " fit " in " ".join(child.cmdline())
                    and child.status() != psutil.STATUS_ZOMBIE]
            shielded = [fit for fit in fits if fit.children()]
        except psutil.Error:
            return
        self.most = max(self.most, len(fits))
        self.most_shielded = max(self.most_shielded, len(shielded))


def most_at_once(runs: list[dict]) -> int:
    """The most runs whose [started_at, ended_at] overlap at one instant."""
    events = sorted([(run["started_at"], 1) for run in runs] + [(run["ended_at"], -1) for run in runs])
    alive = most = 0
    for _, change in events:  # at a tie an end sorts before a start: a run started as another ended
        alive += change
        most = max(most, alive)
    return most


@pytest.mark.slow
def test_four_cartpole_seeds_two_at_a_time_with_their_table(tmp_path):
    arguments = ["--config", CONFIG, "--seeds", "0,1,2,3", "--parallel", "2", "--out", "sweep", *short()]
    counter = FitCounter()
    run = run_lit_impala(arguments, tmp_path, timeout_s=300, module=MODULE, watch=counter)
    assert run.returncode == 0, run.tail()
    assert_all_gone(run.descendants)  # the settings check, the fits, their actors
    assert counter.most == 2, f"{counter.most} fits at once"
    # The table, printed and written.
    assert "4 runs, 4 exited 0" in run.stdout, run.tail()
    rows = [line for line in run.stdout.splitlines() if line.startswith("| cartpole |")]
    assert len(rows) == 4 and all("| exit 0 |" in row for row in rows), run.stdout
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [(r["setting"], r["seed"], r["exit_code"]) for r in summary["runs"]] == [("cartpole", s, 0)
                                                                                   for s in range(4)]
    for result in summary["runs"]:
        assert result["final_return"] > 0 and result["episodes"] > 0 and result["updates"] == 8
        assert result["env_frames"] == 8 * 32 * 20  # 8 updates of batch_size x unroll_length
        assert result["wall_s"] > 0
    assert most_at_once(summary["runs"]) == 2
    assert (tmp_path / "sweep" / "summary.md").read_text().count("| cartpole |") == 4
    # Each run in its own directory: its command, result, log and checkpoints there, nothing in the typed-in one.
    for seed in range(4):
        directory = tmp_path / "sweep" / "cartpole" / f"seed{seed}"
        assert f"--seed_everything={seed}" in json.loads((directory / "command.json").read_text())["fit"]
        assert json.loads((directory / "result.json").read_text())["result"]["exit_code"] == 0
        assert "Training stopped after 8 updates" in (directory / "fit.log").read_text()
        assert (directory / "runs" / "checkpoints" / "cartpole" / "last.ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".cli_")) == ["sweep"]
    # The same command again: every run is reused, no process starts, the same table.
    again = run_lit_impala(arguments, tmp_path, timeout_s=60, module=MODULE)
    assert again.returncode == 0, again.tail()
    assert not again.descendants
    assert again.stdout.count("reusing the run finished in") == 4
    assert [line for line in again.stdout.splitlines() if line.startswith("| cartpole |")] == [
        row.replace("| exit 0 |", "| reused |") for row in rows]


@pytest.mark.slow
def test_submitit_local_executor_runs_the_same_jobs(tmp_path):
    """``--executor submitit-local``: each run a submitit job (SLURM's stand-in here), sbatch-style parameters
    checked and passed through."""
    arguments = ["--config", CONFIG, "--seeds", "0,1", "--parallel", "2", "--out", "jobs", "--executor",
                 "submitit-local", "--slurm", "cpus_per_task=2", "--slurm", "partition=any", *short()]
    run = run_lit_impala(arguments, tmp_path, timeout_s=240, module=MODULE)
    assert run.returncode == 0, run.tail()
    assert_all_gone(run.descendants)
    assert re.search(r"^cartpole seed 0: submitted as job \d+", run.stdout, re.M), run.tail()
    summary = json.loads((tmp_path / "jobs" / "summary.json").read_text())
    assert [(r["seed"], r["exit_code"]) for r in summary["runs"]] == [(0, 0), (1, 0)]
    assert all(r["final_return"] > 0 and r["env_frames"] == 8 * 32 * 20 for r in summary["runs"])
    assert list((tmp_path / "jobs" / "submitit").glob("*_submitted.pkl"))  # submitit's own files, apart
    for seed in range(2):
        assert (tmp_path / "jobs" / "cartpole" / f"seed{seed}" / "result.json").exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_running_fits_with_a_checkpoint(tmp_path):
    """Ctrl-C while a fit runs: it stops after its update with a checkpoint, the next never starts, the table says
    so, exit 130, no process left."""
    arguments = ["--config", CONFIG, "--seeds", "0-1", "--parallel", "1", "--out", "sweep", *short(max_steps=2000)]
    counter = FitCounter()

    def interrupt_when_both_run(launcher: psutil.Process) -> None:
        counter(launcher)
        if counter.most_shielded == 1 and not sent:
            sent.append(launcher.pid)
            launcher.send_signal(signal.SIGINT)  # the launcher alone, as `kill -INT`; Ctrl-C reaches it the same

    sent: list[int] = []
    run = run_lit_impala(arguments, tmp_path, timeout_s=240, module=MODULE, watch=interrupt_when_both_run)
    assert run.returncode == 130, run.tail()
    assert_all_gone(run.descendants)
    assert "stopped by SIGINT: type the same command again" in run.stderr, run.tail()
    statuses = [line.split("|")[3].strip() for line in run.stdout.splitlines() if line.startswith("| cartpole |")]
    assert statuses == ["exit 130", "not started"], run.stdout
    directory = tmp_path / "sweep" / "cartpole" / "seed0"
    assert (directory / "runs" / "checkpoints" / "cartpole" / "last.ckpt").exists()  # to resume from
    assert not (directory / "result.json").exists()  # not finished
    assert not (tmp_path / "sweep" / "cartpole" / "seed1" / "fit.log").exists()


@pytest.mark.parametrize(("arguments", "message"), ids=[
    "missing config", "parallel 0", "no seeds", "grid syntax", "key twice", "unknown slurm parameter",
    "value fit refuses", "settings fit refuses together"], argvalues=[
    (["--config", "nope.yaml"], "--config: no such file: "),
    (["--config", CONFIG, "--parallel", "0"], "--parallel must be >= 1, got 0"),
    (["--config", CONFIG, "--seeds", ""], "--seeds: expected seeds as 0,1,2 or a range 0-3, got ''"),
    (["--config", CONFIG, "--grid", "model.lr"], "--grid: expected KEY=VALUE with KEY a fit argument"),
    (["--config", CONFIG, "--grid", "model.lr=0.1", "--set", "model.lr=0.2"], "--grid/--set: model.lr is given twice"),
    (["--config", CONFIG, "--executor", "submitit-local", "--slurm", "colour=red"],
     "--slurm: Unknown argument 'colour'"),
    # what `fit` would refuse, found by the settings check: a value the parser refuses, in the second setting ...
    (["--config", CONFIG, "--grid", "model.lr=0.001,-1"],
     "lr=-1: model.lr: expected a PositiveFloat (v>0), got -1"),
    # ... and settings that contradict each other (fit's check before its actors start)
    (["--config", CONFIG, "--set", "trainer.max_steps=-1"],
     "cartpole: model.lr_decay decays the learning rate to 0 over trainer.max_steps, which is -1"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_run(arguments, message, tmp_path):
    run = run_lit_impala([*arguments, "--out", "sweep"], tmp_path, timeout_s=120, module=MODULE)
    assert run.returncode == 2, run.tail()
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("python -m lit_impala.launch: error: ") and message in line, run.tail()
    assert_all_gone(run.descendants)
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing written
