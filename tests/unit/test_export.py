"""The exported acting policy (``lit_impala.export``): its TorchScript and ONNX files give the network's own action,
policy parameters and value on the same observations, batches of any size, with the observation normaliser's and
the value normaliser's statistics away from the identity; an LSTM's state goes in and out; the checkpoint -> network
step builds the learner's network."""

import json

import gymnasium
import numpy as np
import pytest
import torch

from lit_impala.checkpoint_io import read_checkpoint
from lit_impala.core.distributions import Categorical, DiagGaussian, MultiCategorical
from lit_impala.core.networks import ImpalaAgent
from lit_impala.core.observation_parts import parts_from_spec
from lit_impala.envs.factory import action_space_spec
from lit_impala.export import (
    METADATA_NAME,
    BadInput,
    export_policy,
    format_for,
    load_network,
    observation_spec,
    random_observations,
)
from lit_impala.learner import ImpalaModule
from tests.conftest import REPO

BATCH_SIZES = (1, 4, 9)
MASKED_TARGET_PARTS = parts_from_spec([{"name": "action_mask", "shape": [4], "kind": "mask"},
                                      {"name": "image", "shape": [1, 5, 5], "kind": "image", "pixels": True},
                                      {"name": "shift", "shape": [2], "kind": "vector"}])


def _with_statistics(network: ImpalaAgent, seed: int = 0) -> ImpalaAgent:
    """``network`` with its weights, observation statistics and value statistics moved away from their start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        if network.normalizer is not None:
            shape = network.normalizer.mean.shape
            network.normalizer.mean.copy_(torch.randn(shape, generator=generator, dtype=torch.float64))
            network.normalizer.var.copy_(torch.rand(shape, generator=generator, dtype=torch.float64) * 4 + 0.1)
            network.normalizer.count.fill_(1000.0)
        if network.value_normalizer is not None:
            network.value_normalizer.mean.fill_(12.5)
            network.value_normalizer.second_moment.fill_(12.5**2 + 9.0)  # std 3
            network.value_normalizer.updates.fill_(7)
    return network.eval()


NETWORKS = {  # name -> a small network of each kind a config builds
    "cartpole_mlp": lambda: ImpalaAgent((4,), Categorical(2), hidden_dim=16, feature_dim=16,
                                        normalize_observations=True, normalize_values=True),
    "minatar_pixels": lambda: ImpalaAgent((4, 10, 10), Categorical(3), encoder="minatar", feature_dim=32),
    "gaussian_clip": lambda: ImpalaAgent((6,), DiagGaussian(2, [-1.0, -0.5], [1.0, 2.0], "clip"), hidden_dim=16,
                                         feature_dim=16, normalize_observations=True, shared_encoder=False),
    "gaussian_tanh_state_std": lambda: ImpalaAgent((3,), DiagGaussian(1, -2.0, 2.0, "tanh"), hidden_dim=16,
                                                   feature_dim=16, state_dependent_std=True),
    "multi_discrete": lambda: ImpalaAgent((5,), MultiCategorical([3, 2]), hidden_dim=16, feature_dim=16),
    # tests.masked_envs:MaskedTarget-v0's packed dict: a [4] action mask, a [1, 5, 5] image, a [2] one-hot
    "dict_with_action_mask": lambda: ImpalaAgent((31,), Categorical(4), encoder="minatar", feature_dim=16,
                                                 normalize_observations=True, observation_parts=MASKED_TARGET_PARTS),
}


def _network(name: str) -> ImpalaAgent:
    torch.manual_seed(0)
    return _with_statistics(NETWORKS[name]())


def _module_outputs(network: ImpalaAgent, observation, core_state=None) -> tuple:
    """What the network itself gives for ``observation [N, *obs]`` acting greedily: (env action, policy_params,
    value[, next h, next c]), written from ImpalaAgent's own interface, not from lit_impala.export."""
    with torch.no_grad():
        output = network(observation.unsqueeze(0), core_state)
    params = output.policy_params[0]
    distribution = network.distribution
    outputs = (distribution.to_env_action(distribution.mode(params)), params, output.baseline[0])
    if core_state is not None:
        outputs += tuple(state[0] for state in output.core_states)
    return outputs


def _observation_batches(network: ImpalaAgent, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [random_observations(observation_spec(network), n, generator) for n in BATCH_SIZES]


def _onnx_session(path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="running an ONNX file needs onnxruntime (the export extra)")
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_onnx(session, *inputs) -> list[torch.Tensor]:
    feed = {node.name: tensor.numpy() for node, tensor in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(output) for output in session.run(None, feed)]


# --- equality with the module ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NETWORKS))
def test_torchscript_outputs_equal_the_modules(name, tmp_path):
    network = _network(name)
    path = tmp_path / "policy.pt"
    exported = export_policy(network, path)
    assert exported.format == "torchscript" and path.is_file()
    policy = torch.jit.load(str(path))
    for observation in _observation_batches(network):
        got, expected = policy(observation), _module_outputs(network, observation)
        assert len(got) == 3
        torch.testing.assert_close(tuple(got), expected)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_onnx_outputs_equal_the_modules(name, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (the export extra)")
    network = _network(name)
    path = tmp_path / "policy.onnx"
    exported = export_policy(network, path)
    assert exported.format == "onnx"
    session = _onnx_session(path)
    (observation_input,) = session.get_inputs()
    spec = observation_spec(network)
    assert observation_input.name == "observation" and observation_input.shape[1:] == list(spec.shape)
    assert observation_input.type == f"tensor({'uint8' if spec.dtype == torch.uint8 else 'float'})"
    assert [node.name for node in session.get_outputs()] == ["action", "policy_params", "value"]
    description = json.loads(session.get_modelmeta().custom_metadata_map["lit_impala"])  # what the file says it takes
    assert description["inputs"]["observation"] == {"shape": ["N", *spec.shape], "dtype": spec.dtype_name}
    for observation in _observation_batches(network):
        torch.testing.assert_close(tuple(_run_onnx(session, observation)), _module_outputs(network, observation))


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_an_lstm_policy_takes_and_returns_its_state(format, tmp_path):
    """Carried over three steps, the exported state equals the network's; zeroing it is the episode start."""
    if format == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (the export extra)")
    torch.manual_seed(0)
    network = _with_statistics(ImpalaAgent((4,), Categorical(3), hidden_dim=16, feature_dim=16, use_lstm=True,
                                           lstm_hidden_dim=8, normalize_observations=True))
    path = tmp_path / ("policy.pt" if format == "torchscript" else "policy.onnx")
    export_policy(network, path)
    if format == "torchscript":
        run = torch.jit.load(str(path))
    else:
        session = _onnx_session(path)
        run = lambda *inputs: _run_onnx(session, *inputs)  # noqa: E731 -- one call site, same shape as the other
    for observation in _observation_batches(network):
        state = network.initial_state(observation.shape[0])
        exported_state = state
        for step in range(3):
            step_observation = observation + step
            expected = _module_outputs(network, step_observation, state)
            got = tuple(run(step_observation, *exported_state))
            torch.testing.assert_close(got, expected)
            state, exported_state = expected[3:], got[3:]


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_a_sampled_action_is_a_valid_draw(format, tmp_path):
    if format == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (the export extra)")
    torch.manual_seed(0)
    network = NETWORKS["minatar_pixels"]().eval()  # as initialised: a near-uniform policy
    path = tmp_path / ("policy.pt" if format == "torchscript" else "policy.onnx")
    export_policy(network, path, sample=True)
    if format == "torchscript":
        policy = torch.jit.load(str(path))
    else:
        session = _onnx_session(path)
        policy = lambda observation: _run_onnx(session, observation)  # noqa: E731
    observation = _observation_batches(network)[-1]
    draws = torch.stack([policy(observation)[0] for _ in range(20)])
    assert draws.dtype == torch.int64 and draws.min() >= 0 and draws.max() < 3
    assert len(draws.unique()) == 3, "each call draws anew"
    torch.testing.assert_close(tuple(policy(observation)[1:]), _module_outputs(network, observation)[1:])


def test_a_continuous_action_is_what_the_env_receives(tmp_path):
    """Mapped into the Box: a clipped mode is inside the bounds even where the mean is outside them."""
    network = _network("gaussian_clip")
    with torch.no_grad():
        network.policy_head.bias.fill_(50.0)  # means far above `high`
    path = tmp_path / "policy.pt"
    export_policy(network, path)
    action, params, _ = torch.jit.load(str(path))(_observation_batches(network)[1])
    assert params[:, :2].min() > 2.0
    torch.testing.assert_close(action, torch.tensor([[1.0, 2.0]]).expand_as(action))


def test_the_torchscript_policy_refuses_observations_it_was_not_traced_for(tmp_path):
    """A float image through the graph traced for uint8 pixels would skip the 1/255 scaling: refused."""
    network = _network("minatar_pixels")
    path = tmp_path / "policy.pt"
    export_policy(network, path)
    policy = torch.jit.load(str(path))
    observation = _observation_batches(network)[1]
    with pytest.raises(Exception, match=r"observation must be a uint8 tensor \[N, 4, 10, 10\].*another dtype"):
        policy(observation.float() / 255)
    with pytest.raises(Exception, match=r"got shape \[4, 10, 10\]"):
        policy(observation[0])


def test_the_file_says_what_it_takes_and_returns(tmp_path):
    network = _network("cartpole_mlp")
    export_policy(network, tmp_path / "policy.pt", metadata={"env": {"env_id": "CartPole-v1"}})
    extra = {METADATA_NAME: ""}
    torch.jit.load(str(tmp_path / "policy.pt"), _extra_files=extra)
    description = json.loads(extra[METADATA_NAME])
    assert description["inputs"] == {"observation": {"shape": ["N", 4], "dtype": "float32"}}
    assert description["outputs"]["action"] == {"shape": ["N"], "dtype": "int64"}
    assert description["action"] == "mode" and description["env"] == {"env_id": "CartPole-v1"}


# --- the file's format and the checkpoint -------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "given", "expected"), [
    ("a/policy.pt", None, "torchscript"), ("policy.ONNX", None, "onnx"), ("policy.bin", "onnx", "onnx"),
    ("policy.pt", "torchscript", "torchscript"),
])
def test_the_format_comes_from_the_suffix_or_the_argument(path, given, expected):
    assert format_for(path, given) == expected


@pytest.mark.parametrize(("path", "given", "match"), [
    ("policy.bin", None, "suffix '.bin' names no format"),
    ("policy.pt", "onnx", "is a torchscript suffix, but --format is onnx"),
    ("policy.pt", "tflite", "--format 'tflite' is not one of torchscript, onnx"),
])
def test_a_format_that_cannot_be_told_is_refused(path, given, match, tmp_path):
    with pytest.raises(BadInput, match=match):
        export_policy(_network("cartpole_mlp"), tmp_path / path, given)
    assert not list(tmp_path.iterdir()), "nothing written"


def _checkpoint_of(module: ImpalaModule) -> dict:
    """What a Lightning checkpoint of ``module`` holds for the network: its hyper-parameters and state dict."""
    return {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
            "lit_impala": {"format": 2}}


def test_load_network_builds_the_learners_network_with_the_checkpoints_weights():
    torch.manual_seed(0)
    module = ImpalaModule([4], action_space_spec(gymnasium.spaces.Discrete(2)), hidden_dim=8,
                          feature_dim=8, normalize_observations=True, value_normalization="popart")
    _with_statistics(module.network)
    network = load_network(_checkpoint_of(module))
    assert isinstance(network, ImpalaAgent) and not network.training
    loaded = network.state_dict()
    assert list(loaded) == list(module.network.state_dict())
    for name, saved in module.network.state_dict().items():
        torch.testing.assert_close(loaded[name], saved, msg=name)
    observation = torch.randn(5, 4)
    torch.testing.assert_close(_module_outputs(network, observation), _module_outputs(module.network, observation))


def test_load_network_reads_a_format_1_checkpoint():
    checkpoint = read_checkpoint(REPO / "tests" / "data" / "format1_cartpole_step30.ckpt")
    network = load_network(checkpoint)
    assert network.observation_shape == (4,) and network.distribution == Categorical(2)
    torch.testing.assert_close(network.encoder.net[0].weight.detach(),
                               checkpoint["state_dict"]["network.encoder.net.0.weight"])


def test_load_network_names_a_checkpoint_of_another_network():
    module = ImpalaModule([4], {"type": "discrete", "n": 2}, hidden_dim=8, feature_dim=8)
    checkpoint = _checkpoint_of(module)
    checkpoint["hyper_parameters"]["hidden_dim"] = 16
    with pytest.raises(ValueError, match=r"checkpoint 'mine.ckpt' was written for a different env or network"):
        load_network(checkpoint, "mine.ckpt")
    with pytest.raises(ValueError, match="holds no ImpalaModule hyper-parameters"):
        load_network({"state_dict": {}}, "mine.ckpt")


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_an_exported_masked_policy_never_chooses_an_illegal_action(format, tmp_path):
    """The action mask is inside the file: on the env's own observations, where illegal actions would be preferred
    unmasked (a policy head biased towards them), every exported action is legal and equals the network's."""
    if format == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (the export extra)")
    from lit_impala.envs.factory import make_gym_env

    network = _network("dict_with_action_mask")
    env = make_gym_env("tests.masked_envs:MaskedTarget-v0", action_mask_key="action_mask")
    rows = [env.reset(seed=0)[0]] + [env.step(action % 4)[0] for action in range(63)]
    observation = torch.as_tensor(np.stack(rows))  # [64, 31]
    legal = observation[:, :4].bool()  # the mask part comes first (keys in sorted order)
    with torch.no_grad():  # unmasked, the head would prefer an illegal action in most rows
        network.policy_head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    path = tmp_path / ("policy.pt" if format == "torchscript" else "policy.onnx")
    export_policy(network, path)
    if format == "torchscript":
        action, params, value = torch.jit.load(str(path))(observation)
    else:
        action, params, value = _run_onnx(_onnx_session(path), observation)
    expected = _module_outputs(network, observation)
    torch.testing.assert_close((action, params, value), expected)
    assert legal.gather(1, action.long().unsqueeze(1)).all()
    assert not legal[:, 3].all()  # some rows forbid the action the head prefers
