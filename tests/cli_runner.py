"""Run ``python -m lit_impala ...`` as a user types it: a subprocess in its own session, its output, exit
code and every descendant process it ever had (to check that none is left)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from lit_impala.actors.preloaded_start import FORK_SERVER_COMMAND
from tests.conftest import REPO

FORK_SERVER = FORK_SERVER_COMMAND  # in the fork server's command line (and its forks', which inherit it)


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    descendants: set[int] = field(default_factory=set)  # every pid seen below the command's process
    descendant_commands: dict[int, str] = field(default_factory=dict)  # their command lines
    spawned_actors: int = 0  # of those, multiprocessing children (actor processes, DDP's are not spawned): spawned,
    # or forked by the command's fork server (lit_impala.actors.preloaded_start)
    interrupted_after_s: float | None = None  # time from the signal to the exit
    args: list[str] = field(default_factory=list)  # what was typed after `python -m <module>`

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def tail(self, chars: int = 4000) -> str:
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-chars:]}\n--- stderr ---\n{self.stderr[-chars:]}"


def run_lit_impala(
    args: list[str],
    cwd: Path,
    timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
    interrupt_after_s: float | None = None,
    interrupt_signal: int = signal.SIGINT,
    interrupt_times: int = 1,
    interrupt_once_printed: str | None = None,
    module: str = "lit_impala",
    watch: Callable[[psutil.Process], None] | None = None,
) -> CliRun:
    """Run ``python -m lit_impala *args`` in ``cwd``; SIGKILL its process group and fail after ``timeout_s``.
    ``module``: another command of the project run the same way (``benchmarks.learning``).

    ``interrupt_after_s``: send ``interrupt_signal`` to the whole process group (what Ctrl-C in a
    terminal does) once the run is that old and has child processes; ``interrupt_times`` times, 0.5 s apart.
    ``interrupt_once_printed``: instead of waiting for child processes, wait until its stdout holds this text (a
    command with no child processes, such as one whose envs are threads, is interrupted when it has done something).
    ``watch``: called with the command's process every 50 ms while it runs (to look at it from outside).
    """
    environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_DIR": str(cwd), **(env or {})}
    environment.pop("COLUMNS", None)
    # A W&B run made in the test process leaves its service's address here: the command must start its own.
    for name in [name for name in environment if name.startswith(("WANDB_SERVICE", "WANDB__SERVICE"))]:
        del environment[name]
    out_path, err_path = Path(cwd) / ".cli_stdout", Path(cwd) / ".cli_stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
        parent = psutil.Process(process.pid)
        descendants: dict[int, str] = {}
        parents: dict[int, int] = {}
        sightings: dict[int, int] = {}  # polls at which a process showed the fork server's command line
        interrupted_at = None
        interrupts_sent = 0
        while process.poll() is None:
            try:
                for child in parent.children(recursive=True):
                    # Read again at every poll: a process caught mid-start (a fork of the fork server before it runs
                    # another program, or one whose /proc entry is not readable yet) shows what it is a poll later.
                    try:
                        command, ppid = " ".join(child.cmdline()), child.ppid()
                    except psutil.Error:
                        descendants.setdefault(child.pid, "")
                    else:
                        if command or child.pid not in descendants:  # a zombie's command line reads empty: kept
                            descendants[child.pid], parents[child.pid] = command, ppid
                        if FORK_SERVER in command:
                            sightings[child.pid] = sightings.get(child.pid, 0) + 1
            except psutil.Error:
                pass
            if watch is not None:
                watch(parent)
            elapsed = time.monotonic() - start
            if (interrupt_after_s is not None and interrupts_sent < interrupt_times
                    and elapsed > interrupt_after_s + 0.5 * interrupts_sent
                    and (interrupt_once_printed in out_path.read_text() if interrupt_once_printed is not None
                         else descendants)):
                os.killpg(process.pid, interrupt_signal)
                interrupts_sent += 1
                interrupted_at = interrupted_at or time.monotonic()
            if elapsed > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                pytest.fail(f"`{module} {' '.join(args)}` did not finish in {timeout_s} s:\n"
                            f"{out_path.read_text()[-3000:]}\n{err_path.read_text()[-3000:]}")
            time.sleep(0.05)
        wall_s = time.monotonic() - start
    return CliRun(
        returncode=process.returncode,
        stdout=out_path.read_text(),
        stderr=err_path.read_text(),
        wall_s=wall_s,
        descendants=set(descendants),
        descendant_commands=dict(descendants),
        # A fork of the server seen once only is not counted: a program the server runs while it imports (glfw's
        # version check, `python -c ...`, under torchrl.envs -> mujoco) shows the server's command line between its
        # fork and its exec, and can end before the next poll reads its own. An actor lives for many polls.
        spawned_actors=sum("spawn_main" in cmdline or (FORK_SERVER in cmdline and sightings.get(pid, 0) > 1
                                                        and parents.get(pid) in _fork_servers(descendants, parents))
                           for pid, cmdline in descendants.items()),
        interrupted_after_s=None if interrupted_at is None else time.monotonic() - interrupted_at,
        args=list(args),
    )


def _fork_servers(commands: dict[int, str], parents: dict[int, int]) -> set[int]:
    """The fork servers among processes. Their forks, the actors, inherit the command line (a program a server runs,
    such as a library's version check while it imports, does not)."""
    return {pid for pid, command in commands.items()
            if FORK_SERVER in command and FORK_SERVER not in commands.get(parents.get(pid), "")}


def is_actor_process(process: psutil.Process) -> bool:
    """A child started by multiprocessing's spawn, or forked by the command's fork server (actors.preloaded_start);
    a short-lived child that ended (or is a zombie not yet reaped) between the listing and this look is not one (it
    raised psutil.ZombieProcess here once, at random)."""
    try:
        command = " ".join(process.cmdline())
        if "spawn_main" in command:
            return True
        if FORK_SERVER not in command:  # a program a fork server runs (a library's check while it imports)
            return False
        parent = process.parent()
        grandparent = parent.parent() if parent is not None else None
        return (parent is not None and FORK_SERVER in " ".join(parent.cmdline())
                and not (grandparent is not None and FORK_SERVER in " ".join(grandparent.cmdline())))
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False


def assert_all_gone(pids: set[int], within_s: float = 10.0) -> None:
    """Every process in ``pids`` has exited (zombies count as gone) within ``within_s``."""
    deadline = time.monotonic() + within_s
    alive: list[int] = list(pids)
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if _running(pid)]
        if not alive:
            return
        time.sleep(0.2)
    described = []
    for pid in alive:
        try:
            described.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:
            described.append(str(pid))
    pytest.fail(f"processes left alive: {described}")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
