"""Every setting of a sweep checked as its ``fit`` would check it, before any run starts: the arguments parsed and
the trainer, model and data module built (``cli_main(run=False)``, which reads the env's facts) and their
settings checked together (``check_run_settings``), without starting an actor.

In a child process (``python -m lit_impala.launch.check``, the settings as JSON on stdin), in an empty temporary
directory: the launcher stays free of torch and of what building a run prints or writes. The child's verdict is its
exit code and, for a bad setting, one ``error: <setting>: <what>`` line, the CLI's one-line wording.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile

from lit_impala.launch.processes import python_environment

ERROR_PREFIX = "error: "


def check_settings(settings: list[tuple[str, list[str]]]) -> str | None:
    """None when every ``(name, fit arguments)`` builds, else the first problem as one line naming its setting.
    The arguments are those of ``python -m lit_impala`` (``fit --config ...``), config files as absolute paths."""
    if not settings:
        return None  # nothing left to run: no process to start
    payload = json.dumps([[name, arguments] for name, arguments in settings])
    with tempfile.TemporaryDirectory(prefix="lit_impala_check_") as empty:
        child = subprocess.run([sys.executable, "-m", "lit_impala.launch.check"], input=payload, cwd=empty,
                               capture_output=True, text=True, env=python_environment())
    if child.returncode == 0:
        return None
    lines = child.stderr.strip().splitlines()
    verdict = next((line for line in reversed(lines) if line.startswith(ERROR_PREFIX)), None)
    if verdict is not None:
        return verdict.removeprefix(ERROR_PREFIX)
    return f"checking the settings failed (exit {child.returncode}): {lines[-1] if lines else 'no output'}"


def check_one(arguments: list[str]) -> None:
    """Build one ``fit``'s run without running it; raise what ``fit`` would report as a configuration error."""
    from lit_impala.cli import check_run_settings, cli_main

    built = cli_main([argument for argument in arguments if argument != "fit"], run=False,
                     save_config_callback=None)
    check_run_settings(built.trainer, built.model, built.datamodule)


def main() -> None:
    from lit_impala.cli import one_line, quiet_third_party_start_up
    from lit_impala.config import ConfigError

    quiet_third_party_start_up()
    for name, arguments in json.loads(sys.stdin.read()):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # Lightning's start-up lines: not the verdict
                check_one(arguments)
        except (argparse.ArgumentError, ConfigError) as error:
            print(f"{ERROR_PREFIX}{name}: {one_line(error)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except Exception as error:  # what `fit` would stop on too (a missing package, a broken env)
            print(f"{ERROR_PREFIX}{name}: {type(error).__name__}: {one_line(error)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()
