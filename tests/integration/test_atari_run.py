"""Atari end to end on CPU: the shipped Pong config through the CLI for a tiny budget, and the
life-loss flag reaching the learner's batches."""

import pytest
import torch

pytest.importorskip("ale_py", reason="Atari needs the atari extra: pip install -e '.[atari]'")

from lit_impala.callbacks import EpisodeStats
from lit_impala.cli import cli_main  # noqa: E402
from lit_impala.envs.factory import make_vector_env  # noqa: E402
from lit_impala.schema import to_time_major  # noqa: E402
from tests.cli_runner import run_lit_impala  # noqa: E402
from tests.conftest import REPO  # noqa: E402


def test_pong_config_trains_end_to_end_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main([
        "fit", "--config", str(REPO / "configs" / "atari.yaml"), "--data.env_id=ALE/Pong-v5",
        "--trainer.max_steps=4", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=null",
        "--data.num_actors=1", "--data.envs_per_actor=2", "--data.unroll_length=10", "--data.batch_size=2",
    ])
    module = cli.trainer.lightning_module
    assert cli.trainer.global_step == 4
    assert EpisodeStats.of(cli.trainer).env_frames == 4 * 10 * 2
    assert tuple(cli.datamodule.observation_shape) == (4, 84, 84)
    assert module.hparams.encoder == "resnet" and module.hparams.reward_clip == 1.0
    assert cli.datamodule.actors is None  # actors shut down


def test_atari_options_from_the_command_line_are_typed(tmp_path):
    """``--data.atari_options.screen_size 84`` is the number 84 (a string reached envpool's C++ and failed there
    with a TypeError); a value that is no number is one line naming it, exit 2, before any env is made."""
    config = str(REPO / "configs" / "atari_cpu.yaml")
    typed = run_lit_impala(["fit", "--config", config, "--data.atari_options.screen_size", "84", "--print_config"],
                           tmp_path, timeout_s=120)
    assert typed.returncode == 0, typed.stderr
    assert "    screen_size: 84\n" in typed.stdout and "frame_stack: 4" in typed.stdout
    wrong = run_lit_impala(["fit", "--config", config, "--data.atari_options.screen_size", "big"], tmp_path,
                           timeout_s=120)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().count("\n") == 0 and "data.atari_options" in wrong.stderr
    assert "Got value: big" in wrong.stderr
    assert wrong.spawned_actors == 0


def random_play(env_id: str, num_envs: int, steps: int, **options):
    """``steps`` random steps of the actors' batched env (seed 0), as the learner's ``Trajectory``."""
    env = make_vector_env(env_id, num_envs, seed=0, **options)
    try:
        rollout = env.rollout(steps, break_when_any_done=False)
    finally:
        env.close()
    # What the acting policy would add (a random rollout has no policy): only the env's keys matter here.
    rollout["policy_sample"] = rollout["action"]
    rollout["behaviour_log_prob"] = torch.zeros(rollout.shape)
    rollout["policy_version"] = torch.zeros(rollout.shape, dtype=torch.int64)
    return to_time_major(rollout)


def test_life_lost_reaches_the_trajectory():
    trajectory = random_play("ALE/Breakout-v5", 2, 400, atari_options={"terminal_on_life_loss": True})
    assert trajectory.life_lost is not None and trajectory.life_lost.shape == (400, 2)
    assert trajectory.life_lost.any(), "random Breakout play loses a life within 400 steps"
    assert not (trajectory.life_lost & trajectory.done).any()  # a life lost at game over is a game over
    assert trajectory.observation.dtype == torch.uint8  # frames stay uint8 until the learner's device


def test_rewards_clipped_for_learning_while_the_logged_return_is_the_raw_score():
    """SpaceInvaders pays 5-30 points per alien: the learner sees +1, the logged return the score."""
    from lit_impala.core.episode_boundaries import vtrace_step_inputs

    trajectory = random_play("ALE/SpaceInvaders-v5", 1, 3000)
    assert trajectory.reward.max() > 1, "random SpaceInvaders scores more than 1 point at a time"
    targets = vtrace_step_inputs(trajectory.reward, trajectory.terminated, trajectory.truncated,
                                torch.zeros_like(trajectory.reward), discount=0.99, reward_clip=1.0)
    not_truncated = ~trajectory.truncated
    assert targets.rewards[not_truncated].abs().max() <= 1.0
    # The first game's logged return (RewardSum) is the sum of its raw rewards.
    done_steps = trajectory.done[:, 0].nonzero().flatten()
    assert len(done_steps) >= 1, "a random game ends within 3000 steps"
    end = int(done_steps[0])
    assert trajectory.episode_return[end, 0].item() == trajectory.reward[: end + 1, 0].sum().item()
