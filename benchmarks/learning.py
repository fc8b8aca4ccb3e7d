"""Learning curves: return against env frames and against wall time, several seeds, next to a published result.

For each task: every seed is one ``python -m lit_impala fit`` process (the shipped YAML with its callbacks), run by
the launcher (``lit_impala.launch``) one after the other (``--parallel N``: N seeds of a task at a time), logging
to CSV, in a directory of its own, ``<workdir>/<task>/seed<k>/`` (``--workdir``, by default ``runs/learning`` in the
repository, which git ignores), where its checkpoints, CSV log and ``fit.log`` stay. A seed's curve is written there
as soon as its process ends (``curve.json``, with the command that made it); the logged history of every seed is
then written per task as

* ``results/learning/<task>.png``: mean and min/max band over seeds, return vs env frames and vs wall seconds,
  with the task's target and the published references drawn in;
* ``results/learning/<task>.json``: every seed's curve, and the summary row;

and the summary table (final mean return over the last 100 episodes; frames and wall seconds to the target, per
seed) is printed, written to ``results/learning.json``, and put into docs/results.md between the
``<!-- learning-table -->`` markers. Rerunning a task replaces its files and its row.

Stopping and going on (the launcher's rules, ``lit_impala.launch.runs``): Ctrl-C stops the running fits after their
current update, with a checkpoint (a second Ctrl-C stops them at once; they resume from their last periodic
checkpoint then), and the benchmark with them; a killed sitting leaves the same. Typing the same command again goes
on where it stopped: a seed finished with the same ``fit`` command (config, overrides, seed, frame budget) is reused
without running; an unfinished seed with a checkpoint from the same command is resumed (``fit --ckpt_path last``:
its CSV log goes on in a new version, read together with the earlier ones); a seed whose command changed, or that
stopped before its first checkpoint, starts over in a cleared directory. ``--fresh`` starts every seed of the tasks
over (after a change to the code, which the command does not show).

    python -m benchmarks.learning --tasks cartpole,pendulum            # each task's own budget and seeds
    python -m benchmarks.learning --tasks cartpole --frames 50000 --seeds 1   # a smoke run
    python -m benchmarks.learning --tasks cartpole --parallel 3         # the 3 seeds at once
    python -m benchmarks.learning --replot                              # redraw all from the saved curves
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS_DIR, RESULTS_DIR_VARIABLE, OneLineErrorParser, print_table, write_result
from lit_impala.launch import Interrupted, Run, RunResult, launch
from lit_impala.launch.runs import LOG_FILE, read_json, write_json

REPO = Path(__file__).resolve().parent.parent
RESULTS_PAGE = REPO / "docs" / "results.md"  # where the table and the plots are shown
WORKDIR = REPO / "runs" / "learning"
CURVE_FILE = "curve.json"  # a seed's curve, next to the launcher's record of its run
TABLE_START, TABLE_END = "<!-- learning-table -->", "<!-- /learning-table -->"


@dataclass(frozen=True)
class Reference:
    """A published result to put next to ours: who, the value, at what budget, and where it is printed."""

    name: str
    value: float
    frames: float
    source: str


@dataclass(frozen=True)
class Task:
    config: str
    frames: float  # env frames per seed (agent steps; MinAtar has no frame skip)
    seeds: int
    target: float | None = None
    references: tuple[Reference, ...] = ()
    overrides: tuple[str, ...] = field(default_factory=tuple)


# Published results next to ours: the algorithm, the budget and where the number is printed (the MinAtar paper has
# figures only: its values are read off the figure, to the nearest unit or half unit).
CLEANRL_PPO = "CleanRL ppo.py, {env}, 3 seeds (vwxyzjn/cleanrl, docs/rl-algorithms/ppo.md)"
ZOO = "rl-baselines3-zoo benchmark.md (DLR-RM/rl-baselines3-zoo), one run, deterministic evaluation"
CLEANRL_MUJOCO = ("CleanRL ppo_continuous_action.py, {env}-v4, 3 seeds, 10 epochs over each batch "
                  "(vwxyzjn/cleanrl, docs/benchmark/ppo_continuous_action.md)")
SAMPLE_FACTORY_MUJOCO = ("Sample Factory APPO, {env}, 10M frames (alex-petrenko/sample-factory, MuJoCo benchmark "
                         "in its docs), the figure issue 25 quotes")
MINATAR_FIGURE = ("Young & Tian 2019 (MinAtar), kenjyoung/MinAtar README, img/learning_curves.gif, read off the "
                  "figure at 5M frames: mean of 30 runs, sticky actions 0.1, full 6-action set")
GYMNAX_PPO = "gymnax PPO on Breakout-MinAtar, 10M steps (RobertTLange/gymnax README), the figure issue 25 quotes"
MINATAR_PAPER = {  # game: (DQN, AC(lambda=0.8), AC(0)) at 5M frames; AC(0) is given for Asterix only
    "Asterix": (17.0, 19.0, 20.5), "Breakout": (10.0, 17.5, None), "Freeway": (50.0, 47.0, None),
    "Seaquest": (20.0, 15.5, None), "SpaceInvaders": (43.0, 185.0, None),
}
MINATAR_GAMES = tuple(MINATAR_PAPER)


def minatar_references(game: str) -> tuple[Reference, ...]:
    names = ("DQN", "AC(0.8)", "AC(0)")
    return tuple(Reference(name, value, 5e6, MINATAR_FIGURE)
                 for name, value in zip(names, MINATAR_PAPER[game], strict=True) if value is not None)


def minatar_target(game: str) -> float:
    """The best of the paper's agents at 5M frames: the target of one config for all five games."""
    return max(value for value in MINATAR_PAPER[game] if value is not None)


MUJOCO_PPO = {"HalfCheetah": 1442.6, "Hopper": 2382.9}  # CleanRL's PPO at 1M steps
MUJOCO_APPO = {"HalfCheetah": 6263.0, "Hopper": 2793.0}  # Sample Factory's APPO at 10M frames
MUJOCO_TARGETS_5M = {"HalfCheetah": 5000.0, "Hopper": 2800.0}


def mujoco_task(env: str, frames: float) -> Task:
    """``<env>-v5`` with the one MuJoCo config: at 1M frames against CleanRL's PPO at 1M (the target), at 5M
    against Sample Factory's APPO at 10M (the target a little below it)."""
    ppo = Reference("PPO", MUJOCO_PPO[env], 1e6, CLEANRL_MUJOCO.format(env=env))
    if frames <= 1e6:
        return Task(MUJOCO, frames, 3, MUJOCO_PPO[env], (ppo,), (f"--data.env_id={env}-v5",))
    appo = Reference("APPO", MUJOCO_APPO[env], 1e7, SAMPLE_FACTORY_MUJOCO.format(env=f"{env}-v4"))
    return Task(MUJOCO, frames, 3, MUJOCO_TARGETS_5M[env], (ppo, appo), (f"--data.env_id={env}-v5",))


# Atari: frames are agent steps (each 4 emulator frames at frame skip 4), as RLlib and CleanRL count them.
RLLIB_APPO_PONG = ("RLlib APPO, tuned example pong-appo (ray-project/ray, rllib/tuned_examples/appo), 32 workers: "
                   "'can also solve Pong in 2.5 million timesteps', the figure issue 26 quotes")
CLEANRL_PPO_PONG = "CleanRL ppo_atari.py, PongNoFrameskip-v4, 10M agent steps, the figure issue 26 quotes"
CLEANRL_PPO_BREAKOUT = ("CleanRL ppo_atari.py, BreakoutNoFrameskip-v4, 10M agent steps, 414.66 +- 28.09 over 3 seeds "
                        "(vwxyzjn/cleanrl, docs/rl-algorithms/ppo.md)")
CLEANBA_IMPALA_PONG = ("cleanba IMPALA, Pong-v5 with sticky actions and the full action set, 200M frames = 50M agent "
                       "steps, the figure issue 26 quotes")

# One config per family of tasks, each run unchanged over the family's tasks (only the env id differs).
CLASSIC, MINATAR, MUJOCO = "configs/cartpole.yaml", "configs/minatar.yaml", "configs/mujoco.yaml"
ATARI_CPU = "configs/atari_cpu.yaml"

TASKS: dict[str, Task] = {
    # vector observations, discrete actions
    "cartpole": Task(CLASSIC, 5e5, 3, 490.0, (Reference("PPO", 490.04, 5e5, CLEANRL_PPO.format(env="CartPole-v1")),)),
    "acrobot": Task(CLASSIC, 5e5, 3, -86.36, (Reference("PPO", -86.36, 5e5, CLEANRL_PPO.format(env="Acrobot-v1")),),
                    ("--data.env_id=Acrobot-v1",)),
    # tasks with a config of their own
    "pendulum": Task("configs/pendulum.yaml", 2e6, 3, -200.0,
                     (Reference("PPO, gSDE", -172.2, 1e5, f"{ZOO}, Pendulum-v1"),
                      Reference("A2C, gSDE", -163.0, 1e6, f"{ZOO}, Pendulum-v1"))),
    "cartpole_pomdp_lstm": Task("configs/cartpole_pomdp.yaml", 1.92e6, 3, 400.0,
                                (Reference("RecurrentPPO", 500.0, 1e5, f"{ZOO}, CartPoleNoVel-v1"),)),
    "cartpole_pomdp_mlp": Task("configs/cartpole_pomdp.yaml", 1.92e6, 3, 400.0,
                               (Reference("RecurrentPPO", 500.0, 1e5, f"{ZOO}, CartPoleNoVel-v1"),),
                               ("--model.use_lstm=false",)),
    # MinAtar: all five games with minatar.yaml
    **{
        f"minatar_{game.lower()}": Task(MINATAR, 5e6, 3, minatar_target(game), minatar_references(game),
                                        (f"--data.env_id=MinAtar/{game}-v1",))
        for game in MINATAR_GAMES
    },
    "minatar_breakout_10m": Task(MINATAR, 1e7, 3, 28.0, (Reference("PPO", 28.0, 1e7, GYMNAX_PPO),),
                                 ("--data.env_id=MinAtar/Breakout-v1",)),
    # MuJoCo (gymnasium[mujoco], mujoco.yaml's backend) with mujoco.yaml
    "halfcheetah_1m": mujoco_task("HalfCheetah", 1e6),
    "hopper_1m": mujoco_task("Hopper", 1e6),
    "halfcheetah": mujoco_task("HalfCheetah", 5e6),
    "hopper": mujoco_task("Hopper", 5e6),
    # Atari with atari_cpu.yaml (envpool, RLlib's network at 42x42), 1 seed: hours on 2 cores
    "pong": Task(ATARI_CPU, 5e6, 1, 18.0, (Reference("APPO", 18.0, 2.5e6, RLLIB_APPO_PONG),
                                           Reference("PPO", 20.5, 1e7, CLEANRL_PPO_PONG),
                                           Reference("IMPALA", 19.1, 5e7, CLEANBA_IMPALA_PONG))),
    # the curve over what fits in one sitting on 2 cores (~35 min), next to PPO's score at 5x the agent steps
    "breakout": Task(ATARI_CPU, 2e6, 1, None, (Reference("PPO", 414.66, 1e7, CLEANRL_PPO_BREAKOUT),),
                     ("--data.env_id=ALE/Breakout-v5",)),
}


def updates_for(frames: float, config: Path, overrides: tuple[str, ...]) -> int:
    """``trainer.max_steps`` that learns from ``frames`` env frames: batches of ``unroll_length x batch_size``
    frames, ``passes_per_batch x minibatches_per_pass`` updates each (the config's values, then those of any
    ``--config=`` override file and ``--data.*=`` override in order, else the data module's defaults)."""
    import yaml

    values = {"unroll_length": 20, "batch_size": 32, "passes_per_batch": 1, "minibatches_per_pass": 1}
    for path in (config, *(Path(o) for o in map(override_config, overrides) if o is not None)):
        data = (yaml.safe_load(path.read_text()) or {}).get("data", {})
        values.update({key: data[key] for key in values if key in data})
    for override in overrides:
        for key in values:
            if override.startswith(f"--data.{key}="):
                values[key] = int(override.split("=", 1)[1])
    batches = max(1, math.ceil(frames / (values["unroll_length"] * values["batch_size"])))
    return batches * values["passes_per_batch"] * values["minibatches_per_pass"]


def override_config(override: str) -> str | None:
    """The repository path of a ``--config=configs/x.yaml`` override (a second config file, read after the
    task's), or None for any other override."""
    return str(REPO / override.split("=", 1)[1]) if override.startswith("--config=") else None


def fit_arguments(task: Task, seed: int, frames: float) -> list[str]:
    """One seed's ``python -m lit_impala`` arguments, config files named relative to the repository (as recorded
    next to its curve: the same arguments are the same run)."""
    updates = updates_for(frames, REPO / task.config, task.overrides)
    return [
        "fit", "--config", task.config, *task.overrides,
        f"--seed_everything={seed}", f"--trainer.max_steps={updates}", "--episode_stats.stop_at_return=null",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir=csv",
        "--trainer.logger.init_args.name=run",
    ]


def seed_run(name: str, task: Task, seed: int, frames: float, workdir: Path) -> Run:
    """One seed of a task as a launcher run in ``workdir/<name>/seed<k>``: its ``fit`` arguments (config files
    relative to the repository) recorded with its frame budget, so that the same arguments are the same run."""
    return Run(name, seed, workdir / name / f"seed{seed}", tuple(fit_arguments(task, seed, frames)), REPO,
               {"frames": frames})


def seed_curve(task: Task, run: Run, result: RunResult) -> dict:
    """One seed's curve once its run ended: the one saved next to a run finished before, else read from the CSV
    logs of its fit processes and saved next to it (``curve.json``); frames, return, wall seconds."""
    if not (result.reused or result.exit_code == 0):
        log = run.directory / LOG_FILE
        tail = log.read_text()[-2000:] if log.exists() else result.note
        raise RuntimeError(f"seed {run.seed} of {task.config} ended with {result.status}:\n{tail}")
    saved = read_json(run.directory / CURVE_FILE) or {}
    if result.reused and saved.get("command") == run.record:
        curve = saved["curve"]
        print(f"{run.name}: reusing the curve finished in {run.directory}: {curve['return'][-1]:.1f} after "
              f"{curve['env_frames'][-1]:,.0f} frames", flush=True)
        return curve
    parts = [read_log(path) for path in csv_logs(run.directory / "csv")]
    frames_seen, returns, seconds = merge_logs(parts)
    if not returns:
        raise RuntimeError(f"seed {run.seed} of {task.config} logged no episode return")
    curve = {"seed": run.seed, "env_frames": frames_seen, "return": returns, "train_seconds": seconds,
             "resumed_at_frames": resume_points(parts),
             "process_seconds": result.wall_s}  # of the last fit process, when the run was resumed
    write_json(run.directory / CURVE_FILE, {"command": run.record, "curve": curve})
    print(f"{run.name}: {curve['return'][-1]:.1f} after {curve['env_frames'][-1]:,.0f} frames, "
          f"{curve['process_seconds']:.0f} s", flush=True)
    return curve


def csv_logs(directory: Path) -> list[Path]:
    """Every ``metrics.csv`` the CSV logger wrote under ``directory``, oldest version first (one version per fit
    process: ``version_10`` comes after ``version_9``)."""
    def version(path: Path) -> int:
        number = path.parent.name.removeprefix("version_")
        return int(number) if number.isdigit() else -1

    return sorted(directory.rglob("metrics.csv"), key=lambda path: (str(path.parent.parent), version(path)))


# Metric names before they were grouped by prefix: a seed stopped under the old names resumes into the new ones.
FRAMES_NAMES, SECONDS_NAMES = ("progress/env_frames", "env_frames"), ("progress/train_s", "time/train_s")


def read_log(path: Path) -> list[tuple[float, float, float]]:
    """The logged ``(env frames, mean return, progress/train_s)`` rows of one CSV log, in order."""
    def first(row: dict, names: tuple[str, ...]) -> str | None:
        return next((row[name] for name in names if row.get(name)), None)

    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            frames = first(row, FRAMES_NAMES)
            if row.get("episode/return") and frames:
                rows.append((float(frames), float(row["episode/return"]), float(first(row, SECONDS_NAMES) or "nan")))
    return rows


def merge_logs(parts: list[list[tuple[float, float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """One curve (frames, returns, train seconds), frames strictly increasing, from the CSV logs of a run's fit
    processes, oldest first.

    A row logged again for as many frames as an earlier one, or fewer, replaces it and every row after it: the
    last update's row is logged twice, and a resumed process starts from the last checkpoint, so the rows its
    predecessor logged from there on were redone (the later values are kept). Each process counts
    ``time/train_s`` from its own start: a later part's seconds go on from the last row kept before it (what
    was trained after that row and lost with the stop is not counted).
    """
    merged: list[tuple[float, float, float]] = []
    for part in parts:
        if not part:
            continue  # e.g. resumed at the budget already: nothing left to train
        while merged and merged[-1][0] >= part[0][0]:
            merged.pop()
        offset = merged[-1][2] if merged else 0.0
        for frames, value, seconds in part:
            while merged and merged[-1][0] >= frames:
                merged.pop()
            merged.append((frames, value, seconds + offset))
    return [row[0] for row in merged], [row[1] for row in merged], [row[2] for row in merged]


def resume_points(parts: list[list[tuple[float, float, float]]]) -> list[float]:
    """The env frames of the first row each resumed fit process logged (every part after the first that logged
    anything): where the curve goes on after a stop, drawn on the plot."""
    starts = [part[0][0] for part in parts if part]
    return starts[1:]


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
        if x_key == "env_frames":  # where a seed was stopped and resumed (--ckpt_path last): the curve goes on
            resumed = sorted({f for c in curves for f in c.get("resumed_at_frames", [])})
            for i, frames in enumerate(resumed):
                axis.axvline(frames / scale, color="grey", linewidth=0.8, linestyle="--", alpha=0.6,
                             label="a seed resumed" if i == 0 else None)
        axis.fill_between(grid / scale, low, high, color="C0", alpha=0.25, linewidth=0, label="min / max")
        if task.target is not None:
            axis.axhline(task.target, color="grey", linestyle=":", label=f"target {task.target:g}")
        shown = task.references if x_key == "env_frames" else ()  # published results are at a frame budget
        for color, reference in zip(("C3", "C2", "C1"), shown, strict=False):
            axis.plot([reference.frames / scale], [reference.value], marker="*", markersize=11, color=color,
                      linestyle="none", label=f"{reference.name} (published) at {reference.frames / 1e6:g}M")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean return, last 100 episodes")
    axes[0].legend(fontsize=7, loc="best")  # clear of the curve and the published stars
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
        "references": [asdict(reference) for reference in task.references],
        "versus_references": versus_references(float(np.mean(finals)), task.references),
    }


def versus_references(final: float, references: tuple[Reference, ...]) -> str:
    """Plainly: where our final mean return stands against each published result, budgets included."""
    return "; ".join(
        f"{'at or above' if final >= r.value else 'below'} {r.name} ({r.value:g} at {r.frames / 1e6:g}M)"
        for r in references
    ) or "-"


def markdown_table(rows: list[dict]) -> str:
    """The summary table, then each task's plot, as docs/results.md shows them (the plots' paths are relative to it)."""
    def fmt_list(values, scale, unit):
        return " / ".join("not reached" if v is None else f"{v / scale:.{2 if scale > 1 else 1}f}{unit}"
                          for v in values)

    lines = ["| task | seeds | frames | final return (mean; per seed) | target | frames to target | "
             "wall s to target | published reference | ours at the end vs reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    sources: list[str] = []  # cited once each, under the table
    for row in rows:
        row.setdefault("references", [])  # rows written before references were recorded (`--replot` adds them)
        row.setdefault("versus_references", "-")
        for r in row["references"]:
            if r["source"] not in sources:
                sources.append(r["source"])
        references = "; ".join(
            f"{r['name']} {r['value']:g} at {r['frames'] / 1e6:g}M [{sources.index(r['source']) + 1}]"
            for r in row["references"]
        ) or "-"
        target = "-" if row["target"] is None else f"{row['target']:g}"
        lines.append(
            f"| {row['task']} | {row['seeds']} | {row['frames'] / 1e6:.2f}M | {row['final_return_mean']:.1f}; "
            + " / ".join(f"{v:.1f}" for v in row["final_return_per_seed"])
            + f" | {target} | "
            + ("-" if row["target"] is None else fmt_list(row["frames_to_target_per_seed"], 1e6, "M"))
            + " | "
            + ("-" if row["target"] is None else fmt_list(row["seconds_to_target_per_seed"], 1, " s"))
            + f" | {references} | {row['versus_references']} |"
        )
    lines.append("")
    lines += [f"[{number}] {source}  " for number, source in enumerate(sources, 1)]
    lines.append("")
    lines += [f"![{row['task']}](../benchmarks/results/learning/{row['task']}.png)" for row in rows]
    return "\n".join(lines)


def update_results_page(table: str, page: Path = RESULTS_PAGE) -> bool:
    """Put ``table`` between the page's markers; False if it has none."""
    text = page.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        return False
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    page.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")
    return True


def run_task(name: str, task: Task, frames: float, seeds: int, workdir: Path, fresh: bool = False,
             parallel: int = 1) -> list[dict]:
    """Every seed of one task through the launcher, ``parallel`` fits at a time (1: one after the other, as the wall
    times in the results were measured), each in ``workdir/<name>/seed<k>``; their curves, in seed order.

    Raises:
        Interrupted: Ctrl-C or SIGTERM stopped it (every running fit stopped after its update, with a checkpoint).
    """
    runs = [seed_run(name, task, seed, frames, workdir) for seed in range(seeds)]
    results = launch(runs, parallel=parallel, fresh=fresh, say=lambda line: print(line, flush=True))
    return [seed_curve(task, run, result) for run, result in zip(runs, results, strict=True)]


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineErrorParser(prog="python -m benchmarks.learning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated, from: {', '.join(TASKS)} (default: all; with --replot, all run so far)")
    parser.add_argument("--frames", type=float, default=None, help="env frames per seed (default: the task's)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task (default: the task's)")
    parser.add_argument("--workdir", type=Path, default=WORKDIR,
                        help="where each seed runs, in <workdir>/<task>/seed<k>/, and its finished curve stays "
                             "(default: runs/learning in the repository)")
    parser.add_argument("--fresh", action="store_true",
                        help="start every seed of the tasks over, even one finished or stopped with the same command")
    parser.add_argument("--parallel", type=int, default=1,
                        help="seeds of a task run at a time (default 1: one after the other, so that wall times "
                             "stay comparable with the published ones)")
    parser.add_argument("--no-table", "--no-readme", dest="no_table", action="store_true",
                        help="do not rewrite the table in docs/results.md")
    parser.add_argument("--replot", action="store_true",
                        help="run nothing: redraw the plots and rows from the curves already in results/learning "
                             "(after a change to a task's references or target)")
    args = parser.parse_args(argv)
    if args.frames is not None and not args.frames > 0:
        parser.error(f"--frames must be > 0, got {args.frames:g}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")
    results_dir = Path(os.environ.get(RESULTS_DIR_VARIABLE, RESULTS_DIR))
    out = results_dir / "learning"
    if args.tasks:
        names = args.tasks.split(",")
    else:
        names = [n for n in TASKS if not args.replot or (out / f"{n}.json").exists()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    if args.replot:
        missing = [n for n in names if not (out / f"{n}.json").exists()]
        if missing:
            parser.error(f"--replot: no curves for {', '.join(missing)} in {out}: run the task first")
    out.mkdir(parents=True, exist_ok=True)
    summary_path = results_dir / "learning.json"
    rows = {row["task"]: row for row in (json.loads(summary_path.read_text()).get("rows", [])
                                         if summary_path.exists() else [])}
    for name in names:
        task = TASKS[name]
        if args.replot:
            curves = json.loads((out / f"{name}.json").read_text())["curves"]
        else:
            try:
                curves = run_task(name, task, args.frames or task.frames, args.seeds or task.seeds,
                                  args.workdir.resolve(), args.fresh, args.parallel)
            except Interrupted as stop:
                print(f"stopped during {name}: type the same command again to go on from there", file=sys.stderr)
                sys.exit(128 + stop.signum)
        row = summarize(name, task, curves)
        plot(name, task, curves, out / f"{name}.png")
        (out / f"{name}.json").write_text(json.dumps({"row": row, "curves": curves}) + "\n")
        rows[name] = row
    ordered = [rows[n] for n in TASKS if n in rows]
    print_table(
        "Learning: mean return of the last 100 episodes at the end of the budget",
        ["task", "seeds", "frames", "final return", "target", "frames to target (per seed)", "vs published"],
        [[r["task"], r["seeds"], f"{r['frames'] / 1e6:.2f}M", r["final_return_mean"],
          "-" if r["target"] is None else r["target"],
          " / ".join("-" if v is None else f"{v / 1e6:.2f}M" for v in r["frames_to_target_per_seed"]),
          r.get("versus_references", "-")]
         for r in ordered],
    )
    table = markdown_table(ordered)
    result = {"rows": ordered, "table_markdown": table}
    write_result("learning", result)
    if not args.no_table and update_results_page(table):
        print(f"updated the table in {RESULTS_PAGE.relative_to(REPO)}")
    return result


if __name__ == "__main__":
    main()
