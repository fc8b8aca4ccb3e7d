"""The update metrics against hand computations: importance-weight statistics, lag, and how DDP reduces each."""

import math

import torch

from lit_impala.core.diagnostics import UpdateTensors, importance_weight_stats, update_metrics
from lit_impala.core.losses import LossTerms


def test_importance_weight_statistics_by_hand():
    rhos = torch.tensor([[0.5, 1.0], [2.0, 4.0]])  # [T=2, B=2]
    stats = importance_weight_stats(rhos, rho_bar=1.0, c_bar=3.0, pg_rho_bar=None)
    assert stats["rho/mean"].item() == 1.875 and stats["rho/min"].item() == 0.5 and stats["rho/max"].item() == 4.0
    assert stats["rho/clipped_by_rho_bar"].item() == 0.5  # 2 and 4 exceed 1
    assert stats["rho/clipped_by_c_bar"].item() == 0.25  # 4 exceeds 3
    assert stats["rho/clipped_by_pg_rho_bar"].item() == 0.0  # no threshold
    # ESS = (sum rho)^2 / (N sum rho^2) = 7.5^2 / (4 * 21.25)
    assert math.isclose(stats["rho/ess"].item(), 7.5**2 / (4 * 21.25), rel_tol=1e-6)
    assert importance_weight_stats(torch.ones(3, 2), 1.0, 1.0, 1.0)["rho/ess"].item() == 1.0  # on-policy


def test_update_metrics_say_how_ddp_reduces_them():
    update = UpdateTensors(
        log_rhos=torch.zeros(3, 2),
        policy_lag=torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]),
        terms=LossTerms(total=torch.tensor(1.0), policy=torch.tensor(2.0), baseline=torch.tensor(3.0),
                        entropy=torch.tensor(-0.5)),
        entropy=torch.full((3, 2), 0.7),
        baseline=torch.full((3, 2), 4.0),
    )
    metrics = update_metrics(update, 1.0, 1.0, 1.0)
    assert metrics["policy_lag/max"][0].item() == 5.0 and metrics["policy_lag/max"][1] == "max"
    assert metrics["rho/min"][1] == "min" and metrics["rho/max"][1] == "max"
    assert metrics["policy_lag/mean"][0].item() == 2.5
    assert metrics["loss/baseline"][0].item() == 3.0 and metrics["train/value_mean"][0].item() == 4.0
    assert {reduce for name, (_, reduce) in metrics.items() if name not in ("policy_lag/max", "rho/max", "rho/min")} \
        == {"mean"}
