"""Which remote actor nodes are still in use, why the others were lost, and how they are all stopped.

``NodeRoster`` names nodes the way a user can find them (pid, SLURM job id, or "started by hand"), notices
nodes whose process or SLURM job ended, and turns every loss into one warning and, once none is left, one
error that lists them all. ``actors.remote.RemoteActors`` asks it before it talks to a node.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time

import torch
from torchrl.collectors.distributed import DistributedCollector

log = logging.getLogger("lit_impala.actors.remote")

_HEALTH_CHECK_EVERY_S = 0.2  # how often the learner asks whether a node's process or job still exists


class NodeRoster:
    """The live ranks ``1..num_nodes`` of torchrl's ``DistributedCollector`` and the lost ones.

    Args:
        jobs: the collector's ``jobs``: a ``multiprocessing`` process per node ("mp"), a submitit job
            ("submitit"), or none (nodes started by hand).
        num_nodes: number of actor nodes.
    """

    def __init__(self, jobs: list, num_nodes: int):
        self.jobs = list(jobs or [])
        self.num_nodes = num_nodes
        self.live: list[int] = list(range(1, num_nodes + 1))
        self.lost: dict[int, str] = {}  # rank -> "node r (where): why"
        self._next_health_check = 0.0

    def job(self, rank: int):
        """Node ``rank``'s process ("mp"), submitit job ("submitit"), or None (started by hand)."""
        return self.jobs[rank - 1] if rank <= len(self.jobs) else None

    def name(self, rank: int) -> str:
        job = self.job(rank)
        if isinstance(job, multiprocessing.process.BaseProcess):
            return f"node {rank} (pid {job.pid})"
        if job is not None:
            return f"node {rank} (SLURM job {getattr(job, 'job_id', '?')})"
        return f"node {rank} (started by hand)"

    def check_health(self, force: bool = False) -> None:
        """Drop nodes whose process ("mp") or SLURM job ("submitit") has ended (at most every 0.2 s)."""
        now = time.monotonic()
        if not force and now < self._next_health_check:
            return
        self._next_health_check = now + _HEALTH_CHECK_EVERY_S
        for rank in list(self.live):
            job = self.job(rank)
            if isinstance(job, multiprocessing.process.BaseProcess):
                if job.exitcode is not None:
                    self.drop(rank, "its process exited")  # drop adds the exit code
            elif job is not None and job.done():
                self.drop(rank, f"its SLURM job ended ({getattr(job, 'state', 'state unknown')})")

    def drop(self, rank: int, why: str) -> None:
        """Node ``rank`` is lost for the run: a warning names it; an "mp" process still running is killed."""
        job = self.job(rank)
        if isinstance(job, multiprocessing.process.BaseProcess):
            job.join(timeout=0.5)  # one that just died: its exit code says more than what gloo or the store saw
            if job.exitcode is not None:
                why = f"its process exited with code {_describe_exit(job.exitcode)}"
        self.live.remove(rank)
        self.lost[rank] = f"{self.name(rank)}: {why}"
        going_on = f"going on with {len(self.live)} of {self.num_nodes} nodes" if self.live else "no node is left"
        log.warning("lost remote actor %s; %s (a lost node cannot rejoin)", self.lost[rank], going_on)
        if isinstance(job, multiprocessing.process.BaseProcess) and job.exitcode is None:
            job.kill()  # hung: it will never be asked again; SIGKILL also ends a stopped process
            job.join(timeout=5)

    def none_left_error(self) -> RuntimeError:
        lines = "".join(f"  {self.lost[rank]}\n" for rank in sorted(self.lost))
        return RuntimeError(
            f"every remote actor node is lost ({len(self.lost)} of {self.num_nodes}), no rollouts can arrive:\n{lines}"
            "A node cannot rejoin a running torch.distributed group (torchrl 0.14): fix the cause, then resume "
            "from the last checkpoint with `fit --ckpt_path last`."
        )


def gloo_reason(error: Exception) -> str:
    # "[/path/pair.cc:553] Connection closed by peer [127.0.0.1]:4242. This is typically..." -> the middle
    return str(error).split("] ", 1)[-1].split(". ", 1)[0]


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"{exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return str(exitcode)


def reap(collector: DistributedCollector, timeout_s: float) -> None:
    """Leave no "mp" node and no process group behind (torchrl joins nodes for 10 s, then moves on)."""
    deadline = time.monotonic() + timeout_s
    for job in list(getattr(collector, "jobs", [])):
        if not isinstance(job, multiprocessing.process.BaseProcess) or job.pid is None:
            continue  # submitit jobs end with their node's function
        job.join(timeout=max(0.0, deadline - time.monotonic()))
        if job.is_alive():
            log.warning("remote actor process %s did not stop; terminating it", job.pid)
            job.terminate()
            job.join(timeout=5)
            if job.is_alive():
                job.kill()
                job.join()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
