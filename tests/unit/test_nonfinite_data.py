"""Non-finite env data: caught in the actor's env where it is produced (``envs.finite``), never in the
learner's observation statistics, never in the stop rule's window."""

import math
import re
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict

import tests.faulty_envs  # noqa: F401  (registers the NaN envs)
from lit_impala.callbacks import EpisodeStats
from lit_impala.envs.factory import make_vector_env
from lit_impala.envs.finite import FiniteCheck, NonFiniteEnvData, nonfinite_report
from lit_impala.learner import ImpalaModule
from lit_impala.schema import NONFINITE_KEY, REPLAYED_KEY, to_time_major
from tests.faulty_envs import NONFINITE_AT_STEP

NAN_OBSERVATION = "tests.faulty_envs:NaNObservationPendulum-v0"
NAN_REWARD = "tests.faulty_envs:NaNRewardCartPole-v0"


def steps(env, n: int) -> list[TensorDict]:
    """``n`` random steps as an actor takes them (finished sub-envs reset); each step's TensorDict."""
    root, out = env.reset(), []
    for _ in range(n):
        step, root = env.step_and_maybe_reset(env.rand_action(root))
        out.append(step.clone())
    out.append(root.clone())  # what the policy sees next
    return out


# --- at the source ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env_id, what", [(NAN_OBSERVATION, r"observation \(nan in 1 of 3 components\)"), (NAN_REWARD, r"reward \(nan\)")]
)
def test_raise_names_the_env_the_actor_the_sub_env_its_step_and_what(env_id, what):
    env = make_vector_env(env_id, 3, seed=0, actor=1)
    with pytest.raises(NonFiniteEnvData) as error:
        steps(env, NONFINITE_AT_STEP)
    expected = (rf"actor 1 of env '{env_id}': sub-env 0 returned a non-finite {what} at its step {NONFINITE_AT_STEP} "
                r"\(and 2 more sub-envs at the same step\)")
    assert re.fullmatch(expected, str(error.value)), str(error.value)
    env.close()


def test_in_an_actor_raise_leaves_the_traceback_for_the_learner_and_ends_the_process(tmp_path):
    error_file = tmp_path / "actor1.traceback"
    env = make_vector_env(NAN_REWARD, 1, seed=0, actor=1, error_file=str(error_file))
    with pytest.raises(SystemExit) as exit_info:  # multiprocessing prints its message as one line, exit code 1
        steps(env, NONFINITE_AT_STEP)
    assert "reward (nan) at its step 100: this actor stops" in str(exit_info.value.code)
    text = error_file.read_text()
    assert "Traceback" in text
    assert nonfinite_report(text) == f"actor 1 of env '{NAN_REWARD}': sub-env 0 returned a non-finite reward (nan) " \
                                     f"at its step {NONFINITE_AT_STEP}"
    assert nonfinite_report("Traceback ...\nRuntimeError: boom") is None
    env.close()


@pytest.mark.parametrize("env_id", [NAN_OBSERVATION, NAN_REWARD])
def test_drop_zeroes_the_values_ends_the_episode_and_marks_the_step(env_id, caplog):
    torch.manual_seed(0)  # the random actions
    env = make_vector_env(env_id, 2, seed=0, actor=0, nonfinite_data="drop")
    taken = steps(env, NONFINITE_AT_STEP + 1)
    marked = torch.stack([step.get(("next", NONFINITE_KEY)) for step in taken[:-1]])  # [steps, sub-envs]
    assert marked.nonzero().tolist() == [[NONFINITE_AT_STEP - 1, 0], [NONFINITE_AT_STEP - 1, 1]]
    bad = taken[NONFINITE_AT_STEP - 1]["next"]
    for key in ("observation", "reward", "episode_reward"):  # RewardSum added a 0, not the NaN
        assert torch.isfinite(bad[key]).all(), key
    assert bad["done"].all() and torch.equal(bad["truncated"], ~bad["terminated"])  # truncated, unless it ended
    after = taken[NONFINITE_AT_STEP]  # the policy's next input: a fresh episode, unmarked
    assert after["is_init"].all() and not after[NONFINITE_KEY].any() and (after["step_count"] == 0).all()
    assert not any(step.get(NONFINITE_KEY).any() for step in taken)
    assert f"actor 0 of env '{env_id}': sub-env 0 returned a non-finite" in caplog.text
    assert "(and 1 more sub-envs at the same step): replaced by 0, the episode ends there" in caplog.text
    assert env.check.dropped == 2
    env.close()


def test_reset_observations_are_checked_too():
    with pytest.raises(NonFiniteEnvData, match="sub-env 0 returned a non-finite observation .* at its first reset"):
        make_vector_env("tests.faulty_envs:NaNFirstResetPendulum-v0", 2, seed=0).reset()
    # drop: the first observation of the second episode (Pendulum's episodes last 200 steps) is 0, and marked
    env = make_vector_env("tests.faulty_envs:NaNResetPendulum-v0", 1, seed=0, nonfinite_data="drop")
    taken = steps(env, 201)
    assert taken[199]["next", "truncated"].all() and not taken[199]["next", NONFINITE_KEY].any()
    second_episode = taken[200]
    assert second_episode["is_init"].all() and second_episode[NONFINITE_KEY].all()
    assert (second_episode["observation"] == 0).all()
    assert not any(step[NONFINITE_KEY].any() for step in taken[:200])
    env.close()


class _NaNRewardsAt:
    """Wraps an envpool env: the reward of env 1 is NaN at step ``at``."""

    def __init__(self, env, at: int):
        self.env, self.at, self.steps = env, at, 0

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps == self.at:
            reward = reward.copy()
            reward[1] = math.nan
        return observation, reward, terminated, truncated, info

    def __getattr__(self, name):
        return getattr(self.env, name)


def test_the_envpool_backend_gets_the_same_check():
    pytest.importorskip("envpool", reason="the envpool backend is an extra: pip install -e '.[envpool]'")
    # envpool's envs are C++: a NaN is injected between envpool and its torchrl wrapper.
    env = make_vector_env("Pendulum-v1", 2, seed=0, backend="envpool", nonfinite_data="drop", actor=3)
    assert isinstance(env.check, FiniteCheck)
    env.vector._env = _NaNRewardsAt(env.vector._env, at=5)
    taken = steps(env, 6)
    assert taken[4]["next", NONFINITE_KEY].tolist() == [False, True]
    assert taken[4]["next", "truncated"].squeeze(-1).tolist() == [False, True]
    assert torch.isfinite(taken[4]["next", "episode_reward"]).all()
    assert taken[5]["is_init"].squeeze(-1).tolist() == [False, True]
    env.close()

    env = make_vector_env("Pendulum-v1", 2, seed=0, backend="envpool", actor=3)
    env.vector._env = _NaNRewardsAt(env.vector._env, at=5)
    with pytest.raises(NonFiniteEnvData, match="actor 3 of env 'Pendulum-v1': sub-env 1 returned a non-finite reward"):
        steps(env, 5)
    env.close()


# --- the learner's observation statistics ----------------------------------------------------------------


def batch(observation: torch.Tensor, replayed: bool = False) -> TensorDict:
    """A learner batch ``[B, T]`` of a 1-D observation, discrete actions, no episode end."""
    B, T = observation.shape[:2]
    zeros = torch.zeros(B, T, 1)
    return TensorDict(
        {
            "observation": observation,
            "is_init": zeros.bool(),
            "policy_sample": torch.zeros(B, T, dtype=torch.int64),
            "behaviour_log_prob": torch.full((B, T), -math.log(2)),
            "policy_version": torch.zeros(B, T, dtype=torch.int64),
            "next": {"observation": observation + 1, "reward": zeros + 1, "terminated": zeros.bool(),
                     "truncated": zeros.bool(), "episode_reward": zeros, "step_count": zeros.long()},
            REPLAYED_KEY: torch.full((B, T), replayed),
        },
        batch_size=[B, T],
    )


def learner_update(model: ImpalaModule, data: TensorDict, poison_gradient: bool = False) -> None:
    """One update as Lightning's automatic optimisation runs it: optimizer_step runs the closure (training_step,
    backward, then the guard in configure_gradient_clipping) and then the optimizer."""
    optimizer = torch.optim.RMSprop(model.network.parameters(), lr=1e-3)

    def closure():
        loss = model.training_step(to_time_major(data), 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        if poison_gradient:
            next(model.network.parameters()).grad.fill_(math.nan)
        model.configure_gradient_clipping(optimizer)
        return loss

    model.optimizer_step(0, 0, optimizer, closure)


def statistics(model: ImpalaModule) -> list[torch.Tensor]:
    normalizer = model.network.normalizer
    return [normalizer.mean.clone(), normalizer.var.clone(), normalizer.count.clone()]


def test_the_observation_statistics_learn_only_from_applied_updates():
    model = ImpalaModule(observation_shape=[1], action_space={"type": "discrete", "n": 2}, normalize_observations=True)
    observation = torch.arange(12.0).reshape(3, 4, 1)
    learner_update(model, batch(observation))
    mean, var, count = statistics(model)
    assert count == 12 and mean.item() == pytest.approx(5.5) and var.item() == pytest.approx(143 / 12)
    before = statistics(model)
    learner_update(model, batch(observation + 100), poison_gradient=True)  # skipped: non-finite gradient
    learner_update(model, batch(observation + 100, replayed=True))  # applied, but these frames counted already
    poisoned = observation.clone()
    poisoned[1, 2, 0] = math.nan
    learner_update(model, batch(poisoned))  # a NaN observation: a NaN loss, skipped
    assert model.nonfinite_updates == 2
    for saved, now in zip(before, statistics(model), strict=True):
        assert torch.equal(saved, now)


def test_the_observation_statistics_take_only_finite_rows():
    model = ImpalaModule(observation_shape=[2], action_space={"type": "discrete", "n": 2}, normalize_observations=True)
    observation = torch.ones(2, 3, 2)
    observation[0, 1, 0] = math.inf
    model.network.normalizer.forward = lambda x: torch.nan_to_num(x, posinf=0.0)  # a finite loss all the same
    learner_update(model, batch(observation))
    mean, var, count = statistics(model)
    assert count == 5 and torch.equal(mean, torch.ones(2, dtype=torch.float64)) and torch.isfinite(var).all()


# --- the stop rule's window ---------------------------------------------------------------------------------


def test_nonfinite_returns_never_enter_the_window_and_the_stop_rule_still_fires():
    stats = EpisodeStats(stop_at_return=15.0, return_window=2)
    trainer = SimpleNamespace(world_size=1, max_steps=-1, global_step=1, should_stop=False, log_every_n_steps=50,
                              datamodule=None)
    module = SimpleNamespace(device=torch.device("cpu"), loggers=[], print=lambda *_: None,
                             log=lambda *_, **__: None, log_dict=lambda *_, **__: None)
    data = batch(torch.zeros(3, 2, 1))
    data["next", "terminated"][:, 1] = True  # three episodes end at the last step
    data["next", "episode_reward"][:, 1, 0] = torch.tensor([10.0, math.nan, 20.0])
    data["next", "step_count"][:, 1, 0] = 2
    # where a batch's episodes count and the stop is decided; the learner made the batch time-major
    stats.on_train_batch_start(trainer, module, to_time_major(data), 0)
    assert list(stats.episode_returns) == [10.0, 20.0] and list(stats.episode_lengths) == [2, 2]
    assert stats.nonfinite_episodes == 1
    assert stats.progress.mean_return == 15.0 and trainer.should_stop
