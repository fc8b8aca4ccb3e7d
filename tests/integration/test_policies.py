"""Acting and learning agree: with equal weights the learner's log-probs are the actors' (rho == 1), and so are
its values (``behaviour_value``, the old values of value-loss clipping).

Each test runs with both inference modes: the policy in each actor process (``inference="actor"``) and one
batched policy in this process serving all actors (``inference="server"``, ``actors.inference``).

Data comes from real actor processes on real envs with short time limits, so unrolls contain
terminations, truncations and episode starts; the recurrent state must be carried and reset the same
way on both sides, and continuous log-probs must be of the same distribution on both sides.
"""

from functools import partial

import pytest
import torch

from lit_impala.cli import cli_main
from lit_impala.core.distributions import make_distribution
from lit_impala.core.networks import ImpalaAgent
from lit_impala.data import ImpalaDataModule
from lit_impala.schema import to_time_major
from tests.conftest import REPO


def on_policy_batches(env_id, network_kwargs, num_batches=6, **data_kwargs):
    data = ImpalaDataModule(
        env_id, num_actors=2, envs_per_actor=6, unroll_length=12, batch_size=6, seed=1, **data_kwargs
    )
    distribution = make_distribution(data.env_facts.action_space, squash=network_kwargs.pop("squash", "clip"))
    factory = partial(ImpalaAgent, tuple(data.observation_shape), distribution, **network_kwargs)
    torch.manual_seed(0)
    network = factory()
    data.start_actors(network, factory, version=0)  # nothing else is ever published: all on-policy
    try:
        stream = iter(data.train_dataloader())
        return network, [to_time_major(next(stream)) for _ in range(num_batches)]
    finally:
        data.stop_actors()


def learner_log_probs(network, trajectory, core_state="stored"):
    state = trajectory.initial_core_state if core_state == "stored" else core_state
    with torch.no_grad():
        output = network(trajectory.observation, state, trajectory.is_init)
    return network.distribution.log_prob(output.policy_params, trajectory.action)


def learner_values(network, trajectory):
    """``V(x_t) [T, B]`` as the learner computes it, from the actors' stored core state."""
    with torch.no_grad():
        return network(trajectory.observation, trajectory.initial_core_state, trajectory.is_init).baseline


INFERENCE = pytest.mark.parametrize("inference", ["actor", "server"])


@pytest.mark.parametrize(("hidden", "inference"), [([1, 3], "actor"), ([1, 3], "server"), (None, "actor")],
                         ids=["pomdp-actor", "pomdp-server", "full-observation-actor"])
def test_recurrent_policy_is_on_policy(hidden, inference):
    network, batches = on_policy_batches(
        "CartPole-v1",
        dict(use_lstm=True, lstm_hidden_dim=32, policy_init_scale=3.0),  # a sharp policy: mismatches show
        max_episode_steps=9,
        hide_observation_indices=hidden,
        inference=inference,
    )
    boundaries_inside = 0
    for trajectory in batches:
        torch.testing.assert_close(
            learner_log_probs(network, trajectory), trajectory.behaviour_log_prob, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(learner_values(network, trajectory), trajectory.behaviour_value, atol=1e-5, rtol=0)
        boundaries_inside += int(trajectory.done[:-1].sum())
        assert trajectory.initial_core_state[0].shape == (6, 32)
    assert boundaries_inside > 10  # resets happened inside unrolls, not only at their edges
    # The test can fail: starting each unroll from a zero state instead of the actors' state breaks it
    # (checked on every unroll that begins mid-episode, i.e. whose first step carries memory over).
    mismatches = []
    for trajectory in batches:
        carried_over = ~trajectory.is_init[0]
        if carried_over.any():
            zero_state = network.initial_state(trajectory.observation.shape[1])
            error = (learner_log_probs(network, trajectory, zero_state) - trajectory.behaviour_log_prob).abs()
            mismatches.append(error[:, carried_over].max())
    assert mismatches, "no unroll began mid-episode"
    assert max(mismatches) > 1e-3


@pytest.mark.parametrize(("squash", "inference"), [("clip", "actor"), ("clip", "server"), ("tanh", "actor")],
                         ids=["clip-actor", "clip-server", "tanh-actor"])
def test_continuous_policy_is_on_policy(squash, inference):
    network, batches = on_policy_batches(
        "Pendulum-v1", dict(squash=squash, log_std_init=0.5, policy_init_scale=1.0), max_episode_steps=7,
        inference=inference,
    )
    for trajectory in batches:
        assert trajectory.action.shape[-1] == 1 and trajectory.action.dtype == torch.float32
        torch.testing.assert_close(
            learner_log_probs(network, trajectory), trajectory.behaviour_log_prob, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(learner_values(network, trajectory), trajectory.behaviour_value, atol=1e-5, rtol=0)
        assert trajectory.truncated.any()
    samples = torch.cat([t.action.flatten() for t in batches])
    assert (samples.abs() > 2).any()  # the Gaussian sample itself is unbounded: log-probs are of it


@INFERENCE
def test_multi_actor_pixel_policy_is_on_policy(inference):
    pytest.importorskip("minigrid", reason="the minigrid extra provides the image env")
    network, batches = on_policy_batches(
        "minigrid:MiniGrid-Empty-5x5-v0",
        dict(encoder="resnet", feature_dim=32, use_lstm=True, lstm_hidden_dim=16, policy_init_scale=3.0),
        num_batches=3,
        observation_key="image",
        max_episode_steps=8,
        inference=inference,
    )
    for trajectory in batches:
        assert trajectory.observation.dtype == torch.uint8  # pixels travel as uint8
        assert trajectory.observation.shape[2:] == (3, 7, 7)
        torch.testing.assert_close(
            learner_log_probs(network, trajectory), trajectory.behaviour_log_prob, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("cartpole_pomdp.yaml", []),
        ("pendulum.yaml", []),
        ("minigrid.yaml", ["--data.envs_per_actor=2", "--data.batch_size=2"]),
    ],
)
def test_shipped_configs_run_end_to_end(tmp_path, monkeypatch, config, overrides):
    if config == "minigrid.yaml":
        pytest.importorskip("minigrid", reason="the minigrid extra provides the image env")
    monkeypatch.chdir(tmp_path)
    cli = cli_main([
        "fit", "--config", str(REPO / "configs" / config),
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=null", "--trainer.max_steps=4", "--data.num_actors=1", "--data.envs_per_actor=4",
        "--data.batch_size=4", "--data.unroll_length=6", *overrides,
    ])
    assert cli.trainer.global_step == 4
    assert all(torch.isfinite(p).all() for p in cli.model.network.parameters())
    if cli.model.hparams.normalize_observations:  # its statistics are part of the checkpointed state
        state = cli.model.state_dict()
        assert state["network.normalizer.count"] > 0 and "network.normalizer.mean" in state


def test_sync_actors_hand_over_whole_unrolls():
    """``data.sync_actors``: torchrl's MultiSyncCollector splits its ``frames_per_batch`` over its workers (the async
    one's is per worker); every actor still hands over ``[envs_per_actor, unroll_length]`` unrolls, not unrolls of
    ``unroll_length / num_actors`` steps."""
    _, batches = on_policy_batches("CartPole-v1", {}, num_batches=3, sync_actors=True)
    assert all(trajectory.observation.shape[:2] == (12, 6) for trajectory in batches)
