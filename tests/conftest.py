from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _torch_threads():
    # The actors and the learner share two cores in CI; keep the test process on one thread.
    torch.set_num_threads(1)


