"""Real learning: IMPALA solves CartPole-v1 to a mean return of 195 on 2 CPU cores."""

import pytest

from lit_impala.callbacks import EpisodeStats
from lit_impala.cli import cli_main
from tests.conftest import REPO

PPO_OPTIONS = (  # the options mujoco.yaml takes, on CartPole: Adam, normalised advantages, clipped minibatch passes
    "--model.optimizer=adam", "--model.loss_reduction=mean", "--model.lr=0.001", "--model.max_grad_norm=0.5",
    "--model.normalize_advantages=true", "--model.policy_clip=0.2", "--data.passes_per_batch=2",
    "--data.minibatches_per_pass=2", "--trainer.max_steps=6000",
)


@pytest.mark.parametrize("inference, loss", [("actor", ()), ("server", ()),
                                             # APPO: 2 clipped passes over each batch, updates counted per pass
                                             ("actor", ("--model.policy_clip=0.2", "--data.passes_per_batch=2")),
                                             ("actor", PPO_OPTIONS)],
                         ids=["actor", "server", "actor-appo", "actor-ppo-options"])
def test_cartpole_reaches_195(tmp_path, monkeypatch, inference, loss):
    monkeypatch.chdir(tmp_path)
    cli = cli_main([
        "fit", "--config", str(REPO / "configs" / "cartpole.yaml"),
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=null",
        "--trainer.max_steps=1500",  # budget: 960K frames; it usually stops near 200K
        "--episode_stats.stop_at_return=195",
        f"--data.inference={inference}", *loss,
    ])
    stats = EpisodeStats.of(cli.trainer)
    assert len(stats.episode_returns) == 100
    assert stats.mean_return >= 195, f"mean return {stats.mean_return:.1f} after {stats.env_frames} frames"
    assert cli.trainer.global_step < cli.trainer.max_steps  # stopped because it learned, not for the budget
