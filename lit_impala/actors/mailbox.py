"""Versioned weight transport from the learner to actor processes on the same machine.

A ``WeightMailbox`` is one flat float32 vector plus a sequence counter and a version in shared
memory. The learner *publishes* under a seqlock (odd sequence = write in progress); each actor
copies a complete snapshot into its private weights at a step boundary and ignores torn or stale
ones. Not torchrl's ``MultiProcessWeightSyncScheme``: its workers act on the sender's shared tensors in
place, so a change the learner never published would reach the actors, and each update waits on the workers.
"""

from __future__ import annotations

import mmap
import os
from multiprocessing import shared_memory

import torch
from torch import Tensor, nn

_HEADER_BYTES = 64  # two int64 (sequence, version), padded to a cache line
SHM_DIRECTORY = "/dev/shm"  # where Linux keeps POSIX shared memory (multiprocessing.shared_memory creates it there)


def flat_parameters(module: nn.Module) -> list[Tensor]:
    """The tensors that define a network's behaviour, in a fixed order: parameters, then buffers."""
    return [p for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]


class WeightMailbox:
    """Single-writer, many-reader shared-memory slot for a network's weights.

    Args:
        template: a network with the architecture whose weights will travel; only the sizes are read.
    """

    def __init__(self, template: nn.Module):
        numel = sum(t.numel() for t in flat_parameters(template))
        # Named POSIX shared memory: it reattaches by name however the mailbox is pickled (torchrl
        # ships policy factories with a plain pickler, which would copy a shared torch tensor).
        self._shm = shared_memory.SharedMemory(create=True, size=_HEADER_BYTES + 4 * numel)
        self._owner = True
        self._attach(numel)
        self.header.zero_()

    def _attach(self, numel: int) -> None:
        buffer = self._shm.buf if self._owner else self._mmap
        # header = [sequence, version]: sequence is odd while a write is in progress.
        self.header = torch.frombuffer(buffer, dtype=torch.int64, count=2)
        self.weights = torch.frombuffer(buffer, dtype=torch.float32, count=numel, offset=_HEADER_BYTES)

    def __getstate__(self) -> dict:
        return {"name": self._shm.name if self._owner else self._name, "numel": self.weights.numel()}

    def __setstate__(self, state: dict) -> None:
        # Readers map the segment directly rather than through SharedMemory, which on Python < 3.13
        # registers it with the resource tracker again and so breaks the creator's own cleanup. On Linux a POSIX
        # shared-memory segment is the file of its name in /dev/shm (what shm_open opens).
        self._owner, self._shm, self._name = False, None, state["name"]
        fd = os.open(os.path.join(SHM_DIRECTORY, self._name.lstrip("/")), os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, _HEADER_BYTES + 4 * state["numel"])
        finally:
            os.close(fd)
        self._attach(state["numel"])

    def close(self) -> None:
        """Release this process's view; the creating process also removes the segment."""
        self.header = self.weights = None
        if self._owner and self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None

    @property
    def version(self) -> int:
        """Version of the last complete publish (``-1`` before the first one)."""
        return int(self.header[1]) if int(self.header[0]) > 0 else -1

    @torch.no_grad()
    def publish(self, network: nn.Module, version: int) -> None:
        """Copy ``network``'s weights (any device) into the mailbox, tagged with ``version``."""
        tensors = flat_parameters(network)
        flat = torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for t in tensors])
        if flat.numel() != self.weights.numel():
            raise ValueError(f"network has {flat.numel()} weights, the mailbox holds {self.weights.numel()}")
        self.header[0] += 1  # odd: readers keep their current weights
        self.weights.copy_(flat)
        self.header[1] = version
        self.header[0] += 1  # even: snapshot complete

    @torch.no_grad()
    def read_into(self, network: nn.Module, last_sequence: int) -> tuple[int, int] | None:
        """If a newer complete snapshot than ``last_sequence`` exists, copy it into ``network``.

        Returns ``(sequence, version)`` of the snapshot copied, or ``None`` when there is nothing
        new or a write was in progress (the caller simply tries again at its next step).
        """
        sequence = int(self.header[0])
        if sequence == last_sequence or sequence % 2 == 1:
            return None
        snapshot = self.weights.clone()
        version = int(self.header[1])
        if int(self.header[0]) != sequence:  # the learner wrote meanwhile: torn snapshot
            return None
        offset = 0
        for tensor in flat_parameters(network):
            n = tensor.numel()
            tensor.copy_(snapshot[offset : offset + n].view_as(tensor))
            offset += n
        return sequence, version
