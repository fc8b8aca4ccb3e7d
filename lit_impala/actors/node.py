"""What runs on a remote actor host: the acting policy whose weights torchrl's weight sync writes, the env
factory each node builds, and ``python -m lit_impala.remote`` for nodes started by hand.

The learner side (``actors.remote``) starts nodes itself with the "mp" and "submitit" launchers; with
"external" each host runs ``python -m lit_impala.remote --learner HOST --port P --rank R --world-size N+1``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal

import torch
from torch import nn
from torchrl.collectors.distributed.generic import _distributed_init_delayed
from torchrl.envs import EnvBase

from lit_impala.actors.policy import ActingPolicy
from lit_impala.envs.factory import make_vector_env


class RemoteActingPolicy(ActingPolicy):
    """``ActingPolicy`` whose weights *and* version are written by torchrl's weight sync.

    Writes the same keys as ``ActingPolicy`` (``action``, ``policy_sample``, ``behaviour_log_prob``,
    ``policy_version`` and, with an LSTM core, ``core_state_h`` / ``core_state_c``). The version is
    the registered int64 buffer ``policy_version``, part of ``TensorDict.from_module(policy)``: the
    learner sets it together with the weights (``load_learner_weights``) and torchrl sends both.
    """

    def __init__(self, network: nn.Module):
        super().__init__(network.requires_grad_(False), mailbox=None)
        self.register_buffer("policy_version", torch.zeros((), dtype=torch.int64))

    def _refresh_weights(self) -> None:
        # No mailbox: torchrl's weight receiver writes straight into self.network and the buffer.
        self._version = int(self.policy_version)

    @torch.no_grad()
    def load_learner_weights(self, network: nn.Module, version: int) -> None:
        """Copy ``network``'s weights (any device) into this CPU copy and tag them ``version``."""
        self.network.load_state_dict(network.state_dict())
        self.policy_version.fill_(version)


def _is_actor_node() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_rank() != 0


def make_remote_env(env_id: str, num_envs: int, seed: int | None, env_options: dict) -> EnvBase:
    """``make_vector_env`` as run by each node (module-level: it is pickled to the nodes).

    torchrl also builds one copy in the learner (rank 0) to size its receive buffers.
    """
    if _is_actor_node():
        torch.set_num_threads(1)  # as for local actors: one thread per actor
        if multiprocessing.parent_process() is not None:
            # Started by the "mp" launcher: Ctrl-C reaches the learner's whole process group, and
            # the learner stops its nodes itself after its last update (as for local actors).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return make_vector_env(env_id, num_envs, seed, **env_options)


def run_actor_node(learner: str, port: int, rank: int, world_size: int, backend: str = "gloo") -> None:
    """Serve as actor node ``rank`` of a learner started with ``launcher="external"``.

    Joins the learner at ``learner:port``, receives the env factory and the policy from it
    (pickled: run nodes only for a learner you trust), collects until the learner shuts it down.
    """
    _distributed_init_delayed(rank, backend, learner, port, world_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_impala.remote", description=run_actor_node.__doc__)
    parser.add_argument("--learner", required=True, help="host name or IP address of the learner")
    parser.add_argument("--port", type=int, required=True, help="the learner's data.remote_tcp_port")
    parser.add_argument("--rank", type=int, required=True, help="this node's rank, 1 .. world size - 1")
    parser.add_argument("--world-size", type=int, required=True, help="number of actor nodes + 1 (the learner)")
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args(argv)
    if not 1 <= args.rank < args.world_size:
        parser.error(f"--rank must be in 1 .. {args.world_size - 1}")
    run_actor_node(args.learner, args.port, args.rank, args.world_size, args.backend)


if __name__ == "__main__":
    main()
