"""Batched inference on a GPU: the served policy on CUDA acts with exactly the learner's log-probs, values and
versions."""

from functools import partial

import pytest
import torch

from lit_impala.core.distributions import make_distribution
from lit_impala.core.networks import ImpalaAgent
from lit_impala.data import ImpalaDataModule
from lit_impala.schema import to_time_major

pytestmark = [pytest.mark.gpu,  # benchmarks/gpu_check.py runs every test marked gpu on a GPU machine
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the served policy runs on the GPU")]


@pytest.mark.parametrize("use_lstm", [False, True], ids=["feed-forward", "lstm"])
def test_served_policy_on_cuda_is_on_policy_and_versioned(use_lstm):
    data = ImpalaDataModule("CartPole-v1", num_actors=2, envs_per_actor=6, unroll_length=12, batch_size=6, seed=1,
                            max_episode_steps=9, inference="server")
    distribution = make_distribution(data.env_facts.action_space)
    factory = partial(ImpalaAgent, tuple(data.observation_shape), distribution, use_lstm=use_lstm,
                      lstm_hidden_dim=32, policy_init_scale=3.0)
    torch.manual_seed(0)
    network = factory().to("cuda")
    data.start_actors(network, factory, version=3)
    try:
        stream = iter(data.train_dataloader())
        for _ in range(4):
            trajectory = to_time_major(next(stream).to("cuda"))
            state = trajectory.initial_core_state if use_lstm else None
            with torch.no_grad():
                output = network(trajectory.observation, state, trajectory.is_init)
            log_prob = network.distribution.log_prob(output.policy_params, trajectory.action)
            torch.testing.assert_close(log_prob, trajectory.behaviour_log_prob, atol=1e-4, rtol=0)
            torch.testing.assert_close(output.baseline, trajectory.behaviour_value, atol=1e-4, rtol=0)
            assert (trajectory.policy_version == 3).all()
        assert data.actors.inference.model.network.policy_head.weight.device.type == "cuda"
    finally:
        data.stop_actors()
