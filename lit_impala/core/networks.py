"""The agent network shared by actors and learner: observation encoder -> optional LSTM core -> policy
and baseline heads, with one time-major forward ``[T, B, *obs] -> AgentOutput``.

Plain ``nn.Module``s; nothing here knows about TensorDicts, torchrl or Lightning.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from lit_impala.core.distributions import ActionDistribution, Categorical, DiagGaussian
from lit_impala.core.encoders import (
    ENCODERS,
    DictEncoder,
    MinAtarEncoder,
    MLPEncoder,
    NatureCNNEncoder,
    ObservationNormalizer,
    ResNetEncoder,
    RLlibCNNEncoder,
)
from lit_impala.core.observation_parts import ObservationPart, flat_size, mask_logits, split
from lit_impala.core.value_normalization import ValueNormalizer

INIT_FNS = ("orthogonal", "xavier_uniform", "identity")

CoreState = tuple[Tensor, Tensor]  # (h, c), each [B, H]


class AgentOutput(NamedTuple):
    """What one forward pass of the agent returns (time-major)."""

    policy_params: Tensor  # [T, B, P] the action distribution's parameters (logits, or mean and log std)
    baseline: Tensor  # [T, B] state value V(x_t)
    core_states: CoreState | None = None  # (h, c) each [T, B, H]: the LSTM state AFTER step t; None without LSTM

    @property
    def policy_logits(self) -> Tensor:
        """Alias of ``policy_params`` for callers written when every policy was categorical."""
        return self.policy_params


# --- the agent -----------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")


class ImpalaAgent(nn.Module):
    """Encoder -> optional LSTM core -> policy head ``[..., P]`` and baseline head ``[...]``.

    The same module acts (actors, ``T = 1``) and learns (learner, ``T`` = unroll length), so both
    compute the policy in exactly one way.

    Args:
        observation_shape: shape of one observation: ``(size,)`` for "mlp", ``(C, H, W)`` for pixels.
        distribution: the action distribution; fixes the policy head's size ``distribution.param_size``.
        encoder: "mlp" (vectors), "resnet" (IMPALA deep net), "nature" (DQN Nature CNN), "rllib"
            (RLlib's small CNN for 42x42 frames) or "minatar" (the MinAtar paper's one-conv net, for 10x10 images).
        hidden_dim: width of the MLP encoder's hidden layer (unused by pixel encoders).
        feature_dim: encoder output size (the papers use 256 for "resnet", 512 for "nature").
        use_lstm: add an LSTM core between encoder and heads, reset at episode starts.
        lstm_hidden_dim: H, the LSTM state size (TorchBeast uses 256 on Atari).
        init_fn: "orthogonal" or "xavier_uniform" (gain sqrt(2) for ReLU layers, zero biases, small
            policy head), or "identity" to keep PyTorch's default init everywhere.
        policy_init_scale: policy-head gain; 0.01 makes the initial policy near-uniform (high entropy).
        value_init_scale: baseline-head gain.
        log_std_init: initial log std of a Gaussian policy (ignored for discrete actions).
        state_dependent_std: Gaussian only: the head outputs log std too, instead of one learned
            state-independent ``log_std`` parameter (ignored for discrete actions).
        normalize_observations: normalise vector observations with running statistics (``normalizer``;
            the learner calls ``normalizer.update``). Pixel encoders scale uint8 by 1/255 instead.
        shared_encoder: the baseline head reads the policy's features (the paper). False: the baseline
            has an encoder of its own, of the same shape (``baseline_encoder``), so the value loss does not
            move the policy's features, as PPO baselines do for MuJoCo. Feed-forward agents only: with an
            LSTM the value needs the core's memory.
        normalize_values: the baseline head learns value targets in units of their running statistics
            (``value_normalizer``, ``core.value_normalization``); ``baseline`` is given denormalised, so every
            caller sees values in the returns' own scale. The learner calls ``value_normalizer.update``.
        value_norm_beta: step size of those running statistics.
        observation_parts: a dict observation's layout (``core.observation_parts``): the observation is then the
            packed vector ``(D,)``, each ``image`` part goes through the ``encoder`` (a pixel one), the ``vector``
            parts through the MLP (normalised with ``normalize_observations``), and a ``mask`` part (legal
            actions, 1 / 0, one per logit) masks the policy's logits, on actors and learner alike. None: a plain
            observation of ``observation_shape``.
    """

    def __init__(
        self,
        observation_shape: tuple[int, ...],
        distribution: ActionDistribution,
        encoder: str = "mlp",
        hidden_dim: int = 64,
        feature_dim: int = 64,
        use_lstm: bool = False,
        lstm_hidden_dim: int = 128,
        init_fn: str = "orthogonal",
        policy_init_scale: float = 0.01,
        value_init_scale: float = 1.0,
        log_std_init: float = 0.0,
        state_dependent_std: bool = False,
        normalize_observations: bool = False,
        shared_encoder: bool = True,
        normalize_values: bool = False,
        value_norm_beta: float = 3e-4,
        observation_parts: tuple[ObservationPart, ...] | None = None,
    ):
        super().__init__()
        _check_choice("encoder", encoder, ENCODERS)
        _check_choice("init_fn", init_fn, INIT_FNS)
        self.observation_shape = tuple(int(s) for s in observation_shape)
        self.distribution = distribution
        self.encoder_name = encoder
        self.use_lstm = use_lstm
        self.observation_parts = tuple(observation_parts) if observation_parts else None
        self.is_pixel = encoder != "mlp" and self.observation_parts is None
        self.action_mask = self._check_parts(encoder, distribution, normalize_observations)

        # 1. encoder
        needed_dims = 3 if self.is_pixel else 1
        if len(self.observation_shape) != needed_dims:
            expects = "(C, H, W) images" if self.is_pixel else "1-D vectors"
            raise ValueError(f"encoder {encoder!r} expects {expects}, got observation shape {self.observation_shape}")
        if normalize_observations and self.is_pixel:
            raise ValueError(f"normalize_observations is for vector observations, not encoder {encoder!r}")
        if use_lstm and not shared_encoder:
            raise ValueError("shared_encoder=False is for feed-forward agents: with use_lstm the value reads the "
                             "core's memory, so it shares the encoder")
        normalized_shape = self.observation_shape
        if self.observation_parts is not None:
            normalized_shape = (sum(part.size for part in self.observation_parts if part.kind == "vector"),)
        self.normalizer = ObservationNormalizer(normalized_shape) if normalize_observations else None
        self.encoder = self._make_encoder(encoder, hidden_dim, feature_dim)
        self.baseline_encoder = None if shared_encoder else self._make_encoder(encoder, hidden_dim, feature_dim)

        # 2. core
        self.core = nn.LSTM(feature_dim, lstm_hidden_dim) if use_lstm else None
        core_size = lstm_hidden_dim if use_lstm else feature_dim

        # 3. heads; a state-independent Gaussian std is a parameter broadcast next to the head's mean
        gaussian = isinstance(distribution, DiagGaussian)
        learned_log_std = gaussian and not state_dependent_std
        self.policy_head = nn.Linear(core_size, distribution.action_dim if learned_log_std else distribution.param_size)
        self.baseline_head = nn.Linear(core_size, 1)
        self.value_normalizer = ValueNormalizer(value_norm_beta) if normalize_values else None
        if learned_log_std:
            self.log_std = nn.Parameter(torch.full((distribution.action_dim,), float(log_std_init)))
        else:
            self.register_parameter("log_std", None)

        # 4. initialisation
        self._initialize(init_fn, policy_init_scale, value_init_scale)
        if gaussian and state_dependent_std:
            with torch.no_grad():  # start at std = exp(log_std_init) whatever the state
                self.policy_head.bias[distribution.action_dim :].fill_(float(log_std_init))

    def _check_parts(self, encoder: str, distribution: ActionDistribution, normalize: bool) -> ObservationPart | None:
        """Check a dict layout against the other arguments; its action-mask part, if any."""
        parts = self.observation_parts
        if parts is None:
            return None
        if self.observation_shape != (flat_size(parts),):
            raise ValueError(f"observation_shape {list(self.observation_shape)} is not the packed size "
                             f"[{flat_size(parts)}] of the observation parts {[p.name for p in parts]}")
        images = [part.name for part in parts if part.kind == "image"]
        if images and encoder == "mlp":
            raise ValueError(f"observation parts {images} are images: set the encoder to a pixel one "
                             f"({', '.join(e for e in ENCODERS if e != 'mlp')})")
        if not images and encoder != "mlp":
            raise ValueError(f"encoder {encoder!r} is for images; the observation parts {[p.name for p in parts]} "
                             "hold none (use mlp)")
        if normalize and not any(part.kind == "vector" for part in parts):
            raise ValueError("normalize_observations normalises the vector parts; these observation parts hold none")
        if not any(part.kind in ("image", "vector") for part in parts):
            raise ValueError(f"observation parts {[p.name for p in parts]} hold nothing for the network to read")
        mask = next((part for part in parts if part.kind == "mask"), None)
        if mask is not None:
            if isinstance(distribution, DiagGaussian):
                raise ValueError(f"action mask {mask.name!r}: masking is for discrete actions, not a continuous Box")
            if mask.size != distribution.param_size:
                raise ValueError(f"action mask {mask.name!r} has {mask.size} entries; the policy has "
                                 f"{distribution.param_size} logits (one entry per action)")
        return mask

    def _make_encoder(self, encoder: str, hidden_dim: int, feature_dim: int) -> nn.Module:
        if self.observation_parts is not None:
            return DictEncoder(self.observation_parts, lambda shape: _pixel_encoder(encoder, shape, feature_dim),
                               hidden_dim, feature_dim)
        if encoder == "mlp":
            return MLPEncoder(self.observation_shape[0], hidden_dim, feature_dim)
        return _pixel_encoder(encoder, self.observation_shape, feature_dim)

    def _encode(self, encoder: nn.Module, x: Tensor) -> Tensor:
        """``x [N, *obs]`` -> ``[N, F]`` through ``encoder``, normalised where asked."""
        if self.observation_parts is None:
            return encoder(x if self.normalizer is None else self.normalizer(x))
        entries = split(x, self.observation_parts)
        vector = self.vector_parts(x)
        return encoder(entries, vector if self.normalizer is None or vector is None else self.normalizer(vector))

    def vector_parts(self, observation: Tensor) -> Tensor | None:
        """What ``normalize_observations`` normalises: the whole observation ``[N, *obs]``, or of dict observations
        the vector parts concatenated ``[N, V]`` (None without any). The learner updates the normaliser with it."""
        if self.observation_parts is None:
            return observation
        entries = split(observation, self.observation_parts)
        vectors = [entries[part.name] for part in self.observation_parts if part.kind == "vector"]
        return torch.cat(vectors, dim=-1) if vectors else None

    def _initialize(self, init_fn: str, policy_init_scale: float, value_init_scale: float) -> None:
        """rllte / CleanRL-style init; "identity" keeps PyTorch's defaults untouched."""
        if init_fn == "identity":
            return
        init_weight = nn.init.orthogonal_ if init_fn == "orthogonal" else nn.init.xavier_uniform_
        relu_gain = nn.init.calculate_gain("relu")  # sqrt(2): keeps activations' scale through ReLUs
        encoders = [self.encoder] if self.baseline_encoder is None else [self.encoder, self.baseline_encoder]
        for module in (m for encoder in encoders for m in encoder.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                init_weight(module.weight, gain=relu_gain)
                nn.init.zeros_(module.bias)
        if self.core is not None:
            # Orthogonal recurrent weights keep the state's norm over many steps; xavier for the input map.
            for name, param in self.core.named_parameters():
                if name.startswith("weight_hh"):
                    nn.init.orthogonal_(param)
                elif name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(param)
                else:
                    nn.init.zeros_(param)
        for head, gain in ((self.policy_head, policy_init_scale), (self.baseline_head, value_init_scale)):
            init_weight(head.weight, gain=gain)
            nn.init.zeros_(head.bias)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> CoreState | None:
        """Zero LSTM state ``(h, c)``, each ``[batch_size, H]``; ``None`` without LSTM."""
        if self.core is None:
            return None
        weight = self.core.weight_hh_l0
        zeros = torch.zeros(batch_size, self.core.hidden_size, dtype=weight.dtype, device=device or weight.device)
        return zeros, zeros.clone()

    def forward(
        self, observation: Tensor, core_state: CoreState | None = None, is_init: Tensor | None = None
    ) -> AgentOutput:
        """One forward for acting (``T = 1``) and learning.

        Args:
            observation: ``[T, B, *observation_shape]`` (without LSTM, any leading dims are accepted).
            core_state: ``(h, c)`` each ``[B, H]``, the state entering step 0; zeros when ``None``.
                Ignored without LSTM.
            is_init: ``[T, B]`` bool, True where step t is the first of a new episode: the state entering
                that step is zeroed for that column. ``None``: no resets. Ignored without LSTM.

        Returns:
            ``AgentOutput`` with ``policy_params [T, B, P]``, ``baseline [T, B]`` and ``core_states``
            ``(h, c)`` each ``[T, B, H]`` (the state after step t, i.e. the one to carry into t + 1).
        """
        obs_dims = len(self.observation_shape)
        if tuple(observation.shape[observation.dim() - obs_dims :]) != self.observation_shape:
            raise ValueError(f"observation shape {tuple(observation.shape)} does not end in {self.observation_shape}")
        leading = observation.shape[: observation.dim() - obs_dims]

        # The encoder sees all T * B observations at once; only the core needs time order.
        x = observation.reshape(-1, *self.observation_shape)
        features = self._encode(self.encoder, x)  # [T * B, F]

        core_states = None
        if self.core is None:
            core_output = features.reshape(*leading, -1)
        else:
            if len(leading) != 2:
                raise ValueError(f"an LSTM agent needs observations [T, B, *obs], got {tuple(observation.shape)}")
            core_output, core_states = self._unroll(features.reshape(*leading, -1), core_state, is_init)

        policy_params = self.policy_head(core_output)
        if self.log_std is not None:
            policy_params = torch.cat([policy_params, self.log_std.expand_as(policy_params)], dim=-1)
        if self.action_mask is not None:
            legal = split(x, self.observation_parts)[self.action_mask.name]
            policy_params = mask_logits(policy_params, legal.reshape(*leading, -1))
        # Without LSTM (checked in __init__) the value's own features need no time order either.
        value_input = core_output
        if self.baseline_encoder is not None:
            value_input = self._encode(self.baseline_encoder, x).reshape(*leading, -1)
        baseline = self.baseline_head(value_input).squeeze(-1)
        if self.value_normalizer is not None:
            baseline = self.value_normalizer.denormalize(baseline)
        return AgentOutput(policy_params, baseline, core_states)

    def _unroll(
        self, features: Tensor, core_state: CoreState | None, is_init: Tensor | None
    ) -> tuple[Tensor, CoreState]:
        """LSTM over ``features [T, B, F]`` step by step, resetting at episode starts -> ``([T, B, H], (h, c))``."""
        T, B = features.shape[:2]
        h, c = self.initial_state(B, features.device) if core_state is None else core_state
        if is_init is not None and tuple(is_init.shape) != (T, B):
            raise ValueError(f"is_init must be [T, B] = {(T, B)}, got {tuple(is_init.shape)}")
        hs, cs = [], []
        for t in range(T):
            if is_init is not None:
                # A new episode must not see the previous episode's memory.
                keep = (~is_init[t].bool()).to(h.dtype).unsqueeze(-1)  # [B, 1]
                h, c = h * keep, c * keep
            _, (h, c) = self.core(features[t].unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))
            h, c = h.squeeze(0), c.squeeze(0)
            hs.append(h)
            cs.append(c)
        h_all, c_all = torch.stack(hs), torch.stack(cs)
        return h_all, (h_all, c_all)  # a one-layer LSTM's output is its h

    def step_value(self, observation: Tensor, core_state: CoreState | None = None) -> Tensor:
        """``V`` of ``observation [N, *obs]`` continuing from ``core_state`` (each ``[N, H]``; one core
        step, no reset) -> ``[N]``. The learner bootstraps from final observations with it."""
        return self.forward(observation.unsqueeze(0), core_state).baseline.squeeze(0)


def _pixel_encoder(encoder: str, shape: tuple[int, ...], feature_dim: int) -> nn.Module:
    if encoder == "resnet":
        return ResNetEncoder(shape, feature_dim)
    if encoder == "minatar":
        return MinAtarEncoder(shape, feature_dim)
    if encoder == "rllib":
        return RLlibCNNEncoder(shape, feature_dim)
    return NatureCNNEncoder(shape, feature_dim)


class ActorCriticMLP(ImpalaAgent):
    """Backwards-compatible shortcut: an ``ImpalaAgent`` with an MLP encoder and a categorical policy.

    Args:
        observation_size: length of the flat observation vector.
        num_actions: number of discrete actions.
        hidden_dim: width of the first hidden layer.
        feature_dim: width of the shared feature layer the two heads read.
    """

    def __init__(self, observation_size: int, num_actions: int, hidden_dim: int = 64, feature_dim: int = 64):
        super().__init__((observation_size,), Categorical(num_actions), "mlp", hidden_dim, feature_dim)
        self.observation_size = observation_size
        self.num_actions = num_actions

    def value(self, observation: Tensor) -> Tensor:
        """State value only: ``[..., observation_size] -> [...]``."""
        return self.forward(observation).baseline
