"""The benchmarks run end to end on tiny budgets (their figures are not asserted here: speed targets
live in the benchmarks' own output, not in timed tests)."""

import json
import math
import re

import pytest
import torch

from benchmarks import ceiling, collector, fit, learning, reference_ppo, vtrace
from benchmarks.common import RESULTS_DIR_VARIABLE
from tests.cli_runner import assert_all_gone, run_lit_impala
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")
SMALL = ["--data.envs_per_actor=4", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.callbacks=null"]


@pytest.fixture(autouse=True)
def results_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS_DIR_VARIABLE, str(tmp_path / "results"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "results"


def read(results_dir, name):
    payload = json.loads((results_dir / f"{name}.json").read_text())
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["torch"]
    return payload


def test_vtrace_benchmark_checks_agreement_and_writes_rows(results_in_tmp):
    vtrace.main(["--lengths", "20", "--batches", "32", "--min-run-time", "0.01"])
    rows = read(results_in_tmp, "vtrace")["rows"]
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["max_abs_diff"] < 1e-4 and cpu[0]["speedup"] > 0


def test_ceiling_and_collector_benchmarks(results_in_tmp):
    ceiling.main(["--config", CONFIG, "--seconds", "0.5", *SMALL])
    result = read(results_in_tmp, "ceiling")
    assert [r["backend"] for r in result["backends"]] == ["gymnasium", "envpool"]  # CartPole: both engines
    assert all(r["num_envs"] == 2 * 4 and r["frames_per_second"] > 0 for r in result["backends"])
    assert result["best"]["frames_per_second"] == max(r["frames_per_second"] for r in result["backends"])
    collector.main(["--config", CONFIG, "--seconds", "1", "--warmup", "0.5", *SMALL])
    result = read(results_in_tmp, "collector")
    assert result["frames"] > 0 and result["frames"] % (4 * 20) == 0  # whole unrolls of T = 20


def test_fit_benchmark_measures_a_window(results_in_tmp):
    fit.main(["--config", CONFIG, "--seconds", "1", "--warmup", "0.5", "--ceiling-seconds", "0.5", *SMALL,
              "--data.batch_size=8"])
    result = read(results_in_tmp, "fit")
    assert result["fit"]["updates"] >= 1 and 0 <= result["fit"]["learner_wait_fraction"] <= 1
    assert result["fit_over_ceiling"] > 0
    assert set(result["fits"]) == {"actor", "server"}  # both inference modes, in one run
    assert all(fit["updates"] >= 1 for fit in result["fits"].values())
    assert {fit["inference"] for fit in result["fits"].values()} == {"actor", "server"}
    assert result["ceiling"]["frames_per_second"] == max(c["frames_per_second"] for c in result["ceilings"])


def test_learning_benchmark_writes_a_plot_a_curve_and_a_row(results_in_tmp, tmp_path):
    """A tiny budget of the real thing, as typed: ``python -m benchmarks.learning`` runs one seed of the shipped
    CartPole config in a ``fit`` process of its own, prints the table and writes a PNG, a JSON curve and a row;
    the same command again reuses the finished seed without running it."""
    import matplotlib.image

    work = tmp_path / "work"
    arguments = ["--tasks", "cartpole", "--frames", "40000", "--seeds", "1", "--no-table", "--workdir", str(work)]
    run = run_lit_impala(arguments, tmp_path, timeout_s=300, module="benchmarks.learning")
    assert run.returncode == 0, run.tail()
    assert re.search(r"^cartpole seed 0: [\d.-]+ after [\d,]+ frames, \d+ s$", run.stdout, re.M), run.tail()
    assert "Learning: mean return of the last 100 episodes" in run.stdout and "Traceback" not in run.output
    assert "updated the table" not in run.stdout  # --no-table
    assert_all_gone(run.descendants)  # the fit process and its actors
    png = results_in_tmp / "learning" / "cartpole.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape  # a PNG matplotlib can read back
    assert width > 300 and height > 100
    assert png.stat().st_size < 100_000  # small enough to commit
    curves = json.loads((results_in_tmp / "learning" / "cartpole.json").read_text())
    (curve,) = curves["curves"]
    assert len(curve["return"]) >= 2 and curve["env_frames"] == sorted(curve["env_frames"])
    assert 0 < curve["env_frames"][-1] <= 40000 + 640 and all(s > 0 for s in curve["train_seconds"])
    result = read(results_in_tmp, "learning")
    (row,) = result["rows"]
    assert row == curves["row"] and row["task"] == "cartpole" and row["seeds"] == 1
    assert row["final_return_mean"] == curve["return"][-1] > 0
    # The fit's files stay in the seed's own directory, its curve next to the command that made it.
    seed_dir = work / "cartpole" / "seed0"
    assert list(seed_dir.glob("runs/checkpoints/*/last.ckpt")) and list(seed_dir.glob("csv/run/version_0/*.csv"))
    saved = json.loads((seed_dir / "curve.json").read_text())
    assert saved["curve"] == curve and "--seed_everything=0" in saved["command"]["fit"]
    assert not (tmp_path / "runs").exists()  # nothing in the directory it was typed in
    # The same command again: the finished seed is reused, no fit process runs, the same curve is written.
    again = run_lit_impala(arguments, tmp_path, timeout_s=120, module="benchmarks.learning")
    assert again.returncode == 0, again.tail()
    assert f"cartpole seed 0: reusing the curve finished in {seed_dir}" in again.stdout, again.tail()
    assert not again.descendants and "frames, " not in again.stdout  # no fit ran
    assert json.loads((results_in_tmp / "learning" / "cartpole.json").read_text()) == curves
    page = tmp_path / "results.md"
    page.write_text(f"before\n{learning.TABLE_START}\nold\n{learning.TABLE_END}\nafter\n")
    assert learning.update_results_page(result["table_markdown"], page)
    text = page.read_text()
    assert "old" not in text and "| cartpole | 1 |" in text and text.startswith("before") and text.endswith("after\n")
    assert "![cartpole](../benchmarks/results/learning/cartpole.png)" in text  # docs/results.md's place
    # The published reference sits next to ours, with its budget, a plain verdict and its source under the table.
    assert "PPO 490.04 at 0.5M [1]" in text and "[1] CleanRL ppo.py, CartPole-v1" in text
    assert row["versus_references"].startswith("below PPO (490.04 at 0.5M)")
    # --replot redraws the plot and the row from the saved curve without running anything.
    png.unlink()
    replot = run_lit_impala(["--replot", "--no-table"], tmp_path, timeout_s=120, module="benchmarks.learning")
    assert replot.returncode == 0, replot.tail()
    assert " seed 0: " not in replot.stdout and "Learning: mean return" in replot.stdout  # no fit process ran
    replotted = read(results_in_tmp, "learning")["rows"]
    assert [r["task"] for r in replotted] == ["cartpole"] and replotted[0] == row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("arguments", "message"), [
    (["--tasks", "cartpole,nope"], "unknown task(s) ['nope']"),
    (["--frames", "-1"], "--frames must be > 0, got -1"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--parallel", "0"], "--parallel must be >= 1, got 0"),
    (["--replot", "--tasks", "hopper"], "--replot: no curves for hopper"),
])
def test_learning_benchmark_bad_input_is_one_line_and_exit_2(arguments, message, results_in_tmp, tmp_path):
    run = run_lit_impala(arguments, tmp_path, timeout_s=60, module="benchmarks.learning")
    assert run.returncode == 2, run.tail()
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"python -m benchmarks.learning: error: {message}"), run.tail()
    assert not run.descendants and not results_in_tmp.exists()  # nothing ran, nothing written


def test_learning_budgets_count_frames_not_updates(tmp_path):
    """trainer.max_steps for a frame budget: one update per batch of unroll x batch frames, times the passes and
    the minibatches of each pass."""
    config = learning.REPO / "configs" / "cartpole.yaml"
    assert learning.updates_for(5e6, config, ()) == 7813  # 640 frames per batch
    assert learning.updates_for(5e6, config, ("--data.passes_per_batch=4",)) == 4 * 7813
    assert learning.updates_for(5e6, config, ("--data.batch_size=8",)) == 31250
    assert learning.updates_for(5e6, config, ("--data.passes_per_batch=4", "--data.minibatches_per_pass=2")) == 8 * 7813
    # an overlay file given as --config=...: its data section counts, read after the task's config
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  passes_per_batch: 4\n")
    assert learning.updates_for(5e6, config, (f"--config={overlay}",)) == 4 * 7813
    assert learning.override_config("--config=configs/mujoco.yaml") == str(learning.REPO / "configs" / "mujoco.yaml")
    # the shipped MuJoCo config: 2048 frames per batch, 10 passes of 8 minibatches
    assert learning.updates_for(1e6, learning.REPO / "configs" / "mujoco.yaml", ()) == 489 * 80
    assert learning.override_config("--data.env_id=Hopper-v5") is None


def test_reference_ppo_learns_from_real_frames_and_writes_its_curve(results_in_tmp, tmp_path):
    """The independent reference learner as typed: two batches of real envpool Pong, a table, a JSON curve."""
    pytest.importorskip("envpool", reason="the reference learner runs envpool Atari: pip install -e '.[envpool]'")
    run = run_lit_impala(["--agent-steps", "2048"], tmp_path, timeout_s=180, module="benchmarks.reference_ppo")
    assert run.returncode == 0, run.tail()
    assert "reference PPO on ALE/Pong-v5, 42x42 frames, seed 0" in run.stdout and "Traceback" not in run.output
    assert_all_gone(run.descendants)
    result = read(results_in_tmp, "reference_ppo_pong_42")
    assert [point["agent_steps"] for point in result["curve"]] == [1024, 2048]
    assert result["final"] == result["curve"][-1]
    # The updates moved the policy off its near-uniform start (entropy log 6).
    assert all(0 < point["entropy"] < math.log(6) for point in result["curve"])


@pytest.mark.parametrize(("arguments", "message"), [
    (["--screen-size", "20"], "--screen-size 20 is below 36"),
    (["--agent-steps", "100"], "--agent-steps 100 is less than one batch (8 envs x 128)"),
])
def test_reference_ppo_bad_input_is_one_line_and_exit_2(arguments, message, results_in_tmp, tmp_path):
    run = run_lit_impala(arguments, tmp_path, timeout_s=60, module="benchmarks.reference_ppo")
    assert run.returncode == 2, run.tail()
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"python -m benchmarks.reference_ppo: error: {message}"), run.tail()
    assert not run.descendants and not results_in_tmp.exists()


def test_reference_ppo_advantages_are_gae_by_its_definition():
    """``gae`` against GAE written from its definition in float64: A_t = sum_k (gamma lambda)^k delta_{t+k}, the sum
    cut after a terminal step, delta_t = r_t + gamma V_{t+1} (0 after a terminal) - V_t."""
    torch.manual_seed(0)
    T, N = 7, 3
    rewards, values, bootstrap = torch.randn(T, N), torch.randn(T, N), torch.randn(N)
    terminals = torch.zeros(T, N)
    terminals[2, 0] = terminals[6, 1] = terminals[0, 2] = terminals[4, 2] = 1.0
    advantages = reference_ppo.gae(rewards, values, terminals, bootstrap)
    gamma, lam = reference_ppo.GAMMA, reference_ppo.GAE_LAMBDA
    r, v, d, b = (x.double().tolist() for x in (rewards, values, terminals, bootstrap))
    for n in range(N):
        for t in range(T):
            expected, weight = 0.0, 1.0
            for k in range(t, T):
                next_value = (b[n] if k == T - 1 else v[k + 1][n]) * (1.0 - d[k][n])
                expected += weight * (r[k][n] + gamma * next_value - v[k][n])
                if d[k][n]:
                    break
                weight *= gamma * lam
            assert abs(advantages[t, n].item() - expected) < 1e-5, (t, n)


def test_reference_ppo_stopped_by_ctrl_c_writes_the_curve_so_far(results_in_tmp, tmp_path):
    """A long reference run stopped at the end of a sitting keeps what it learnt: Ctrl-C ends it after the batch in
    progress is dropped, with its table, its JSON (``interrupted``) and exit 130."""
    pytest.importorskip("envpool", reason="the reference learner runs envpool Atari: pip install -e '.[envpool]'")
    # Its envs are envpool threads, so there is no child process to wait for: Ctrl-C comes after its first batch.
    run = run_lit_impala(["--agent-steps", "10000000"], tmp_path, timeout_s=90, module="benchmarks.reference_ppo",
                         interrupt_after_s=0, interrupt_once_printed="agent_steps 1024 ")
    assert run.returncode == 130, run.tail()
    assert re.search(r"stopped by Ctrl-C after [1-9]\d* of 9765 batches", run.stdout), run.tail()
    assert "Traceback" not in run.output
    result = read(results_in_tmp, "reference_ppo_pong_42")
    assert result["interrupted"] and result["curve"][-1]["agent_steps"] == 1024 * len(result["curve"])
