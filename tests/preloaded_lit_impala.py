"""``python -m lit_impala fit ...`` with the imports already done: a server for the tests that forks a copy of itself
per command, and the copy runs ``lit_impala``'s ``__main__`` as ``python -m`` would (its own session, working
directory, environment, stdout and stderr files, ``sys.argv``), then ends the way that interpreter would: its exit
code, atexit handlers, a traceback if one escapes.

Why: the bad-input table (tests/integration/test_cli.py) types 40 commands that each end within a second of
their start, after ~5 s of imports (Lightning's). Forked from here each costs the part the test is about. What this
does not show, and tests that start ``python -m lit_impala`` afresh do: the imports themselves and the start-up
shield around them (``lit_impala.__main__``). Only ``fit`` commands come here: the fork server ``fit`` starts for its
actors needs the start method set before torchrl is imported, as ``__main__`` sets it; the server this program's
copies start is their own, as a real run's is.

Protocol, one JSON or text line each way: a request ``{"id", "args", "cwd", "env", "stdout", "stderr"}`` on stdin;
``started <id> <pid>`` once the copy runs and ``ended <id> <returncode>`` (``subprocess``'s: minus the signal's
number for one that killed it) on stdout. End of stdin: the server ends.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import select
import sys

# As `python -m lit_impala fit` starts (lit_impala.actors.preloaded_start), before torchrl is imported: torchrl
# would otherwise choose spawn. The server for the actors is started by each copy, not here.
os.environ.setdefault("MP_START_METHOD", "forkserver")
multiprocessing.set_start_method("forkserver")

# What `python -m lit_impala` imports before it runs the CLI (not lit_impala.__main__ itself: runpy runs it afresh, and
# warns when it finds it imported), then the CLI (Lightning, torchrl, the learner).
import lit_impala.actors.preloaded_start  # noqa: E402,F401
import lit_impala.cli  # noqa: E402,F401
import lit_impala.interrupts  # noqa: E402,F401


def _reply(line: str) -> None:
    os.write(1, (line + "\n").encode())


def serve() -> dict:
    """Fork a copy per request until stdin ends (then exit); in a copy, return its request."""
    children: dict[int, str] = {}
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        if readable:
            data = os.read(0, 65536)  # not sys.stdin: its buffer would hand the next requests to a copy too
            if not data:
                sys.exit(0)
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    return request
                children[pid] = request["id"]
                _reply(f"started {request['id']} {pid}")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            _reply(f"ended {children.pop(pid)} {os.waitstatus_to_exitcode(status)}")


def become(request: dict) -> None:
    """Turn this copy into the process ``python -m lit_impala <args>`` in ``cwd`` with ``env`` would be."""
    os.setsid()  # its own session and process group, as the tests start a real command
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["lit_impala", *request["args"]]  # run_module puts the module's file in argv[0], as -m does
    sys.path[0] = os.getcwd()  # -m puts the working directory first


if __name__ == "__main__":
    become(serve())
    runpy.run_module("lit_impala", run_name="__main__", alter_sys=True)
