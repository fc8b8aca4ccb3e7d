"""Plain ``nn.Module`` networks for the actor and the learner.

Every network maps an observation batch ``[..., obs_dim]`` to policy logits ``[..., A]`` and a
state value ``[...]``; nothing here knows about TensorDicts, torchrl or Lightning.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class AgentOutput(NamedTuple):
    """What one forward pass of an actor-critic network returns."""

    policy_logits: Tensor  # [..., A] unnormalised log-probabilities of each action
    baseline: Tensor  # [...] state value V(x)


class ActorCriticMLP(nn.Module):
    """Actor-critic MLP for vector observations and a discrete action space.

    ``obs [..., observation_size] -> torso (2 x Linear+ReLU) -> features [..., feature_dim]``,
    then two linear heads: policy logits ``[..., num_actions]`` and value ``[...]``.

    Args:
        observation_size: length of the flat observation vector.
        num_actions: number of discrete actions.
        hidden_dim: width of the first hidden layer.
        feature_dim: width of the shared feature layer the two heads read.
    """

    def __init__(self, observation_size: int, num_actions: int, hidden_dim: int = 64, feature_dim: int = 64):
        super().__init__()
        self.observation_size = observation_size
        self.num_actions = num_actions
        self.torso = nn.Sequential(
            nn.Linear(observation_size, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, feature_dim),
            nn.ReLU(),
        )
        self.policy_head = nn.Linear(feature_dim, num_actions)
        self.baseline_head = nn.Linear(feature_dim, 1)
        # Small policy-head weights make the initial policy near-uniform (high entropy), as peers do.
        nn.init.orthogonal_(self.policy_head.weight, gain=0.01)
        nn.init.zeros_(self.policy_head.bias)

    def forward(self, observation: Tensor) -> AgentOutput:
        features = self.torso(observation)
        return AgentOutput(self.policy_head(features), self.baseline_head(features).squeeze(-1))

    def value(self, observation: Tensor) -> Tensor:
        """State value only: ``[..., observation_size] -> [...]``."""
        return self.baseline_head(self.torso(observation)).squeeze(-1)
