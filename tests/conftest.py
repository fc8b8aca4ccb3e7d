from pathlib import Path

import pytest
import torch

from lit_impala.actors.preloaded_start import start_preloaded_forkserver

# The actors of every in-process run are forks of one server that imported torch and torchrl once, as the command's
# are (lit_impala.actors.preloaded_start): each run saves its actors' ~3.5 s of imports. Before torchrl is imported.
start_preloaded_forkserver()

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _torch_threads():
    # The actors and the learner share two cores in CI; keep the test process on one thread.
    torch.set_num_threads(1)


