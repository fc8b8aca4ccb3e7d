"""``envs.episodes.EpisodeEnv`` against torchrl's own way to the same data: the base env under
``TransformedEnv(FiniteCheck, InitTracker, RewardSum, StepCounter)``, stepped by ``EnvBase.step_and_maybe_reset``.
Same seeds, same actions: every key of every step is equal, alone and through torchrl's collector."""

from functools import partial

import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from tensordict import TensorDict, TensorDictBase
from torchrl.collectors import Collector
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, GymWrapper, InitTracker, RewardSum, StepCounter, TransformedEnv
from torchrl.envs.libs.gym import default_info_dict_reader

import tests.faulty_envs  # noqa: F401  (registers the NaN envs)
from lit_impala.actors.mailbox import WeightMailbox
from lit_impala.actors.policy import ActingPolicy
from lit_impala.core.networks import ActorCriticMLP
from lit_impala.envs.factory import BACKENDS, make_gym_env, make_vector_env
from lit_impala.envs.finite import FiniteCheck
from lit_impala.schema import EPISODE_RETURN_KEY, LIFE_LOST_KEY

LIFE_LOSS = {"atari_options": {"terminal_on_life_loss": True, "screen_size": 42}}


def torchrl_gymnasium_env(env_id: str, num_envs: int, seed: int, **options) -> EnvBase:
    """What the gymnasium backend was before EpisodeEnv: torchrl's GymWrapper over the same SyncVectorEnv
    (autoreset disabled), torchrl's transforms, seeded by torchrl."""
    vector_env = SyncVectorEnv([partial(make_gym_env, env_id, check_env=False, **options) for _ in range(num_envs)],
                               autoreset_mode=AutoresetMode.DISABLED)
    base = GymWrapper(vector_env, categorical_action_encoding=True)
    if options.get("atari_options"):
        base.set_info_dict_reader(default_info_dict_reader(
            [LIFE_LOST_KEY], spec={LIFE_LOST_KEY: Categorical(2, shape=(num_envs,), dtype=torch.bool)}))
    env = with_torchrl_transforms(base, env_id)
    env.set_seed(seed)
    return env


class TorchrlBaseEnv(EnvBase):
    """A backend's sub-envs as a plain torchrl base env (no episode keys), for backends torchrl does not wrap."""

    def __init__(self, vector):
        super().__init__(batch_size=torch.Size([vector.num_envs]))
        self.vector = vector
        flag = Categorical(2, shape=(vector.num_envs, 1), dtype=torch.bool)
        self.observation_spec = Composite(observation=vector.observation_spec, shape=self.batch_size)
        self.action_spec = vector.action_spec
        self.reward_spec = Unbounded(shape=(vector.num_envs, 1))
        self.done_spec = Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=self.batch_size)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        mask = None if tensordict is None else tensordict.get("_reset", None)
        out = self.full_done_spec.zero()
        out.set("observation", self.vector.reset(None if mask is None else mask.reshape(-1)).clone())
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        step = self.vector.step(tensordict.get("action"))
        column = (self.vector.num_envs, 1)
        return TensorDict({"observation": step.observation.clone(), "reward": step.reward.reshape(column),
                           "terminated": step.terminated.reshape(column), "truncated": step.truncated.reshape(column),
                           "done": (step.terminated | step.truncated).reshape(column)}, batch_size=self.batch_size)

    def _set_seed(self, seed):
        self.vector.seed(seed)


def with_torchrl_transforms(base: EnvBase, env_id: str) -> TransformedEnv:
    env = TransformedEnv(base, FiniteCheck(env_id, "drop"))
    env.append_transform(InitTracker())
    env.append_transform(RewardSum(in_keys=["reward"], out_keys=[EPISODE_RETURN_KEY]))
    env.append_transform(StepCounter())
    return env


def assert_same(ours: TensorDictBase, theirs: TensorDictBase, where: str) -> None:
    assert set(ours.keys(True, True)) == set(theirs.keys(True, True)), where
    for key in theirs.keys(True, True):
        a, b = ours.get(key), theirs.get(key)
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {key} {a.dtype}{tuple(a.shape)} " \
                                                          f"vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: {key} differs"


def step_both(ours: EnvBase, theirs: EnvBase, steps: int, seed: int = 0) -> int:
    """Both envs stepped as an actor steps them, with the same random actions; returns the episodes finished."""
    generator = torch.Generator().manual_seed(seed)
    root_ours, root_theirs = ours.reset(), theirs.reset()
    assert_same(root_ours, root_theirs, "reset")
    assert set(ours.observation_spec.keys()) == set(theirs.observation_spec.keys())
    finished = 0
    for t in range(steps):
        action = ours.action_spec.rand()
        if action.dtype == torch.int64:  # the spec's rand uses torch's global generator: draw from ours instead
            action = torch.randint(0, int(ours.action_spec.space.n), action.shape, generator=generator)
        step_ours, root_ours = ours.step_and_maybe_reset(root_ours.set("action", action))
        step_theirs, root_theirs = theirs.step_and_maybe_reset(root_theirs.set("action", action.clone()))
        assert_same(step_ours, step_theirs, f"step {t}")
        # The root's action is the last one taken: the policy replaces it before the next step. torchrl leaves it
        # zeroed in the sub-envs it reset when only some were; EpisodeEnv leaves it alone.
        assert_same(root_ours.exclude("action"), root_theirs.exclude("action"), f"root after step {t}")
        finished += int(step_ours["next", "done"].sum())
    return finished


def test_a_partial_reset_asked_for_resets_alike():
    """``env.reset`` with a ``_reset`` mask (torchrl's way to restart some sub-envs) on a mid-episode root."""
    ours = make_vector_env("CartPole-v1", 6, seed=4, nonfinite_data="drop")
    theirs = torchrl_gymnasium_env("CartPole-v1", 6, seed=4)
    step_both(ours, theirs, 3)  # short of any episode's end: every sub-env is 3 steps in
    mask = torch.tensor([True, False, True, False, False, True]).reshape(6, 1)
    action = torch.zeros(6, dtype=torch.int64)
    _, root_ours = ours.step_and_maybe_reset(ours.reset().set("action", action))
    _, root_theirs = theirs.step_and_maybe_reset(theirs.reset().set("action", action.clone()))
    reset_ours = ours.reset(root_ours.clone().set("_reset", mask))
    reset_theirs = theirs.reset(root_theirs.clone().set("_reset", mask))
    assert_same(reset_ours.exclude("action"), reset_theirs.exclude("action"), "partial reset")
    assert reset_ours["is_init"].squeeze(-1).tolist() == mask.squeeze(-1).tolist()
    assert (reset_ours["step_count"].squeeze(-1) == torch.where(mask.squeeze(-1), 0, 1)).all()


def test_the_gymnasium_backend_steps_as_torchrls_gym_wrapper_and_transforms():
    ours = make_vector_env("CartPole-v1", 8, seed=5, nonfinite_data="drop")
    theirs = torchrl_gymnasium_env("CartPole-v1", 8, seed=5)
    assert step_both(ours, theirs, 300) > 50  # many episodes ended, and many partial resets
    ours.close()
    theirs.close()


def test_short_time_limits_truncate_alike():
    ours = make_vector_env("CartPole-v1", 4, seed=1, nonfinite_data="drop", max_episode_steps=7)
    theirs = torchrl_gymnasium_env("CartPole-v1", 4, seed=1, max_episode_steps=7)
    assert step_both(ours, theirs, 60) >= 4 * (60 // 7)  # every sub-env at least every 7 steps
    ours.close()
    theirs.close()


def test_atari_life_losses_alike():
    pytest.importorskip("ale_py", reason="the atari extra (pip install -e '.[atari]')")
    ours = make_vector_env("ALE/Breakout-v5", 2, seed=0, nonfinite_data="drop", **LIFE_LOSS)
    theirs = torchrl_gymnasium_env("ALE/Breakout-v5", 2, seed=0, **LIFE_LOSS)
    step_both(ours, theirs, 400)
    ours.close()
    theirs.close()


def test_a_dropped_nan_ends_the_episode_alike():
    env_id = "tests.faulty_envs:NaNRewardCartPole-v0"
    ours = make_vector_env(env_id, 3, seed=0, nonfinite_data="drop")
    theirs = torchrl_gymnasium_env(env_id, 3, seed=0)
    step_both(ours, theirs, 120)
    assert ours.check.dropped == theirs.transform[0].dropped > 0


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_the_envpool_backend_steps_as_torchrls_transforms(env_id):
    pytest.importorskip("envpool", reason="the envpool extra (pip install -e '.[envpool]')")
    make = partial(BACKENDS["envpool"].make, env_id, 8, 3, None, max_episode_steps=30)
    ours = make_vector_env(env_id, 8, seed=3, backend="envpool", nonfinite_data="drop", max_episode_steps=30)
    theirs = with_torchrl_transforms(TorchrlBaseEnv(make()), env_id)
    assert step_both(ours, theirs, 200) > 8


def test_torchrls_collector_gathers_the_same_rollouts():
    network = ActorCriticMLP(4, 2)
    mailbox = WeightMailbox(network)
    mailbox.publish(network, 0)

    def rollouts(env):
        torch.manual_seed(0)  # the policy samples from torch's generator
        collector = Collector(env, ActingPolicy(network, mailbox), frames_per_batch=8 * 25, total_frames=-1,
                              storing_device="cpu", env_device="cpu", policy_device="cpu")
        stream = iter(collector)
        batches = [next(stream).clone() for _ in range(6)]
        collector.shutdown()
        return batches

    try:
        ours = rollouts(make_vector_env("CartPole-v1", 8, seed=2, nonfinite_data="drop"))
        theirs = rollouts(torchrl_gymnasium_env("CartPole-v1", 8, seed=2))
    finally:
        mailbox.close()
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert_same(a.exclude("collector"), b.exclude("collector"), f"batch {i}")
        assert_same(a.get("collector"), b.get("collector"), f"batch {i} trajectory ids")
    assert sum(int(b["next", "done"].sum()) for b in ours) > 20
