"""Observation encoders ``[N, *obs] -> [N, feature_dim]`` and the running observation normaliser.

Plain ``nn.Module``s used by ``core.networks.ImpalaAgent``: an MLP for vectors, the IMPALA paper's deep
ResNet, DQN's Nature CNN and RLlib's small CNN for images, the MinAtar paper's small CNN for 10x10 images
(uint8 pixels are scaled on the learner's device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENCODERS = ("mlp", "resnet", "nature", "rllib", "minatar")

# --- encoders: [N, *obs_shape] -> [N, feature_dim] -------------------------------------------------------


def _scale_pixels(x: Tensor, like: Tensor) -> Tensor:
    """uint8 pixels in [0, 255] -> floats in [0, 1] in ``like``'s dtype. Float input is taken as already
    scaled. Scaling here lets uint8 (4x smaller) travel from the actors to the learner's device."""
    x_float = x.to(like.dtype)
    return x_float / 255.0 if x.dtype == torch.uint8 else x_float


@torch.no_grad()
def _flat_size(conv_stack: nn.Module, observation_shape: tuple[int, ...], name: str) -> int:
    """Size of ``conv_stack``'s flattened output for one observation, found by a dummy forward."""
    try:
        return conv_stack(torch.zeros(1, *observation_shape)).numel()
    except RuntimeError as error:  # the strides shrank the image to nothing
        raise ValueError(f"observation shape {observation_shape} is too small for the {name!r} encoder") from error


class MLPEncoder(nn.Module):
    """Vector observations ``[N, observation_size] -> [N, feature_dim]``: Linear-ReLU-Linear-ReLU."""

    def __init__(self, observation_size: int, hidden_dim: int = 64, feature_dim: int = 64):
        super().__init__()
        self.feature_dim = feature_dim
        self.net = nn.Sequential(
            nn.Linear(observation_size, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, feature_dim),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        # Envs emit float64 or integer vectors too; compute in the network's own dtype.
        return self.net(x.to(self.net[0].weight.dtype))


class ResidualBlock(nn.Module):
    """``x + conv(relu(conv(relu(x))))``, 3x3 convolutions that keep ``[N, C, H, W]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ResNetStage(nn.Module):
    """conv3x3 -> max-pool 3x3 stride 2 (halves H and W) -> 2 residual blocks."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.res0 = ResidualBlock(out_channels)
        self.res1 = ResidualBlock(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.res1(self.res0(self.pool(self.conv(x))))


class ResNetEncoder(nn.Module):
    """The IMPALA paper's deep encoder (Espeholt et al. 2018, fig. 3; TorchBeast's ``AtariNet``).

    Pixels ``[N, C, H, W]`` (uint8 or float in [0, 1]) -> 3 stages of 16, 32, 32 channels -> ReLU ->
    flatten -> Linear -> ReLU -> ``[N, feature_dim]``.
    """

    STAGE_CHANNELS = (16, 32, 32)

    def __init__(self, observation_shape: tuple[int, int, int], feature_dim: int = 256):
        super().__init__()
        self.feature_dim = feature_dim
        channels = (observation_shape[0],) + self.STAGE_CHANNELS
        self.stages = nn.Sequential(
            *(ResNetStage(c_in, c_out) for c_in, c_out in zip(channels, channels[1:], strict=False))
        )
        self.fc = nn.Linear(_flat_size(self.stages, observation_shape, "resnet"), feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(_scale_pixels(x, self.fc.weight))
        return F.relu(self.fc(F.relu(x).flatten(1)))


class NatureCNNEncoder(nn.Module):
    """The DQN Nature CNN (Mnih et al. 2015): pixels ``[N, C, H, W]`` (uint8 or float in [0, 1]) ->
    conv 32 8x8 s4 -> conv 64 4x4 s2 -> conv 64 3x3 s1 (ReLU each) -> flatten -> Linear -> ReLU
    -> ``[N, feature_dim]``. Needs H, W >= 36."""

    def __init__(self, observation_shape: tuple[int, int, int], feature_dim: int = 512):
        super().__init__()
        self.feature_dim = feature_dim
        self.convs = nn.Sequential(
            nn.Conv2d(observation_shape[0], 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(_flat_size(self.convs, observation_shape, "nature"), feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.convs(_scale_pixels(x, self.fc.weight))))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one axis (before, after): the output is ``ceil(size / stride)`` long."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class RLlibCNNEncoder(nn.Module):
    """RLlib's default vision network for 42x42 Atari frames (``model: {dim: 42}``, the one its tuned APPO and
    IMPALA Pong examples use): pixels ``[N, C, H, W]`` (uint8 or float in [0, 1]) -> conv 16 4x4 s2 "same"
    -> conv 32 4x4 s2 "same" (ReLU each; 42x42 -> 21x21 -> 11x11) -> flatten -> Linear -> ReLU ->
    ``[N, feature_dim]``. RLlib's last layer is a 256-channel conv whose kernel covers the whole 11x11 map,
    which is this Linear. Unlike the Nature CNN at 42x42 (whose stride-4 first layer leaves a 1x1 map), it keeps
    an 11x11 map in which Pong's one-pixel ball still has a place."""

    def __init__(self, observation_shape: tuple[int, int, int], feature_dim: int = 256):
        super().__init__()
        self.feature_dim = feature_dim
        layers, (channels, height, width) = [], observation_shape
        for out_channels in (16, 32):
            (top, bottom), (left, right) = _same_padding(height, 4, 2), _same_padding(width, 4, 2)
            layers += [nn.ZeroPad2d((left, right, top, bottom)), nn.Conv2d(channels, out_channels, 4, stride=2),
                       nn.ReLU()]
            channels, height, width = out_channels, -(-height // 2), -(-width // 2)
        self.convs = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(_flat_size(self.convs, observation_shape, "rllib"), feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.convs(_scale_pixels(x, self.fc.weight))))


class MinAtarEncoder(nn.Module):
    """The MinAtar paper's network body (Young & Tian 2019): images ``[N, C, H, W]`` (uint8 or float in
    [0, 1]; MinAtar's boolean channels arrive as 0 / 255) -> conv 16 3x3 s1 -> ReLU -> flatten -> Linear
    -> ReLU -> ``[N, feature_dim]`` (the paper: 128). For small images: 10x10 -> 8x8x16 = 1024 features."""

    def __init__(self, observation_shape: tuple[int, int, int], feature_dim: int = 128):
        super().__init__()
        self.feature_dim = feature_dim
        self.conv = nn.Sequential(nn.Conv2d(observation_shape[0], 16, kernel_size=3, stride=1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(_flat_size(self.conv, observation_shape, "minatar"), feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.conv(_scale_pixels(x, self.fc.weight))))


class DictEncoder(nn.Module):
    """The parts of a dict observation (``core.observation_parts``) -> ``[N, feature_dim]``: each image part
    through a pixel encoder of its own, the vector parts (concatenated) through one MLP, their features
    concatenated -> Linear -> ReLU. The action mask is not an input: the network applies it to the logits.

    Args:
        parts: the layout; ``image`` and ``vector`` parts are encoded, in this order.
        pixel_encoder: ``(C, H, W) -> module`` for each image part (the configured ``encoder``).
        hidden_dim, feature_dim: the MLP's widths, and the width of the output.
    """

    def __init__(self, parts, pixel_encoder, hidden_dim: int, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.image_parts = [part for part in parts if part.kind == "image"]
        self.vector_size = sum(part.size for part in parts if part.kind == "vector")
        self.images = nn.ModuleDict({part.name: pixel_encoder(part.shape) for part in self.image_parts})
        self.vector = MLPEncoder(self.vector_size, hidden_dim, feature_dim) if self.vector_size else None
        joint = sum(encoder.feature_dim for encoder in self.images.values()) + (feature_dim if self.vector else 0)
        self.fc = nn.Linear(joint, feature_dim)

    def forward(self, entries: dict[str, Tensor], vector: Tensor | None) -> Tensor:
        """``entries``: ``{name: [N, *shape]}`` (packed as float32: pixel images hold 0-255, made uint8 again so
        the pixel encoder scales them as it scales frames); ``vector``: the vector parts ``[N, V]``, normalised."""
        features = []
        for part in self.image_parts:
            image = entries[part.name]
            features.append(self.images[part.name](image.to(torch.uint8) if part.pixels else image))
        if self.vector is not None:
            features.append(self.vector(vector))
        return F.relu(self.fc(torch.cat(features, dim=-1)))


# --- observation normalisation -------------------------------------------------------------------------


class ObservationNormalizer(nn.Module):
    """Running mean / variance of vector observations: ``x -> clamp((x - mean) / sqrt(var + eps), +-clip)``.

    The statistics are float64 buffers (``mean``, ``var`` ``[*shape]``, ``count`` ``[]``), so they are
    saved in checkpoints and travel to the actors with the weights; only ``update`` changes them (the
    learner calls it), so actors and learner normalise alike given the same weights. Before any update
    (mean 0, var 1) it is the identity, up to the clipping.

    Args:
        shape: shape of one observation.
        clip: bound on the normalised values, so a rare outlier cannot dominate the features.
        epsilon: added to the variance, so a constant feature does not divide by zero.
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, epsilon: float = 1e-8):
        super().__init__()
        self.shape = tuple(shape)
        self.clip = clip
        self.epsilon = epsilon
        self.register_buffer("mean", torch.zeros(self.shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(self.shape, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch: Tensor) -> None:
        """Merge the statistics of ``batch [..., *shape]`` (Chan et al.'s parallel variance formula)."""
        batch = batch.reshape(-1, *self.shape).to(self.mean)
        n = batch.shape[0]
        if n == 0:
            return
        batch_mean, batch_var = batch.mean(0), batch.var(0, unbiased=False)
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta.square() * self.count * n / total
        self.mean += delta * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., *shape] -> [..., *shape]`` in ``x``'s floating dtype."""
        if not x.is_floating_point():
            x = x.float()
        std = torch.sqrt(self.var + self.epsilon)
        return ((x - self.mean.to(x.dtype)) / std.to(x.dtype)).clamp(-self.clip, self.clip)
