"""Running a sweep's fits, at most N at a time: as processes on this machine (``run_processes``) or as SLURM jobs
through submitit (``run_jobs``; submitit's local executor runs the same jobs here, for tests). ``launch`` plans
every run's directory, runs what is left to run and returns one result per run, in order.

Stopping: the first SIGINT or SIGTERM to the launcher starts no new run and passes Ctrl-C on to every running fit,
which stops after its update with a checkpoint (a SLURM job is cancelled: SLURM sends its fit SIGTERM, the same
stop); a second one is passed on too (the fits stop at once); a third kills them. ``launch`` then raises
``Interrupted`` with the results so far. The same command again goes on from where each run stopped. (A fit that
Python is still starting, before ``lit_impala.interrupts`` shields it, ends at once: it has nothing to save yet.)
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from lit_impala.launch.processes import clear_group, interrupt, run_to_end, start_fit
from lit_impala.launch.runs import Prepared, Run, RunResult, Say, apply, finish, format_return, not_started, plan

POLL_S = 0.2  # how often the launcher looks at its fits (a SLURM job's state is cached by submitit)
STOP_AT_ONCE_AFTER_S = 30.0  # a fit still running this long after an error in the launcher itself is killed


class Interrupted(Exception):
    """The launcher was stopped by ``signum``; ``results`` holds every run's result (``not started`` ones too)."""

    def __init__(self, signum: int, results: list[RunResult]):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.results = signum, results


class StopSignals:
    """While in use: SIGINT and SIGTERM are counted (``count``, ``first``) instead of ending the launcher, so that
    it can stop its fits first. Main thread only (elsewhere: nothing changes)."""

    def __init__(self):
        self.count, self.first = 0, None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._record)
                              for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame) -> None:
        self.count += 1
        self.first = self.first or signum


@dataclass
class Running:
    prepared: Prepared
    started_at: float
    process: subprocess.Popen | None = None  # a local fit
    job: object | None = None  # a submitit job


def describe_end(result: RunResult) -> str:
    """One progress line for a run that ended."""
    if result.exit_code is None:
        return f"{result.setting} seed {result.seed}: {result.status}"
    return (f"{result.setting} seed {result.seed}: exit {result.exit_code} after {result.wall_s:.0f} s; return "
            f"{format_return(result)} over the last {result.episodes} episodes, at {result.env_frames or 0:,} env "
            "frames")


def run_processes(todo: list[Prepared], parallel: int, stop: StopSignals, say: Say) -> list[RunResult]:
    """Each run's fit as a process here, at most ``parallel`` at a time, in order."""
    waiting, running, results = list(todo), [], []
    passed_on = 0  # stop signals passed on to the running fits
    try:
        while waiting or running:
            while waiting and len(running) < parallel and not stop.count:
                prepared = waiting.pop(0)
                entry = Running(prepared, time.time(), process=start_fit(prepared))
                running.append(entry)
                say(f"{prepared.run.name}: started in {prepared.run.directory} (pid {entry.process.pid})")
            if stop.count and waiting:
                results += [not_started(prepared) for prepared in waiting]
                waiting = []
            for entry in [entry for entry in running if entry.process.poll() is not None]:
                running.remove(entry)
                result = finish(entry.prepared, entry.process.returncode, entry.started_at, time.time())
                clear_group(entry.process.pid)
                results.append(result)
                say(describe_end(result))
            if stop.count > passed_on:
                passed_on = stop.count
                for entry in running:
                    interrupt(entry.process, signal.SIGINT if passed_on < 3 else signal.SIGKILL)
            time.sleep(POLL_S)
    finally:  # only an error in the launcher itself leaves fits running here: stop them, then kill what is left
        for entry in running:
            interrupt(entry.process)
        deadline = time.monotonic() + STOP_AT_ONCE_AFTER_S
        for entry in running:
            try:
                entry.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            clear_group(entry.process.pid, grace_s=0.0)
    return results


def run_jobs(todo: list[Prepared], parallel: int, executor, stop: StopSignals, say: Say) -> list[RunResult]:
    """Each run's fit as a submitit job (``runs.run_to_end``), at most ``parallel`` submitted at a time, in order."""
    waiting, running, results = list(todo), [], []
    cancelled = False
    while waiting or running:
        while waiting and len(running) < parallel and not stop.count:
            prepared = waiting.pop(0)
            job = executor.submit(run_to_end, prepared)
            running.append(Running(prepared, time.time(), job=job))
            say(f"{prepared.run.name}: submitted as job {job.job_id} ({prepared.run.directory})")
        if stop.count and waiting:
            results += [not_started(prepared) for prepared in waiting]
            waiting = []
        for entry in [entry for entry in running if entry.job.done()]:
            running.remove(entry)
            result = job_result(entry)
            results.append(result)
            say(describe_end(result))
        if stop.count and not cancelled:
            cancelled = True
            for entry in running:
                entry.job.cancel(check=False)
        time.sleep(POLL_S)
    return results


def job_result(entry: Running) -> RunResult:
    """A finished job's result; a job that failed outside its fit (its node, its time limit) as a note."""
    try:
        return entry.job.result()
    except Exception as error:  # submitit's FailedJobError, UncompletedJobError (a cancelled job), ...
        reason = " ".join(str(error).split())[-300:]
        return not_started(entry.prepared, note=f"job {entry.job.job_id} failed: {reason}")


def launch(runs: list[Run], parallel: int = 1, fresh: bool = False, executor=None, say: Say = print) -> list[RunResult]:
    """Run every run not finished before, at most ``parallel`` at a time, and return each run's result, in order.

    Args:
        runs: the runs, each in its own directory (see ``lit_impala.launch.runs``).
        parallel: how many fits run (or SLURM jobs are submitted) at once.
        fresh: start every run over, even one finished or stopped with the same command.
        executor: a ``submitit`` executor to run each fit as a job of; None: processes on this machine.
        say: where progress lines go.

    Raises:
        Interrupted: SIGINT or SIGTERM stopped it, after every fit it started had ended.
    """
    prepared = [plan(run, fresh) for run in runs]
    for entry in prepared:
        apply(entry, say)
    todo = [entry for entry in prepared if entry.plan != "reuse"]
    with StopSignals() as stop:
        if not todo:
            ended = []
        elif executor is None:
            ended = run_processes(todo, parallel, stop, say)
        else:
            ended = run_jobs(todo, parallel, executor, stop, say)
    by_directory = {result.directory: result for result in ended}
    results = [entry.finished if entry.plan == "reuse" else by_directory[str(entry.run.directory)]
               for entry in prepared]
    if stop.first is not None:
        raise Interrupted(stop.first, results)
    return results
