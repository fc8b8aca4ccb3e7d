"""The gymnasium backend's sub-envs: one ``SyncVectorEnv`` with autoreset *disabled*, stepped in this process.

Finished sub-envs are reset by ``envs.episodes.EpisodeEnv`` (``reset_mask``), so ``("next", "observation")`` is
always the real final observation of a step (needed to bootstrap truncated episodes), and no phantom transition
appears between episodes (the trap of gymnasium 1.x next-step autoreset).
"""

from __future__ import annotations

import torch
from gymnasium.vector import VectorEnv as GymnasiumVectorEnv

from lit_impala.envs.episodes import VectorStep, gym_wrapper_spec
from lit_impala.schema import LIFE_LOST_KEY


class GymnasiumVector:
    """A gymnasium vector env as the ``envs.episodes.VectorEnv`` of ``EpisodeEnv``, with the specs torchrl's
    ``GymWrapper`` gives it (discrete actions as indices). With ``report_life_loss``, ``life_lost`` is read from
    the step's info (``envs.atari.LifeLossInfo`` puts it there)."""

    def __init__(self, vector_env: GymnasiumVectorEnv, report_life_loss: bool = False):
        self.num_envs = vector_env.num_envs
        self.reports_life_loss = report_life_loss
        self._env = vector_env
        observation_spec = gym_wrapper_spec(vector_env.single_observation_space)
        action_spec = gym_wrapper_spec(vector_env.single_action_space, categorical=True)
        self.observation_spec = observation_spec.expand(self.num_envs, *observation_spec.shape)
        self.action_spec = action_spec.expand(self.num_envs, *action_spec.shape)
        self._observation_dtype = self.observation_spec.dtype

    def _observation(self, observation) -> torch.Tensor:
        return torch.as_tensor(observation, dtype=self._observation_dtype)

    def reset(self, mask: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
        options = None if mask is None else {"reset_mask": mask.reshape(-1).numpy()}
        observation, _ = self._env.reset(seed=seed, options=options)
        return self._observation(observation)

    def step(self, action: torch.Tensor) -> VectorStep:
        observation, reward, terminated, truncated, info = self._env.step(action.cpu().numpy())
        life_lost = None
        if self.reports_life_loss:
            life_lost = torch.as_tensor(info.get(LIFE_LOST_KEY, False), dtype=torch.bool).expand(self.num_envs)
        return VectorStep(self._observation(observation), torch.as_tensor(reward, dtype=torch.float32),
                          torch.as_tensor(terminated, dtype=torch.bool), torch.as_tensor(truncated, dtype=torch.bool),
                          life_lost)

    def seed(self, seed: int | None) -> None:
        # As torchrl's GymWrapper: seeding is a reset with the seed (sub-env i gets seed + i).
        self.reset(seed=seed)

    def close(self) -> None:
        self._env.close()

