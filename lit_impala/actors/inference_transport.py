"""The transport between actor processes and the batched inference server (``actors.inference``).

torchrl ships a collector worker's policy factory with cloudpickle, which copies a multiprocessing queue's file
descriptor numbers rather than its pipes: clients of torchrl's ``MPTransport`` handed over that way read EOF.
So each actor connects to the server by address instead, over a Unix socket (``SocketTransport``, a torchrl
``InferenceTransport``). Requests and replies are a few arrays pickled with protocol 5.
"""

from __future__ import annotations

import os
import pickle
import threading
from multiprocessing.connection import Client, Connection, Listener, wait

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.modules.inference_server import InferenceTransport


def _encode(tensors: TensorDictBase) -> bytes:
    return pickle.dumps({key: value.numpy() for key, value in tensors.items()}, protocol=5)


def _decode(payload: bytes, batch_size) -> TensorDict:
    return TensorDict({key: torch.from_numpy(value) for key, value in pickle.loads(payload).items()}, batch_size)


class SocketClient:
    """An actor's end of a ``SocketTransport``: plain-picklable (address and key); connects on first use."""

    def __init__(self, address: str, authkey: bytes):
        self.address, self.authkey = address, authkey
        self._connection: Connection | None = None

    def __getstate__(self) -> dict:
        return {"address": self.address, "authkey": self.authkey}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __call__(self, request: TensorDictBase) -> TensorDict:
        """Send one request ``[N]`` and wait for its reply ``[N]``; raises what the server's forward raised."""
        if self._connection is None:
            self._connection = Client(self.address, family="AF_UNIX", authkey=self.authkey)
        self._connection.send_bytes(_encode(request))
        payload = self._connection.recv_bytes()
        if payload.startswith(b"error:"):
            raise RuntimeError(f"the inference server failed: {payload[6:].decode()}")
        return _decode(payload, request.batch_size)


class SocketTransport(InferenceTransport):
    """A torchrl ``InferenceTransport`` over Unix sockets: one connection per actor, one request in flight each.

    A connection that closes (its actor exited or was killed) is dropped; nothing else is shared with the
    actor processes, so a killed actor cannot leave a lock or queue behind that stalls the others.
    """

    def __init__(self):
        self._authkey = os.urandom(32)
        self._listener = Listener(family="AF_UNIX", authkey=self._authkey)
        self._connections: list[Connection] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True, name="inference-accept")
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                connection = self._listener.accept()
            except Exception:  # closed by close(), or a client that failed the handshake
                if self._listener is None:
                    return
                continue
            self._connections.append(connection)

    def client(self) -> SocketClient:
        return SocketClient(self._listener.address, self._authkey)

    def submit(self, td: TensorDictBase):
        raise RuntimeError("SocketTransport clients live in other processes: use client()")

    def wait_for_work(self, timeout: float) -> None:
        if self._connections:
            wait(list(self._connections), timeout)
        else:
            threading.Event().wait(timeout)

    def drain(self, max_items: int) -> tuple[list[TensorDictBase], list[Connection]]:
        items, callbacks = [], []
        for connection in wait(list(self._connections), 0) if self._connections else []:
            if len(items) == max_items:
                break
            try:
                payload = connection.recv_bytes()
            except (EOFError, OSError):
                self._drop(connection)
                continue
            request = pickle.loads(payload)
            num_envs = next(iter(request.values())).shape[0]
            items.append(TensorDict({key: torch.from_numpy(value) for key, value in request.items()}, [num_envs]))
            callbacks.append(connection)
        return items, callbacks

    def resolve(self, callback: Connection, result: TensorDictBase) -> None:
        self._send(callback, _encode(result))

    def resolve_exception(self, callback: Connection, exc: BaseException) -> None:
        self._send(callback, b"error:" + repr(exc).encode())

    def _send(self, connection: Connection, payload: bytes) -> None:
        try:
            connection.send_bytes(payload)
        except OSError:  # the actor is gone
            self._drop(connection)

    def _drop(self, connection: Connection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
        connection.close()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        listener.close()
        for connection in list(self._connections):
            self._drop(connection)
