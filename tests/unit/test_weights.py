"""The weight mailbox: versioned, complete snapshots reach the actors, nothing unpublished does."""

import copy
import multiprocessing as mp
from functools import partial

import pytest
import torch

from lit_impala.actors.mailbox import WeightMailbox
from lit_impala.core.networks import ActorCriticMLP
from lit_impala.data import ImpalaDataModule
from lit_impala.schema import to_time_major


def _value_under(network, trajectory):
    """``V(x_t) [T, B]`` under ``network``: the behaviour value iff it acted with these weights."""
    with torch.no_grad():
        return network(trajectory.observation).baseline


def _read_in_child(mailbox, queue):
    network = ActorCriticMLP(4, 2)
    got = mailbox.read_into(network, last_sequence=0)
    # plain lists: a tensor on the queue would be shared through this process, which exits now
    queue.put((got[1], torch.cat([p.detach().flatten() for p in network.parameters()]).tolist()))


def test_mailbox_crosses_a_spawned_process():
    source = ActorCriticMLP(4, 2)
    mailbox = WeightMailbox(source)
    try:
        mailbox.publish(source, version=7)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(mailbox, queue))
        child.start()
        version, weights = queue.get(timeout=60)
        child.join(timeout=30)
        assert version == 7
        torch.testing.assert_close(
            torch.tensor(weights), torch.cat([p.detach().flatten() for p in source.parameters()])
        )
    finally:
        mailbox.close()


def test_reader_skips_stale_and_in_progress_snapshots():
    source, target = ActorCriticMLP(4, 2), ActorCriticMLP(4, 2)
    mailbox = WeightMailbox(source)
    try:
        assert mailbox.read_into(target, 0) is None  # nothing published yet
        mailbox.publish(source, version=3)
        sequence, version = mailbox.read_into(target, 0)
        assert version == 3
        assert mailbox.read_into(target, sequence) is None  # nothing newer
        mailbox.header[0] += 1  # a writer is mid-way: the reader must not take the snapshot
        assert mailbox.read_into(target, sequence) is None
    finally:
        mailbox.close()


@pytest.mark.parametrize("inference", ["actor", "server"])
def test_actors_act_with_published_versions_only(inference):
    data = ImpalaDataModule("CartPole-v1", num_actors=2, envs_per_actor=4, unroll_length=10, batch_size=4, seed=0,
                            inference=inference)
    learner = ActorCriticMLP(4, 2)
    version_0 = copy.deepcopy(learner)
    data.start_actors(learner, partial(ActorCriticMLP, 4, 2), version=0)
    try:
        stream = iter(data.train_dataloader())
        next(stream)
        # An in-place change the learner never published must not reach the actors: make action 1
        # certain in the learner's copy (and shift its values); the actors must still act with
        # version 0's near-uniform policy and record version 0's values.
        with torch.no_grad():
            learner.policy_head.bias.copy_(torch.tensor([-50.0, 50.0]))
            learner.baseline_head.bias.add_(10.0)
        unpublished = [to_time_major(next(stream)) for _ in range(6)][-2:]
        for trajectory in unpublished:
            assert (trajectory.policy_version == 0).all()
            assert 0.2 < trajectory.action.float().mean() < 0.8
            torch.testing.assert_close(trajectory.behaviour_value, _value_under(version_0, trajectory))
        data.publish_weights(learner, version=5)
        for _ in range(8):  # rollouts already in flight may still carry version 0
            trajectory = to_time_major(next(stream))
        assert (trajectory.policy_version == 5).all()
        assert (trajectory.action == 1).all()
        assert torch.allclose(trajectory.behaviour_log_prob, torch.zeros(()), atol=1e-6)
        assert trajectory.behaviour_value.dtype == torch.float32
        torch.testing.assert_close(trajectory.behaviour_value, _value_under(learner, trajectory))
    finally:
        data.stop_actors()
