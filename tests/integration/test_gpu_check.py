"""The GPU check rehearsed on CPU, as it is typed (``python -m benchmarks.gpu_check run --dry-run``): every step of
the GPU machine's command runs here with tiny budgets, so that the command is known to work before a GPU is lent."""

import json

import pytest

from tests.cli_runner import assert_all_gone, run_lit_impala


@pytest.mark.slow  # ~45 s: a pytest run, V-trace timings, a short Pong fit and a 6-second Pong training
def test_the_gpu_check_rehearsed_on_cpu_runs_every_step(tmp_path):
    out = tmp_path / "out"
    run = run_lit_impala(["run", "--dry-run", "--out", str(out)], tmp_path, timeout_s=400,
                         module="benchmarks.gpu_check")
    assert run.returncode == 0, run.tail()
    assert "GPU check on CPU (dry run)" in run.stdout and "Traceback" not in run.output
    assert "wheel plan: " in run.stdout and "torchrl==" in run.stdout
    summary = json.loads((out / "gpu_check.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == ["cuda_tests", "vtrace", "fit_pong", "train_pong"]
    assert all(step["status"] == "passed" for step in steps.values()), run.tail()
    assert summary["dry_run"] and summary["machine"]["gpu"] is None and summary["machine"]["torchrl"]
    # Without CUDA every gpu test is collected and skips, saying why.
    assert "skipped" in steps["cuda_tests"]["figures"]["summary"]
    assert any("needs CUDA" in reason for reason in steps["cuda_tests"]["figures"]["skip_reasons"])
    assert {row["device"] for row in steps["vtrace"]["figures"]["rows"]} == {"cpu"}
    fit = steps["fit_pong"]["figures"]
    assert fit["learner_device"] == "cpu" and fit["actor_frames_per_second"] > 0
    train = steps["train_pong"]["figures"]
    assert train["progress/env_frames"] > 0 and train["progress/frames_per_second"] > 0
    assert train["progress/train_s"] >= 4
    assert all((out / f"{name}.log").stat().st_size > 0 for name in steps)  # each step's output is kept
    assert_all_gone(run.descendants)


@pytest.mark.parametrize(("arguments", "message"), [
    (["run", "--out", "{tmp}"], "no CUDA device: run it with --dry-run for the rehearsal on CPU"),
    (["run"], "run needs --out DIR (or $OUT)"),
])
def test_the_gpu_check_without_a_gpu_or_an_output_folder_is_one_line(arguments, message, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    run = run_lit_impala([a.format(tmp=tmp_path / "out") for a in arguments], tmp_path, timeout_s=120,
                         module="benchmarks.gpu_check", env={"CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2, run.tail()
    (line,) = run.stderr.strip().splitlines()
    assert message in line, run.tail()
    assert not (tmp_path / "out" / "gpu_check.json").exists()
