"""Remote actors that nobody else can drive: with ``--data.actors remote`` nothing listens beyond loopback unless
asked, a peer without the run's secret is refused before anything is unpickled (on both sides of the gate), a
corrupt rollout is dropped and counted while training goes on, and every wait for the other side ends."""

import ipaddress
import os
import pickle
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from types import SimpleNamespace

import lightning as L
import psutil
import pytest

from lit_impala.actors import admission
from lit_impala.actors.admission import MAGIC, SECRET_ENV, new_secret
from lit_impala.actors.pool import ActorSpec
from lit_impala.actors.remote_launch import find_free_port, make_remote_collector
from lit_impala.core.networks import ActorCriticMLP
from lit_impala.data import ImpalaDataModule
from lit_impala.learner import ImpalaModule
from tests.cli_runner import run_lit_impala
from tests.conftest import REPO
from tests.faulty_remote import corrupting_network, one_env_too_many_on_node_2
from tests.integration.test_remote import RemoteActorsData

_HELLO_BYTES = len(MAGIC) + 4 + 32 + 32  # what the gate reads from a node before answering


class _Strangers:
    """Peers without the secret that connect to the learner's admission port while nodes are joining."""

    def __init__(self, port: int):
        self.port = port
        self.addresses: dict[str, str] = {}  # what it did -> its address as the learner's warning names it
        self.listening: set[tuple[int, str, int]] = set()  # (pid, ip, port) of every LISTEN socket seen
        self._next_look = 0.0

    def watch(self, learner: psutil.Process) -> None:
        if time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + 0.25
        try:
            for process in [learner, *learner.children(recursive=True)]:
                for connection in process.net_connections(kind="tcp"):
                    if connection.status == psutil.CONN_LISTEN:
                        self.listening.add((process.pid, connection.laddr.ip, connection.laddr.port))
        except psutil.Error:
            pass
        if not self.addresses:
            self._visit()

    def _visit(self) -> None:
        try:
            garbage = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
        except OSError:
            return  # the gate is not listening yet
        with garbage, socket.create_connection(("127.0.0.1", self.port), timeout=10) as forger:
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n".ljust(_HELLO_BYTES, b"x"))
            self.addresses["garbage"] = f"127.0.0.1:{garbage.getsockname()[1]}"
            greeting = admission._recv_exactly(forger, len(MAGIC) + 32)  # a node's greeting, then a made-up proof
            forger.sendall(MAGIC + (1).to_bytes(4, "big") + secrets.token_bytes(32) + secrets.token_bytes(32))
            self.addresses["forged proof"] = f"127.0.0.1:{forger.getsockname()[1]}"
            assert greeting.startswith(MAGIC)
            for stranger in (garbage, forger):
                _read_until_closed(stranger)  # the learner sends nothing more and hangs up


def _read_until_closed(sock: socket.socket) -> None:
    sock.settimeout(15)
    while sock.recv(1 << 16):
        pass


@pytest.fixture(scope="module")
def loopback_run(tmp_path_factory):
    """One `python -m lit_impala fit` with two "mp" remote actor nodes, watched from outside while it runs."""
    cwd = tmp_path_factory.mktemp("loopback_run")
    port = find_free_port()
    strangers = _Strangers(port)
    run = run_lit_impala(
        ["fit", "--config", str(REPO / "configs" / "cartpole.yaml"), "--data.actors=remote", "--data.num_actors=2",
         "--data.envs_per_actor=8", f"--data.remote_tcp_port={port}", "--trainer.max_steps=6",
         "--episode_stats.stop_at_return=null", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_checkpointing=false", "--trainer.callbacks=null"],
        cwd=cwd, watch=strangers.watch,
    )
    return run, strangers


def test_remote_actors_listen_on_loopback_only(loopback_run):
    run, strangers = loopback_run
    assert run.returncode == 0, run.tail()
    listeners_per_process = {pid for pid, _, _ in strangers.listening}
    assert len(listeners_per_process) >= 3, f"saw the learner's and both nodes' sockets: {strangers.listening}"
    assert strangers.port in {port for _, _, port in strangers.listening}, "the admission gate was seen listening"
    public = [(pid, ip, port) for pid, ip, port in strangers.listening if not ipaddress.ip_address(ip).is_loopback]
    assert not public, f"listening beyond loopback: {public}"
    assert not re.search(r"\b[0-9a-f]{64}\b", run.output), "the run's secret must never be printed"


def test_a_peer_without_the_secret_is_refused_and_training_goes_on(loopback_run):
    run, strangers = loopback_run
    assert run.returncode == 0, run.tail()
    assert "Training stopped after 6 updates" in run.stdout, run.tail()
    assert set(strangers.addresses) == {"garbage", "forged proof"}, "the strangers never reached the gate"
    refused = f"refused a connection to the remote actors' admission port {strangers.port} from "
    assert f"{refused}{strangers.addresses['garbage']}: not a lit_impala node" in run.stderr
    assert f"{refused}{strangers.addresses['forged proof']}: wrong proof of the shared secret" in run.stderr


def _marker_pickle(path) -> bytes:
    class MakesAFile:
        def __reduce__(self):
            return open, (str(path), "w")

    return pickle.dumps(MakesAFile())


def _fake_learner(listener: socket.socket, payload: bytes, send_proof: bool, seen: list) -> None:
    """Speaks the gate's protocol with a secret of its own (or skips the proof) and offers ``payload``."""
    connection, _ = listener.accept()
    with connection:
        connection.settimeout(20)
        nonce = secrets.token_bytes(32)
        connection.sendall(MAGIC + nonce)
        hello = admission._recv_exactly(connection, _HELLO_BYTES)
        seen.append(hello)
        rank, nonce_node = hello[len(MAGIC) : len(MAGIC) + 4], hello[len(MAGIC) + 4 : len(MAGIC) + 36]
        wrong = new_secret()
        proof = admission._mac(wrong, b"learner", rank, nonce, nonce_node) if send_proof else b""
        tag = admission._mac(wrong, b"payload", rank, nonce_node, payload)
        try:
            connection.sendall(proof + len(payload).to_bytes(8, "big") + payload + tag)
            connection.recv(1)
        except OSError:
            pass


@pytest.mark.parametrize("send_proof", [True, False], ids=["wrong-secret", "no-proof"])
def test_a_node_refuses_a_learner_that_cannot_prove_the_secret(tmp_path, send_proof):
    marker, control = tmp_path / "unpickled", tmp_path / "control"
    pickle.loads(_marker_pickle(control)).close()
    assert control.exists(), "the offered pickle does create its file when unpickled"
    with admission.listening_socket("127.0.0.1", 0) as listener:
        port = listener.getsockname()[1]
        seen: list[bytes] = []
        server = threading.Thread(target=_fake_learner, args=(listener, _marker_pickle(marker), send_proof, seen))
        server.start()
        node = subprocess.run(
            [sys.executable, "-m", "lit_impala.remote", "--learner", "127.0.0.1", "--port", str(port), "--rank", "1",
             "--world-size", "3", "--join-timeout", "20"],
            env={**os.environ, "PYTHONPATH": str(REPO), SECRET_ENV: new_secret()}, capture_output=True, text=True,
            timeout=60,
        )
        server.join(timeout=20)
    assert seen, "the node reached the fake learner"
    assert node.returncode == 1, node.stderr
    errors = [line for line in node.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the peer at 127.0.0.1:{port} did not prove it holds the shared secret: refusing "
                      "anything it sends"], node.stderr
    assert "Traceback" not in node.stderr
    assert not marker.exists(), "the node unpickled what an unproven learner sent"


def test_corrupt_rollouts_are_dropped_counted_and_training_goes_on(monkeypatch, caplog):
    """Node 1's policy writes a NaN and a positive log-probability into two of its rollouts (the learner drops
    them on arrival); node 2 steps one env too many, so every rollout of its has another shape than the
    learner's buffers (it never sends them: gloo would abort the learner; it reports them instead)."""
    monkeypatch.setattr("lit_impala.actors.remote_launch.make_remote_env", one_env_too_many_on_node_2)
    module = ImpalaModule(observation_shape=[4], action_space={"type": "discrete", "n": 2})
    actors = make_remote_collector(
        ActorSpec("CartPole-v1", 2, 4, 10), module.network, partial(corrupting_network, module.network_factory),
    )
    try:
        trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=RemoteActorsData(actors))
        assert trainer.global_step == 6, "training went on"
        assert actors.lost == 0
        warnings = [r.getMessage() for r in caplog.records if "dropped a rollout from remote actor" in r.getMessage()]
        node_1 = [w for w in warnings if "node 1 (pid" in w]
        node_2 = [w for w in warnings if "node 2 (pid" in w]
        assert any("behaviour_log_prob has 4 non-finite values (NaN or inf)" in w for w in node_1), warnings
        assert any("behaviour_log_prob is above 0 (a log-probability) at 4 steps" in w for w in node_1), warnings
        assert node_2 and "observation has shape [5, 8, 4], expected [4, 10, 4] (and" in node_2[0], warnings
        assert actors.rollouts_rejected >= 2 + len(node_2)
        assert len(node_2) <= 3 < actors.rollouts_rejected - 2, "repeated warnings about one node are rate-limited"
    finally:
        actors.shutdown()


def test_an_external_node_that_never_starts_ends_the_wait_with_the_missing_rank(monkeypatch):
    """Node 1 joins, node 2 never starts: the learner gives up after join_timeout_s naming node 2, and node 1,
    whose learner is gone, exits by itself."""
    monkeypatch.setenv(SECRET_ENV, new_secret())
    port = find_free_port()
    node = subprocess.Popen([sys.executable, "-m", "lit_impala.remote", "--learner", "127.0.0.1", "--port",
                             str(port), "--rank", "1", "--world-size", "3"], stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"remote actor node 2 of 2 did not join within 8 s"):
            make_remote_collector(ActorSpec("CartPole-v1", 2, 4, 10), ActorCriticMLP(4, 2),
                                  partial(ActorCriticMLP, 4, 2), launcher="external", tcp_port=port,
                                  bind_address="127.0.0.1", join_timeout_s=8)
        assert time.monotonic() - started < 20
        assert node.wait(timeout=30) != 0, "node 1 ended with an error once its learner was gone"
        assert "error: " in node.stderr.read()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()


def test_external_actors_without_a_secret_stop_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    port = find_free_port()
    run = run_lit_impala(
        ["fit", "--config", str(REPO / "configs" / "cartpole.yaml"), "--data.actors=remote",
         "--data.remote_launcher=external", f"--data.remote_tcp_port={port}", "--data.remote_bind_address=127.0.0.1",
         "--trainer.logger=false"],
        cwd=tmp_path, timeout_s=120,
    )
    assert run.returncode == 2, run.tail()
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: remote_launcher: external needs a shared secret in the environment variable {SECRET_ENV}, the "
        "same on the learner and every node, but it is not set"), run.tail()
    assert run.spawned_actors == 0, "no actor process was started"



def test_the_data_module_counts_rejected_rollouts_over_the_run():
    data = ImpalaDataModule(actors="remote")
    data.actors = SimpleNamespace(restarts=0, lost=1, rollouts_rejected=3, shutdown=lambda: None)
    assert data.rollouts_rejected == 3
    data.stop_actors()  # the count outlives the pool, as actors_lost does
    assert (data.rollouts_rejected, data.actors_lost) == (3, 1)
