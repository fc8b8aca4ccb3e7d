"""``python -m lit_impala`` -> the LightningCLI."""

from lit_impala.cli import cli_main

if __name__ == "__main__":
    cli_main()
