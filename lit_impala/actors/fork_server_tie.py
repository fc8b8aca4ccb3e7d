"""Imported first by the actors' fork server (``actors.preloaded_start``), and nowhere else: the server asks Linux to
kill it when the learner that started it ends (``PR_SET_PDEATHSIG``), even while it is still importing torch.
Without this, a learner that exits early (a configuration error, Ctrl-C during start-up, SIGKILL) would leave the
server running until its imports finish. Its actors are not affected (the signal is not inherited across fork): they
exit when orphaned (``actors.policy.prepare_actor_process``). Elsewhere than Linux it does nothing."""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

if sys.platform.startswith("linux"):
    _prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the learner died before the request was in place
            os._exit(0)
