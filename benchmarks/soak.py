"""Soak: a long CartPole run, resident memory (RSS) of the learner and of each actor over time.

Starts ``python -m lit_impala fit --config CONFIG`` (no early stop, a step budget it never reaches) as
a child process, samples the RSS of the learner and of every actor process every ``--interval``
seconds for ``--minutes``, then stops the run with SIGINT (the graceful path: last checkpoint, actors
shut down) and checks nothing is left. Growth is measured from the first sample after ``--settle``
seconds (start-up, first allocations) to the end; the target is < 10% for every process.

    python -m benchmarks.soak --minutes 20
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil

from benchmarks.common import print_table, write_result


def actor_processes(learner: psutil.Process) -> list[psutil.Process]:
    return [p for p in learner.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--settle", type=float, default=60.0, help="growth is measured from this many seconds on")
    args, overrides = parser.parse_known_args(argv)
    overrides = [arg for arg in overrides if arg != "--"]

    workdir = tempfile.mkdtemp(prefix="lit_impala_soak_")
    command = [
        sys.executable,
        "-m",
        "lit_impala",
        "fit",
        "--config",
        os.path.abspath(args.config),
        "--episode_stats.stop_at_return=null",
        "--trainer.max_steps=100000000",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    log_path = os.path.join(workdir, "fit.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    learner = psutil.Process(process.pid)
    samples: list[dict] = []
    start = time.monotonic()
    try:
        while time.monotonic() - start < args.minutes * 60:
            if process.poll() is not None:
                raise RuntimeError(f"the run ended early (exit {process.returncode}); see {log_path}")
            actors = actor_processes(learner)
            sample = {"t": time.monotonic() - start, "learner": learner.memory_info().rss}
            for i, actor in enumerate(sorted(actors, key=lambda p: p.pid)):
                try:
                    sample[f"actor{i}"] = actor.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            samples.append(sample)
            time.sleep(args.interval)
        all_actors = actor_processes(learner)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        _, left = psutil.wait_procs(all_actors, timeout=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    names = [k for k in samples[-1] if k != "t"]
    settled = next(s for s in samples if s["t"] >= min(args.settle, samples[-1]["t"]))
    growth = {name: (samples[-1][name] - settled[name]) / settled[name] for name in names if name in settled}
    rows = [
        [f"{s['t'] / 60:.1f}", *[f"{s.get(n, 0) / 2**20:.0f}" for n in names]]
        for s in samples[:: max(1, len(samples) // 12)]
    ]
    rows.append(["growth", *[f"{growth.get(n, float('nan')):+.1%}" for n in names]])
    print_table(f"Soak: RSS (MiB) over {args.minutes:g} min, growth from {settled['t']:.0f} s to the end",
                ["minutes", *names], rows)
    result = {
        "config": args.config, "overrides": overrides, "minutes": args.minutes, "samples": samples,
        "growth_after_settle": growth, "max_growth": max(growth.values()), "processes_left": [p.pid for p in left],
        "exit_code_after_sigint": process.returncode,
    }
    print(f"max growth {result['max_growth']:+.1%} (target < 10%); processes left after SIGINT: {len(left)}; "
          f"exit code {process.returncode}")
    write_result("soak", result)
    return result


if __name__ == "__main__":
    main()
