"""benchmarks.learning's resumable seeds: a seed as a launcher run, and one curve from the CSV logs of a run stopped
and resumed (each fit process logs a version of its own)."""

import math
from pathlib import Path

from benchmarks import learning
from lit_impala.launch.runs import absolute_config_paths


def test_a_seed_is_a_launcher_run_recorded_with_its_budget(tmp_path):
    """A seed's record is its fit arguments and its frame budget, as before the launcher ran the seeds: a seed
    directory of an earlier sitting is the same run (the rules for reusing and resuming it are the launcher's,
    tests/unit/test_launch.py)."""
    task = learning.TASKS["cartpole"]
    run = learning.seed_run("cartpole", task, 2, 40000.0, tmp_path)
    assert run.directory == tmp_path / "cartpole" / "seed2" and run.base == learning.REPO
    assert run.record == {"fit": learning.fit_arguments(task, 2, 40000.0), "frames": 40000.0}
    assert run.name == "cartpole seed 2"


def test_a_resumed_run_is_one_curve_later_values_kept_seconds_going_on():
    before = [(100.0, 1.0, 1.0), (200.0, 2.0, 2.0), (300.0, 3.0, 3.0), (300.0, 3.0, 3.0)]  # last row logged twice
    # Resumed from the checkpoint at 200 frames: 300 is redone, and the seconds start at 0 again.
    after = [(300.0, 30.0, 0.5), (400.0, 40.0, 1.5)]
    frames, returns, seconds = learning.merge_logs([before, [], after])  # [] resumed at the budget: no rows
    assert frames == [100.0, 200.0, 300.0, 400.0]
    assert returns == [1.0, 2.0, 30.0, 40.0]
    assert seconds == [1.0, 2.0, 2.5, 3.5]
    assert learning.resume_points([before, [], after]) == [300.0]  # drawn on the plot where the second process began
    assert learning.resume_points([before]) == [] and learning.resume_points([[], before]) == []
    assert learning.merge_logs([[]]) == ([], [], [])
    nan_seconds = learning.merge_logs([[(1.0, 1.0, math.nan)]])[2]
    assert math.isnan(nan_seconds[0])


def test_csv_logs_are_read_oldest_version_first(tmp_path):
    for version in (10, 2, 0, 9):
        (tmp_path / "run" / f"version_{version}").mkdir(parents=True)
        (tmp_path / "run" / f"version_{version}" / "metrics.csv").write_text("progress/env_frames,episode/return\n")
    assert [path.parent.name for path in learning.csv_logs(tmp_path)] == [
        "version_0", "version_2", "version_9", "version_10"]


def test_a_log_under_the_metric_names_before_the_prefixes_reads_as_one_under_the_new(tmp_path):
    """A seed stopped before the names were grouped (``env_frames``, ``time/train_s``) resumes into a log with the
    new ones: both versions read the same way."""
    old, new = tmp_path / "version_0.csv", tmp_path / "version_1.csv"
    old.write_text("step,env_frames,episode/return,time/train_s,loss/total\n9,640,1.5,2.0,\n10,,,,0.3\n")
    new.write_text("step,progress/env_frames,episode/return,progress/train_s\n19,1280,2.5,1.0\n")
    assert learning.read_log(old) == [(640.0, 1.5, 2.0)]
    assert learning.read_log(new) == [(1280.0, 2.5, 1.0)]


def test_a_seed_runs_with_the_repository_configs_and_records_them_relative():
    task = learning.Task("configs/minatar.yaml", 5e6, 1, overrides=("--config=configs/cartpole_ddp.yaml",))
    arguments = learning.fit_arguments(task, 1, 1e5)
    assert arguments[:4] == ["fit", "--config", "configs/minatar.yaml", "--config=configs/cartpole_ddp.yaml"]
    assert "--seed_everything=1" in arguments
    assert f"--trainer.max_steps={learning.updates_for(1e5, learning.REPO / task.config, task.overrides)}" in arguments
    base = learning.seed_run("t", task, 1, 1e5, Path("/w")).base  # the launcher makes config paths absolute from it
    absolute = absolute_config_paths(arguments, base)
    assert absolute[:4] == ["fit", "--config", str(learning.REPO / "configs" / "minatar.yaml"),
                            f"--config={learning.REPO / 'configs' / 'cartpole_ddp.yaml'}"]
    assert absolute[4:] == arguments[4:]


def test_the_machine_facts_start_no_process(monkeypatch):
    """A benchmark that only reuses finished seeds must start no child process; ``platform.processor()`` would
    (``uname -p`` on Linux), which once failed the reuse check in tests/integration/test_benchmarks.py at random."""
    import subprocess

    from benchmarks.common import machine

    def no_process(*args, **kwargs):
        raise AssertionError(f"a child process was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    facts = machine()
    assert facts["cores"] >= 1 and facts["cpu_model"] not in ("", "unknown")
