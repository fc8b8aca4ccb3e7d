"""``python -m lit_impala`` -> the LightningCLI (``cli.main``: configuration errors as one line, exit 2)."""

from lit_impala.cli import main

if __name__ == "__main__":
    main()
