"""UnrollStream: actor rollouts regrouped into learner batches of exactly ``batch_size`` unrolls, each batch
handed out ``passes`` times with every pass after the first marked as a replay; unrolls holding a step marked
non-finite by their env are dropped first."""

import pytest
import torch
from tensordict import TensorDict

from lit_impala.data import UnrollStream
from lit_impala.schema import NONFINITE_KEY, OBSERVATION_KEY, REPLAYED_KEY, is_replayed

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


def test_unrolls_holding_a_nonfinite_step_are_dropped_and_counted_and_batches_stay_exact():
    marked = rollouts([4, 4, 4])
    for rollout in marked:  # as data.nonfinite_data: drop writes them: [n, T] at the root and after the action
        rollout.set(NONFINITE_KEY, torch.zeros(rollout.batch_size, dtype=torch.bool))
        rollout.set(("next", NONFINITE_KEY), torch.zeros(rollout.batch_size, dtype=torch.bool))
    marked[0].get(("next", NONFINITE_KEY))[1, 3] = True  # unroll 1: a NaN reward or observation after step 3
    marked[1].get(NONFINITE_KEY)[2, 0] = True  # unroll 6: a NaN first observation (a reset)
    marked[1].get(("next", NONFINITE_KEY))[2, 4] = True  # ... and one more in the same unroll
    stream = UnrollStream(marked, batch_size=3)
    batches = list(stream)
    assert [unroll_ids(b) for b in batches] == [[0, 2, 3], [4, 5, 7], [8, 9, 10]]  # 11 waits for the next rollout
    assert stream.unrolls_dropped == 2
    assert all(tuple(b.batch_size) == (3, T) for b in batches)
    assert not any(NONFINITE_KEY in b.keys() or ("next", NONFINITE_KEY) in b.keys(True) for b in batches)
