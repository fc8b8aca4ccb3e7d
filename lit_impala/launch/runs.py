"""One run of a sweep: what its directory says to do (reuse a finished result, resume an unfinished run, or start
over), and its result, read back from its fit's output when the fit ended (the process itself: ``processes``).

A run lives in a directory of its own and its ``fit`` runs there (the working directory), so the relative paths of a
config (``runs/checkpoints/...``, the logger's ``save_dir``, Lightning's ``default_root_dir``) all land in it; its
config files are passed as absolute paths. The directory holds ``command.json`` (the command last started there),
``fit.log`` (the fit's stdout and stderr, appended across resumes) and, once the fit exited 0, ``result.json`` (the
command with its result). The same command again reuses a finished result, resumes an unfinished run that has a
checkpoint (``--ckpt_path last``), and starts anything else over in a cleared directory (``run_plan``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

COMMAND_FILE, RESULT_FILE, LOG_FILE = "command.json", "result.json", "fit.log"
# The line every `fit` prints at its end (lit_impala.cli.fit_summary), whatever its logger: a run's result.
_FIT_SUMMARY = re.compile(r"Training stopped after (\d+) updates and (\d+) env frames; "
                          r"mean return of the last (\d+) episodes: ([-+.\deE]+|none finished)\.")

Say = Callable[[str], None]  # where progress lines go (print)
RunPlan = Literal["reuse", "resume", "start"]


@dataclass(frozen=True)
class Run:
    """One ``fit`` of a sweep: a setting and a seed, the directory it runs in, and its ``fit`` arguments."""

    setting: str
    seed: int
    directory: Path
    arguments: tuple[str, ...]  # ``fit --config CONFIG ...`` as recorded: config files as given, relative to ``base``
    base: Path  # the directory the config files in ``arguments`` are relative to
    labels: dict = field(default_factory=dict)  # what else makes it this run, recorded with it (a frame budget)

    @property
    def name(self) -> str:
        return f"{self.setting} seed {self.seed}"

    @property
    def record(self) -> dict:
        """What identifies the run in its directory: the same record again is the same run."""
        return {"fit": list(self.arguments), **self.labels}


@dataclass
class RunResult:
    """How a run ended: its exit code and what its fit printed at the end; times in seconds since the epoch."""

    setting: str
    seed: int
    directory: str
    exit_code: int | None  # None: it did not run to an exit code (not started, or its job failed)
    reused: bool = False  # finished in an earlier sitting, not run again
    final_return: float | None = None  # mean return of the last `episodes` training episodes
    episodes: int = 0
    env_frames: int | None = None
    updates: int | None = None
    wall_s: float | None = None  # of its last fit process (a resumed run's earlier ones are not counted)
    started_at: float | None = None
    ended_at: float | None = None
    note: str = ""  # why there is no exit code, or what went wrong around the fit

    @property
    def status(self) -> str:
        if self.reused:
            return "reused"
        if self.exit_code is None:
            return self.note or "not started"
        if self.exit_code < 0:  # ended by a signal it did not handle (Ctrl-C while Python was still starting)
            return f"killed by {signal.Signals(-self.exit_code).name}"
        return f"exit {self.exit_code}"

    @classmethod
    def from_json(cls, payload: dict) -> RunResult:
        """A result as ``result.json`` holds it (fields a later version added or dropped are left out)."""
        return cls(**{name: payload[name] for name in cls.__dataclass_fields__ if name in payload})


@dataclass(frozen=True)
class Prepared:
    """A run with what its directory says to do (``run_plan``); ``arguments`` add ``--ckpt_path=last`` to resume."""

    run: Run
    plan: RunPlan
    why: str = ""  # why it starts over
    finished: RunResult | None = None  # the earlier result, for ``reuse``

    @property
    def arguments(self) -> list[str]:
        return [*self.run.arguments, "--ckpt_path=last"] if self.plan == "resume" else list(self.run.arguments)


def run_plan(command: dict, started_with: dict | None, finished_with: dict | None, has_checkpoint: bool,
             fresh: bool) -> RunPlan:
    """What to do with one run's directory: ``reuse`` its finished result, ``resume`` its unfinished run from the
    checkpoint (``--ckpt_path last``), or ``start`` over in a cleared directory.

    Args:
        command: this invocation's record of the run (``Run.record``).
        started_with: the record of the run last started in the directory (None: none was).
        finished_with: the record next to its finished result (None: none finished).
        has_checkpoint: whether the directory holds a checkpoint.
        fresh: start over whatever is there.
    """
    if fresh:
        return "start"
    if finished_with == command:
        return "reuse"
    if started_with == command and has_checkpoint:
        return "resume"
    return "start"


def read_json(path: Path) -> dict | None:
    """``path``'s JSON object, or None when it is missing or torn (a sitting killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` whole or not at all (a kill mid-write leaves the old file or none)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload) + "\n")
    os.replace(partial, path)


def plan(run: Run, fresh: bool = False) -> Prepared:
    """What ``run``'s directory says to do; reads only (``apply`` acts on it)."""
    started_with = read_json(run.directory / COMMAND_FILE)
    finished = read_json(run.directory / RESULT_FILE) or {}
    has_checkpoint = run.directory.is_dir() and any(run.directory.rglob("*.ckpt"))
    decided = run_plan(run.record, started_with, finished.get("command"), has_checkpoint, fresh)
    if decided == "reuse":
        return Prepared(run, decided, finished=RunResult.from_json({**finished["result"], "reused": True}))
    why = ("asked to start fresh" if fresh else "its command changed" if started_with not in (None, run.record)
           else "no checkpoint to resume from")
    return Prepared(run, decided, why=why)


def apply(prepared: Prepared, say: Say) -> None:
    """Make the run's directory ready for its plan: cleared to start over, the command recorded before it starts."""
    run = prepared.run
    if prepared.plan == "reuse":
        result = prepared.finished
        say(f"{run.name}: reusing the run finished in {run.directory} (return {format_return(result)}, "
            f"{result.env_frames or 0:,} env frames)")
        return
    if prepared.plan == "resume":
        say(f"{run.name}: resuming the unfinished run in {run.directory} from its last checkpoint")
    elif run.directory.exists():
        say(f"{run.name}: starting over in {run.directory} ({prepared.why})")
        shutil.rmtree(run.directory)
    run.directory.mkdir(parents=True, exist_ok=True)
    write_json(run.directory / COMMAND_FILE, run.record)


def absolute_config_paths(arguments: list[str], base: Path) -> list[str]:
    """``arguments`` with every config file (``--config X`` or ``--config=X``) as a path from ``base``."""
    out = []
    for previous, argument in zip(["", *arguments], arguments, strict=False):
        if previous == "--config":
            out.append(str(base / argument))
        elif argument.startswith("--config="):
            out.append(f"--config={base / argument.split('=', 1)[1]}")
        else:
            out.append(argument)
    return out


def read_fit_summary(log: str) -> tuple[int, int, int, float | None] | None:
    """(updates, env frames, episodes, mean return or None) from the last end-of-fit line in a fit's output."""
    found = list(_FIT_SUMMARY.finditer(log))
    if not found:
        return None
    updates, frames, episodes, mean_return = found[-1].groups()
    return int(updates), int(frames), int(episodes), None if mean_return == "none finished" else float(mean_return)


def finish(prepared: Prepared, exit_code: int, started_at: float, ended_at: float) -> RunResult:
    """The run's result from its fit's exit code and end-of-fit line; written next to it when it exited 0."""
    run = prepared.run
    try:
        summary = read_fit_summary((run.directory / LOG_FILE).read_text(errors="replace"))
    except OSError:
        summary = None
    result = RunResult(run.setting, run.seed, str(run.directory), exit_code, wall_s=ended_at - started_at,
                       started_at=started_at, ended_at=ended_at)
    if summary is not None:
        result.updates, result.env_frames, result.episodes, result.final_return = summary
    if exit_code == 0:
        write_json(run.directory / RESULT_FILE, {"command": run.record, "result": asdict(result)})
    return result


def not_started(prepared: Prepared, note: str = "not started") -> RunResult:
    run = prepared.run
    return RunResult(run.setting, run.seed, str(run.directory), None, note=note)


def format_return(result: RunResult) -> str:
    return "-" if result.final_return is None else f"{result.final_return:.1f}"
