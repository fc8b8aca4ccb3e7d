"""RestartBudget: local actor restarts counted over a sliding time window, with a fake clock."""

from lit_impala.actors.local import RestartBudget


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_restarts_are_counted_over_the_window_and_older_ones_expire():
    clock = FakeClock()
    budget = RestartBudget(max_restarts=3, window_s=3600.0, clock=clock)
    for now in (0.0, 1000.0, 2000.0):
        clock.now = now
        assert budget.take()
    clock.now = 3599.0
    assert budget.used() == 3 and not budget.take()  # a fourth within the hour: refused
    clock.now = 3600.0  # the restart at 0 s leaves the window
    assert budget.used() == 2 and budget.take()
    clock.now = 3 * 86400.0  # a flaky node, days later: the budget is whole again
    assert budget.used() == 0
    assert all(budget.take() for _ in range(3)) and not budget.take()
    assert budget.window_text == "within 3600 s"


def test_without_a_window_the_budget_is_for_the_whole_run():
    clock = FakeClock()
    budget = RestartBudget(max_restarts=2, window_s=None, clock=clock)
    assert budget.take() and budget.take()
    clock.now = 1e9
    assert budget.used() == 2 and not budget.take()
    assert budget.window_text == "in the run"


def test_a_budget_of_zero_never_restarts():
    assert not RestartBudget(max_restarts=0).take()
