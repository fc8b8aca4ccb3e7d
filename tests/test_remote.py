"""Remote actors through torchrl's DistributedCollector: on localhost, two actor nodes (separate
processes standing for two hosts) feed a real learner, receive its weights and versions over
torch.distributed, and are all gone after shutdown."""

import socket
import subprocess
import sys
import time
from functools import partial

import lightning as L
import psutil
import pytest
import torch
from torch.utils.data import DataLoader
from torchrl.collectors.distributed import generic

from lit_impala.actor import CORE_STATE_KEYS
from lit_impala.data import UnrollStream
from lit_impala.module import ImpalaModule
from lit_impala.networks import ActorCriticMLP
from lit_impala.remote import find_free_port, make_remote_collector
from lit_impala.trajectory import BATCH_KEYS, to_time_major

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


def _actor_processes():
    # torchrl's "mp" launcher starts the nodes with spawn; the resource tracker is not an actor.
    return [p for p in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]


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
        "CartPole-v1", module.network, module.network_factory,
        num_actors=NUM_ACTORS, envs_per_actor=ENVS_PER_ACTOR, unroll_length=UNROLL_LENGTH, version=0, seed=0,
    )
    nodes = [p for p in _actor_processes() if p.pid not in before]
    try:
        assert len(nodes) >= NUM_ACTORS, "each actor node is a process of its own"

        # Rollouts arrive through UnrollStream as learner batches [B, T] with the learner's keys.
        stream = iter(UnrollStream(actors, BATCH_SIZE))
        batch = next(stream)
        assert batch.batch_size == torch.Size([BATCH_SIZE, UNROLL_LENGTH])
        keys = set(batch.keys(True, True))
        assert keys <= set(BATCH_KEYS) and keys >= set(BATCH_KEYS) - OPTIONAL_KEYS, keys
        assert batch["observation"].dtype == torch.float32 and batch["observation"].shape[-1] == 4
        assert batch["policy_sample"].dtype == torch.int64 and batch["policy_sample"].shape == (BATCH_SIZE, UNROLL_LENGTH)
        assert batch["behaviour_log_prob"].dtype == torch.float32
        assert batch["policy_version"].dtype == torch.int64 and (batch["policy_version"] == 0).all()
        assert batch["is_init"].dtype == torch.bool
        trajectory = to_time_major(batch)  # what training_step reads
        assert trajectory.reward.shape == (UNROLL_LENGTH, BATCH_SIZE)
        torch.testing.assert_close(trajectory.behaviour_log_prob.T, _log_prob_under(start_weights, batch))

        # A real learner: STEPS updates on remote unrolls, publishing after each one.
        trainer = L.Trainer(
            max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, datamodule=RemoteActorsData(actors))
        assert trainer.global_step == STEPS and module.env_frames > 0

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
    finally:
        actors.shutdown()
    _assert_all_gone(nodes)
    assert not torch.distributed.is_initialized()


def test_nodes_started_by_hand_join_an_external_learner(monkeypatch):
    # What a host list looks like: each host runs `python -m lit_impala.remote ...`, unrelated to
    # the learner's process tree. Should a node fail to start, the learner's rendezvous must not
    # wait torchrl's default 1000 days.
    monkeypatch.setattr(generic, "MAX_TIME_TO_CONNECT", 120 / 86400)  # timedelta(days)
    port = find_free_port()
    host = socket.gethostbyname(socket.gethostname())  # where torchrl's learner listens
    nodes = [
        subprocess.Popen([sys.executable, "-m", "lit_impala.remote", "--learner", host, "--port", str(port),
                          "--rank", str(rank), "--world-size", str(NUM_ACTORS + 1)])
        for rank in range(1, NUM_ACTORS + 1)
    ]
    try:
        network = ActorCriticMLP(4, 2)
        actors = make_remote_collector(
            "CartPole-v1", network, partial(ActorCriticMLP, 4, 2), num_actors=NUM_ACTORS,
            envs_per_actor=ENVS_PER_ACTOR, unroll_length=UNROLL_LENGTH, launcher="external", tcp_port=port,
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
    cli = cli_main([
        "fit", "--config", str(REPO / "configs" / "cartpole.yaml"), "--data.actors=remote",
        "--data.num_actors=2", "--data.envs_per_actor=8", "--trainer.max_steps=8", "--model.stop_at_return=null",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=null",
    ])
    assert cli.trainer.global_step == 8
    assert cli.trainer.lightning_module.env_frames == 8 * 20 * 32
    assert cli.datamodule.collector is None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # actor nodes are multiprocessing children (W&B's service, started by other tests, is not one)
        left = [p for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline())]
        if not left:
            break
        time.sleep(0.2)
    assert not left, [p.cmdline() for p in left]
