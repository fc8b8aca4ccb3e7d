"""``data.max_policy_lag`` with a learner slower than its actors: the shipped CartPole config, real actor
processes. Without the bound the queued rollouts reach the learner several updates old; with it, no batch is
learnt from more than ``max_policy_lag`` + 1 updates after the weights that began its oldest unroll (the one
update is the batch Lightning fetches ahead), and the unrolls dropped are counted and logged."""

import time

import lightning as L

from lit_impala.cli import cli_main
from tests.conftest import REPO
from tests.integration.test_faults import spawned_children

CONFIG = str(REPO / "configs" / "cartpole.yaml")
ACTORS = 4  # each actor's rollout is one whole batch: with a slow learner, up to 4 queued batches


class SlowLearnerProbe(L.Callback):
    """Slows each update by ``sleep_s`` and records, per update, how far behind the learner the weights that began
    the batch's oldest unroll are."""

    def __init__(self, sleep_s: float):
        self.sleep_s = sleep_s
        self.lags: list[int] = []
        self.logged_dropped: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lags.append(trainer.global_step - int(batch.policy_version[0].min()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.sleep_s)
        if "policy_lag/unrolls_dropped" in trainer.callback_metrics:
            self.logged_dropped.append(float(trainer.callback_metrics["policy_lag/unrolls_dropped"]))


def fit_slowly(tmp_path, *overrides) -> tuple[SlowLearnerProbe, object]:
    cli = cli_main(["--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                    "--trainer.max_steps=40", "--trainer.log_every_n_steps=5", "--episode_stats.stop_at_return=null",
                    f"--data.num_actors={ACTORS}", "--data.envs_per_actor=4", "--data.unroll_length=10",
                    "--data.batch_size=4", *overrides], run=False)
    probe = SlowLearnerProbe(sleep_s=0.1)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 40
    assert not spawned_children(), "actor processes left behind"
    return probe, cli.datamodule


def test_without_a_bound_a_slow_learner_learns_from_old_unrolls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probe, data = fit_slowly(tmp_path)
    assert max(probe.lags[10:]) >= 3, probe.lags  # the setting the next test bounds: queued batches are old
    assert data.unrolls_too_old == 0


def test_max_policy_lag_drops_the_old_unrolls_and_counts_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probe, data = fit_slowly(tmp_path, "--data.max_policy_lag=1")
    assert max(probe.lags) <= 1 + 1, probe.lags
    assert data.unrolls_too_old > 0
    assert probe.logged_dropped and probe.logged_dropped[-1] > 0
