"""``python -m lit_impala.launch``: many ``fit`` runs from one config, a grid of overrides times seeds, at most
``--parallel`` at a time, as processes on this machine or as SLURM jobs (submitit), with a summary table at the end.

Each run is ``python -m lit_impala fit --config CONFIG <grid point> <--set overrides> --seed_everything S`` in its
own directory, ``<out>/<setting>/seed<S>/``, where its checkpoints, logs and ``fit.log`` stay (the config's relative
paths land there). Typing the same command again reuses finished runs and resumes stopped ones from their last
checkpoint (``--fresh`` starts all over). Every setting is checked as ``fit`` would check it before anything
starts: a bad one is one ``error:`` line naming it, exit 2. Ctrl-C (or SIGTERM) stops every running fit after its
update with a checkpoint, then prints the table. The exit code is 0 when every run exited 0, else 1 (a stop:
128 + the signal's number).

    python -m lit_impala.launch --config configs/cartpole.yaml --seeds 0-3 --parallel 2
    python -m lit_impala.launch --config configs/cartpole.yaml --seeds 0,1 --grid model.lr=0.002,0.0006 \\
        --grid data.unroll_length=20,40 --set trainer.max_steps=200 --out runs/lr_sweep
    python -m lit_impala.launch --config configs/cartpole.yaml --seeds 0-7 --parallel 8 --executor slurm \\
        --slurm partition=gpu --slurm timeout_min=120 --slurm cpus_per_task=4 --slurm gpus_per_node=1
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lit_impala.config import OneLineErrorParser
from lit_impala.launch import grid
from lit_impala.launch.check import check_settings
from lit_impala.launch.executors import Interrupted, launch
from lit_impala.launch.runs import Run, absolute_config_paths, plan
from lit_impala.launch.summary import FOOTNOTE, exit_status, markdown_table, table_rows, write_summary

PROG = "python -m lit_impala.launch"
EXECUTORS = ("local", "slurm", "submitit-local")  # submitit-local: submitit's local executor, SLURM's stand-in
# submitit's own names, passed as they are; any other --slurm key is an sbatch option (submitit's ``slurm_<key>``).
SUBMITIT_GENERIC = ("name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node",
                    "stderr_to_stdout")
DEFAULT_JOB_MINUTES = 60  # submitit's default is 5; a run its time limit cuts resumes when the command is typed again


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the fit's YAML, as for python -m lit_impala fit --config")
    parser.add_argument("--seeds", default="0", help="seed_everything of each run: 0,1,2,3 or 0-3 (default: 0)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a fit argument and its values, e.g. model.lr=0.001,0.0003; repeated: every "
                             "combination (commas inside [...] stay in the value)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="fixed",
                        help="a fit argument every run gets, e.g. trainer.max_steps=200 (repeatable)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="fits at a time (default 1); SLURM: jobs submitted at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"),
                        help="each run in <out>/<setting>/seed<S>/, the summary in <out> (default: runs/sweep)")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: processes on this machine; slurm: SLURM jobs through submitit; submitit-local: "
                             "the same jobs through submitit's local executor (a rehearsal of slurm here)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="a job parameter: submitit's timeout_min (default 60), cpus_per_task, gpus_per_node, "
                             "mem_gb, nodes, tasks_per_node, name, or any sbatch option submitit knows (partition, "
                             "account, qos, constraint, gres, time, ...); repeatable")
    parser.add_argument("--fresh", action="store_true",
                        help="start every run over, even one finished or stopped with the same command")
    return parser


def scalar(text: str) -> int | float | bool | str:
    """A --slurm value as the type submitit wants: ``8`` an int, ``7.5`` a float, ``true`` a bool, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def slurm_parameters(pairs: list[str]) -> dict:
    """``--slurm`` values as ``AutoExecutor.update_parameters`` keywords (sbatch options prefixed ``slurm_``)."""
    parameters: dict = {"timeout_min": DEFAULT_JOB_MINUTES}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise grid.GridError(f"--slurm: expected KEY=VALUE, e.g. partition=gpu, got {pair!r}")
        parameters[key if key in SUBMITIT_GENERIC else f"slurm_{key}"] = scalar(value)
    return parameters


def make_executor(kind: str, folder: Path, parameters: dict):
    """A submitit executor for ``slurm`` or ``submitit-local`` with ``parameters``; submitit's refusal of a
    parameter as ``ValueError`` naming it."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if kind == "slurm" else "local")
    try:
        executor.update_parameters(**parameters)
    except (NameError, AssertionError, TypeError, ValueError) as error:
        raise ValueError(f"--slurm: {str(error).splitlines()[0]}") from None
    return executor


def check_executor(kind: str, parameters: dict) -> None:
    """Refuse what would fail only at the first submission: no SLURM here, a parameter submitit does not know."""
    if kind == "local":
        return
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("--executor slurm: no sbatch on this machine's PATH (submitit-local runs the jobs here)")
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ValueError(f"--executor {kind} needs submitit: pip install submitit") from None
    with tempfile.TemporaryDirectory() as scratch:  # the real folder is made only once the sweep starts
        make_executor("submitit-local", Path(scratch), parameters)


def sweep_runs(args: argparse.Namespace, cwd: Path) -> list[Run]:
    """Every run of the command line, setting by setting, each seed in ``<out>/<setting>/seed<S>``."""
    seeds = grid.parse_seeds(args.seeds)
    axes = [grid.parse_axis(text) for text in args.grid]
    fixed = [grid.parse_key_value(text, "--set") for text in args.fixed]
    settings = grid.expand(axes, fixed, base_name=Path(args.config).stem)
    out = (cwd / args.out).resolve()
    return [Run(setting.name, seed, out / setting.name / f"seed{seed}",
                tuple(grid.fit_arguments(args.config, setting, seed)), cwd)
            for setting in settings for seed in seeds]


def missing_config(runs: list[Run]) -> str | None:
    """The first config file (``--config``, or a ``config`` grid or --set value) that is not a file."""
    for run in runs:
        arguments = absolute_config_paths(list(run.arguments), run.base)
        for previous, argument in zip(["", *arguments], arguments, strict=False):
            path = argument if previous == "--config" else argument.removeprefix("--config=")
            if (previous == "--config" or argument.startswith("--config=")) and not Path(path).is_file():
                return path
    return None


def settings_to_check(runs: list[Run], fresh: bool) -> list[tuple[str, list[str]]]:
    """One ``fit`` command per setting that has a run left to run (a finished run needs no check)."""
    chosen: dict[str, list[str]] = {}
    for run in runs:
        if run.setting not in chosen and plan(run, fresh).plan != "reuse":
            chosen[run.setting] = absolute_config_paths(list(run.arguments), run.base)
    return list(chosen.items())


def print_summary(results, out: Path, command: list[str], wall_s: float) -> None:
    json_path, markdown_path = write_summary(out, results, command)
    finished = sum(result.reused or result.exit_code == 0 for result in results)
    print(f"\n{len(results)} runs, {finished} exited 0, in {wall_s:.0f} s\n", flush=True)
    print(markdown_table(table_rows(results)))
    print(f"\n{FOOTNOTE}\nwrote {json_path} and {markdown_path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = [PROG, *(sys.argv[1:] if argv is None else argv)]
    cwd = Path.cwd()
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    try:
        runs = sweep_runs(args, cwd)
        parameters = slurm_parameters(args.slurm)
        check_executor(args.executor, parameters)
    except ValueError as error:  # GridError included
        parser.error(str(error))
    if (missing := missing_config(runs)) is not None:
        parser.error(f"--config: no such file: {missing}")
    if (problem := check_settings(settings_to_check(runs, args.fresh))) is not None:
        parser.error(problem)
    out = (cwd / args.out).resolve()
    executor = None if args.executor == "local" else make_executor(args.executor, out / "submitit", parameters)
    started = time.monotonic()
    try:
        results = launch(runs, parallel=args.parallel, fresh=args.fresh, executor=executor,
                         say=lambda line: print(line, flush=True))
    except Interrupted as stop:
        print_summary(stop.results, out, command, time.monotonic() - started)
        print(f"{stop}: type the same command again to go on from where each run stopped", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + stop.signum) from None
    print_summary(results, out, command, time.monotonic() - started)
    raise SystemExit(exit_status(results))


if __name__ == "__main__":
    main()
