"""Actor processes that start in a fraction of a second: forked from a server process that has already imported
what an actor runs (torch, torchrl's collectors, our envs and policy). The command starts the server once its
arguments are parsed (a mistyped one starts nothing), so that the server's imports overlap the learner's set-up (the
model, the env's description, the logger) instead of following it.

Python's ``forkserver`` start method with ``set_forkserver_preload``. Without it (a notebook, a test calling
``cli.cli_main``, or ``MP_START_METHOD`` set to another method, torchrl's switch) actors are spawned as torchrl does
by default: the same processes, each importing for itself.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os

# The server ends with the learner (fork_server_tie, first), then imports what an actor process runs
# (lit_impala.actors.local brings torch, torchrl's collectors, envs.factory and actors.policy); envpool, MuJoCo and
# the like stay per-run imports, made in the actor that needs them.
PRELOAD = ["lit_impala.actors.fork_server_tie", "lit_impala.actors.local"]


def start_preloaded_forkserver() -> bool:
    """Make actors forks of a server that imports ``PRELOAD`` from now on, in the background. False (nothing
    changed) where the user chose another start method (``MP_START_METHOD``) or the platform has no fork server."""
    if os.environ.get("MP_START_METHOD", "forkserver") != "forkserver":
        return False
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    # torchrl set "spawn" when imported; its collectors start processes with the default context.
    multiprocessing.set_start_method("forkserver", force=True)
    multiprocessing.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return True
