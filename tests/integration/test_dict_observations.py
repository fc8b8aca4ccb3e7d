"""A dict observation (image + vector) with an action mask, end to end as a user runs it: the shipped CartPole
config pointed at ``tests.masked_envs:MaskedTarget-v0`` learns to a mean return of 9.5 (of at most 10; acting at
random over the legal actions earns 5) with real actor processes, never taking an illegal action, counted by the
envs themselves; ``test`` plays the checkpoint. Without ``data.action_mask_key`` the same envs count illegal
actions: the count can fail."""

from __future__ import annotations

import re

import pytest

from tests.cli_runner import run_lit_impala
from tests.conftest import REPO
from tests.masked_envs import LOG_DIR_ENV, illegal_action_counts

CONFIG = str(REPO / "configs" / "cartpole.yaml")
ENV = ["--data.env_id=tests.masked_envs:MaskedTarget-v0", "--model.encoder=minatar"]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
TARGET_RETURN = 9.5


@pytest.mark.slow
def test_a_masked_dict_observation_env_learns_and_never_takes_an_illegal_action(tmp_path):
    log_dir = tmp_path / "illegal"
    log_dir.mkdir()
    fit = run_lit_impala(["fit", "--config", CONFIG, *ENV, "--data.action_mask_key=action_mask", *QUIET,
                          f"--episode_stats.stop_at_return={TARGET_RETURN}", "--trainer.max_steps=400"],
                         cwd=tmp_path, timeout_s=300, env={LOG_DIR_ENV: str(log_dir)})
    assert fit.returncode == 0, fit.tail()
    reached = re.search(r"Reached a mean return of ([\d.]+) over the last 100 episodes \(target ([\d.]+)\)", fit.output)
    assert reached and float(reached[1]) >= TARGET_RETURN == float(reached[2]), fit.tail()  # it may stop above it (9.6)
    steps, illegal = illegal_action_counts(log_dir)
    assert steps > 10_000 and illegal == 0, (steps, illegal)

    played = run_lit_impala(["test", "--config", CONFIG, *ENV, "--data.action_mask_key=action_mask", *QUIET,
                             "--ckpt_path=last", "--data.test_episodes=3"], cwd=tmp_path, timeout_s=180)
    assert played.returncode == 0, played.tail()
    returns = [float(r) for r in re.findall(r"Test episode \d+: return ([\d.]+)", played.output)]
    assert len(returns) == 3 and min(returns) >= 8, played.tail()


@pytest.mark.slow
def test_without_the_mask_the_same_envs_count_illegal_actions(tmp_path):
    log_dir = tmp_path / "illegal"
    log_dir.mkdir()
    fit = run_lit_impala(["fit", "--config", CONFIG, *ENV, *QUIET, "--episode_stats.stop_at_return=null",
                          "--trainer.max_steps=5"], cwd=tmp_path, timeout_s=180, env={LOG_DIR_ENV: str(log_dir)})
    assert fit.returncode == 0, fit.tail()
    steps, illegal = illegal_action_counts(log_dir)
    assert steps > 0 and illegal > steps / 10, (steps, illegal)  # half the actions are illegal


def test_a_mask_key_the_env_lacks_is_one_line_before_any_actor_starts(tmp_path):
    run = run_lit_impala(["fit", "--config", CONFIG, *ENV, "--data.action_mask_key=legal_moves", *QUIET],
                         cwd=tmp_path, timeout_s=120)
    assert run.returncode == 2, run.tail()
    assert "action_mask_key 'legal_moves' is not an entry of the observation space" in run.stderr
    assert "Traceback" not in run.output and run.spawned_actors == 0
