"""The launcher's pure parts: seeds and grids as typed, settings and their names, what a run's directory says to do
(reuse, resume, start over), the fit's end line read back, and the summary table."""

import json

import pytest

from lit_impala.launch import grid
from lit_impala.launch.__main__ import scalar, slurm_parameters
from lit_impala.launch.runs import (
    COMMAND_FILE,
    RESULT_FILE,
    Run,
    RunResult,
    absolute_config_paths,
    apply,
    plan,
    read_fit_summary,
    run_plan,
)
from lit_impala.launch.summary import exit_status, markdown_table, table_rows


@pytest.mark.parametrize(("text", "seeds"), [
    ("0", [0]), ("0,1,2,3", [0, 1, 2, 3]), ("0-3", [0, 1, 2, 3]), ("0-2,7", [0, 1, 2, 7]), (" 4 , 2 ", [4, 2]),
])
def test_seeds(text, seeds):
    assert grid.parse_seeds(text) == seeds


@pytest.mark.parametrize(("text", "message"), [
    ("", "--seeds: expected seeds as 0,1,2 or a range 0-3, got ''"),
    ("0,x", "got '0,x'"),
    ("-1", "got '-1'"),
    ("3-1", "the range '3-1' is empty"),
    ("0-2,1", "seed 1 is given twice"),
])
def test_bad_seeds_name_the_value(text, message):
    with pytest.raises(grid.GridError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid.parse_seeds(text)


def test_a_grid_is_every_combination_first_axis_slowest_named_by_its_values():
    axes = [grid.parse_axis("model.lr=0.001,0.0003"), grid.parse_axis("--data.unroll_length=20,40")]
    fixed = [grid.parse_key_value("trainer.max_steps=200", "--set")]
    settings = grid.expand(axes, fixed, base_name="cartpole")
    assert [s.name for s in settings] == ["lr=0.001,unroll_length=20", "lr=0.001,unroll_length=40",
                                          "lr=0.0003,unroll_length=20", "lr=0.0003,unroll_length=40"]
    assert settings[1].overrides == ("--model.lr=0.001", "--data.unroll_length=40", "--trainer.max_steps=200")
    assert grid.fit_arguments("configs/cartpole.yaml", settings[1], 3) == [
        "fit", "--config", "configs/cartpole.yaml", "--model.lr=0.001", "--data.unroll_length=40",
        "--trainer.max_steps=200", "--seed_everything=3"]


def test_without_a_grid_one_setting_named_after_the_config():
    (setting,) = grid.expand([], [("trainer.max_steps", "5")], base_name="cartpole")
    assert setting == grid.Setting("cartpole", ("--trainer.max_steps=5",))


def test_names_are_directory_names_and_keys_stay_apart():
    axes = [grid.parse_axis("data.env_id=MinAtar/Breakout-v1,CartPole-v1"), grid.parse_axis("model.lr=1e-3")]
    assert [s.name for s in grid.expand(axes, [], "x")] == ["env_id=MinAtar_Breakout-v1,lr=1e-3",
                                                            "env_id=CartPole-v1,lr=1e-3"]
    # two keys ending alike keep their whole names
    assert grid.short_keys(["model.lr", "data.lr", "model.discount"]) == {
        "model.lr": "model.lr", "data.lr": "data.lr", "model.discount": "discount"}


def test_values_with_commas_inside_brackets_stay_whole():
    assert grid.parse_axis("model.hidden_sizes=[64,64],[128]") == ("model.hidden_sizes", ("[64,64]", "[128]"))
    assert grid.split_values('{"a": 1, "b": 2},3') == ['{"a": 1, "b": 2}', "3"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda: grid.parse_axis("model.lr"), "--grid: expected KEY=VALUE with KEY a fit argument"),
    (lambda: grid.parse_axis("model lr=1,2"), "--grid: expected KEY=VALUE"),
    (lambda: grid.parse_axis("model.lr=1,,2"), "--grid: an empty value in 'model.lr=1,,2'"),
    (lambda: grid.parse_axis("model.lr=1,1"), "--grid: model.lr value '1' is given twice"),
    (lambda: grid.parse_key_value("seed_everything=3", "--set"), "--set: 'seed_everything=3': the seeds are set by"),
    (lambda: grid.expand([("model.lr", ("1",))], [("model.lr", "2")], "x"), "--grid/--set: model.lr is given twice"),
    (lambda: grid.expand([("data.env_id", ("a/b", "a_b"))], [], "x"), "two settings would share the directory"),
])
def test_bad_grids_name_the_value(make, message):
    with pytest.raises(grid.GridError, match=message.replace("(", r"\(")):
        make()


def test_slurm_parameters_are_submitits_names_typed():
    assert scalar("8") == 8 and scalar("7.5") == 7.5 and scalar("true") is True and scalar("gpu") == "gpu"
    assert slurm_parameters(["partition=gpu", "cpus_per_task=4", "gpus_per_node=1", "timeout_min=120"]) == {
        "slurm_partition": "gpu", "cpus_per_task": 4, "gpus_per_node": 1, "timeout_min": 120}
    assert slurm_parameters([]) == {"timeout_min": 60}  # not submitit's 5 minutes
    with pytest.raises(grid.GridError, match="--slurm: expected KEY=VALUE"):
        slurm_parameters(["partition"])


def test_config_files_are_passed_from_where_they_were_named(tmp_path):
    arguments = ["fit", "--config", "configs/a.yaml", "--config=b.yaml", "--model.lr=1", "--config", "/abs/c.yaml"]
    assert absolute_config_paths(arguments, tmp_path) == [
        "fit", "--config", str(tmp_path / "configs/a.yaml"), f"--config={tmp_path / 'b.yaml'}", "--model.lr=1",
        "--config", "/abs/c.yaml"]


COMMAND = {"fit": ["fit", "--config", "configs/cartpole.yaml", "--seed_everything=0"], "frames": 40000.0}
OTHER = {**COMMAND, "frames": 80000.0}


@pytest.mark.parametrize(("started_with", "finished_with", "has_checkpoint", "fresh", "expected"), [
    (None, None, False, False, "start"),  # an empty directory
    (COMMAND, COMMAND, True, False, "reuse"),  # finished with the same command
    (COMMAND, None, True, False, "resume"),  # stopped with a checkpoint
    (COMMAND, None, False, False, "start"),  # stopped before its first checkpoint
    (OTHER, None, True, False, "start"),  # stopped, but another command: its checkpoint is not this run's
    (OTHER, OTHER, True, False, "start"),  # finished with another command
    (COMMAND, COMMAND, True, True, "start"),  # --fresh
    (COMMAND, None, True, True, "start"),
])
def test_run_plan(started_with, finished_with, has_checkpoint, fresh, expected):
    assert run_plan(COMMAND, started_with, finished_with, has_checkpoint, fresh) == expected


def make_run(tmp_path, seed=0, frames=40000.0) -> Run:
    return Run("cartpole", seed, tmp_path / "cartpole" / f"seed{seed}", ("fit", "--config", "c.yaml"), tmp_path,
               {"frames": frames})


def test_a_directory_is_reused_resumed_or_cleared(tmp_path):
    said = []
    run = make_run(tmp_path)
    first = plan(run)
    assert first.plan == "start" and first.arguments == ["fit", "--config", "c.yaml"]
    apply(first, said.append)
    assert json.loads((run.directory / COMMAND_FILE).read_text()) == run.record and not said  # nothing to say
    # stopped with a checkpoint: resumed from it
    (run.directory / "runs").mkdir()
    (run.directory / "runs" / "last.ckpt").write_bytes(b"")
    resumed = plan(run)
    assert resumed.plan == "resume" and resumed.arguments[-1] == "--ckpt_path=last"
    # finished: reused with its result
    result = RunResult("cartpole", 0, str(run.directory), 0, final_return=480.5, episodes=100, env_frames=40960)
    (run.directory / RESULT_FILE).write_text(json.dumps({"command": run.record, "result": result.__dict__}))
    reused = plan(run)
    assert reused.plan == "reuse" and reused.finished.reused and reused.finished.final_return == 480.5
    apply(reused, said.append)
    assert said == [f"cartpole seed 0: reusing the run finished in {run.directory} (return 480.5, 40,960 env "
                    "frames)"]
    # another budget: the directory is cleared and the new command recorded
    other = make_run(tmp_path, frames=80000.0)
    again = plan(other)
    assert again.plan == "start" and again.why == "its command changed"
    apply(again, said.append)
    assert said[-1].endswith("(its command changed)") and not (run.directory / "runs").exists()
    assert json.loads((run.directory / COMMAND_FILE).read_text())["frames"] == 80000.0


def test_the_fits_end_line_is_read_back():
    log = ("update 30/30 (100%) | 19,200 env frames | return 64.4\n"
           "Training stopped after 30 updates and 19200 env frames; mean return of the last 100 episodes: 64.4.\n"
           "Resuming from runs/checkpoints/cartpole/last.ckpt (update 30, 19200 env frames)\n"
           "Training stopped after 40 updates and 25600 env frames; mean return of the last 100 episodes: -12.5.\n")
    assert read_fit_summary(log) == (40, 25600, 100, -12.5)  # the last fit process's
    none_finished = "Training stopped after 1 updates and 640 env frames; mean return of the last 0 episodes: none " \
                    "finished."
    assert read_fit_summary(none_finished) == (1, 640, 0, None)
    assert read_fit_summary("Traceback (most recent call last):\n") is None


def test_the_table_has_a_row_per_run_numbers_to_the_right():
    results = [
        RunResult("lr=0.001", 0, "d0", 0, final_return=480.46, episodes=100, env_frames=150400, wall_s=21.4),
        RunResult("lr=0.001", 1, "d1", 1, wall_s=3.0),
        RunResult("lr=0.001", 2, "d2", 0, reused=True, final_return=12.0, env_frames=640, wall_s=9.0),
        RunResult("lr=0.001", 3, "d3", None),
    ]
    rows = table_rows(results)
    assert rows[0] == ("lr=0.001", "0", "exit 0", "480.5", "150,400", "21")
    assert [row[2] for row in rows] == ["exit 0", "exit 1", "reused", "not started"]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| setting  | seed | status      | final return | env frames | wall s |"
    assert lines[1] == "|----------|-----:|-------------|-------------:|-----------:|-------:|"
    assert lines[2] == "| lr=0.001 |    0 | exit 0      |        480.5 |    150,400 |     21 |"
    assert lines[5] == "| lr=0.001 |    3 | not started |            - |          - |      - |"
    assert exit_status(results) == 1 and exit_status([results[0], results[2]]) == 0
