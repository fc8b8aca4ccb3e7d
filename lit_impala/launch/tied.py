"""``python tied.py PARENT_PID COMMAND...``: become COMMAND (``exec``, the same process) after
asking Linux to send it SIGINT when PARENT_PID, the launcher that started it, dies (``PR_SET_PDEATHSIG``, kept
across ``exec``). A fit whose launcher was killed, even by SIGKILL, then stops after its update with a checkpoint
instead of running on as an orphan.

A process of its own because setting the signal from ``subprocess``'s ``preexec_fn`` is unsafe in a parent with
threads (torch's, in ``benchmarks.learning``); run as a script, so it imports nothing but the standard library.
Elsewhere than Linux it only runs COMMAND.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[1:]
    prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform.startswith("linux") else None
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != parent:  # it died before the request was in place: nothing to run for
            raise SystemExit(128 + signal.SIGINT)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
