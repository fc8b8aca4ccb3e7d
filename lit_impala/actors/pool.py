"""The one interface every actor back-end offers the learner's data module.

An ``ActorPool`` yields rollouts ``[envs_per_actor, unroll_length]`` as its actors finish them, takes the
learner's new weights, and shuts its actors down. Back-ends: ``actors.local.LocalActors`` (processes on
this machine, torchrl's multi-process collector) and ``actors.remote.RemoteActors`` (torch.distributed
nodes, torchrl's distributed collector). Each deals with its own failures; what it did is in
``restarts`` and ``lost``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

from tensordict import TensorDictBase
from torch import nn

from lit_impala.envs.factory import actor_seeds


class ActorSpec(NamedTuple):
    """What every actor back-end builds its actors from (``ImpalaDataModule.start_actors`` makes it): ``num_actors``
    processes or nodes, each stepping ``envs_per_actor`` copies of the env and sending ``[envs_per_actor,
    unroll_length]`` rollouts, every actor's envs seeded apart from ``seed`` and the DDP ``rank``."""

    env_id: str
    num_actors: int
    envs_per_actor: int
    unroll_length: int
    seed: int = 0
    rank: int = 0
    env_options: dict | None = None  # envs.factory.make_vector_env's keyword options (backend, nonfinite_data, ...)

    @property
    def frames_per_rollout(self) -> int:
        return self.envs_per_actor * self.unroll_length

    def actor_seeds(self) -> list[int]:
        """One env seed per actor, distinct across actors and DDP ranks."""
        return actor_seeds(self.seed, self.num_actors, self.rank)


@runtime_checkable
class ActorPool(Protocol):
    restarts: int  # times the pool restarted failed actors (local back-end)
    lost: int  # actors lost for good and not replaced (remote back-end)

    def __iter__(self) -> Iterator[TensorDictBase]:
        """Rollouts ``[envs_per_actor, unroll_length]``, in the order the actors finish them; endless.
        Raises ``RuntimeError`` naming the cause when the actors can deliver no more."""

    def publish_weights(self, network: nn.Module, version: int) -> None:
        """Make ``network``'s weights (any device), tagged ``version``, the ones the actors act with next."""

    def shutdown(self) -> None:
        """Stop every actor process; safe to call more than once."""
