"""An env that returns NaN, as a user meets it through ``python -m lit_impala fit``: with ``data.nonfinite_data``
``raise`` the run stops at once with one line naming the env, the actor, the sub-env and its step; with ``drop``
it trains on, and the observation statistics it ships and saves stay finite."""

import csv
import json
import re

import torch

from tests.cli_runner import assert_all_gone, run_lit_impala
from tests.conftest import REPO
from tests.faulty_envs import NONFINITE_AT_STEP

PENDULUM = str(REPO / "configs" / "pendulum.yaml")  # normalize_observations: true
CARTPOLE = str(REPO / "configs" / "cartpole.yaml")
NAN_OBSERVATION = "tests.faulty_envs:NaNObservationPendulum-v0"
NAN_REWARD = "tests.faulty_envs:NaNRewardCartPole-v0"
SMALL = ["--trainer.enable_progress_bar=false", "--episode_stats.stop_at_return=null", "--data.num_actors=1",
         "--data.envs_per_actor=4"]


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_a_nan_observation_stops_the_run_at_once_naming_the_env_and_the_actor(tmp_path):
    run = run_lit_impala(["fit", "--config", PENDULUM, f"--data.env_id={NAN_OBSERVATION}", "--trainer.logger=false",
                          "--trainer.callbacks=null", "--trainer.max_steps=1000", *SMALL], tmp_path)
    assert run.returncode == 1, run.tail()
    assert re.fullmatch(
        rf"error: actor 0 of env '{NAN_OBSERVATION}': sub-env 0 returned a non-finite observation \(nan in 1 of 3 "
        rf"components\) at its step {NONFINITE_AT_STEP} \(and 3 more sub-envs at the same step\)\. Stopping: "
        r"data.nonfinite_data=raise \(with data.nonfinite_data=drop .*\)\.",
        error_line(run.stderr),
    ), run.tail()
    assert "Traceback" not in run.output, run.tail()  # the actors' and the learner's: one line each instead
    assert "restarting the actors" not in run.output  # a deterministic fault: no restart
    assert run.spawned_actors == 1
    assert_all_gone(run.descendants)


def test_a_nan_reward_stops_a_run_whose_policy_is_served_in_the_learner(tmp_path):
    run = run_lit_impala(["fit", "--config", CARTPOLE, f"--data.env_id={NAN_REWARD}", "--data.inference=server",
                          "--trainer.logger=false", "--trainer.callbacks=null", "--trainer.max_steps=1000", *SMALL],
                         tmp_path)
    assert run.returncode == 1, run.tail()
    assert re.match(rf"error: actor 0 of env '{NAN_REWARD}': sub-env 0 returned a non-finite reward \(nan\) at its "
                    rf"step {NONFINITE_AT_STEP} ", error_line(run.stderr)), run.tail()
    assert "Traceback" not in run.output, run.tail()
    assert_all_gone(run.descendants)


def test_drop_trains_on_without_the_nan_unrolls_and_the_saved_statistics_are_finite(tmp_path):
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}
    run = run_lit_impala(["fit", "--config", PENDULUM, f"--data.env_id={NAN_OBSERVATION}", "--data.nonfinite_data=drop",
                          "--trainer.max_steps=10", "--trainer.log_every_n_steps=5",
                          "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                          f"--trainer.logger.save_dir={tmp_path / 'csv'}",
                          "--trainer.callbacks=" + json.dumps([checkpoint]), *SMALL], tmp_path)
    assert run.returncode == 0, run.tail()
    assert "Training stopped after 10 updates and 1600 env frames" in run.stdout, run.tail()
    assert re.search(rf"actor 0 of env '{NAN_OBSERVATION}': sub-env \d+ returned a non-finite observation .* at its "
                     rf"step {NONFINITE_AT_STEP}.*: replaced by 0, the episode ends there and its unroll is dropped",
                     run.stderr), run.tail()
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    dropped = [float(row["faults/unrolls_dropped"]) for row in csv.DictReader(metrics.open())
               if row.get("faults/unrolls_dropped")]
    # Each of the 4 sub-envs returns one NaN observation, at the same step: their 4 unrolls are dropped.
    assert dropped[-1] == 4 and dropped == sorted(dropped), dropped
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    statistics = {name: value for name, value in state.items() if ".normalizer." in name}
    assert statistics and all(torch.isfinite(value).all() for value in statistics.values()), statistics
    assert state["network.normalizer.count"].item() == 10 * 8 * 20  # every applied update's frames, once
    assert_all_gone(run.descendants)
