"""The admission gate in one process: a node with the secret gets its settings; without it, either side is
refused before anything is unpickled; a silent or clumsy peer does not hold the others up; every wait ends."""

import logging
import pickle
import socket
import threading
import time

import pytest

from lit_impala.actors import node
from lit_impala.actors.admission import (
    MAGIC,
    SECRET_ENV,
    AdmissionError,
    AdmissionGate,
    join_learner,
    new_secret,
    secret_from_environment,
)
from lit_impala.actors.remote_network import interface_holding, is_wildcard, reachable_host

SECRET = new_secret()


@pytest.fixture
def gate():
    gate = AdmissionGate("127.0.0.1", None, SECRET, num_nodes=2)
    gate.open({rank: pickle.dumps({"rank": rank, "weights": list(range(10))}) for rank in (1, 2)})
    yield gate
    gate.close()


def _join(gate, rank, secret=SECRET, timeout_s=5.0):
    return join_learner("127.0.0.1", gate.port, rank, secret, timeout_s)


def test_nodes_with_the_secret_get_their_own_settings(gate):
    settings, local_address = _join(gate, 2)
    assert settings == {"rank": 2, "weights": list(range(10))} and local_address == "127.0.0.1"
    assert _join(gate, 1)[0]["rank"] == 1
    gate.wait(timeout_s=5)
    assert gate.joined == {1, 2} and gate.refused == 0


def test_a_node_with_another_secret_is_refused_and_the_rank_stays_free(gate, caplog):
    with pytest.raises(AdmissionError, match=f"refused node 1 \\(is {SECRET_ENV} the same on both sides"):
        _join(gate, 1, secret=new_secret())
    assert "wrong proof of the shared secret" in caplog.text and gate.refused == 1
    assert _join(gate, 1)[0]["rank"] == 1


def test_a_rank_joins_once_and_only_within_range(gate, caplog):
    _join(gate, 1)
    with pytest.raises(AdmissionError, match="refused node 1"):
        _join(gate, 1)
    with pytest.raises(AdmissionError, match="refused node 3"):
        _join(gate, 3)
    assert "rank 1 already joined" in caplog.text and "rank 3 is not one of 1..2" in caplog.text


def test_a_silent_stranger_does_not_hold_up_the_nodes(gate, caplog):
    with socket.create_connection(("127.0.0.1", gate.port)):  # connects, says nothing
        started = time.monotonic()
        _join(gate, 1)
        _join(gate, 2)
        gate.wait(timeout_s=5)
        assert time.monotonic() - started < 5


def test_waiting_for_nodes_ends_naming_the_missing_ones(gate):
    _join(gate, 2)
    with pytest.raises(TimeoutError, match=r"remote actor node 1 of 2 did not join within 0.5 s"):
        gate.wait(timeout_s=0.5)
    with pytest.raises(RuntimeError, match="gave up"):
        gate.wait(timeout_s=5, check=lambda: (_ for _ in ()).throw(RuntimeError("gave up")))


def test_a_node_gives_up_when_no_learner_listens():
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # bound, not listening: connections are refused
        started = time.monotonic()
        with pytest.raises(AdmissionError, match=f"no learner accepted this node at 127.0.0.1:{port} within 1.5 s"):
            join_learner("127.0.0.1", port, 1, SECRET, timeout_s=1.5)
        assert time.monotonic() - started < 5


def test_a_node_refuses_a_peer_that_is_not_a_lit_impala_learner():
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer():
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"HTTP/1.0 200 OK\r\n".ljust(len(MAGIC) + 32, b" "))
                connection.recv(1 << 16)

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(AdmissionError, match="is not a lit_impala learner's admission port"):
            join_learner("127.0.0.1", server.getsockname()[1], 1, SECRET, timeout_s=5)
        thread.join()


def test_the_secret_comes_from_the_environment_long_enough(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match=f"{SECRET_ENV}, the same on the learner and every node, but it is not set"):
        secret_from_environment()
    monkeypatch.setenv(SECRET_ENV, "x" * 31)
    with pytest.raises(ValueError, match="but it has 31 characters, fewer than 32"):
        secret_from_environment()
    monkeypatch.setenv(SECRET_ENV, "x" * 32)
    assert secret_from_environment() == "x" * 32
    assert len(new_secret()) == 64 and new_secret() != new_secret()


def test_a_node_without_the_secret_stops_before_connecting(monkeypatch, capsys):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        node.main(["--learner", "127.0.0.1", "--port", "1", "--rank", "1", "--world-size", "2"])
    assert exit_.value.code == 2
    assert f"a node needs a shared secret in the environment variable {SECRET_ENV}" in capsys.readouterr().err


def test_addresses_map_to_the_interfaces_gloo_listens_on():
    assert interface_holding("127.0.0.1") == "lo" and interface_holding("localhost") == "lo"
    assert interface_holding("127.0.1.1") == "lo"  # Debian's hostname address: the loopback interface
    assert interface_holding("192.0.2.123") is None  # TEST-NET-1: on no interface here
    assert is_wildcard("0.0.0.0") and is_wildcard("::") and not is_wildcard("127.0.0.1")
    assert reachable_host("0.0.0.0") == "127.0.0.1" and reachable_host("10.1.2.3") == "10.1.2.3"


def test_logging_names_the_refused_peer(gate, caplog):
    caplog.set_level(logging.WARNING)
    with socket.create_connection(("127.0.0.1", gate.port)) as stranger:
        stranger.sendall(b"\x00" * (len(MAGIC) + 4 + 32 + 32))  # as long as a request: the learner reads it all
        stranger.settimeout(5)
        while stranger.recv(1 << 16):
            pass
        where = f"127.0.0.1:{stranger.getsockname()[1]}"
    assert f"refused a connection to the remote actors' admission port {gate.port} from {where}: not a lit_impala " \
           "node (unexpected greeting)" in caplog.text
