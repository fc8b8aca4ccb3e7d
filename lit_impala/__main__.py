"""``python -m lit_impala`` -> the LightningCLI (``cli.main``: configuration errors as one line, exit 2)."""

import sys

from lit_impala import interrupts

if __name__ == "__main__" and interrupts.is_fit(sys.argv[1:]):
    # Before the heavy imports start their threads: see lit_impala.interrupts.
    interrupts.shield_child_processes()

from lit_impala.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
