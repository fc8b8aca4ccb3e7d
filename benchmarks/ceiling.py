"""Ceiling: the frames/s these cores can step the config's envs with its policy network, nothing else.

For each env backend: as many envs as all actors together (``num_actors x envs_per_actor``) in one
vector env, stepped in a tight loop with actions sampled from the config's network (forward, sample,
log-prob: the work an actor does per step, on one torch thread), no learning, no torchrl, no actor
processes. ``gymnasium``: a ``SyncVectorEnv`` of the same envs the actors build. ``envpool``: one envpool
(its C++ threads: one per core) with the options the envpool backend maps, where envpool has the env.
The ``fit`` benchmark reports its frames/s as a fraction of the best of these.

    python -m benchmarks.ceiling --config configs/cartpole.yaml
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from functools import partial

import gymnasium as gym
import numpy as np
import torch

from benchmarks.common import build_run, print_table, write_result
from lit_impala.envs.factory import make_gym_env


def available_backends(env_id: str, env_options: dict) -> list[str]:
    """The backends that can run ``env_id`` here (envpool: installed, and has the env)."""
    backends = ["gymnasium"]
    if importlib.util.find_spec("envpool") is not None:
        from lit_impala.envs.envpool import envpool_config

        try:
            envpool_config(env_id, **env_options)
            backends.append("envpool")
        except ValueError:
            pass
    return backends


def _vector_env(backend: str, env_id: str, env_options: dict, num_envs: int):
    # The engine alone, without torchrl: a backend of lit_impala.envs.factory.BACKENDS added here to be measured.
    if backend == "envpool":
        from lit_impala.envs.envpool import envpool_config, import_envpool

        task_id, kwargs, _ = envpool_config(env_id, **env_options)
        return import_envpool().make(task_id, env_type="gymnasium", num_envs=num_envs, num_threads=os.cpu_count(),
                                     **kwargs)
    return gym.vector.SyncVectorEnv(
        [partial(make_gym_env, env_id, check_env=False, **env_options) for _ in range(num_envs)]
    )


def measure_ceiling(
    config: str, overrides: list[str], seconds: float, num_envs: int | None = None, backend: str = "gymnasium"
) -> dict:
    cli = build_run(config, overrides)
    data, network = cli.datamodule, cli.model.network.eval()
    hp = data.hparams
    num_envs = num_envs or hp.num_actors * hp.envs_per_actor
    env = _vector_env(backend, hp.env_id, data.env_options, num_envs)
    distribution = network.distribution
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each actor process: one core steps the envs and runs the net
    try:
        observation, _ = env.reset(seed=0) if backend == "gymnasium" else env.reset()
        core_state = network.initial_state(num_envs) if network.use_lstm else None
        is_init = torch.ones(1, num_envs, dtype=torch.bool)

        def step(observation, core_state, is_init):
            with torch.no_grad():
                output = network(torch.from_numpy(observation).unsqueeze(0), core_state, is_init)
                params = output.policy_params[0]
                sample = distribution.sample(params)
                distribution.log_prob(params, sample)
                action = distribution.to_env_action(sample).numpy()
            observation, _reward, terminated, truncated, _ = env.step(action)
            core_state = None if output.core_states is None else (output.core_states[0][0], output.core_states[1][0])
            return observation, core_state, torch.from_numpy(np.logical_or(terminated, truncated)).unsqueeze(0)

        for _ in range(200):  # warm-up
            observation, core_state, is_init = step(observation, core_state, is_init)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            observation, core_state, is_init = step(observation, core_state, is_init)
            steps += 1
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)
        env.close()
    return {
        "config": config,
        "overrides": overrides,
        "env_id": hp.env_id,
        "backend": backend,
        "num_envs": num_envs,
        "seconds": elapsed,
        "frames": steps * num_envs,
        "frames_per_second": steps * num_envs / elapsed,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds after a warm-up")
    args, overrides = parser.parse_known_args(argv)  # the rest: CLI overrides, e.g. --data.envs_per_actor=64
    overrides = [arg for arg in overrides if arg != "--"]
    cli = build_run(args.config, overrides)
    backends = available_backends(cli.datamodule.hparams.env_id, cli.datamodule.env_options)
    results = [measure_ceiling(args.config, overrides, args.seconds, backend=backend) for backend in backends]
    print_table(
        "Ceiling: one vector env + the policy network, tight loop, 1 torch thread",
        ["env", "backend", "envs", "frames/s"],
        [[r["env_id"], r["backend"], r["num_envs"], r["frames_per_second"]] for r in results],
    )
    result = {"backends": results, "best": max(results, key=lambda r: r["frames_per_second"])}
    write_result("ceiling", result)
    return result


if __name__ == "__main__":
    main()
