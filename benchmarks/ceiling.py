"""Ceiling: the frames/s these cores can step the config's envs with its policy network, nothing else.

One gymnasium ``SyncVectorEnv`` holding as many envs as all actors together (``num_actors x
envs_per_actor``), stepped in a tight loop with actions sampled from the config's network (forward,
sample, log-prob: the work an actor does per step), no learning, no torchrl, no processes. The
``fit`` benchmark reports its frames/s as a fraction of this figure.

    python -m benchmarks.ceiling --config configs/cartpole.yaml
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import gymnasium as gym
import numpy as np
import torch

from benchmarks.common import build_run, print_table, write_result
from lit_impala.envs.factory import make_gym_env


def measure_ceiling(config: str, overrides: list[str], seconds: float, num_envs: int | None = None) -> dict:
    cli = build_run(config, overrides)
    data, network = cli.datamodule, cli.model.network.eval()
    hp = data.hparams
    num_envs = num_envs or hp.num_actors * hp.envs_per_actor
    env = gym.vector.SyncVectorEnv(
        [partial(make_gym_env, hp.env_id, check_env=False, **data.env_options) for _ in range(num_envs)]
    )
    distribution = network.distribution
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each actor process: one core steps the envs and runs the net
    try:
        observation, _ = env.reset(seed=0)
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
    result = measure_ceiling(args.config, overrides, args.seconds)
    print_table(
        "Ceiling: one sync vector env + the policy network, tight loop, 1 thread",
        ["env", "envs", "frames/s"],
        [[result["env_id"], result["num_envs"], result["frames_per_second"]]],
    )
    write_result("ceiling", result)
    return result


if __name__ == "__main__":
    main()
