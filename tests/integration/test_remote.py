"""Remote actors through torchrl's DistributedCollector: on localhost, two actor nodes (separate
processes standing for two hosts) feed a real learner, receive its weights and versions over
torch.distributed, and are all gone after shutdown. A node killed or frozen mid-run is dropped with a
warning naming it and the run goes on; with none left the run stops with an error naming each."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial

import lightning as L
import psutil
import pytest
import torch
from torch.utils.data import DataLoader

from lit_impala.actors.admission import SECRET_ENV, new_secret
from lit_impala.actors.pool import ActorSpec
from lit_impala.actors.remote_launch import find_free_port, make_remote_collector
from lit_impala.callbacks import EpisodeStats
from lit_impala.core.networks import ActorCriticMLP
from lit_impala.data import ImpalaDataModule, UnrollStream
from lit_impala.learner import ImpalaModule
from lit_impala.schema import BATCH_KEYS, CORE_STATE_KEYS, REPLAYED_KEY, to_time_major
from tests.cli_runner import is_actor_process
from tests.conftest import REPO

NUM_ACTORS, ENVS_PER_ACTOR, UNROLL_LENGTH, BATCH_SIZE, STEPS = 2, 4, 10, 4, 4
OPTIONAL_KEYS = {*CORE_STATE_KEYS, ("next", "life_lost")}  # recurrent policies; Atari with life loss


class RemoteActorsData(L.LightningDataModule):
    """The smallest datamodule the learner needs: batches from the stream, weights to the actors."""

    def __init__(self, actors):
        super().__init__()
        self.actors = actors

    def train_dataloader(self):
        return DataLoader(UnrollStream(self.actors, BATCH_SIZE), batch_size=None, num_workers=0, collate_fn=lambda b: b)

    def publish_weights(self, network, version):  # called by ImpalaModule's ActorWeightSync callback
        self.actors.publish_weights(network, version)


def _log_prob_under(network, rollout):
    """What ``network`` gives the rollout's samples: the behaviour log-prob iff it acted with these weights."""
    n, t = rollout.batch_size
    observation = rollout["observation"].reshape(1, n * t, -1)
    with torch.no_grad():
        params = network(observation, None, rollout["is_init"].reshape(1, n * t)).policy_params[0]
    return network.distribution.log_prob(params, rollout["policy_sample"].reshape(n * t)).reshape(n, t)


def _value_under(network, rollout):
    """``V(x_t) [N, T]`` under ``network``: the behaviour value iff the rollout was acted with these weights."""
    n, t = rollout.batch_size
    with torch.no_grad():
        return network(rollout["observation"].reshape(1, n * t, -1)).baseline[0].reshape(n, t)


def _actor_processes():
    # torchrl's "mp" launcher starts the nodes (spawned, or forks of the tests' fork server: tests/conftest.py); the
    # resource tracker and the fork server are not actors.
    return [p for p in psutil.Process().children(recursive=True) if is_actor_process(p)]


def _assert_all_gone(processes, within_s=10.0):
    deadline = time.monotonic() + within_s
    alive = processes
    while time.monotonic() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    pytest.fail(f"processes left alive: {[p.cmdline() for p in alive]}")


def test_remote_actors_feed_a_learner_and_leave_nothing_behind():
    before = {p.pid for p in _actor_processes()}
    module = ImpalaModule(observation_shape=[4], action_space={"type": "discrete", "n": 2})
    start_weights = module.network_factory()
    start_weights.load_state_dict(module.network.state_dict())
    actors = make_remote_collector(
        ActorSpec("CartPole-v1", NUM_ACTORS, ENVS_PER_ACTOR, UNROLL_LENGTH), module.network, module.network_factory,
    )
    nodes = [p for p in _actor_processes() if p.pid not in before]
    try:
        assert len(nodes) >= NUM_ACTORS, "each actor node is a process of its own"

        # Rollouts arrive through UnrollStream as learner batches [B, T] with the learner's keys.
        stream = iter(UnrollStream(actors, BATCH_SIZE))
        batch = next(stream)
        assert batch.batch_size == torch.Size([BATCH_SIZE, UNROLL_LENGTH])
        keys = set(batch.keys(True, True))
        stream_keys = {*BATCH_KEYS, REPLAYED_KEY}  # what the actors send, and the dataset's replay mark
        assert keys <= stream_keys and keys >= stream_keys - OPTIONAL_KEYS, keys
        assert not batch[REPLAYED_KEY].any()
        assert batch["observation"].dtype == torch.float32 and batch["observation"].shape[-1] == 4
        assert batch["policy_sample"].dtype == torch.int64 and batch["policy_sample"].shape == (
            BATCH_SIZE,
            UNROLL_LENGTH,
        )
        assert batch["behaviour_log_prob"].dtype == torch.float32
        assert batch["policy_version"].dtype == torch.int64 and (batch["policy_version"] == 0).all()
        assert batch["is_init"].dtype == torch.bool
        trajectory = to_time_major(batch)  # what training_step reads
        assert trajectory.reward.shape == (UNROLL_LENGTH, BATCH_SIZE)
        torch.testing.assert_close(trajectory.behaviour_log_prob.T, _log_prob_under(start_weights, batch))
        assert batch["behaviour_value"].dtype == torch.float32
        torch.testing.assert_close(trajectory.behaviour_value.T, _value_under(start_weights, batch))

        # A real learner: STEPS updates on remote unrolls, publishing after each one.
        trainer = L.Trainer(
            max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, datamodule=RemoteActorsData(actors))
        assert trainer.global_step == STEPS and EpisodeStats.of(trainer).env_frames > 0

        # The last publish (version STEPS) reached the nodes with its weights: once the rollouts
        # in flight are out, unrolls carry that version and the learner's own log-probabilities.
        final = None
        for _ in range(4 * NUM_ACTORS):
            rollout = next(iter(actors))
            assert rollout.batch_size == torch.Size([ENVS_PER_ACTOR, UNROLL_LENGTH])
            if (rollout["policy_version"] == STEPS).all():
                final = rollout
                break
        assert final is not None, "no rollout acted with the last published weights"
        torch.testing.assert_close(final["behaviour_log_prob"], _log_prob_under(module.network, final))
        assert not torch.allclose(final["behaviour_log_prob"], _log_prob_under(start_weights, final), atol=1e-6)
        torch.testing.assert_close(final["behaviour_value"], _value_under(module.network, final))
    finally:
        actors.shutdown()
    _assert_all_gone(nodes)
    assert not torch.distributed.is_initialized()


def test_nodes_started_by_hand_join_an_external_learner(monkeypatch):
    # What a host list looks like: each host runs `python -m lit_impala.remote ...`, unrelated to
    # the learner's process tree, with the run's secret in its environment. Should a node fail to
    # start, the learner stops waiting after join_timeout_s.
    monkeypatch.setenv(SECRET_ENV, new_secret())  # the learner's, and (inherited) the nodes'
    port = find_free_port()
    host = "127.0.0.1"  # the learner's bind address
    nodes = [
        subprocess.Popen([sys.executable, "-m", "lit_impala.remote", "--learner", host, "--port", str(port),
                          "--rank", str(rank), "--world-size", str(NUM_ACTORS + 1)])
        for rank in range(1, NUM_ACTORS + 1)
    ]
    try:
        network = ActorCriticMLP(4, 2)
        actors = make_remote_collector(
            ActorSpec("CartPole-v1", NUM_ACTORS, ENVS_PER_ACTOR, UNROLL_LENGTH), network, partial(ActorCriticMLP, 4, 2),
            launcher="external", tcp_port=port, bind_address=host, join_timeout_s=120,
        )
        try:
            rollouts = iter(actors)
            first = next(rollouts)
            assert first.batch_size == torch.Size([ENVS_PER_ACTOR, UNROLL_LENGTH])
            assert (first["policy_version"] == 0).all()
            with torch.no_grad():  # a policy that always picks action 1
                network.policy_head.bias.copy_(torch.tensor([-50.0, 50.0]))
            actors.publish_weights(network, version=3)
            for _ in range(4 * NUM_ACTORS):  # rollouts in flight may still carry version 0
                rollout = next(rollouts)
                if (rollout["policy_version"] == 3).all():
                    break
            assert (rollout["policy_version"] == 3).all()
            assert (rollout["action"] == 1).all()
        finally:
            actors.shutdown()
        assert [node.wait(timeout=30) for node in nodes] == [0] * NUM_ACTORS
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()


def test_the_yaml_switch_trains_with_remote_actors_through_the_cli(tmp_path, monkeypatch):
    """`data.actors: remote` is the only change: the shipped CartPole config then learns from two
    torch.distributed actor nodes (local processes standing for hosts)."""
    import psutil

    from lit_impala.cli import cli_main
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "cartpole.yaml"),
            "--data.actors=remote",
            "--data.num_actors=2",
            "--data.envs_per_actor=8",
            "--trainer.max_steps=8",
            "--episode_stats.stop_at_return=null",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=null",
        ]
    )
    assert cli.trainer.global_step == 8
    assert EpisodeStats.of(cli.trainer).env_frames == 8 * 20 * 32
    assert cli.datamodule.actors is None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # actor nodes are multiprocessing children (W&B's service, started by other tests, is not one)
        left = [p for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE and is_actor_process(p)]
        if not left:
            break
        time.sleep(0.2)
    assert not left, [p.cmdline() for p in left]


def _spawned_children():
    # actor nodes are multiprocessing children (W&B's service, started by other tests, is not one)
    return [p for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE and is_actor_process(p)]


class KillRemoteNodes(L.Callback):
    """SIGKILLs one remote actor node (or all of them) at update ``at_step``, once; remembers which and when.

    Only signals: reaping a node here would hide its exit code from the learner.
    """

    killed_pids: list[int] = []
    killed_at: float | None = None

    def __init__(self, at_step: int = 3, every_node: bool = False):
        self.at_step = at_step
        self.every_node = every_node

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step and not KillRemoteNodes.killed_pids:
            nodes = _spawned_children()
            victims = nodes if self.every_node else nodes[:1]
            KillRemoteNodes.killed_pids = [p.pid for p in victims]
            KillRemoteNodes.killed_at = time.monotonic()
            for victim in victims:
                victim.kill()


def _remote_run_args(tmp_path, *extra, kill):
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "save_on_exception": True}}
    killer = {"class_path": "tests.integration.test_remote.KillRemoteNodes", "init_args": kill}
    return ["fit", "--config", str(REPO / "configs" / "cartpole.yaml"), "--data.actors=remote", "--data.num_actors=2",
            "--data.envs_per_actor=8", "--episode_stats.stop_at_return=null", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.callbacks=" + json.dumps([checkpoint, killer]), *extra]


def test_a_killed_remote_node_is_dropped_and_training_goes_on_with_the_other(tmp_path, monkeypatch, caplog):
    from lit_impala.cli import cli_main

    monkeypatch.chdir(tmp_path)
    KillRemoteNodes.killed_pids, KillRemoteNodes.killed_at = [], None
    cli = cli_main(_remote_run_args(tmp_path, "--trainer.max_steps=12", kill={"at_step": 3}))
    assert len(KillRemoteNodes.killed_pids) == 1
    assert time.monotonic() - KillRemoteNodes.killed_at < 30, "the run stalled after the kill"
    assert cli.trainer.global_step == 12  # trained to the end on the surviving node
    assert cli.datamodule.actors_lost == 1
    (pid,) = KillRemoteNodes.killed_pids
    assert f"(pid {pid}): its process exited with code -9 (SIGKILL); going on with 1 of 2 nodes" in caplog.text
    assert cli.datamodule.actors is None
    _assert_all_gone([psutil.Process(p.pid) for p in _spawned_children()])


def test_losing_every_remote_node_stops_the_run_with_an_error_naming_them(tmp_path, monkeypatch):
    from lit_impala.cli import cli_main

    monkeypatch.chdir(tmp_path)
    KillRemoteNodes.killed_pids, KillRemoteNodes.killed_at = [], None
    with pytest.raises(RuntimeError) as error:
        cli_main(_remote_run_args(tmp_path, "--trainer.max_steps=100000", kill={"at_step": 3, "every_node": True}))
    assert time.monotonic() - KillRemoteNodes.killed_at < 30, "no error within 30 s of the kill"
    message = str(error.value)
    assert "every remote actor node is lost (2 of 2)" in message
    assert len(KillRemoteNodes.killed_pids) == 2
    for pid in KillRemoteNodes.killed_pids:
        assert f"(pid {pid}): its process exited with code -9 (SIGKILL)" in message
    assert "--ckpt_path last" in message
    assert list((tmp_path / "ckpt").glob("*.ckpt")), "a checkpoint to resume from is written before stopping"
    _assert_all_gone([psutil.Process(p.pid) for p in _spawned_children()])


def _freeze(pid):
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.01)


def _silent_s(reason):
    return float(re.search(r"silent for ([0-9.]+) s", reason).group(1))


def test_a_frozen_remote_node_is_lost_after_the_silence_timeout():
    """SIGSTOP stands for a node that is alive but hung (or a host that dropped off the network): only
    its silence tells. Both ways a node can fall silent are bounded: no rollout, and no weights ack."""
    before = {p.pid for p in _actor_processes()}
    network = ActorCriticMLP(4, 2)
    actors = make_remote_collector(
        ActorSpec("CartPole-v1", 2, ENVS_PER_ACTOR, UNROLL_LENGTH), network, partial(ActorCriticMLP, 4, 2),
        node_timeout_s=3.0,
    )
    pids = [job.pid for job in actors.collector.jobs]
    nodes = [p for p in _actor_processes() if p.pid not in before]
    try:
        rollouts = iter(actors)
        next(rollouts)
        _freeze(pids[0])
        frozen_at = time.monotonic()
        while 1 not in actors.nodes.lost and time.monotonic() - frozen_at < 30:
            next(rollouts)  # node 2 goes on delivering meanwhile
        assert time.monotonic() - frozen_at < 10
        assert actors.nodes.lost[1].startswith(f"node 1 (pid {pids[0]}): silent for ")
        assert _silent_s(actors.nodes.lost[1]) >= 3.0
        assert "no rollout since it was asked for one (remote_node_timeout_s=3)" in actors.nodes.lost[1]
        assert actors.nodes.live == [2]
        assert actors.collector.jobs[0].exitcode == -signal.SIGKILL  # an "mp" node that hangs is ended

        _freeze(pids[1])
        frozen_at = time.monotonic()
        with pytest.raises(RuntimeError, match=r"every remote actor node is lost \(2 of 2\)") as error:
            actors.publish_weights(network, version=1)
        assert time.monotonic() - frozen_at < 10
        assert f"node 2 (pid {pids[1]}): silent for " in str(error.value)
        assert _silent_s(str(error.value).split("node 2")[1]) >= 3.0
        assert "no acknowledgement of new weights" in str(error.value)
        with pytest.raises(RuntimeError, match="every remote actor node is lost"):
            next(iter(actors))
    finally:
        for pid in pids:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)
        actors.shutdown()
    _assert_all_gone(nodes)
    assert not torch.distributed.is_initialized()


def test_a_dead_node_started_by_hand_is_dropped(monkeypatch):
    """No process handle for such a node: the learner sees it gone through gloo (its connection closed)
    or, at the latest, its silence; the stream goes on from the other node."""
    monkeypatch.setenv(SECRET_ENV, new_secret())
    port = find_free_port()
    host = "127.0.0.1"
    nodes = [
        subprocess.Popen([sys.executable, "-m", "lit_impala.remote", "--learner", host, "--port", str(port),
                          "--rank", str(rank), "--world-size", "3"])
        for rank in (1, 2)
    ]
    try:
        actors = make_remote_collector(
            ActorSpec("CartPole-v1", 2, ENVS_PER_ACTOR, UNROLL_LENGTH), ActorCriticMLP(4, 2),
            partial(ActorCriticMLP, 4, 2), launcher="external", tcp_port=port, bind_address=host, join_timeout_s=120,
            node_timeout_s=3.0,
        )
        try:
            rollouts = iter(actors)
            next(rollouts)
            nodes[0].kill()
            nodes[0].wait()
            killed_at = time.monotonic()
            while 1 not in actors.nodes.lost and time.monotonic() - killed_at < 30:
                next(rollouts)
            assert time.monotonic() - killed_at < 10
            assert actors.nodes.lost[1].startswith("node 1 (started by hand): "), actors.nodes.lost
            for _ in range(3):
                assert next(rollouts).batch_size == torch.Size([ENVS_PER_ACTOR, UNROLL_LENGTH])
        finally:
            actors.shutdown()
        assert nodes[1].wait(timeout=30) == 0
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_a_remote_node_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match=rf"remote_node_timeout_s must be a PositiveFloat, got {timeout!r}"):
        ImpalaDataModule(actors="remote", remote_node_timeout_s=timeout)
