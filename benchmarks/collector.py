"""Collector: the actor pipeline alone (torchrl collector + ``UnrollStream``), no learner.

Starts the config's actor processes exactly as ``fit`` does, publishes the initial weights once,
and drains learner batches as fast as they come; frames/s is measured after a warm-up.

    python -m benchmarks.collector --config configs/cartpole.yaml
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import build_run, print_table, write_result
from lit_impala.data import UnrollStream


def measure_collector(config: str, overrides: list[str], seconds: float, warmup: float) -> dict:
    cli = build_run(config, overrides)
    data, model = cli.datamodule, cli.model
    hp = data.hparams
    started = time.perf_counter()
    data.start_actors(model.network, model.network_factory)
    try:
        stream = iter(UnrollStream(data.actors, hp.batch_size))  # the same path fit reads
        next(stream)
        first_batch_s = time.perf_counter() - started
        warm_until = time.perf_counter() + warmup
        while time.perf_counter() < warm_until:
            next(stream)
        frames, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(stream)
            frames += batch.numel()
        elapsed = time.perf_counter() - start
    finally:
        data.stop_actors()
    return {
        "config": config,
        "overrides": overrides,
        "env_id": hp.env_id,
        "num_actors": hp.num_actors,
        "envs_per_actor": hp.envs_per_actor,
        "unroll_length": hp.unroll_length,
        "batch_size": hp.batch_size,
        "startup_to_first_batch_s": first_batch_s,
        "seconds": elapsed,
        "frames": frames,
        "frames_per_second": frames / elapsed,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds at steady state")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds drained before timing")
    args, overrides = parser.parse_known_args(argv)  # the rest: CLI overrides, e.g. --data.envs_per_actor=64
    overrides = [arg for arg in overrides if arg != "--"]
    result = measure_collector(args.config, overrides, args.seconds, args.warmup)
    print_table(
        "Collector: actors + UnrollStream, no learner",
        ["env", "actors x envs", "T", "frames/s", "start-up s"],
        [[result["env_id"], f"{result['num_actors']} x {result['envs_per_actor']}", result["unroll_length"],
          result["frames_per_second"], result["startup_to_first_batch_s"]]],
    )
    write_result("collector", result)
    return result


if __name__ == "__main__":
    main()
