"""Soak: long runs of a config, every process's memory and open files, and shared-memory segments, over time.

Runs ``python -m lit_impala fit --config CONFIG`` (no early stop, a budget it never reaches) once per scenario,
the scenarios side by side, each in a scratch directory of its own:

* ``ddp``: 2 DDP ranks on the CPU (``--trainer.devices=2 --trainer.strategy=ddp``), each rank with its local
  actor processes;
* ``remote``: a single learner with remote actor nodes (``--data.actors=remote``, the ``mp`` launcher). Remote
  actors cannot be combined with DDP in one run (torchrl's distributed collector makes the learner rank 0 of
  the default process group, which DDP needs too: ``cli.check_run_settings``), hence two runs.

Every ``--interval`` seconds it samples, for every process of each run (the learner, DDP's second rank, actor
processes and remote nodes, W&B's service, multiprocessing's resource tracker): resident memory (RSS) and open
file descriptors; and, for each run, the ``/dev/shm`` segments its processes hold (count and bytes). After
``--minutes`` it stops each run with SIGINT (the graceful path: last checkpoint, actors shut down) and checks
that it exits 130 and leaves no process behind. Growth is measured from the first sample after ``--settle``
seconds (start-up, first allocations) to the end, each end the median of 5 samples (one sample is noisy: the
learner's RSS moves with each batch in flight and each evaluation); the target is < 10% for every process and
measure.

    python -m benchmarks.soak --minutes 30                # both scenarios, configs/cartpole.yaml
    python -m benchmarks.soak --config configs/pendulum.yaml --scenarios remote -- --data.num_actors=2
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.common import OneLineErrorParser, print_table, write_result

SCENARIOS = {
    "ddp": ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"],
    "remote": ["--data.actors=remote"],
}
TARGET_GROWTH = 0.10
SHM = Path("/dev/shm")


def role(process: psutil.Process, learner_pid: int) -> str:
    """What a process of a run is, from its command line."""
    if process.pid == learner_pid:
        return "learner"
    try:
        command = " ".join(process.cmdline())
        environment = process.environ()
    except psutil.Error:
        return "gone"
    if "resource_tracker" in command:
        return "resource_tracker"
    if "wandb" in command:
        return "wandb"
    if "spawn_main" in command:
        return "actor"  # a local actor process or a remote actor node (the "mp" launcher spawns both)
    if "lit_impala" in command and environment.get("LOCAL_RANK"):
        return f"rank{environment['LOCAL_RANK']}"
    return Path(process.cmdline()[0]).name if process.cmdline() else "other"


def shm_segments(processes: list[psutil.Process]) -> dict[str, int]:
    """The ``/dev/shm`` segments (POSIX shared memory: torch's tensors shared between processes, our weight
    mailbox, multiprocessing's semaphores) that ``processes`` have mapped or open, with their sizes."""
    found = {}
    for process in processes:
        try:
            paths = [m.path for m in process.memory_maps()] + [f.path for f in process.open_files()]
        except psutil.Error:
            continue
        for path in paths:
            if path.startswith(f"{SHM}/") and path not in found:
                try:
                    found[path] = os.stat(path.removesuffix(" (deleted)")).st_size
                except OSError:
                    found[path] = 0  # unlinked already, still mapped
    return found


def sample_run(learner: psutil.Process) -> tuple[dict[str, dict], dict[str, int]]:
    """``{name: {"pid", "rss", "fds"}}`` for every live process of one run (names: role + index by pid), and
    the ``/dev/shm`` segments the run holds."""
    processes = [learner, *learner.children(recursive=True)]
    by_role: dict[str, list[psutil.Process]] = {}
    for process in processes:
        by_role.setdefault(role(process, learner.pid), []).append(process)
    found = {}
    for name, members in by_role.items():
        for index, process in enumerate(sorted(members, key=lambda p: p.pid)):
            try:
                found[f"{name}{index if len(members) > 1 or name == 'actor' else ''}"] = {
                    "pid": process.pid, "rss": process.memory_info().rss, "fds": process.num_fds()}
            except psutil.Error:
                pass
    return found, shm_segments(processes)


WINDOW = 5  # samples: growth compares medians of windows, so that one batch or evaluation in flight is not a trend


def growth(series: list[float], settled_at: int) -> float:
    """Relative growth from the median of the ``WINDOW`` samples from ``settled_at`` on to the median of the last
    ``WINDOW`` samples."""
    start = statistics.median(series[settled_at: settled_at + WINDOW])
    end = statistics.median(series[-WINDOW:])
    return (end - start) / start if start else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineErrorParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--scenarios", default="ddp,remote", help=f"comma-separated, of {sorted(SCENARIOS)}")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--settle", type=float, default=180.0, help="growth is measured from this many seconds on")
    args, overrides = parser.parse_known_args(argv)
    overrides = [arg for arg in overrides if arg != "--"]
    scenarios = [name for name in args.scenarios.split(",") if name]
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown or not scenarios:
        parser.error(f"--scenarios: unknown {unknown or 'none given'}; choose from {sorted(SCENARIOS)}")
    if not Path(args.config).is_file():
        parser.error(f"--config: {args.config!r} does not exist")
    if not (args.minutes > 0 and args.interval > 0 and args.settle >= 0):
        parser.error("--minutes and --interval must be > 0, --settle >= 0")

    runs: dict[str, tuple[subprocess.Popen, psutil.Process, Path]] = {}
    samples: dict[str, list[dict]] = {name: [] for name in scenarios}
    start = time.monotonic()
    try:
        for name in scenarios:
            workdir = Path(tempfile.mkdtemp(prefix=f"lit_impala_soak_{name}_"))
            command = [sys.executable, "-m", "lit_impala", "fit", "--config", os.path.abspath(args.config),
                       "--episode_stats.stop_at_return=null", "--trainer.max_steps=100000000",
                       "--trainer.enable_progress_bar=false", *SCENARIOS[name], *overrides]
            with open(workdir / "fit.log", "w") as log:
                process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, env={**os.environ, "WANDB_DIR": str(workdir)})
            runs[name] = (process, psutil.Process(process.pid), workdir)
            print(f"{name}: pid {process.pid}, log {workdir / 'fit.log'}", flush=True)
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            for name, (process, learner, workdir) in runs.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name}: the run ended early (exit {process.returncode}); "
                                       f"see {workdir / 'fit.log'}")
                processes, segments = sample_run(learner)
                samples[name].append({"t": elapsed, "processes": processes, "shm_segments": len(segments),
                                      "shm_bytes": sum(segments.values())})
            time.sleep(args.interval)
        ended = {}
        for name, (process, learner, _) in runs.items():
            tree = [learner, *learner.children(recursive=True)]
            process.send_signal(signal.SIGINT)
            ended[name] = tree
        exits, left = {}, {}
        for name, (process, _, _) in runs.items():
            exits[name] = process.wait(timeout=120)
            _, alive = psutil.wait_procs(ended[name], timeout=15)
            left[name] = [p.pid for p in alive if p.pid != process.pid]
    finally:
        for process, _, _ in runs.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    times = [s["t"] for s in samples[scenarios[0]]]
    settled_at = next(i for i, t in enumerate(times) if t >= min(args.settle, times[max(0, len(times) - WINDOW)]))
    rows, growths = [], {}
    for name in scenarios:
        series = samples[name]
        names = sorted({p for s in series[settled_at:] for p in s["processes"]})
        for process_name in names:
            present = [s["processes"].get(process_name) for s in series]
            after = present[settled_at:]
            if any(p is None for p in after) or len({p["pid"] for p in after}) > 1:
                what = "appeared after warm-up" if after[0] is None else "replaced or gone after warm-up"
                rows.append([name, process_name, what, "", "", "", ""])
                growths[f"{name}/{process_name}/{what.split()[0]}"] = float("inf")
                continue
            rss = [p["rss"] / 2**20 if p else 0.0 for p in present]
            fds = [p["fds"] if p else 0 for p in present]
            g_rss, g_fds = growth(rss, settled_at), growth(fds, settled_at)
            growths[f"{name}/{process_name}/rss"] = g_rss
            growths[f"{name}/{process_name}/fds"] = g_fds
            rows.append([name, process_name, f"{rss[settled_at]:.0f}", f"{rss[-1]:.0f}", f"{g_rss:+.1%}",
                         f"{fds[settled_at]} -> {fds[-1]}", f"{g_fds:+.1%}"])
        segments = [s["shm_segments"] for s in series]
        shm_mib = [s["shm_bytes"] / 2**20 for s in series]
        growths[f"{name}/shm_segments"] = growth(segments, settled_at)
        growths[f"{name}/shm_bytes"] = growth(shm_mib, settled_at)
        rows.append([name, "/dev/shm (whole run)", f"{shm_mib[settled_at]:.1f}", f"{shm_mib[-1]:.1f}",
                     f"{growths[f'{name}/shm_bytes']:+.1%}", f"{segments[settled_at]} -> {segments[-1]} segments",
                     f"{growths[f'{name}/shm_segments']:+.1%}"])
    minutes = times[-1] / 60
    print_table(f"Soak: {args.config}, {minutes:.1f} min; growth: median of the last {WINDOW} samples against the "
                f"median of {WINDOW} from {times[settled_at]:.0f} s on", ["run", "process", "RSS MiB at warm-up",
                                                                           "RSS MiB at end", "RSS growth",
                                                                           "open fds", "fd growth"], rows)
    worst = max(growths, key=growths.get)
    verdict = "PASS" if growths[worst] <= TARGET_GROWTH and not any(left.values()) and all(
        code == 128 + signal.SIGINT for code in exits.values()) else "FAIL"
    print(f"\nlargest growth: {worst} {growths[worst]:+.1%} (target <= {TARGET_GROWTH:.0%}); exit codes after "
          f"SIGINT {exits}; processes left {left}: {verdict}")
    result = {
        "config": args.config, "scenarios": scenarios, "overrides": overrides, "minutes": minutes,
        "settle_s": args.settle, "interval_s": args.interval, "samples": samples, "growth": growths,
        "largest_growth": {"what": worst, "growth": growths[worst]}, "exit_codes_after_sigint": exits,
        "processes_left": left, "verdict": verdict,
    }
    write_result("soak", result)
    return result


if __name__ == "__main__":
    main()
