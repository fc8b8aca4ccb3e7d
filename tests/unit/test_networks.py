"""ImpalaAgent: shapes for every encoder x distribution x core, LSTM reset semantics, init statistics,
the observation normaliser, and clear errors for invalid configurations."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lit_impala.core.distributions import Categorical, DiagGaussian, MultiCategorical
from lit_impala.core.encoders import NatureCNNEncoder, ObservationNormalizer, ResNetEncoder, RLlibCNNEncoder
from lit_impala.core.networks import ActorCriticMLP, ImpalaAgent

PIXELS = (3, 36, 36)  # the smallest image the Nature CNN accepts: keeps the CPU tests fast
SHAPES = {"mlp": (5,), "resnet": PIXELS, "nature": PIXELS, "rllib": PIXELS}
DISTRIBUTIONS = {
    "categorical": Categorical(4),
    "multicategorical": MultiCategorical([2, 3]),
    "gaussian": DiagGaussian(2, -1.0, 1.0),
}


def _observations(shape, T, B, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 3:
        return torch.randint(0, 256, (T, B, *shape), generator=g, dtype=torch.uint8)
    return torch.randn(T, B, *shape, generator=g)


# --- shapes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_lstm", [False, True])
@pytest.mark.parametrize("dist_name", list(DISTRIBUTIONS))
@pytest.mark.parametrize("encoder", list(SHAPES))
def test_output_shapes_for_every_encoder_head_and_core(encoder, dist_name, use_lstm):
    T, B, H = 3, 2, 16
    dist = DISTRIBUTIONS[dist_name]
    agent = ImpalaAgent(SHAPES[encoder], dist, encoder, feature_dim=32, use_lstm=use_lstm, lstm_hidden_dim=H)
    output = agent(_observations(SHAPES[encoder], T, B), agent.initial_state(B))

    assert output.policy_params.shape == (T, B, dist.param_size) and output.policy_params.dtype == torch.float32
    assert output.baseline.shape == (T, B) and output.baseline.dtype == torch.float32
    assert agent.use_lstm == use_lstm and agent.distribution is dist
    if use_lstm:
        assert [s.shape for s in output.core_states] == [(T, B, H), (T, B, H)]
    else:
        assert output.core_states is None and agent.initial_state(B) is None
    sample = dist.sample(output.policy_params)
    assert sample.shape == (T, B, *dist.sample_shape)
    assert dist.log_prob(output.policy_params, sample).shape == (T, B)
    assert agent.step_value(_observations(SHAPES[encoder], 1, B)[0], agent.initial_state(B)).shape == (B,)
    copy.deepcopy(agent)  # the actors take private copies


@pytest.mark.parametrize("encoder_cls", [ResNetEncoder, NatureCNNEncoder, RLlibCNNEncoder])
def test_pixel_encoders_scale_uint8_to_unit_interval(encoder_cls):
    torch.manual_seed(0)
    encoder = encoder_cls(PIXELS, feature_dim=8)
    pixels = torch.randint(0, 256, (4, *PIXELS), dtype=torch.uint8)
    torch.testing.assert_close(encoder(pixels), encoder(pixels.float() / 255.0))
    assert not torch.allclose(encoder(pixels), encoder(pixels.float()))  # float input is not rescaled


def test_resnet_has_three_stages_of_16_32_32_channels():
    encoder = ResNetEncoder((4, 84, 84), feature_dim=256)
    assert len(encoder.stages) == 3
    stage_channels = [stage.conv.out_channels for stage in encoder.stages]
    assert stage_channels == [16, 32, 32]
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 * (1 + 2 * 2)  # per stage: one conv, then two residual blocks of two convs
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) for c in convs)
    pools = [m for m in encoder.modules() if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 3
    assert encoder.fc.in_features == 32 * 11 * 11  # 84 -> 42 -> 21 -> 11
    assert encoder(torch.zeros(2, 4, 84, 84, dtype=torch.uint8)).shape == (2, 256)


def test_rllib_cnn_is_rllibs_42x42_network_with_tensorflow_same_padding():
    encoder = RLlibCNNEncoder((4, 42, 42), feature_dim=256)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [(16, (4, 4), (2, 2), (0, 0)),
                                                                                     (32, (4, 4), (2, 2), (0, 0))]
    # TF "same": 42 -> 21 pads 2 (1 each side), 21 -> 11 pads 3 (1 before, 2 after: the odd one goes last)
    pads = [m.padding for m in encoder.modules() if isinstance(m, nn.ZeroPad2d)]
    assert pads == [(1, 1, 1, 1), (1, 2, 1, 2)]
    assert encoder.fc.in_features == 32 * 11 * 11  # RLlib's last layer: a 256-channel 11x11 "valid" conv
    # parameters as RLlib's dim-42 filters [[16, 4, 2], [32, 4, 2], [256, 11, 1]] on 4 stacked frames
    rllib_parameters = (16 * 4 * 16 + 16) + (32 * 16 * 16 + 32) + (256 * 32 * 121 + 256)
    assert sum(p.numel() for p in encoder.parameters()) == rllib_parameters
    assert encoder(torch.zeros(2, 4, 42, 42, dtype=torch.uint8)).shape == (2, 256)


def test_resnet_blocks_are_residual():
    stage = ResNetEncoder(PIXELS).stages[0]
    x = torch.randn(2, 16, 9, 9)
    block = stage.res0
    expected = x + block.conv1(torch.relu(block.conv0(torch.relu(x))))
    torch.testing.assert_close(block(x), expected)


def test_nature_cnn_layout():
    encoder = NatureCNNEncoder((4, 84, 84))
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [(32, 8, 4), (64, 4, 2), (64, 3, 1)]
    assert encoder.fc.in_features == 3136 and encoder.fc.out_features == 512  # the DQN paper's sizes


# --- LSTM core -----------------------------------------------------------------------------------------


def _lstm_agent() -> ImpalaAgent:
    torch.manual_seed(0)
    return ImpalaAgent((5,), Categorical(3), "mlp", feature_dim=8, use_lstm=True, lstm_hidden_dim=6)


def test_lstm_resets_match_separate_episodes_from_zero_state():
    agent = _lstm_agent()
    T, B = 7, 2
    observation = _observations((5,), T, B)
    carried = tuple(torch.randn(B, 6) for _ in range(2))  # state from the previous unroll
    is_init = torch.zeros(T, B, dtype=torch.bool)
    is_init[3, 0] = is_init[5, 1] = True
    output = agent(observation, carried, is_init)

    # Column 0: steps 0-2 continue the carried state, steps 3-6 are a new episode from zeros.
    # Column 1: steps 0-4 continue, steps 5-6 are a new episode.
    for b, start in [(0, 3), (1, 5)]:
        segments = [(0, start, tuple(s[b : b + 1] for s in carried)), (start, T, agent.initial_state(1))]
        for begin, end, state in segments:
            alone = agent(observation[begin:end, b : b + 1], state)
            torch.testing.assert_close(output.policy_params[begin:end, b], alone.policy_params[:, 0])
            torch.testing.assert_close(output.baseline[begin:end, b], alone.baseline[:, 0])
            for got, want in zip(output.core_states, alone.core_states, strict=False):
                torch.testing.assert_close(got[begin:end, b], want[:, 0])

    # The reset matters: without it step 3 of column 0 sees the old episode's memory.
    no_reset = agent(observation, carried)
    assert not torch.allclose(no_reset.baseline[3, 0], output.baseline[3, 0])
    torch.testing.assert_close(no_reset.baseline[:3], output.baseline[:3])


def test_lstm_state_after_step_t_is_what_a_step_by_step_actor_carries():
    agent = _lstm_agent()
    T, B = 6, 3
    observation = _observations((5,), T, B, seed=1)
    is_init = torch.rand(T, B, generator=torch.Generator().manual_seed(2)) < 0.3
    is_init[0] = True
    unrolled = agent(observation, None, is_init)

    state = agent.initial_state(B)
    for t in range(T):
        step = agent(observation[t : t + 1], state, is_init[t : t + 1])  # the actor: T = 1
        torch.testing.assert_close(step.policy_params[0], unrolled.policy_params[t])
        state = (step.core_states[0][-1], step.core_states[1][-1])
        torch.testing.assert_close(state[0], unrolled.core_states[0][t])
        torch.testing.assert_close(state[1], unrolled.core_states[1][t])


def test_step_value_continues_from_the_given_state():
    agent = _lstm_agent()
    T, B = 4, 2
    observation = _observations((5,), T, B, seed=3)
    output = agent(observation, agent.initial_state(B))
    state_before_last = (output.core_states[0][-2], output.core_states[1][-2])
    torch.testing.assert_close(agent.step_value(observation[-1], state_before_last), output.baseline[-1])

    mlp = ActorCriticMLP(5, 3)
    torch.testing.assert_close(mlp.step_value(observation[0]), mlp(observation).baseline[0])


# --- initialisation ------------------------------------------------------------------------------------


def _gram(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().reshape(weight.shape[0], -1)
    return w @ w.T


def test_orthogonal_init():
    torch.manual_seed(0)
    agent = ImpalaAgent((64,), Categorical(4), "mlp", hidden_dim=48, feature_dim=32, use_lstm=True, lstm_hidden_dim=16)
    linear0, linear1 = agent.encoder.net[0], agent.encoder.net[2]
    relu_gain_sq = 2.0
    torch.testing.assert_close(_gram(linear0.weight), relu_gain_sq * torch.eye(48), atol=1e-4, rtol=0)  # wide: 48 x 64
    torch.testing.assert_close(_gram(linear1.weight), relu_gain_sq * torch.eye(32), atol=1e-4, rtol=0)  # wide: 32 x 48
    torch.testing.assert_close(_gram(agent.policy_head.weight), 0.01**2 * torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(agent.baseline_head.weight.norm(), torch.tensor(1.0))
    w_hh = agent.core.weight_hh_l0.detach()  # [4H, H], tall: orthonormal columns
    torch.testing.assert_close(w_hh.T @ w_hh, torch.eye(16), atol=1e-4, rtol=0)
    for name, param in agent.named_parameters():
        if "bias" in name:
            assert param.abs().max() == 0, name

    conv = ImpalaAgent(PIXELS, Categorical(4), "resnet").encoder.stages[0].conv  # 16 x (3*3*3): wide
    torch.testing.assert_close(_gram(conv.weight), relu_gain_sq * torch.eye(16), atol=1e-4, rtol=0)


def test_xavier_uniform_init():
    torch.manual_seed(0)
    agent = ImpalaAgent((256,), Categorical(4), "mlp", hidden_dim=256, feature_dim=256, init_fn="xavier_uniform")
    expected_std = math.sqrt(2.0) * math.sqrt(2.0 / (256 + 256))
    assert agent.encoder.net[0].weight.std().item() == pytest.approx(expected_std, rel=0.03)
    assert agent.encoder.net[0].weight.abs().max().item() <= math.sqrt(3.0) * expected_std + 1e-6  # uniform bound
    head_std = 0.01 * math.sqrt(2.0 / (256 + 4))
    assert agent.policy_head.weight.std().item() == pytest.approx(head_std, rel=0.1)
    assert agent.encoder.net[0].bias.abs().max() == 0


def test_identity_init_is_pytorch_default():
    torch.manual_seed(123)
    agent = ImpalaAgent((5,), Categorical(3), "mlp", hidden_dim=7, init_fn="identity")
    torch.manual_seed(123)
    fresh = nn.Linear(5, 7)
    torch.testing.assert_close(agent.encoder.net[0].weight, fresh.weight)
    torch.testing.assert_close(agent.encoder.net[0].bias, fresh.bias)
    assert agent.policy_head.bias.abs().max() > 0  # the head was not touched either


def test_policy_head_scale_gives_a_near_uniform_initial_policy():
    torch.manual_seed(0)
    agent = ImpalaAgent((5,), Categorical(6), "mlp")
    assert agent.policy_head.weight.norm() < 0.05
    probs = torch.softmax(agent(torch.randn(10, 4, 5)).policy_params, -1)
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / 6), atol=0.01, rtol=0)


# --- Gaussian policy heads -----------------------------------------------------------------------------


def test_state_independent_log_std_is_a_learned_parameter():
    dist = DiagGaussian(3, -1.0, 1.0)
    agent = ImpalaAgent((5,), dist, "mlp", log_std_init=-0.5)
    assert agent.policy_head.out_features == 3 and agent.log_std.shape == (3,)
    params = agent(torch.randn(2, 4, 5)).policy_params
    assert params.shape == (2, 4, 6)
    assert (params[..., 3:] == -0.5).all()
    dist.log_prob(params, torch.randn(2, 4, 3)).sum().backward()
    assert agent.log_std.grad is not None and agent.log_std.grad.abs().sum() > 0


def test_state_dependent_log_std_starts_at_log_std_init():
    torch.manual_seed(0)
    agent = ImpalaAgent((5,), DiagGaussian(3, -1.0, 1.0), "mlp", log_std_init=-1.0, state_dependent_std=True)
    assert agent.policy_head.out_features == 6 and agent.log_std is None
    log_std = agent(torch.randn(2, 4, 5)).policy_params[..., 3:]
    torch.testing.assert_close(log_std, torch.full_like(log_std, -1.0), atol=0.05, rtol=0)
    assert not torch.equal(log_std[0, 0], log_std[1, 1])  # it does depend on the state


# --- observation normaliser ----------------------------------------------------------------------------


def test_normalizer_statistics_match_numpy_on_concatenated_data():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(n, 2, 3)) * np.array([1.0, 10.0, 0.1]) for n in (1, 17, 250)]
    normalizer = ObservationNormalizer((2, 3))
    for batch in batches:
        normalizer.update(torch.tensor(batch, dtype=torch.float32))
    data = np.concatenate([b.astype(np.float32) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(normalizer.mean.numpy(), data.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(normalizer.var.numpy(), data.var(0), rtol=1e-9, atol=1e-9)
    assert normalizer.count.item() == len(data)

    x = torch.tensor(data[:5], dtype=torch.float32)
    expected = (data[:5] - data.mean(0)) / np.sqrt(data.var(0) + 1e-8)
    np.testing.assert_allclose(normalizer(x).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert normalizer(x).dtype == torch.float32


def test_normalizer_clips_and_starts_as_identity():
    normalizer = ObservationNormalizer((2,), clip=5.0)
    x = torch.tensor([[0.5, -3.0], [100.0, -100.0]])
    torch.testing.assert_close(normalizer(x), torch.tensor([[0.5, -3.0], [5.0, -5.0]]))
    assert {"mean", "var", "count"} <= set(normalizer.state_dict())


def test_agent_normalizes_vector_observations_and_saves_the_statistics():
    torch.manual_seed(0)
    agent = ImpalaAgent((3,), Categorical(2), "mlp", normalize_observations=True)
    observation = 100.0 + 50.0 * torch.randn(4, 8, 3)
    before = agent(observation).baseline
    agent.normalizer.update(observation)
    after = agent(observation).baseline
    assert not torch.allclose(before, after)
    features = agent.encoder(agent.normalizer(observation.reshape(-1, 3))).reshape(4, 8, -1)
    torch.testing.assert_close(after, agent.baseline_head(features).squeeze(-1))
    assert "normalizer.mean" in agent.state_dict()


# --- backwards compatibility and errors ----------------------------------------------------------------


def test_actor_critic_mlp_keeps_its_old_interface():
    network = ActorCriticMLP(4, 2)
    output = network(torch.randn(7, 4))  # no time dim: the old actors call it like this
    assert output.policy_logits.shape == (7, 2) and output.baseline.shape == (7,)
    assert network.value(torch.randn(3, 7, 4)).shape == (3, 7)
    assert network.policy_head.out_features == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(encoder="transformer"), r"unknown encoder 'transformer'; valid: mlp, resnet, nature"),
        (dict(init_fn="kaiming"), r"unknown init_fn 'kaiming'; valid: orthogonal, xavier_uniform, identity"),
        (dict(observation_shape=PIXELS, encoder="mlp"), r"'mlp'.*1-D.*\(3, 36, 36\)"),
        (dict(observation_shape=(5,), encoder="resnet"), r"'resnet'.*\(C, H, W\).*\(5,\)"),
        (dict(observation_shape=(3, 20, 20), encoder="nature"), r"\(3, 20, 20\) is too small for the 'nature'"),
        (dict(observation_shape=PIXELS, encoder="resnet", normalize_observations=True), r"normalize_observations"),
        (dict(use_lstm=True, shared_encoder=False), r"shared_encoder=False is for feed-forward agents"),
    ],
)
def test_invalid_configurations_raise_clear_errors(kwargs, match):
    kwargs = {"observation_shape": (5,), "distribution": Categorical(2), **kwargs}
    with pytest.raises(ValueError, match=match):
        ImpalaAgent(**kwargs)


@pytest.mark.parametrize("shared_encoder", [True, False])
def test_a_value_of_its_own_keeps_the_value_loss_out_of_the_policy_features(shared_encoder):
    torch.manual_seed(0)
    agent = ImpalaAgent((5,), DiagGaussian(2, -1.0, 1.0), hidden_dim=8, feature_dim=8, shared_encoder=shared_encoder)
    output = agent(torch.randn(3, 4, 5))
    output.baseline.square().sum().backward()  # a value loss alone
    policy_encoder_grad = sum(p.grad.abs().sum() for p in agent.encoder.parameters() if p.grad is not None)
    assert agent.policy_head.weight.grad is None
    if shared_encoder:
        assert agent.baseline_encoder is None and policy_encoder_grad > 0
    else:
        assert policy_encoder_grad == 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.baseline_encoder.parameters())
        # Same shape, its own weights: the policy is the same function of the observation either way.
        assert [p.shape for p in agent.baseline_encoder.parameters()] == [p.shape for p in agent.encoder.parameters()]
        assert not torch.equal(agent.baseline_encoder.net[0].weight, agent.encoder.net[0].weight)
    assert agent.step_value(torch.randn(6, 5)).shape == (6,)


def test_wrong_input_shapes_raise():
    agent = _lstm_agent()
    with pytest.raises(ValueError, match="does not end in"):
        agent(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"\[T, B, \*obs\]"):
        agent(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="is_init"):
        agent(torch.zeros(2, 3, 5), None, torch.zeros(3, 2, dtype=torch.bool))
