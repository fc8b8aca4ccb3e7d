"""``python -m lit_impala`` and the ``lit-impala`` command: the LightningCLI (``cli.main``: configuration errors as
one line, exit 2). A ``fit`` first shields its start-up from Ctrl-C, before the heavy imports start their threads
(``lit_impala.interrupts``), then starts the server its actor processes are forked from, which imports torch and
torchrl while this process imports Lightning (``actors.preloaded_start``): so the CLI is imported only after that."""

import gc
import sys

from lit_impala import interrupts
from lit_impala.actors.preloaded_start import start_preloaded_forkserver


def main() -> None:
    if interrupts.is_fit(sys.argv[1:]):
        interrupts.shield_child_processes()
        start_preloaded_forkserver()  # after the shield: the server and its forks ignore Ctrl-C from the start
    from lit_impala.cli import main as run_cli

    try:
        run_cli()
    finally:
        # At exit CPython's last garbage collections walk every object torch, torchrl and Lightning made: ~1.5 s of
        # a 20 s CartPole run on 2 cores. Frozen (moved to the permanent generation), they are not walked; the
        # atexit handlers (W&B's finish, weakref finalizers) still run, and the OS frees the memory.
        gc.freeze()


if __name__ == "__main__":
    main()
