"""Time to solve: wall seconds and env frames from process start until the mean return of the last
100 episodes reaches the config's ``stop_at_return`` (475 for CartPole-v1), one process per seed.

Each seed runs ``python -m lit_impala fit --config CONFIG --seed_everything S`` as a fresh process (so
the time includes interpreter start-up, imports, actor start-up and the first weights), with W&B
offline as configured; the frame count and return come from the run's own stopping line, and the seconds to each
phase from the line ``fit`` ends with.

    python -m benchmarks.time_to_solve --config configs/cartpole.yaml --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

from benchmarks.common import print_table, write_result

PHASE_LINE = re.compile(r"^Seconds from process start: (?P<phases>.*)$", re.MULTILINE)
PHASE = re.compile(r"(?P<name>[a-z][a-z -]*?) (?P<seconds>\d+\.\d)(?:, |$)")
REACHED = re.compile(
    r"Reached a mean return of (?P<ret>[-\d.]+) over the last \d+ episodes \(target [-\d.]+\) "
    r"after (?P<frames>\d+) env frames and (?P<updates>\d+) updates"
)


def solve_once(config: str, seed: int, overrides: list[str], timeout: float) -> dict:
    command = [sys.executable, "-m", "lit_impala", "fit", "--config", config, f"--seed_everything={seed}",
               "--trainer.enable_progress_bar=false", *overrides]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    match = REACHED.search(completed.stdout)
    phase_line = PHASE_LINE.search(completed.stdout)  # the run's own line (callbacks.PhaseTimes)
    phases = {m["name"]: float(m["seconds"]) for m in PHASE.finditer(phase_line["phases"])} if phase_line else {}
    if completed.returncode != 0:
        raise RuntimeError(f"seed {seed}: exit code {completed.returncode}\n{completed.stderr[-3000:]}")
    return {
        "seed": seed,
        "solved": match is not None,
        "wall_seconds": wall,
        "frames": int(match["frames"]) if match else None,
        "updates": int(match["updates"]) if match else None,
        "mean_return": float(match["ret"]) if match else None,
        "phases": phases,  # seconds from process start to the end of each phase, as the run printed them
        "command": " ".join(command),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per seed before giving up")
    args, overrides = parser.parse_known_args(argv)  # the rest: CLI overrides, e.g. --data.envs_per_actor=64
    overrides = [arg for arg in overrides if arg != "--"]

    runs = []
    for seed in args.seeds:
        run = solve_once(args.config, seed, overrides, args.timeout)
        runs.append(run)
        status = f"{run['wall_seconds']:.1f} s, {run['frames']} frames" if run["solved"] else "not solved"
        print(f"seed {seed}: {status}", flush=True)
    solved = [r for r in runs if r["solved"]]
    rows = [[r["seed"], "yes" if r["solved"] else "no", r["wall_seconds"], r["frames"] or "-", r["mean_return"] or "-"]
            for r in runs]
    summary = {"solved": f"{len(solved)}/{len(runs)}"}
    if solved:
        walls, frames = [r["wall_seconds"] for r in solved], [r["frames"] for r in solved]
        summary.update(
            wall_median=statistics.median(walls), wall_min=min(walls), wall_max=max(walls),
            frames_median=statistics.median(frames), frames_min=min(frames), frames_max=max(frames),
        )
        rows.append(["median", summary["solved"], summary["wall_median"], int(summary["frames_median"]), ""])
        rows.append(["range", "", f"{min(walls):.1f}-{max(walls):.1f}", f"{min(frames)}-{max(frames)}", ""])
    print_table(f"Time to solve ({args.config}), wall from process start",
                ["seed", "solved", "wall s", "frames", "return"], rows)
    names = list(dict.fromkeys(name for run in runs for name in run["phases"]))
    if names:  # the median of each phase's end over the seeds, then the process's exit as measured from outside
        summary["phases_median"] = {name: statistics.median(r["phases"][name] for r in runs if name in r["phases"])
                                    for name in names}
        print_table("Phases: median seconds from process start to the end of each",
                    ["phase", "median s"], [*summary["phases_median"].items(),
                                            ("exit", statistics.median(r["wall_seconds"] for r in runs))])
    result = {"config": args.config, "overrides": overrides, "runs": runs, **summary}
    write_result("time_to_solve", result)
    return result


if __name__ == "__main__":
    main()
