"""Action distributions against torch.distributions and float64 NumPy hand computations."""

import math
import pickle

import gymnasium
import numpy as np
import pytest
import torch
from torch import distributions as td

from lit_impala.core.distributions import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    Categorical,
    DiagGaussian,
    MultiCategorical,
    make_distribution,
)


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# --- Categorical ---------------------------------------------------------------------------------------


def test_categorical_log_prob_and_entropy_match_torch_and_numpy():
    torch.manual_seed(0)
    dist = Categorical(5)
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    action = torch.randint(0, 5, (3, 4))

    reference = td.Categorical(logits=logits)
    torch.testing.assert_close(dist.log_prob(logits, action), reference.log_prob(action))
    torch.testing.assert_close(dist.entropy(logits), reference.entropy())

    log_p = _np_log_softmax(logits.numpy())
    np_log_prob = np.take_along_axis(log_p, action.numpy()[..., None], -1)[..., 0]
    np_entropy = -(np.exp(log_p) * log_p).sum(-1)
    np.testing.assert_allclose(dist.log_prob(logits, action).numpy(), np_log_prob, rtol=1e-12)
    np.testing.assert_allclose(dist.entropy(logits).numpy(), np_entropy, rtol=1e-12)


def test_categorical_sample_frequencies_match_probabilities():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.7])
    samples = Categorical(3).sample(probs.log().expand(200_000, 3))
    assert samples.shape == (200_000,) and samples.dtype == torch.int64
    frequencies = torch.bincount(samples, minlength=3).float() / samples.numel()
    torch.testing.assert_close(frequencies, probs, atol=5e-3, rtol=0)


def test_categorical_mode_and_masked_logits():
    dist = Categorical(3)
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, -math.inf, 0.0]])
    assert dist.mode(logits).tolist() == [1, 0]
    entropy = dist.entropy(logits)
    assert torch.isfinite(entropy).all()
    torch.testing.assert_close(entropy[1], torch.tensor(math.log(2.0)))  # a masked action adds nothing
    assert (dist.sample(logits.expand(1000, 2, 3))[:, 1] != 1).all()  # never samples a masked action


# --- MultiCategorical ----------------------------------------------------------------------------------


def test_multicategorical_is_a_sum_of_independent_components():
    torch.manual_seed(1)
    nvec = [2, 3, 4]
    dist = MultiCategorical(nvec)
    assert dist.param_size == 9 and dist.sample_shape == (3,)
    logits = torch.randn(5, 6, 9, dtype=torch.float64)
    action = torch.stack([torch.randint(0, n, (5, 6)) for n in nvec], dim=-1)

    parts = torch.split(logits, nvec, dim=-1)
    references = [td.Categorical(logits=p) for p in parts]
    expected_log_prob = sum(r.log_prob(action[..., i]) for i, r in enumerate(references))
    expected_entropy = sum(r.entropy() for r in references)
    torch.testing.assert_close(dist.log_prob(logits, action), expected_log_prob)
    torch.testing.assert_close(dist.entropy(logits), expected_entropy)

    np_log_prob = sum(
        np.take_along_axis(_np_log_softmax(p.numpy()), action[..., i].numpy()[..., None], -1)[..., 0]
        for i, p in enumerate(parts)
    )
    np.testing.assert_allclose(dist.log_prob(logits, action).numpy(), np_log_prob, rtol=1e-12)
    assert dist.mode(logits).tolist() == torch.stack([p.argmax(-1) for p in parts], -1).tolist()


def test_multicategorical_sample_frequencies_per_component():
    torch.manual_seed(0)
    probs = [torch.tensor([0.3, 0.7]), torch.tensor([0.5, 0.25, 0.25])]
    logits = torch.cat([p.log() for p in probs]).expand(100_000, 5)
    samples = MultiCategorical([2, 3]).sample(logits)
    assert samples.shape == (100_000, 2) and samples.dtype == torch.int64
    for i, p in enumerate(probs):
        frequencies = torch.bincount(samples[:, i], minlength=len(p)).float() / samples.shape[0]
        torch.testing.assert_close(frequencies, p, atol=7e-3, rtol=0)


# --- DiagGaussian --------------------------------------------------------------------------------------


def _gaussian_params(batch=(4, 3), action_dim=2, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(*batch, action_dim, generator=g, dtype=torch.float64)
    log_std = torch.empty(*batch, action_dim, dtype=torch.float64).uniform_(-1.0, 0.5, generator=g)
    return torch.cat([mean, log_std], dim=-1)


def test_gaussian_clip_log_prob_and_entropy_match_torch_and_numpy():
    dist = DiagGaussian(2, low=-1.0, high=1.0, squash="clip")
    params = _gaussian_params()
    mean, log_std = params.chunk(2, -1)
    u = mean + 2.0 * torch.randn_like(mean)

    reference = td.Independent(td.Normal(mean, log_std.exp()), 1)
    torch.testing.assert_close(dist.log_prob(params, u), reference.log_prob(u))
    torch.testing.assert_close(dist.entropy(params), reference.entropy())

    m, s, x = mean.numpy(), log_std.exp().numpy(), u.numpy()
    np_log_prob = (-0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)).sum(-1)
    np.testing.assert_allclose(dist.log_prob(params, u).numpy(), np_log_prob, rtol=1e-12)
    np.testing.assert_allclose(
        dist.entropy(params).numpy(), (0.5 * np.log(2 * np.pi * np.e * s**2)).sum(-1), rtol=1e-12
    )


def test_gaussian_log_std_is_clamped():
    dist = DiagGaussian(1, -1.0, 1.0)
    params = torch.tensor([[0.0, -20.0], [0.0, 20.0]])
    _, log_std = dist.mean_and_log_std(params)
    assert log_std.tolist() == [[LOG_STD_MIN], [LOG_STD_MAX]]
    torch.testing.assert_close(
        dist.entropy(params), 0.5 + 0.5 * math.log(2 * math.pi) + torch.tensor([LOG_STD_MIN, LOG_STD_MAX])
    )


def test_gaussian_sample_statistics_and_mode():
    torch.manual_seed(0)
    dist = DiagGaussian(2, -1.0, 1.0)
    params = torch.tensor([0.5, -2.0, math.log(0.5), math.log(2.0)]).expand(200_000, 4)
    u = dist.sample(params)
    assert u.shape == (200_000, *dist.sample_shape) and u.dtype == dist.sample_dtype
    torch.testing.assert_close(u.mean(0), torch.tensor([0.5, -2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(u.std(0), torch.tensor([0.5, 2.0]), atol=0.02, rtol=0)
    assert dist.mode(params[:1]).tolist() == [[0.5, -2.0]]


@pytest.mark.parametrize("squash", ["clip", "tanh"])
def test_env_actions_stay_in_bounds(squash):
    low, high = [-2.0, 0.0, 10.0], [1.0, 0.5, 12.0]
    dist = DiagGaussian(3, low, high, squash)
    u = torch.tensor([[-1e6, -3.0, 0.0], [0.0, 0.25, 11.0], [1e6, 50.0, 1e3]])
    action = dist.to_env_action(u)
    assert (action >= torch.tensor(low)).all() and (action <= torch.tensor(high)).all()
    if squash == "clip":
        assert action[1].tolist() == [0.0, 0.25, 11.0]  # inside the box: unchanged
    else:
        torch.testing.assert_close(dist.to_env_action(torch.zeros(3)), torch.tensor([-0.5, 0.25, 11.0]))  # midpoints


def test_tanh_log_prob_is_the_env_action_density():
    low, high = torch.tensor([-2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
    dist = DiagGaussian(2, low.tolist(), high.tolist(), "tanh")
    params = _gaussian_params()
    mean, log_std = params.chunk(2, -1)
    u = mean + log_std.exp() * torch.randn_like(mean)
    action = dist.to_env_action(u)

    squashed = td.TransformedDistribution(
        td.Normal(mean, log_std.exp()),
        [td.TanhTransform(), td.AffineTransform(loc=(high + low) / 2, scale=(high - low) / 2)],
    )
    torch.testing.assert_close(dist.log_prob(params, u), squashed.log_prob(action).sum(-1), rtol=1e-6, atol=1e-6)
    # The correction depends on u only: the Gaussian log-prob difference between two params is unchanged.
    clip = DiagGaussian(2, low.tolist(), high.tolist(), "clip")
    other = _gaussian_params(seed=1)
    torch.testing.assert_close(
        dist.log_prob(params, u) - dist.log_prob(other, u), clip.log_prob(params, u) - clip.log_prob(other, u)
    )
    # Stable where tanh(u) rounds to +-1.
    assert torch.isfinite(dist.log_prob(params[:1, :1], torch.full((1, 1, 2), 40.0, dtype=torch.float64))).all()


def test_tanh_density_integrates_to_one_over_the_box():
    dist = DiagGaussian(1, [-3.0], [5.0], "tanh")
    params = torch.tensor([0.7, math.log(0.8)], dtype=torch.float64)
    action = torch.linspace(-3.0, 5.0, 200_001, dtype=torch.float64)[1:-1]
    u = torch.atanh((action - 1.0) / 4.0).unsqueeze(-1)  # invert low + (tanh(u) + 1) / 2 * (high - low)
    density = dist.log_prob(params, u).exp()
    assert abs(torch.trapezoid(density, action).item() - 1.0) < 1e-4


def test_log_prob_has_gradients_for_every_distribution():
    for dist, action in [
        (Categorical(3), torch.tensor([1, 2])),
        (MultiCategorical([2, 3]), torch.tensor([[0, 2], [1, 0]])),
        (DiagGaussian(2, -1.0, 1.0, "tanh"), torch.randn(2, 2)),
    ]:
        params = torch.randn(2, dist.param_size, requires_grad=True)
        (dist.log_prob(params, action).sum() + dist.entropy(params).sum()).backward()
        assert params.grad is not None and params.grad.abs().sum() > 0, dist


def test_sample_shape_and_dtype_describe_samples():
    for dist in [Categorical(4), MultiCategorical([3, 2]), DiagGaussian(3, -1.0, 1.0)]:
        sample = dist.sample(torch.zeros(5, 7, dist.param_size))
        assert sample.shape == (5, 7, *dist.sample_shape) and sample.dtype == dist.sample_dtype, dist
        assert dist.mode(torch.zeros(5, 7, dist.param_size)).shape == sample.shape
        assert dist.log_prob(torch.zeros(5, 7, dist.param_size), sample).shape == (5, 7)
        assert pickle.loads(pickle.dumps(dist)) == dist


# --- make_distribution ---------------------------------------------------------------------------------


def test_make_distribution_from_spaces():
    spaces = gymnasium.spaces
    assert make_distribution(spaces.Discrete(4)) == Categorical(4)
    assert make_distribution(spaces.MultiDiscrete([3, 5])) == MultiCategorical([3, 5])
    box = make_distribution(
        spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 2.0], np.float32)), squash="tanh"
    )
    assert box == DiagGaussian(2, [-1.0, 0.0], [1.0, 2.0], "tanh")
    assert type(box.low[0]) is float  # plain floats: picklable, no numpy or torch inside


@pytest.mark.parametrize(
    "space, fragment",
    [
        (gymnasium.spaces.Box(-1.0, 1.0, (2, 2)), "Box"),
        (gymnasium.spaces.Box(-np.inf, np.inf, (2,)), "Box"),
        (gymnasium.spaces.MultiBinary(3), "MultiBinary"),
        (gymnasium.spaces.Dict({"a": gymnasium.spaces.Discrete(2)}), "Dict"),
        (gymnasium.spaces.Discrete(3, start=1), "Discrete"),
    ],
)
def test_make_distribution_rejects_unsupported_spaces(space, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_distribution(space)


def test_unknown_squash_is_rejected():
    with pytest.raises(ValueError, match="'sigmoid'.*clip, tanh"):
        make_distribution(gymnasium.spaces.Box(-1.0, 1.0, (2,)), squash="sigmoid")
    with pytest.raises(ValueError, match="'sigmoid'"):
        DiagGaussian(2, -1.0, 1.0, squash="sigmoid")
    with pytest.raises(ValueError, match="low < high"):
        DiagGaussian(1, 1.0, 1.0)
