"""Fit: the whole ``fit`` loop at steady state, as a fraction of the ceiling measured in the same run.

Builds the run from the YAML exactly as ``python -m lit_impala fit`` does (logger and checkpoints
included), trains for ``--warmup`` seconds after the first batch (past start-up and the first weights),
then measures for ``--seconds``: env frames consumed by the learner per second, learner
updates per second, the fraction of wall time the learner waited for data, and the policy lag of the
batches it learnt from, and the mean episode length at the end (long episodes mean fewer env resets,
which cost the actors more than steps: ``--model.lr=1e-12`` holds the policy near its random init
for the worst case). The ceilings (see ``benchmarks.ceiling``: each env backend available) are measured
first, in this process, and the fit is reported against the best of them,
with the same env count and network. The config's ``EvaluationCallback`` is left out (see
``measure_fit``). The fit is measured once per inference mode (``--inference actor,server``: the policy in
each actor process, or one batched copy in the learner's process, ``data.inference``), one after the other.

    python -m benchmarks.fit --config configs/cartpole.yaml
"""

from __future__ import annotations

import argparse
import time

import lightning as L

from benchmarks.ceiling import available_backends, measure_ceiling
from benchmarks.common import build_run, print_table, write_result
from lit_impala.callbacks import EpisodeStats, EvaluationCallback


class ThroughputProbe(L.Callback):
    """Times learner steps; after ``warmup`` s it measures for ``seconds`` s, then stops the run."""

    def __init__(self, warmup: float, seconds: float):
        self.warmup, self.seconds = warmup, seconds
        self.first_batch_time = None
        self.window_start = None  # (time, env_frames, global_step) when measuring began
        self.window_end = None
        self.last_end = None
        self.wait_s = 0.0
        self.lags: list[float] = []
        self.max_lag = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now = time.perf_counter()
        if self.first_batch_time is None:
            self.first_batch_time = now
        if self.window_start is not None and self.last_end is not None:
            self.wait_s += now - self.last_end  # fetching this batch from the actors

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.last_end = now
        if self.window_start is None:
            if now - self.first_batch_time >= self.warmup:
                self.window_start = (now, EpisodeStats.of(trainer).env_frames, trainer.global_step)
            return
        lag = (trainer.global_step - 1) - batch.policy_version.float()  # the time-major Trajectory
        self.lags.append(lag.mean().item())
        self.max_lag = max(self.max_lag, int(lag.max().item()))
        if now - self.window_start[0] >= self.seconds:
            self.window_end = (now, EpisodeStats.of(trainer).env_frames, trainer.global_step)
            # Episode length sets how often envs reset, which costs the actors more than a step.
            lengths = EpisodeStats.of(trainer).episode_lengths
            self.mean_episode_length = sum(lengths) / len(lengths) if lengths else float("nan")
            trainer.should_stop = True

    def summary(self) -> dict:
        if self.window_end is None:
            raise RuntimeError("the run ended before the measuring window closed: raise trainer.max_steps")
        (t0, f0, s0), (t1, f1, s1) = self.window_start, self.window_end
        return {
            "seconds": t1 - t0,
            "frames": f1 - f0,
            "updates": s1 - s0,
            "frames_per_second": (f1 - f0) / (t1 - t0),
            "updates_per_second": (s1 - s0) / (t1 - t0),
            "learner_wait_fraction": self.wait_s / (t1 - t0),
            "policy_lag_mean": sum(self.lags) / len(self.lags),
            "policy_lag_max": self.max_lag,
            "mean_episode_length": self.mean_episode_length,
        }


def measure_fit(config: str, overrides: list[str], seconds: float, warmup: float) -> dict:
    # No early stop, and a step budget the window never reaches; the progress bar would only cost time.
    overrides = [
        "--episode_stats.stop_at_return=null",
        "--trainer.max_steps=1000000",
        "--trainer.enable_progress_bar=false",
        *overrides,
    ]
    cli = build_run(config, overrides)
    # Evaluation is a periodic side job whose cost depends on its own settings (episodes, video): it is
    # left out so the figure is the training pipeline's. time_to_solve keeps it.
    cli.trainer.callbacks[:] = [cb for cb in cli.trainer.callbacks if not isinstance(cb, EvaluationCallback)]
    probe = ThroughputProbe(warmup, seconds)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule)
    hp = cli.datamodule.hparams
    return {
        "config": config,
        "overrides": overrides,
        "env_id": hp.env_id,
        "env_backend": hp.env_backend,
        "inference": hp.inference,
        "num_actors": hp.num_actors,
        "envs_per_actor": hp.envs_per_actor,
        "frames_per_update": hp.unroll_length * hp.batch_size,
        "learner_device": str(cli.model.device),
        **probe.summary(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cartpole.yaml")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds at steady state")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of training before timing")
    parser.add_argument("--ceiling-seconds", type=float, default=10.0)
    parser.add_argument("--name", default="fit", help="result file name (results/<name>.json)")
    parser.add_argument("--inference", default="actor,server", help="inference modes to measure, comma-separated")
    args, overrides = parser.parse_known_args(argv)  # the rest: CLI overrides, e.g. --data.envs_per_actor=64
    overrides = [arg for arg in overrides if arg != "--"]

    probe = build_run(args.config, overrides).datamodule
    ceilings = [measure_ceiling(args.config, overrides, args.ceiling_seconds, backend=backend)
                for backend in available_backends(probe.hparams.env_id, probe.env_options)]
    del probe
    ceiling = max(ceilings, key=lambda c: c["frames_per_second"])  # the real limit: the fastest engine here
    fits = {mode: measure_fit(args.config, [*overrides, f"--data.inference={mode}"], args.seconds, args.warmup)
            for mode in args.inference.split(",")}
    ratios = {mode: fit["frames_per_second"] / ceiling["frames_per_second"] for mode, fit in fits.items()}
    first = next(iter(fits.values()))
    print_table(
        f"Fit at steady state vs the ceiling ({first['env_id']}, "
        f"{first['num_actors']} actors x {first['envs_per_actor']} envs, "
        f"{first['frames_per_update']} frames/update, actors on {first['env_backend']}, learner on "
        f"{first['learner_device']}; ceilings: "
        + ", ".join(f"{c['backend']} {c['frames_per_second']:,.0f}" for c in ceilings) + " frames/s)",
        [
            "inference",
            f"ceiling ({ceiling['backend']}) frames/s",
            "fit frames/s",
            "fit / ceiling",
            "updates/s",
            "learner waits",
            "lag mean",
            "lag max",
            "episode length",
        ],
        [
            [
                mode,
                ceiling["frames_per_second"],
                fit["frames_per_second"],
                ratios[mode],
                fit["updates_per_second"],
                f"{fit['learner_wait_fraction']:.0%}",
                fit["policy_lag_mean"],
                fit["policy_lag_max"],
                fit["mean_episode_length"],
            ]
            for mode, fit in fits.items()
        ],
    )
    best = max(ratios, key=ratios.get)
    result = {"ceiling": ceiling, "ceilings": ceilings, "fits": fits, "fit_over_ceiling_by_inference": ratios,
              # the better mode, under the names earlier results used
              "fit": fits[best], "fit_over_ceiling": ratios[best]}
    write_result(args.name, result)
    return result


if __name__ == "__main__":
    main()
