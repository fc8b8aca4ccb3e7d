"""Histograms through whichever loggers the trainer has.

Lightning's ``self.log`` takes scalars only, and each logger has its own histogram call: W&B takes a
``wandb.Histogram`` in its metrics, TensorBoard has ``add_histogram``. Loggers with no histograms
(CSV) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def log_histograms(loggers: Iterable[Logger], histograms: dict[str, Sequence[float]], step: int) -> None:
    """Log each ``name -> values`` (a flat sequence of numbers) as a histogram at ``step``."""
    histograms = {name: np.asarray(values, dtype=np.float64) for name, values in histograms.items() if len(values)}
    if not histograms:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics({name: wandb.Histogram(values) for name, values in histograms.items()}, step=step)
        elif isinstance(logger, TensorBoardLogger):
            for name, values in histograms.items():
                logger.experiment.add_histogram(name, values, global_step=step)
