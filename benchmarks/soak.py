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
    python -m benchmarks.soak --analyse benchmarks/results/soak.json   # the table again from saved samples
"""

from __future__ import annotations

import json
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
from lit_impala.actors.preloaded_start import FORK_SERVER_COMMAND

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
    if FORK_SERVER_COMMAND in command:  # the command's actors are forks of the server (actors.preloaded_start)
        parent = process.parent()  # forks of the server, and their children, inherit its command line
        if parent is None or FORK_SERVER_COMMAND not in " ".join(parent.cmdline()):
            return "fork_server"
        grandparent = parent.parent()
        return "actor" if grandparent is None or FORK_SERVER_COMMAND not in " ".join(grandparent.cmdline()) else "other"
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


def analyse(series: list[dict], settled_at: int) -> tuple[list[list[str]], dict[str, float], list[str]]:
    """One run's table rows and growths from its samples: processes are followed by pid. Those alive in every
    sample from warm-up on are measured (RSS, open fds); one that is gone or replaced by the end, or that appeared
    after warm-up and is still there, is a failure; children that come and go (W&B's short helpers, the video
    encoder) are only counted, as is the number of processes."""
    def by_pid(sample: dict) -> dict[int, dict]:
        return {p["pid"]: {**p, "role": name.rstrip("0123456789")} for name, p in sample["processes"].items()}

    seen = [by_pid(sample) for sample in series]
    after = seen[settled_at:]
    steady = set(after[0]).intersection(*after)
    at_end = set(seen[-1]).intersection(*seen[-WINDOW:])
    rows, growths, transient = [], {}, []
    for pid in sorted(set(after[0]) - steady):
        rows.append([after[0][pid]["role"], f"pid {pid}: gone or replaced after warm-up", "", "", "", ""])
        growths[f"{after[0][pid]['role']}/{pid}/gone"] = float("inf")
    for pid in sorted(at_end - set(after[0])):
        rows.append([seen[-1][pid]["role"], f"pid {pid}: appeared after warm-up and stayed", "", "", "", ""])
        growths[f"{seen[-1][pid]['role']}/{pid}/appeared"] = float("inf")
    for pid in sorted({pid for sample in after for pid in sample} - steady - at_end):
        transient.append(next(sample[pid]["role"] for sample in after if pid in sample))
    index: dict[str, int] = {}
    for pid in sorted(steady, key=lambda pid: (after[0][pid]["role"], pid)):
        role = after[0][pid]["role"]
        name = role
        if role in ("actor", "wandb", "resource_tracker", "rank"):
            number = index.setdefault(role, 1 if role == "rank" else 0)  # DDP's rank 0 is the learner
            name, index[role] = f"{role}{number}", number + 1
        rss = [sample[pid]["rss"] / 2**20 if pid in sample else 0.0 for sample in seen]
        fds = [sample[pid]["fds"] if pid in sample else 0 for sample in seen]
        growths[f"{name}/rss"], growths[f"{name}/fds"] = growth(rss, settled_at), growth(fds, settled_at)
        rows.append([name, f"{rss[settled_at]:.0f}", f"{rss[-1]:.0f}", f"{growths[f'{name}/rss']:+.1%}",
                     f"{fds[settled_at]} -> {fds[-1]}", f"{growths[f'{name}/fds']:+.1%}"])
    counts = [len(sample) for sample in seen]
    growths["processes"] = growth(counts, settled_at)
    rows.append([f"all processes ({len(transient)} short-lived ones came and went)", "", "", "",
                 f"{counts[settled_at]} -> {counts[-1]} processes", f"{growths['processes']:+.1%}"])
    segments = [s["shm_segments"] for s in series]
    shm_mib = [s["shm_bytes"] / 2**20 for s in series]
    growths["shm_segments"], growths["shm_bytes"] = growth(segments, settled_at), growth(shm_mib, settled_at)
    rows.append(["/dev/shm segments held", f"{shm_mib[settled_at]:.1f}", f"{shm_mib[-1]:.1f}",
                 f"{growths['shm_bytes']:+.1%}", f"{segments[settled_at]} -> {segments[-1]} segments",
                 f"{growths['shm_segments']:+.1%}"])
    return rows, growths, sorted(set(transient))


def report(result: dict) -> dict:
    """Print the table and the verdict of a soak's samples, and write ``benchmarks/results/soak.json``."""
    samples, scenarios = result["samples"], result["scenarios"]
    times = [s["t"] for s in samples[scenarios[0]]]
    last_start = times[max(0, len(times) - WINDOW)]
    settled_at = next(i for i, t in enumerate(times) if t >= min(result["settle_s"], last_start))
    rows, growths, transient = [], {}, {}
    for name in scenarios:
        run_rows, run_growths, transient[name] = analyse(samples[name], settled_at)
        rows += [[name, *row] for row in run_rows]
        growths.update({f"{name}/{what}": value for what, value in run_growths.items()})
    minutes = times[-1] / 60
    print_table(f"Soak: {result['config']}, {minutes:.1f} min; growth: median of the last {WINDOW} samples against "
                f"the median of {WINDOW} from {times[settled_at]:.0f} s on",
                ["run", "process", "RSS MiB at warm-up", "RSS MiB at end", "RSS growth", "count", "count growth"],
                rows)
    worst = max(growths, key=growths.get)
    exits, left = result["exit_codes_after_sigint"], result["processes_left"]
    passed = (growths[worst] <= TARGET_GROWTH and not any(left.values())
              and all(code == 128 + signal.SIGINT for code in exits.values()))
    verdict = "PASS" if passed else "FAIL"
    print(f"\nlargest growth: {worst} {growths[worst]:+.1%} (target <= {TARGET_GROWTH:.0%}); short-lived children "
          f"{transient}; exit codes after SIGINT {exits}; processes left {left}: {verdict}")
    result.update(minutes=minutes, growth=growths, largest_growth={"what": worst, "growth": growths[worst]},
                  short_lived_children=transient, verdict=verdict)
    write_result("soak", result)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineErrorParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--scenarios", default="ddp,remote", help=f"comma-separated, of {sorted(SCENARIOS)}")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between samples")
    parser.add_argument("--settle", type=float, default=180.0, help="growth is measured from this many seconds on")
    parser.add_argument("--analyse", metavar="JSON", help="only analyse the samples of a saved soak result again")
    args, overrides = parser.parse_known_args(argv)
    if args.analyse:
        try:
            saved = json.loads(Path(args.analyse).read_text())
        except (OSError, ValueError) as error:
            parser.error(f"--analyse: {args.analyse!r} cannot be read ({error})")
        return report({key: saved[key] for key in ("config", "scenarios", "overrides", "settle_s", "interval_s",
                                                    "samples", "exit_codes_after_sigint", "processes_left")})
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

    result = {"config": args.config, "scenarios": scenarios, "overrides": overrides, "settle_s": args.settle,
              "interval_s": args.interval, "samples": samples, "exit_codes_after_sigint": exits,
              "processes_left": left}
    report(result)
    write_result("soak", result)
    return result


if __name__ == "__main__":
    main()
