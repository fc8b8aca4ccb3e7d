"""torchrl's private names that ``actors.torchrl_distributed`` relies on still exist and mean what it assumes;
this fails first when a torchrl upgrade changes one of them (then that module needs a look)."""

import inspect
import re

import pytest
from torchrl.collectors.distributed import DistributedCollector
from torchrl.weight_update import DistributedWeightSyncScheme

from lit_impala.actors.torchrl_distributed import TORCHRL_INTERNALS, BoundWeightSyncScheme


def _source(cls) -> str:
    return "".join(inspect.getsource(klass) for klass in cls.__mro__ if klass.__module__.startswith("torchrl"))


@pytest.mark.parametrize(("cls", "name"), list(TORCHRL_INTERNALS), ids=lambda x: getattr(x, "__name__", x))
def test_each_private_name_still_exists(cls, name):
    assigned = re.search(rf"self\.{name}\b[^=\n]*=(?!=)", _source(cls))  # self.name = ..., self.name, x = ...
    assert callable(getattr(cls, name, None)) or assigned, (
        f"torchrl {cls.__name__}.{name} is gone: {TORCHRL_INTERNALS[cls, name]}")


def test_the_overridden_methods_keep_their_signatures():
    assert list(inspect.signature(DistributedCollector._init_workers).parameters) == ["self"]
    assert list(inspect.signature(DistributedCollector._make_container).parameters) == ["self"]
    make_store = inspect.signature(DistributedWeightSyncScheme._make_store).parameters
    assert list(make_store) == list(inspect.signature(BoundWeightSyncScheme._make_store).parameters)
    assert list(inspect.signature(DistributedWeightSyncScheme._send_instruction).parameters) == [
        "self", "instruction", "worker_ids"]
    assert {"model_id", "context", "worker_idx"} <= set(inspect.signature(
        DistributedWeightSyncScheme._init_on_receiver_impl).parameters)


def test_the_collector_calls_them_in_the_order_we_assume():
    init = inspect.getsource(DistributedCollector.__init__)
    # The scheme's store exists before the nodes start (they are sent its port), the nodes start before the
    # receive buffers are made (our _init_workers makes them first), the weights go out last.
    order = [init.index("scheme.init_on_sender("), init.index("self._init_workers()"),
             init.index("self._make_container()"), init.index("scheme.connect()")]
    assert order == sorted(order)
    assert "self._make_store(is_master=False, store_info=info)" in inspect.getsource(
        DistributedWeightSyncScheme._init_on_receiver_impl)
    assert "self._make_store(" in inspect.getsource(DistributedWeightSyncScheme._init_on_sender_impl)
    # shutdown speaks the store protocol RemoteActors and the nodes speak
    shutdown = inspect.getsource(DistributedCollector.shutdown)
    assert 'b"shutdown"' in shutdown and 'f"NODE_{rank}_out"' in shutdown and 'b"down"' in shutdown


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_the_backends_spec_conversion_is_still_gym_wrappers(env_id):
    """``envs.episodes.gym_wrapper_spec`` wraps torchrl's private space conversion: it must still give the specs
    torchrl's public ``GymWrapper`` gives the same gymnasium env, or the two env backends describe envs differently."""
    import gymnasium as gym
    from torchrl.envs import GymWrapper

    from lit_impala.envs.episodes import gym_wrapper_spec

    env = gym.make(env_id)
    try:
        wrapped = GymWrapper(env, categorical_action_encoding=True)
        assert gym_wrapper_spec(env.observation_space) == wrapped.observation_spec["observation"]
        assert gym_wrapper_spec(env.action_space, categorical=True) == wrapped.action_spec
    finally:
        env.close()
