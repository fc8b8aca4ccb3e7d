"""Alignment: a hand-built unroll with a termination and a truncation in the middle.

The value function is V(x) = x[0], so every expected number below can be checked by hand.
gamma = 0.9, one env (B=1), five steps:

    t  obs  reward  next_obs  end          V(obs)
    0   1     1        2       -             1
    1   2     1        3      terminated     2   (V(3) must NOT be used)
    2  10     1       11       -            10
    3  11     1       12      truncated     11   (bootstrap from V(12) = 12)
    4  20     1       21       -            20   (bootstrap from V(21) = 21)
"""

import pytest
import torch
from tensordict import TensorDict

from lit_impala.core import vtrace
from lit_impala.core.episode_boundaries import bootstrap_steps, learning_terminations, vtrace_step_inputs
from lit_impala.schema import to_time_major

GAMMA = 0.9


def hand_built_batch() -> TensorDict:
    obs = torch.tensor([1.0, 2.0, 10.0, 11.0, 20.0])
    next_obs = torch.tensor([2.0, 3.0, 11.0, 12.0, 21.0])
    terminated = torch.tensor([False, True, False, False, False])
    truncated = torch.tensor([False, False, False, True, False])
    T = 5

    def batch_major(x):  # [T, ...] -> [B=1, T, ...] as torchrl's collector lays it out
        return x.unsqueeze(0)

    return TensorDict(
        {
            "observation": batch_major(obs.unsqueeze(-1)),
            "is_init": batch_major(torch.tensor([True, False, True, False, True]).unsqueeze(-1)),
            "policy_sample": batch_major(torch.zeros(T, dtype=torch.int64)),
            "behaviour_log_prob": batch_major(torch.zeros(T)),
            "policy_version": batch_major(torch.zeros(T, dtype=torch.int64)),
            "next": {
                "observation": batch_major(next_obs.unsqueeze(-1)),
                "reward": batch_major(torch.ones(T, 1)),
                "terminated": batch_major(terminated.unsqueeze(-1)),
                "truncated": batch_major(truncated.unsqueeze(-1)),
                "episode_reward": batch_major(torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0]).unsqueeze(-1)),
                "step_count": batch_major(torch.tensor([1, 2, 1, 2, 1]).unsqueeze(-1)),
            },
        },
        batch_size=[1, T],
    )


def value_fn(observation):
    return observation[..., 0].to(torch.float64)


def value_of_next(trajectory):
    return lambda mask: value_fn(trajectory.next_observation[mask])


def test_time_major_layout():
    trajectory = to_time_major(hand_built_batch())
    assert trajectory.observation.shape == (5, 1, 1)
    assert trajectory.reward.shape == trajectory.terminated.shape == (5, 1)
    assert trajectory.done[:, 0].tolist() == [False, True, False, True, False]
    assert trajectory.episode_return[:, 0].tolist() == [1.0, 2.0, 1.0, 2.0, 1.0]
    assert trajectory.is_init[:, 0].tolist() == [True, False, True, False, True]
    assert trajectory.initial_core_state is None  # no recurrent core in this batch


def test_behaviour_value_is_time_major_and_optional():
    batch = hand_built_batch()
    assert to_time_major(batch).behaviour_value is None  # data from a producer that does not record it
    batch.set("behaviour_value", torch.tensor([[1.0, 2.0, 10.0, 11.0, 20.0]]))  # [B=1, T=5]: V(obs), as it acted
    trajectory = to_time_major(batch)
    assert trajectory.behaviour_value.shape == (5, 1)
    assert trajectory.behaviour_value[:, 0].tolist() == [1.0, 2.0, 10.0, 11.0, 20.0]


def targets_for(trajectory, discount, **options):
    """What the learner does: the values of the next observations the rules ask for, then the targets.
    The other steps hold NaN: a rule that read one would show it."""
    terminated = learning_terminations(trajectory.terminated, trajectory.life_lost)
    needed = bootstrap_steps(terminated, trajectory.truncated)
    next_values = torch.full(needed.shape, float("nan"))
    next_values[needed] = value_of_next(trajectory)(needed).float()
    return vtrace_step_inputs(trajectory.reward, terminated, trajectory.truncated, next_values, discount, **options)


def test_boundaries_give_the_hand_computed_targets():
    trajectory = to_time_major(hand_built_batch())
    targets = targets_for(trajectory, GAMMA)

    torch.testing.assert_close(targets.discounts[:, 0], torch.tensor([GAMMA, 0.0, GAMMA, 0.0, GAMMA]))
    # truncation folds gamma * V(final obs) into the reward; termination adds nothing
    torch.testing.assert_close(targets.rewards[:, 0], torch.tensor([1.0, 1.0, 1.0, 1.0 + GAMMA * 12.0, 1.0]))
    torch.testing.assert_close(targets.bootstrap_value, torch.tensor([21.0]))

    values = value_fn(trajectory.observation).float()
    returns = vtrace.from_importance_weights(
        log_rhos=torch.zeros(5, 1),
        discounts=targets.discounts,
        rewards=targets.rewards,
        values=values,
        bootstrap_value=targets.bootstrap_value,
    )
    # on-policy V-trace = n-step returns that stop at each episode boundary
    expected_vs = [1 + GAMMA * 1, 1.0, 1 + GAMMA * (1 + GAMMA * 12), 1 + GAMMA * 12, 1 + GAMMA * 21]
    torch.testing.assert_close(returns.vs[:, 0], torch.tensor(expected_vs))
    expected_adv = [
        1 + GAMMA * 1.0 - 1,
        1.0 - 2,
        1 + GAMMA * (1 + GAMMA * 12) - 10,
        1 + GAMMA * 12 - 11,
        1 + GAMMA * 21 - 20,
    ]
    torch.testing.assert_close(returns.pg_advantages[:, 0], torch.tensor(expected_adv))


def test_truncation_at_the_last_step_bootstraps_once():
    batch = hand_built_batch()
    batch["next", "truncated"][0, 4] = True
    trajectory = to_time_major(batch)
    targets = targets_for(trajectory, GAMMA)
    assert targets.discounts[4, 0] == 0.0
    assert targets.rewards[4, 0].item() == pytest.approx(1.0 + GAMMA * 21.0)


def test_terminated_and_truncated_together_counts_as_terminated():
    batch = hand_built_batch()
    batch["next", "truncated"][0, 1] = True  # gymnasium may report both when the limit hits a terminal state
    trajectory = to_time_major(batch)
    targets = targets_for(trajectory, GAMMA)
    assert targets.rewards[1, 0] == 1.0
    assert targets.discounts[1, 0] == 0.0


def test_life_loss_is_a_termination_for_learning_only():
    batch = hand_built_batch()
    life_lost = torch.tensor([[False, False, True, False, False]])
    batch["next", "life_lost"] = life_lost
    trajectory = to_time_major(batch)
    assert trajectory.life_lost[:, 0].tolist() == life_lost[0].tolist()
    assert trajectory.done[:, 0].tolist() == [False, True, False, True, False]  # the game (and its return) go on
    targets = targets_for(trajectory, GAMMA)
    torch.testing.assert_close(targets.discounts[:, 0], torch.tensor([GAMMA, 0.0, 0.0, 0.0, GAMMA]))
    torch.testing.assert_close(targets.rewards[:, 0], torch.tensor([1.0, 1.0, 1.0, 1.0 + GAMMA * 12.0, 1.0]))
    # A life lost on a truncated step: terminal, no bootstrap.
    batch["next", "life_lost"][0, 3] = True
    targets = targets_for(to_time_major(batch), GAMMA)
    assert targets.rewards[3, 0] == 1.0 and targets.discounts[3, 0] == 0.0


def test_reward_clip_applies_before_the_scale_and_not_to_bootstraps():
    batch = hand_built_batch()
    batch["next", "reward"] = torch.tensor([[3.0, -5.0, 0.5, 7.0, -0.25]]).unsqueeze(-1)
    trajectory = to_time_major(batch)
    targets = targets_for(trajectory, GAMMA, reward_scale=0.5, reward_clip=1.0)
    expected = torch.tensor([0.5, -0.5, 0.25, 0.5 + GAMMA * 12.0, -0.125])
    torch.testing.assert_close(targets.rewards[:, 0], expected)
