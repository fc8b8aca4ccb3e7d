"""The actor pipeline on real CartPole envs, for each env backend (gymnasium, envpool): episode boundaries
are exact, no phantom steps."""

from functools import partial

import pytest
import torch

from lit_impala.core.networks import ActorCriticMLP
from lit_impala.data import ImpalaDataModule
from lit_impala.envs.factory import describe_env
from lit_impala.schema import to_time_major

X_LIMIT, THETA_LIMIT = 2.4, 12 * 2 * 3.141592653589793 / 360  # CartPole-v1's termination bounds
MAX_STEPS = 40  # a short time limit so that both terminations and truncations occur


def out_of_bounds(obs):
    return (obs[..., 0].abs() > X_LIMIT) | (obs[..., 2].abs() > THETA_LIMIT)


@pytest.fixture(scope="module", params=["gymnasium", "envpool"])
def batches(request):
    data = ImpalaDataModule("CartPole-v1", num_actors=2, envs_per_actor=8, unroll_length=25, batch_size=12, seed=3,
                            max_episode_steps=MAX_STEPS, env_backend=request.param)
    network = ActorCriticMLP(4, 2)
    data.start_actors(network, partial(ActorCriticMLP, 4, 2))
    try:
        stream = iter(data.train_dataloader())
        yield [to_time_major(next(stream)) for _ in range(40)]
    finally:
        data.stop_actors()


def test_batches_have_the_requested_shape(batches):
    for trajectory in batches:
        assert trajectory.reward.shape == (25, 12)
        assert trajectory.observation.shape == (25, 12, 4)
        assert trajectory.action.dtype == torch.int64
        assert trajectory.behaviour_value.shape == (25, 12)


def test_every_step_is_a_real_step(batches):
    # CartPole pays 1 for every real step: a phantom (autoreset) transition would pay 0
    for trajectory in batches:
        assert (trajectory.reward == 1).all()
        # the step counter goes up by exactly one inside an episode and restarts at 1 after it
        length = trajectory.episode_length
        expected_next = torch.where(trajectory.done[:-1], torch.ones_like(length[1:]), length[:-1] + 1)
        assert torch.equal(length[1:], expected_next)


def test_observations_chain_within_episodes_and_reset_between(batches):
    for trajectory in batches:
        not_done = ~trajectory.done[:-1]
        assert torch.equal(trajectory.observation[1:][not_done], trajectory.next_observation[:-1][not_done])
        reset_obs = trajectory.observation[1:][trajectory.done[:-1]]
        assert (reset_obs.abs() <= 0.05).all()  # CartPole resets uniformly in [-0.05, 0.05]


def test_episode_returns_equal_lengths_and_ends_are_classified(batches, request):
    backend = request.node.callspec.params["batches"]
    terminations = truncations = 0
    for trajectory in batches:
        done = trajectory.done
        assert torch.equal(trajectory.episode_return[done], trajectory.episode_length[done].float())
        final = trajectory.next_observation
        # terminated: the final observation is outside the bounds; truncated: inside, at the limit
        assert out_of_bounds(final[trajectory.terminated]).all()
        trunc = trajectory.truncated & ~trajectory.terminated
        assert (trajectory.episode_length[trunc] == MAX_STEPS).all()
        if backend == "gymnasium":
            assert not out_of_bounds(final[trunc]).any()
        # envpool: an episode that terminates at the time limit's very step is reported truncated only
        # (envpool computes terminated = done and not truncated); docs/performance.md#env-backends-gymnasium-or-envpool
        assert not out_of_bounds(final[~done]).any()
        terminations += int(trajectory.terminated.sum())
        truncations += int(trunc.sum())
    assert terminations > 50 and truncations > 5, (terminations, truncations)


def test_behaviour_log_probs_are_those_of_the_published_weights(batches):
    # Every step was acted with version 0 (nothing else was published), and the recorded log-prob is
    # log pi(a|x) of a real 2-action policy.
    for trajectory in batches:
        assert (trajectory.policy_version == 0).all()
        assert (trajectory.behaviour_log_prob <= 0).all() and (trajectory.behaviour_log_prob > -5).all()


@pytest.mark.parametrize(
    "env_id, message",
    [
        ("CartPole-v9", "Unknown gymnasium env id 'CartPole-v9'"),
        ("Blackjack-v1", "has observation space Tuple"),
        ("CarRacing-v3", "Env 'CarRacing-v3' could not be created \\(gymnasium\\): DependencyNotInstalled"),
    ],
)
def test_unsupported_envs_are_rejected_by_name(env_id, message):
    with pytest.raises(ValueError, match=message):
        describe_env(env_id)


@pytest.mark.parametrize(
    "env_id, options, message",
    [
        ("MinAtar/Breakout-v1", {}, "env_backend envpool has no env 'MinAtar/Breakout-v1'"),
        ("CartPole-v1", {"observation_key": "image"},
         "observation_key, hide_observation_indices and action_mask_key are gymnasium"),
        ("CartPole-v1", {"atari_options": {"frame_skip": 2}}, "which is not an Atari env"),
        ("ALE/Pong-v5", {"atari_options": {"clip_rewards": True}}, r"atari_options \['clip_rewards'\] have no envpool"),
    ],
)
def test_what_envpool_cannot_do_is_refused_by_name(env_id, options, message):
    with pytest.raises(ValueError, match=message):
        describe_env(env_id, backend="envpool", **options)


def test_the_env_backend_type_names_every_backend_of_the_registry():
    """One registry: the ``data.env_backend`` choices the CLI checks are the backends ``make_vector_env`` knows."""
    import typing

    from lit_impala.envs import factory

    assert typing.get_args(factory.EnvBackend) == tuple(factory.BACKENDS)
    assert typing.get_type_hints(ImpalaDataModule.__init__)["env_backend"] == factory.EnvBackend
