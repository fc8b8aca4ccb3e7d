"""UnrollStream: actor rollouts regrouped into learner batches of exactly ``batch_size`` unrolls, each batch
handed out ``passes`` times with every pass after the first marked as a replay, each pass whole or split into
``minibatches`` of whole unrolls in a fresh random order; unrolls holding a step marked non-finite by their env,
and with ``max_policy_lag`` unrolls begun too many versions behind the newest weights, are dropped first."""

import pytest
import torch
from tensordict import TensorDict

from lit_impala.data import UnrollStream, minibatch_indices
from lit_impala.schema import NONFINITE_KEY, OBSERVATION_KEY, POLICY_VERSION_KEY, REPLAYED_KEY, is_replayed

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


@pytest.mark.parametrize("passes, minibatches", [(1, 2), (3, 4), (2, 8)])
def test_each_pass_is_split_into_minibatches_that_partition_the_batch(passes, minibatches):
    stream = UnrollStream(rollouts([8, 8]), batch_size=8, passes=passes, minibatches=minibatches, seed=3)
    items = list(stream)
    assert len(items) == 2 * passes * minibatches  # one learner update each
    assert all(tuple(b.batch_size) == (8 // minibatches, T) for b in items)
    assert all(b.get(REPLAYED_KEY).shape == (8 // minibatches, T) for b in items)
    for first, batch_ids in ((0, range(0, 8)), (passes * minibatches, range(8, 16))):
        passes_ids = []
        for learning_pass in range(passes):
            start = first + learning_pass * minibatches
            minibatches_of_pass = items[start : start + minibatches]
            ids = [i for b in minibatches_of_pass for i in unroll_ids(b)]
            assert sorted(ids) == list(batch_ids)  # every unroll of the batch exactly once per pass
            assert [is_replayed(b) for b in minibatches_of_pass] == [learning_pass > 0] * minibatches
            passes_ids.append(ids)
        # A fresh order each pass (8! orders: two equal ones would be a bug, not chance).
        assert len({tuple(ids) for ids in passes_ids}) == passes
    # An unroll moves whole: its T steps stay together, in time order.
    for b in items:
        observation = b.get(OBSERVATION_KEY)
        assert torch.equal(observation, observation[:, :1].expand_as(observation))


def test_the_minibatch_order_is_reproducible_from_the_seed():
    def order(seed):
        return [unroll_ids(b) for b in UnrollStream(rollouts([8, 8]), batch_size=8, passes=2, minibatches=2, seed=seed)]

    assert order(5) == order(5)
    assert order(5) != order(6)
    generator = torch.Generator().manual_seed(0)
    indices = minibatch_indices(6, 3, generator)
    assert [len(i) for i in indices] == [2, 2, 2] and sorted(torch.cat(indices).tolist()) == list(range(6))


def test_one_minibatch_per_pass_is_the_batch_itself_in_arrival_order():
    """minibatches=1 (the default) is the stream without minibatches: no gather, no shuffle."""
    batches = list(UnrollStream(rollouts([4, 4]), batch_size=4, passes=2, minibatches=1, seed=9))
    assert [unroll_ids(b) for b in batches] == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2
    assert batches[1].get(OBSERVATION_KEY).data_ptr() == batches[0].get(OBSERVATION_KEY).data_ptr()


def test_a_batch_that_does_not_split_into_whole_unrolls_is_refused():
    with pytest.raises(ValueError, match="batch_size 6 does not split into 4 minibatches"):
        UnrollStream(rollouts([6]), batch_size=6, minibatches=4)


def with_versions(rollout: TensorDict, first_step_versions: list[int]) -> TensorDict:
    """Each unroll acted with weights of version v at its first step and v + 1 from its third step on."""
    versions = torch.tensor(first_step_versions)[:, None].expand(rollout.batch_size).clone()
    versions[:, 2:] += 1
    return rollout.set(POLICY_VERSION_KEY, versions)


def test_unrolls_begun_more_than_max_policy_lag_versions_behind_are_dropped_and_counted():
    latest = {"version": 10}
    arriving = rollouts([4, 4, 4])
    with_versions(arriving[0], [10, 8, 7, 9])  # lags 0, 2, 3, 1 at their first step
    with_versions(arriving[1], [6, 10, 10, 8])  # lags 4, 0, 0, 2
    with_versions(arriving[2], [11, 11, 9, 11])  # arrive after the learner moved to 12: lags 1, 1, 3, 1

    def moving(items):
        for index, item in enumerate(items):
            latest["version"] = 10 if index < 2 else 12
            yield item

    stream = UnrollStream(moving(arriving), batch_size=3, max_policy_lag=2, latest_version=lambda: latest["version"])
    batches = list(stream)
    # Dropped: 2 (lag 3), 4 (lag 4), 10 (lag 3); the lag is measured at the unroll's first, oldest step.
    assert [unroll_ids(b) for b in batches] == [[0, 1, 3], [5, 6, 7], [8, 9, 11]]
    assert stream.unrolls_too_old == 3 and stream.unrolls_dropped == 0


def test_without_max_policy_lag_no_unroll_is_dropped_for_its_age():
    arriving = [with_versions(rollout, [0] * 4) for rollout in rollouts([4, 4])]
    stream = UnrollStream(arriving, batch_size=4, latest_version=lambda: 1000)
    assert [unroll_ids(b) for b in stream] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert stream.unrolls_too_old == 0


def test_max_policy_lag_needs_the_latest_version():
    with pytest.raises(ValueError, match="latest_version"):
        UnrollStream([], batch_size=2, max_policy_lag=1)


def test_an_unroll_left_over_from_a_batch_is_dropped_once_it_has_aged_past_the_bound():
    latest = {"version": 5}
    arriving = [with_versions(rollout, [5, 5, 5]) for rollout in rollouts([3, 3])]

    def moving(items):
        yield items[0]  # a batch of 2 and unroll 2 left over, at version 5
        latest["version"] = 9  # the learner moved on while the next rollout was acted
        yield with_versions(items[1], [9, 9, 9])

    stream = UnrollStream(moving(arriving), batch_size=2, max_policy_lag=2, latest_version=lambda: latest["version"])
    assert [unroll_ids(b) for b in stream] == [[0, 1], [3, 4]]  # unroll 2 is 4 versions behind by then; 5 waits
    assert stream.unrolls_too_old == 1
