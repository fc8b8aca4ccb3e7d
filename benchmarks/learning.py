"""Learning curves: return against env frames and against wall time, several seeds, next to a published result.

For each task: every seed is one ``python -m lit_impala fit`` process (the shipped YAML with its callbacks, run in
a scratch directory so its checkpoints and videos stay out of the repository), one after the other, logging to
CSV; the logged history is read back and written per task as

* ``results/learning/<task>.png``: mean and min/max band over seeds, return vs env frames and vs wall seconds,
  with the task's target and the published reference drawn in;
* ``results/learning/<task>.json``: every seed's curve, and the summary row;

and the summary table (final mean return over the last 100 episodes; frames and wall seconds to the target, per
seed) is printed, written to ``results/learning.json``, and put into README.md between the
``<!-- learning-table -->`` markers. Rerunning a task replaces its files and its row.

    python -m benchmarks.learning --tasks cartpole,pendulum            # each task's own budget and seeds
    python -m benchmarks.learning --tasks cartpole --frames 50000 --seeds 1   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, RESULTS_DIR_VARIABLE, print_table, write_result

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TABLE_START, TABLE_END = "<!-- learning-table -->", "<!-- /learning-table -->"


@dataclass(frozen=True)
class Reference:
    """A published result to put next to ours: the value, at what budget, and where it comes from."""

    value: float
    frames: float
    source: str


@dataclass(frozen=True)
class Task:
    config: str
    frames: float  # env frames per seed (agent steps; MinAtar has no frame skip)
    seeds: int
    target: float | None = None
    reference: Reference | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)


MINATAR_GAMES = ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")

TASKS: dict[str, Task] = {
    "cartpole": Task("configs/cartpole.yaml", 1.28e6, 3, 475.0),
    "pendulum": Task("configs/pendulum.yaml", 2e6, 3, -200.0),
    "cartpole_pomdp_lstm": Task("configs/cartpole_pomdp.yaml", 1.92e6, 3, 400.0),
    "cartpole_pomdp_mlp": Task("configs/cartpole_pomdp.yaml", 1.92e6, 3, 400.0, overrides=("--model.use_lstm=false",)),
    **{
        f"minatar_{game.lower()}": Task("configs/minatar.yaml", 5e6, 2, overrides=(f"--data.env_id=MinAtar/{game}-v1",))
        for game in MINATAR_GAMES
    },
}
TASKS["halfcheetah"] = Task("configs/mujoco.yaml", 5e6, 2, 1500.0, overrides=("--data.env_backend=envpool",))
TASKS["hopper"] = Task("configs/mujoco.yaml", 5e6, 2,
                       overrides=("--data.env_id=Hopper-v5", "--data.env_backend=envpool"))
# Published results next to ours (value, at what budget, source); tasks without one have none verified yet.
TASKS["minatar_breakout"] = Task(
    "configs/minatar.yaml", 5e6, 2, 15.0,
    Reference(28.0, 10e6, "gymnax README: PPO on Breakout-MinAtar after 10M steps, no sticky actions"),
    ("--data.env_id=MinAtar/Breakout-v1",),
)


def frames_per_update(config: Path, overrides: tuple[str, ...]) -> int:
    """``unroll_length x batch_size`` of the run (config values, else the data module's defaults)."""
    import yaml

    data = (yaml.safe_load(config.read_text()) or {}).get("data", {})
    values = {"unroll_length": data.get("unroll_length", 20), "batch_size": data.get("batch_size", 32)}
    for override in overrides:
        for key in values:
            if override.startswith(f"--data.{key}="):
                values[key] = int(override.split("=", 1)[1])
    return values["unroll_length"] * values["batch_size"]


def run_seed(task: Task, seed: int, frames: float, workdir: Path) -> dict:
    """One ``fit`` process; returns its curve read back from the CSV log: frames, return, wall seconds."""
    config = REPO / task.config
    updates = max(1, math.ceil(frames / frames_per_update(config, task.overrides)))
    command = [
        sys.executable, "-m", "lit_impala", "fit", "--config", str(config), *task.overrides,
        f"--seed_everything={seed}", f"--trainer.max_steps={updates}", "--episode_stats.stop_at_return=null",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir=csv",
        "--trainer.logger.init_args.name=run",
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(workdir / "fit.log", "w") as log:
        code = subprocess.run(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    wall = time.perf_counter() - started
    if code != 0:
        tail = (workdir / "fit.log").read_text()[-2000:]
        raise RuntimeError(f"seed {seed} of {task.config} exited with {code}:\n{tail}")
    frames_seen, returns, seconds = [], [], []
    for path in sorted((workdir / "csv").rglob("metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("episode/return") and row.get("env_frames"):
                    frames_seen.append(float(row["env_frames"]))
                    returns.append(float(row["episode/return"]))
                    seconds.append(float(row.get("time/train_s") or "nan"))
    if not returns:
        raise RuntimeError(f"seed {seed} of {task.config} logged no episode return")
    return {"seed": seed, "env_frames": frames_seen, "return": returns, "train_seconds": seconds,
            "process_seconds": wall}


def first_reaching(curve: dict, target: float) -> tuple[float, float] | None:
    """(env frames, wall seconds) of the first logged mean return >= target, or None."""
    for frames, value, seconds in zip(curve["env_frames"], curve["return"], curve["train_seconds"], strict=True):
        if value >= target:
            return frames, seconds
    return None


def band(curves: list[dict], x_key: str, points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over seeds of return interpolated on a common grid of ``x_key`` (up to the shortest run)."""
    end = min(max(c[x_key]) for c in curves)
    grid = np.linspace(0, end, points)
    values = np.stack([np.interp(grid, c[x_key], c["return"], left=np.nan) for c in curves])
    with warnings.catch_warnings():  # grid points before a seed's first logged return are NaN: left blank
        warnings.simplefilter("ignore", RuntimeWarning)
        return grid, np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def plot(name: str, task: Task, curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    for axis, x_key, scale, label in ((axes[0], "env_frames", 1e6, "env frames (M)"),
                                      (axes[1], "train_seconds", 1.0, "wall seconds of training")):
        grid, mean, low, high = band(curves, x_key)
        axis.plot(grid / scale, mean, color="C0", label=f"lit_impala, mean of {len(curves)} seeds")
        axis.fill_between(grid / scale, low, high, color="C0", alpha=0.25, linewidth=0, label="min / max")
        if task.target is not None:
            axis.axhline(task.target, color="grey", linestyle=":", label=f"target {task.target:g}")
        if task.reference is not None and x_key == "env_frames":
            axis.plot([task.reference.frames / scale], [task.reference.value], marker="*", markersize=11,
                      color="C3", linestyle="none", label="published reference")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean return, last 100 episodes")
    axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(f"{name}: {task.config} {' '.join(task.overrides)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def summarize(name: str, task: Task, curves: list[dict]) -> dict:
    finals = [c["return"][-1] for c in curves]
    reached = [first_reaching(c, task.target) if task.target is not None else None for c in curves]
    return {
        "task": name,
        "config": task.config,
        "overrides": list(task.overrides),
        "seeds": len(curves),
        "frames": max(max(c["env_frames"]) for c in curves),
        "final_return_mean": float(np.mean(finals)),
        "final_return_per_seed": finals,
        "target": task.target,
        "frames_to_target_per_seed": [r[0] if r else None for r in reached],
        "seconds_to_target_per_seed": [r[1] if r else None for r in reached],
        "reference": asdict(task.reference) if task.reference else None,
    }


def markdown_table(rows: list[dict]) -> str:
    """The summary table, then each task's plot (README.md shows both)."""
    def fmt_list(values, scale, unit):
        return " / ".join("not reached" if v is None else f"{v / scale:.{2 if scale > 1 else 1}f}{unit}"
                          for v in values)

    lines = ["| task | seeds | frames | final return (mean; per seed) | target | frames to target | "
             "wall s to target | published reference |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ref = row["reference"]
        target = "-" if row["target"] is None else f"{row['target']:g}"
        lines.append(
            f"| {row['task']} | {row['seeds']} | {row['frames'] / 1e6:.2f}M | {row['final_return_mean']:.1f}; "
            + " / ".join(f"{v:.1f}" for v in row["final_return_per_seed"])
            + f" | {target} | "
            + ("-" if row["target"] is None else fmt_list(row["frames_to_target_per_seed"], 1e6, "M"))
            + " | "
            + ("-" if row["target"] is None else fmt_list(row["seconds_to_target_per_seed"], 1, " s"))
            + " | "
            + ("-" if ref is None else f"{ref['value']:g} at {ref['frames'] / 1e6:g}M frames: {ref['source']}")
            + " |"
        )
    lines.append("")
    lines += [f"![{row['task']}](benchmarks/results/learning/{row['task']}.png)" for row in rows]
    return "\n".join(lines)


def update_readme(table: str, readme: Path = README) -> bool:
    text = readme.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        return False
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    readme.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--frames", type=float, default=None, help="env frames per seed (default: the task's)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task (default: the task's)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's table")
    args = parser.parse_args(argv)
    names = args.tasks.split(",")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")

    results_dir = Path(os.environ.get(RESULTS_DIR_VARIABLE, RESULTS_DIR))
    out = results_dir / "learning"
    out.mkdir(parents=True, exist_ok=True)
    summary_path = results_dir / "learning.json"
    rows = {row["task"]: row for row in (json.loads(summary_path.read_text()).get("rows", [])
                                         if summary_path.exists() else [])}
    for name in names:
        task = TASKS[name]
        frames = args.frames or task.frames
        with tempfile.TemporaryDirectory(prefix=f"learning_{name}_") as scratch:
            curves = []
            for seed in range(args.seeds or task.seeds):
                curve = run_seed(task, seed, frames, Path(scratch) / f"seed{seed}")
                print(f"{name} seed {seed}: {curve['return'][-1]:.1f} after {curve['env_frames'][-1]:,.0f} frames, "
                      f"{curve['process_seconds']:.0f} s", flush=True)
                curves.append(curve)
        row = summarize(name, task, curves)
        plot(name, task, curves, out / f"{name}.png")
        (out / f"{name}.json").write_text(json.dumps({"row": row, "curves": curves}) + "\n")
        rows[name] = row
    ordered = [rows[n] for n in TASKS if n in rows]
    print_table(
        "Learning: mean return of the last 100 episodes at the end of the budget",
        ["task", "seeds", "frames", "final return", "target", "frames to target (per seed)"],
        [[r["task"], r["seeds"], f"{r['frames'] / 1e6:.2f}M", r["final_return_mean"],
          "-" if r["target"] is None else r["target"],
          " / ".join("-" if v is None else f"{v / 1e6:.2f}M" for v in r["frames_to_target_per_seed"])]
         for r in ordered],
    )
    table = markdown_table(ordered)
    result = {"rows": ordered, "table_markdown": table}
    write_result("learning", result)
    if not args.no_readme and update_readme(table):
        print(f"updated the table in {README.name}")
    return result


if __name__ == "__main__":
    main()
