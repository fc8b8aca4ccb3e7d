"""Admission of remote actor nodes: both sides prove they hold the run's shared secret before anything
pickled crosses the network.

torch.distributed's stores and gloo authenticate nothing, and a node must unpickle its env factory and
policy, which runs code. So every node (``mp``, ``submitit`` and ``external`` alike) first joins through
this gate on ``data.remote_bind_address:data.remote_tcp_port``, one TCP connection each, with a mutual
HMAC-SHA256 challenge-response (``|`` is concatenation, ``rank`` 4 bytes big-endian)::

    learner -> node    MAGIC | nonce_L (32 random bytes)
    node -> learner    MAGIC | rank | nonce_N (32) | HMAC(secret, "node" | rank | nonce_L | nonce_N)
    learner -> node    HMAC(secret, "learner" | rank | nonce_L | nonce_N)
                       | length (8 bytes) | payload | HMAC(secret, "payload" | rank | nonce_N | payload)
    node -> learner    HMAC(secret, "joined" | rank | nonce_L | nonce_N)

The learner checks the node's proof before it sends anything else; the node checks the learner's proof
before it reads the payload and the payload's tag before it unpickles it. Fresh nonces on both sides
make a recorded exchange useless. Every read is bounded in size and time. A connection that fails
(garbage, a wrong proof, a rank that is taken or out of range, silence) gets one warning naming its
address and is closed; the gate goes on serving the others until every rank joined, then stops listening.

The secret: ``new_secret()`` per run for nodes the learner starts itself ("mp", "submitit"); for
``external`` nodes, the environment variable ``LIT_IMPALA_REMOTE_SECRET`` on the learner and on every node.
Nothing is encrypted: the payload (policy weights, env settings) can be read on the wire, not changed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger("lit_impala.actors.remote")

SECRET_ENV = "LIT_IMPALA_REMOTE_SECRET"
MIN_SECRET_CHARS = 32  # 128 bits as hex
MAGIC = b"lit_impala-admission/1\n"
_NONCE = 32
_MAC = 32  # SHA-256
HANDSHAKE_TIMEOUT_S = 10.0  # for each read of the handshake: a silent peer holds one thread this long at most
MAX_PAYLOAD_BYTES = 1 << 31  # the node refuses a larger announced payload (a policy is megabytes)
_MAX_HANDSHAKES = 32  # connections being admitted at once; more are refused at once
_RETRY_S = 1.0  # a node retries this often while no learner listens yet


class AdmissionError(RuntimeError):
    """A node could not join: no learner answered, or the peer did not prove it holds the secret."""


def new_secret() -> str:
    """A fresh secret for a run whose nodes the learner starts itself (never logged)."""
    return secrets.token_hex(32)


def secret_from_environment() -> str:
    """``LIT_IMPALA_REMOTE_SECRET``; ``ValueError`` (one line, a configuration error) if unset or short."""
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < MIN_SECRET_CHARS:
        state = "is not set" if not secret else f"has {len(secret)} characters, fewer than {MIN_SECRET_CHARS}"
        raise ValueError(
            f"remote_launcher: external needs a shared secret in the environment variable {SECRET_ENV}, the same "
            f"on the learner and every node, but it {state} (make one with: python -c "
            "'import secrets; print(secrets.token_hex(32))')"
        )
    return secret


def _mac(secret: str, *parts: bytes) -> bytes:
    return hmac.new(secret.encode(), b"|".join(parts), hashlib.sha256).digest()


def _rank_bytes(rank: int) -> bytes:
    return struct.pack(">I", rank)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def listening_socket(address: str, port: int) -> socket.socket:
    """A TCP socket bound to ``address:port`` (port 0: a free one) and listening; IPv4 or IPv6."""
    family, _, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class AdmissionGate:
    """The learner's side: admits ranks ``1..num_nodes``, each with its own payload.

    Args:
        address, port: where to listen (port None or 0: a free one; ``self.port`` says which).
        secret: the run's shared secret.
        num_nodes: ranks ``1..num_nodes`` may join, each once.
    """

    def __init__(self, address: str, port: int | None, secret: str, num_nodes: int):
        self.listener = listening_socket(address, port or 0)
        self.port = self.listener.getsockname()[1]
        self.num_nodes = num_nodes
        self.joined: set[int] = set()
        self.refused = 0  # connections refused so far
        self._secret = secret
        self._payloads: dict[int, bytes] = {}
        self._claimed: set[int] = set()  # ranks being admitted right now, or admitted
        self._lock = threading.Condition()
        self._slots = threading.BoundedSemaphore(_MAX_HANDSHAKES)
        self._thread: threading.Thread | None = None
        self._closed = False

    def open(self, payloads: dict[int, bytes]) -> None:
        """Start admitting: rank r receives ``payloads[r]`` (pickled bytes) once it proved the secret."""
        self._payloads = payloads
        self._thread = threading.Thread(target=self._serve, daemon=True, name="remote-admission")
        self._thread.start()

    def wait(self, timeout_s: float, check: Callable[[], None] = lambda: None) -> None:
        """Return once every rank joined; ``TimeoutError`` naming the missing ranks after ``timeout_s``.
        ``check`` runs about every 0.2 s (it raises to give up early, e.g. when a node's process died)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if len(self.joined) == self.num_nodes:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, self.num_nodes + 1)) - self.joined)
                    raise TimeoutError(
                        f"remote actor node{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                        f"{self.num_nodes} did not join within {timeout_s:g} s (data.remote_join_timeout_s)"
                    )
                self._lock.wait(min(left, 0.2))
            check()

    def close(self) -> None:
        """Stop listening (connections being admitted are cut off at their next read)."""
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._closed:
            try:
                connection, peer = self.listener.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                self._refuse(connection, peer, f"more than {_MAX_HANDSHAKES} connections being admitted at once")
                continue
            threading.Thread(target=self._admit, args=(connection, peer), daemon=True,
                             name="remote-admission-peer").start()

    def _refuse(self, connection: socket.socket, peer, why: str) -> None:
        self.refused += 1
        log.warning("refused a connection to the remote actors' admission port %d from %s: %s",
                    self.port, _describe_peer(peer), why)
        connection.close()

    def _admit(self, connection: socket.socket, peer) -> None:
        claimed: list[int] = []  # the rank this connection claimed, once its proof was right
        try:
            with connection:
                connection.settimeout(HANDSHAKE_TIMEOUT_S)
                why = self._handshake(connection, claimed)
                if why is not None:
                    self._refuse(connection, peer, why)
                    return
                with self._lock:
                    self.joined.add(claimed[0])
                    self._lock.notify_all()
                log.info("remote actor node %d joined from %s", claimed[0], _describe_peer(peer))
        except Exception as error:  # noqa: BLE001 -- one bad peer must never stop the gate
            self._refuse(connection, peer, f"admission failed ({error!r})")
        finally:
            with self._lock:
                for rank in claimed:
                    if rank not in self.joined:
                        self._claimed.discard(rank)  # its admission failed half-way: the rank is free again
            self._slots.release()

    def _handshake(self, connection: socket.socket, claimed: list[int]) -> str | None:
        """None once the node is admitted (its rank appended to ``claimed`` when its proof was right), else
        why it is refused."""
        nonce_learner = secrets.token_bytes(_NONCE)
        connection.sendall(MAGIC + nonce_learner)
        try:
            hello = _recv_exactly(connection, len(MAGIC) + 4 + _NONCE + _MAC)
        except TimeoutError:
            return f"no admission request within {HANDSHAKE_TIMEOUT_S:g} s"
        except ConnectionError:
            return "it closed the connection before asking to join"
        if not hmac.compare_digest(hello[: len(MAGIC)], MAGIC):
            return "not a lit_impala node (unexpected greeting)"
        rank_bytes = hello[len(MAGIC) : len(MAGIC) + 4]
        nonce_node = hello[len(MAGIC) + 4 : len(MAGIC) + 4 + _NONCE]
        proof = hello[len(MAGIC) + 4 + _NONCE :]
        if not hmac.compare_digest(proof, _mac(self._secret, b"node", rank_bytes, nonce_learner, nonce_node)):
            return "wrong proof of the shared secret"
        rank = struct.unpack(">I", rank_bytes)[0]
        with self._lock:
            if not 1 <= rank <= self.num_nodes:
                return f"rank {rank} is not one of 1..{self.num_nodes}"
            if rank in self._claimed:
                return f"rank {rank} already joined (two nodes started with the same --rank?)"
            self._claimed.add(rank)
            claimed.append(rank)
        payload = self._payloads[rank]
        connection.sendall(
            _mac(self._secret, b"learner", rank_bytes, nonce_learner, nonce_node)
            + struct.pack(">Q", len(payload)) + payload
            + _mac(self._secret, b"payload", rank_bytes, nonce_node, payload)
        )
        try:
            ack = _recv_exactly(connection, _MAC)
        except (TimeoutError, ConnectionError) as error:
            return f"node {rank} did not confirm it received its settings ({error})"
        if not hmac.compare_digest(ack, _mac(self._secret, b"joined", rank_bytes, nonce_learner, nonce_node)):
            return f"node {rank} sent a wrong confirmation"
        return None


def _describe_peer(peer) -> str:
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def join_learner(host: str, port: int, rank: int, secret: str, timeout_s: float):
    """The node's side: connect to the learner's gate at ``host:port`` (retrying while nothing listens, for
    up to ``timeout_s``), prove the secret, check the learner's proof, then receive and unpickle this node's
    settings. Returns ``(settings, local_address)``: the address this host reaches the learner from.
    Raises ``AdmissionError`` with one line saying what went wrong; nothing is unpickled unless both
    proofs and the payload's tag are right."""
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(1.0, min(HANDSHAKE_TIMEOUT_S,
                                                                                deadline - time.monotonic())))
            break
        except OSError as error:
            if time.monotonic() + _RETRY_S > deadline:
                raise AdmissionError(f"no learner accepted this node at {where} within {timeout_s:g} s "
                                     f"(last error: {error})") from None
            time.sleep(_RETRY_S)
    with sock:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        local_address = sock.getsockname()[0]
        try:
            greeting = _recv_exactly(sock, len(MAGIC) + _NONCE)
        except (OSError, ConnectionError) as error:
            raise AdmissionError(f"{where} sent no lit_impala greeting ({error})") from None
        if not hmac.compare_digest(greeting[: len(MAGIC)], MAGIC):
            raise AdmissionError(f"{where} is not a lit_impala learner's admission port (unexpected greeting)")
        nonce_learner, nonce_node, rank_bytes = greeting[len(MAGIC) :], secrets.token_bytes(_NONCE), _rank_bytes(rank)
        sock.sendall(MAGIC + rank_bytes + nonce_node + _mac(secret, b"node", rank_bytes, nonce_learner, nonce_node))
        try:
            proof = _recv_exactly(sock, _MAC)
        except (OSError, ConnectionError):
            raise AdmissionError(
                f"the learner at {where} refused node {rank} (is {SECRET_ENV} the same on both sides, is the rank "
                "free and within the learner's data.num_actors?)"
            ) from None
        if not hmac.compare_digest(proof, _mac(secret, b"learner", rank_bytes, nonce_learner, nonce_node)):
            raise AdmissionError(f"the peer at {where} did not prove it holds the shared secret: "
                                 "refusing anything it sends")
        sock.settimeout(max(HANDSHAKE_TIMEOUT_S, timeout_s))  # the payload may take a while on a slow link
        try:
            (length,) = struct.unpack(">Q", _recv_exactly(sock, 8))
            if length > MAX_PAYLOAD_BYTES:
                raise AdmissionError(f"the learner at {where} announced {length} bytes of settings (too many)")
            payload = _recv_exactly(sock, length)
            tag = _recv_exactly(sock, _MAC)
        except (OSError, ConnectionError) as error:
            raise AdmissionError(f"the learner at {where} stopped sending this node's settings ({error})") from None
        if not hmac.compare_digest(tag, _mac(secret, b"payload", rank_bytes, nonce_node, payload)):
            raise AdmissionError(f"the settings from {where} failed their integrity check: refusing them")
        settings = pickle.loads(payload)  # authenticated: only the learner holding the secret made these bytes
        sock.sendall(_mac(secret, b"joined", rank_bytes, nonce_learner, nonce_node))
    return settings, local_address
