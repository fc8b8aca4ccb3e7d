"""Remote actor nodes that send corrupt rollouts on purpose, importable by the nodes as ``tests.faulty_remote``.

The corruption bypasses the envs (whose values are checked at the source on the actors' side): the node's
policy writes impossible log-probabilities, or a node's env factory builds one env too many, so that its
rollouts have another shape than the learner's receive buffers.
"""

from __future__ import annotations

import torch

from lit_impala.actors.node import make_remote_env

NAN_AT_CALL, POSITIVE_AT_CALL = 15, 35  # the node's policy steps whose log-probabilities are corrupted


def _on_node(rank: int | None = None) -> bool:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        return False
    return rank is None or torch.distributed.get_rank() == rank


class CorruptLogProbs:
    """Wraps an action distribution; on an actor node, its ``NAN_AT_CALL``-th ``log_prob`` is NaN and its
    ``POSITIVE_AT_CALL``-th is above 0 (a probability above 1). The learner's copy is left alone."""

    def __init__(self, distribution):
        self.distribution = distribution
        self.calls = 0

    def __getattr__(self, name):
        if name.startswith("__") or name == "distribution":  # unpickling looks up attributes before __dict__ is set
            raise AttributeError(name)
        return getattr(self.distribution, name)

    def log_prob(self, params, sample):
        log_prob = self.distribution.log_prob(params, sample)
        if not _on_node():
            return log_prob
        self.calls += 1
        if self.calls == NAN_AT_CALL:
            return torch.full_like(log_prob, float("nan"))
        if self.calls == POSITIVE_AT_CALL:
            return log_prob + 2.0
        return log_prob


def corrupting_network(network_factory):
    """``network_factory()`` whose distribution is wrapped in ``CorruptLogProbs`` (same weights and keys)."""
    network = network_factory()
    network.distribution = CorruptLogProbs(network.distribution)
    return network


def one_env_too_many_on_node_2(env_id, num_envs, seed, env_options):
    """``make_remote_env`` with ``num_envs + 1`` envs on node 2: its rollouts are ``[N + 1, T']``."""
    return make_remote_env(env_id, num_envs + 1 if _on_node(rank=2) else num_envs, seed, env_options)
