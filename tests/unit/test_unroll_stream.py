"""UnrollStream: actor rollouts regrouped into learner batches of exactly ``batch_size`` unrolls, each batch
handed out ``passes`` times with every pass after the first marked as a replay."""

import pytest
import torch
from tensordict import TensorDict

from lit_impala.data import UnrollStream
from lit_impala.schema import OBSERVATION_KEY, REPLAYED_KEY, is_replayed

T = 5


def rollouts(sizes: list[int]) -> list[TensorDict]:
    """Rollouts ``[n, T]`` whose observations number the unrolls 0, 1, 2, ... in arrival order."""
    out, first = [], 0
    for n in sizes:
        ids = torch.arange(first, first + n, dtype=torch.float32)
        out.append(TensorDict({OBSERVATION_KEY: ids[:, None, None].expand(n, T, 1).clone()}, batch_size=[n, T]))
        first += n
    return out


def unroll_ids(batch) -> list[int]:
    return batch.get(OBSERVATION_KEY)[:, 0, 0].long().tolist()


def test_unrolls_are_regrouped_in_order_never_dropped_never_repeated():
    batches = list(UnrollStream(rollouts([4, 4, 4]), batch_size=3))
    assert [unroll_ids(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert not any(is_replayed(b) for b in batches)
    assert all(tuple(b.batch_size) == (3, T) for b in batches)


@pytest.mark.parametrize("passes", [2, 4])
def test_each_batch_comes_passes_times_in_a_row_and_the_repeats_are_marked(passes):
    batches = list(UnrollStream(rollouts([4, 4]), batch_size=4, passes=passes))
    assert [unroll_ids(b) for b in batches] == [[0, 1, 2, 3]] * passes + [[4, 5, 6, 7]] * passes
    assert [is_replayed(b) for b in batches] == ([False] + [True] * (passes - 1)) * 2
    assert all(b.get(REPLAYED_KEY).shape == (4, T) for b in batches)
    # A repeat is the same frames, not a copy of them.
    assert batches[1].get(OBSERVATION_KEY).data_ptr() == batches[0].get(OBSERVATION_KEY).data_ptr()
