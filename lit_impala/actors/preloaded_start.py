"""Actor processes that start in a fraction of a second: forked from a server process that has already imported
what an actor runs (torch, torchrl's collectors, our envs and policy). ``python -m lit_impala fit`` starts the server
first thing, so that its imports overlap the learner's (Lightning's, ~4 s) instead of following the learner's
set-up. The server runs no code of the run before an actor is asked for: a configuration error still ends the
command before any actor starts, and the server ends with the learner (``fork_server_tie``).

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
FORK_SERVER_COMMAND = "multiprocessing.forkserver"  # in the server's command line, and so in its forks' (the actors)


def start_preloaded_forkserver() -> bool:
    """Make actors forks of a server that imports ``PRELOAD`` from now on, in the background. Call before torchrl is
    imported: torchrl sets the start method from ``MP_START_METHOD`` (its switch) when imported, and its collectors
    start processes with the default one; the variable stays set for this process's children (DDP ranks start their
    own server). False (nothing changed) where the user chose another start method there or the platform has no fork
    server."""
    method = os.environ.setdefault("MP_START_METHOD", "forkserver")
    if method != "forkserver" or "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    current = multiprocessing.get_start_method(allow_none=True)
    if current not in (None, "forkserver"):  # already chosen: torchrl imported first, or the caller's own choice
        return False
    if current is None:  # a second call (a test module a run imports calls it too) changes nothing
        multiprocessing.set_start_method("forkserver")
    multiprocessing.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return True
