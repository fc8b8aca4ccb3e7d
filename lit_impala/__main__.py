"""``python -m lit_impala`` and the ``lit-impala`` command: the LightningCLI (``cli.main``: configuration errors as
one line, exit 2). A ``fit`` first shields its start-up from Ctrl-C, before the heavy imports start their threads
(``lit_impala.interrupts``): so the CLI is imported only after that."""

import sys

from lit_impala import interrupts


def main() -> None:
    if interrupts.is_fit(sys.argv[1:]):
        interrupts.shield_child_processes()
    from lit_impala.cli import main as run_cli

    run_cli()


if __name__ == "__main__":
    main()
