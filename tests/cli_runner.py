"""Run ``python -m lit_impala ...`` as a user types it: a subprocess in its own session, its output, exit
code and every descendant process it ever had (to check that none is left)."""

from __future__ import annotations

import atexit
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
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
    preloaded: bool = False  # forked from tests/preloaded_lit_impala, not started afresh

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
    fresh: bool = False,
) -> CliRun:
    """Run ``python -m lit_impala *args`` in ``cwd``; SIGKILL its process group and fail after ``timeout_s``.
    ``module``: another command of the project run the same way (``benchmarks.learning``).

    ``interrupt_after_s``: send ``interrupt_signal`` to the whole process group (what Ctrl-C in a
    terminal does) once the run is that old and has child processes; ``interrupt_times`` times, 0.5 s apart.
    ``interrupt_once_printed``: instead of waiting for child processes, wait until its stdout holds this text (a
    command with no child processes, such as one whose envs are threads, is interrupted when it has done something).
    ``watch``: called with the command's process every 50 ms while it runs (to look at it from outside).

    Where: a ``fit`` command with no per-run environment, signal or watcher is forked from a server that has done
    its imports (``tests/preloaded_lit_impala``: ~3 s less per command; its output, exit code and processes are a
    fresh command's). ``fresh`` (a test about the start-up: its imports, its phases, Ctrl-C during it) or
    ``LIT_IMPALA_TESTS_FRESH=1`` in the environment (the whole suite the user's way): ``python -m`` afresh.
    """
    environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_DIR": str(cwd), **(env or {})}
    environment.pop("COLUMNS", None)
    # A W&B run made in the test process leaves its service's address here: the command must start its own.
    for name in [name for name in environment if name.startswith(("WANDB_SERVICE", "WANDB__SERVICE"))]:
        del environment[name]
    out_path, err_path = Path(cwd) / ".cli_stdout", Path(cwd) / ".cli_stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.monotonic()
        preloaded = not fresh and _preloadable(module, args, env, interrupt_after_s, watch)
        if preloaded:
            process = PRELOADED.start(args, cwd, environment, out_path, err_path)
        else:
            process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
        try:
            parent = psutil.Process(process.pid)
        except psutil.NoSuchProcess:  # a preloaded fork that ended (and was reaped) already
            parent = None
        descendants: dict[int, str] = {}
        parents: dict[int, int] = {}
        sightings: dict[int, int] = {}  # polls at which a process showed the fork server's command line
        interrupted_at = None
        interrupts_sent = 0
        while process.poll() is None:
            try:
                for child in parent.children(recursive=True) if parent is not None else []:
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
            if watch is not None and parent is not None:
                watch(parent)
            elapsed = time.monotonic() - start
            if (interrupt_after_s is not None and interrupts_sent < interrupt_times
                    and elapsed > interrupt_after_s + 0.5 * interrupts_sent
                    and (interrupt_once_printed in out_path.read_text() if interrupt_once_printed is not None
                         else descendants)):
                _killpg(process.pid, interrupt_signal)
                interrupts_sent += 1
                interrupted_at = interrupted_at or time.monotonic()
            if elapsed > timeout_s:
                _killpg(process.pid, signal.SIGKILL)
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
        preloaded=preloaded,
    )


FRESH_ENV = "LIT_IMPALA_TESTS_FRESH"


def _preloadable(module: str, args: list[str], env: dict | None, interrupt_after_s: float | None, watch) -> bool:
    """A ``fit`` of ``lit_impala`` whose environment is the test process's (a variable read while importing would
    be the server's) and that no test signals or watches while it starts (the start-up is then the subject); with
    the fork server ``fit`` starts (tests/conftest.py sets the same start method for the test process)."""
    return (module == "lit_impala" and args[:1] == ["fit"] and not env and interrupt_after_s is None and watch is None
            and not os.environ.get(FRESH_ENV) and os.environ.get("MP_START_METHOD", "forkserver") == "forkserver")


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # the group ended between the poll and this
        pass


class PreloadedLitImpala:
    """The test side of ``tests/preloaded_lit_impala``: one server process, started at the first ``start``; each
    ``start`` is a forked copy that runs ``python -m lit_impala <args>``, returned as a ``Popen``-like handle."""

    def __init__(self):
        self._server: subprocess.Popen | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._started: dict[str, int] = {}  # request id -> pid
        self._ended: dict[str, int] = {}  # request id -> return code

    def start(self, args: list[str], cwd: Path, env: dict[str, str], stdout: Path, stderr: Path) -> ForkedCommand:
        request_id = str(next(self._ids))
        request = {"id": request_id, "args": list(args), "cwd": str(cwd), "env": env, "stdout": str(stdout),
                   "stderr": str(stderr)}
        with self._lock:
            if self._server is None:
                self._server = subprocess.Popen(
                    [sys.executable, "-m", "tests.preloaded_lit_impala"], cwd=REPO, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
                threading.Thread(target=self._read, daemon=True).start()
            self._server.stdin.write((json.dumps(request) + "\n").encode())
            self._server.stdin.flush()
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self._started or self._server.poll() is not None,
                                          timeout=120):
                raise RuntimeError("the preloaded lit_impala server did not fork a command in 120 s")
            if request_id not in self._started:
                raise RuntimeError(f"the preloaded lit_impala server ended (exit {self._server.returncode})")
            return ForkedCommand(self._started[request_id], request_id, self)

    def _read(self) -> None:
        for line in self._server.stdout:
            what, first, second = line.decode().split()
            with self._changed:
                if what == "started":
                    self._started[first] = int(second)
                else:
                    self._ended[first] = int(second)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def returncode(self, request_id: str, timeout: float | None = 0.0) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: request_id in self._ended or self._server.poll() is not None,
                                   timeout=timeout)
            return self._ended.get(request_id)

    def close(self) -> None:
        if self._server is not None:
            self._server.stdin.close()
            self._server.wait(timeout=30)


PRELOADED = PreloadedLitImpala()  # started by the first command forked from it; ends with the test process
atexit.register(PRELOADED.close)


@dataclass
class ForkedCommand:
    """What ``run_lit_impala`` needs of a ``Popen``: the pid, ``poll`` and ``wait``."""

    pid: int
    request_id: str
    server: PreloadedLitImpala
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.returncode(self.request_id)
        return self.returncode

    def wait(self) -> int:
        self.returncode = self.server.returncode(self.request_id, timeout=None)
        if self.returncode is None:
            raise RuntimeError(f"the preloaded lit_impala server ended before command {self.pid}")
        return self.returncode


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
