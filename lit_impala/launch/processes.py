"""A run's ``fit`` process: started in the run's directory and in a process group of its own, stopped as Ctrl-C
stops it, and its group cleared once it ended, so that no process outlives its run.

The launcher alone decides when a fit stops (its own process group keeps a terminal's Ctrl-C from reaching it
directly): it passes Ctrl-C on to the whole group, as a terminal would. A fit is started through ``tied.py``, which
has it stop (SIGINT) when the launcher dies, even by SIGKILL. Once the fit exited, whatever its group still holds
after a few seconds (the actors of a fit that was itself killed) is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lit_impala
from lit_impala.launch.runs import LOG_FILE, Prepared, RunResult, absolute_config_paths, finish

PACKAGE_ROOT = Path(lit_impala.__file__).resolve().parent.parent  # on the fits' PYTHONPATH: they run elsewhere
TIED = Path(__file__).with_name("tied.py")  # run as a script: it imports nothing of lit_impala
LEFTOVER_GRACE_S = 5.0  # after a fit exits, how long its process group may take to empty by itself


def python_environment() -> dict[str, str]:
    """This environment with lit_impala importable from any working directory (a run's)."""
    paths = [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def fit_command(prepared: Prepared, parent_pid: int) -> list[str]:
    """The fit's command line: ``python -m lit_impala fit ...`` through ``tied.py``, which has it stop (SIGINT)
    when ``parent_pid`` dies, even by SIGKILL."""
    fit = [sys.executable, "-m", "lit_impala", *absolute_config_paths(prepared.arguments, prepared.run.base)]
    return [sys.executable, str(TIED), str(parent_pid), *fit]


def start_fit(prepared: Prepared) -> subprocess.Popen:
    """Start the run's fit in its directory and in a process group of its own, output appended to ``fit.log``."""
    directory = prepared.run.directory
    with open(directory / LOG_FILE, "a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(fit_command(prepared, os.getpid()), cwd=directory, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=python_environment(),
                                start_new_session=True)


def interrupt(process: subprocess.Popen, signum: int = signal.SIGINT) -> None:
    """``signum`` to the fit's whole process group, as Ctrl-C in a terminal sends it (the fit shields its actors
    while it starts, then stops after its update with a checkpoint; a second one stops it at once)."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def group_alive(group: int) -> bool:
    """Whether a process other than a zombie is still in process group ``group``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel (zombies count)
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _parent, process_group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # it ended while we looked
        if int(process_group) == group and state != "Z":
            return True
    return False


def clear_group(group: int, grace_s: float = LEFTOVER_GRACE_S) -> None:
    """After a fit ended: wait ``grace_s`` for its process group to empty (an actor finishing its exit), then
    SIGKILL what is left (the actors of a fit that was itself killed), so no process outlives its run."""
    deadline = time.monotonic() + grace_s
    while group_alive(group):
        if time.monotonic() > deadline:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return
        time.sleep(0.1)


def run_to_end(prepared: Prepared) -> RunResult:
    """Run the fit here until it exits (the body of a SLURM job): SIGINT or SIGTERM to this process is passed on
    to the fit as Ctrl-C, and this process waits for it to stop with its checkpoint."""
    started_at = time.time()
    process = start_fit(prepared)
    previous = {signum: signal.signal(signum, lambda signum, frame: interrupt(process))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        exit_code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    ended_at = time.time()
    clear_group(process.pid)
    return finish(prepared, exit_code, started_at, ended_at)
