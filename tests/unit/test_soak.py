"""The soak's verdict from its samples (``benchmarks.soak.analyse``): steady processes are measured, a process
that leaks or vanishes fails it, short-lived helpers do not; a bad argument is one line and exit 2."""

import subprocess
import sys

from benchmarks.soak import WINDOW, analyse
from tests.conftest import REPO


def samples(rss_of_actor, extra_from=None, transient_at=(), count=12):
    series = []
    for i in range(count):
        processes = {"learner": {"pid": 10, "rss": 500 * 2**20, "fds": 40},
                     "actor0": {"pid": 11, "rss": rss_of_actor(i), "fds": 20}}
        if extra_from is not None and i >= extra_from:
            processes["actor1"] = {"pid": 12, "rss": 400 * 2**20, "fds": 20}
        if i in transient_at:
            processes["wandb0"] = {"pid": 100 + i, "rss": 100 * 2**20, "fds": 5}
        series.append({"t": 15.0 * i, "processes": processes, "shm_segments": 2, "shm_bytes": 2**20})
    return series


def test_steady_processes_are_measured_and_short_lived_helpers_only_counted():
    rows, growths, transient = analyse(samples(lambda i: 400 * 2**20, transient_at=(3, 7)), settled_at=2)
    assert growths["actor0/rss"] == 0.0 and growths["learner/fds"] == 0.0 and growths["processes"] == 0.0
    assert transient == ["wandb"] and max(growths.values()) == 0.0
    assert rows[-2][0] == "all processes (2 short-lived ones came and went)"


def test_growing_memory_and_a_process_that_appears_and_stays_are_failures():
    _, growths, _ = analyse(samples(lambda i: (400 + 10 * i) * 2**20), settled_at=2)
    start, end = 400 + 10 * (2 + WINDOW // 2), 400 + 10 * (11 - WINDOW // 2)  # medians of the two windows
    assert growths["actor0/rss"] == (end - start) / start > 0.1
    _, growths, _ = analyse(samples(lambda i: 400 * 2**20, extra_from=6), settled_at=2)
    assert growths["actor/12/appeared"] == float("inf")


def test_a_bad_argument_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--scenarios", "gpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("python -m benchmarks.soak: error: --scenarios: unknown ['gpu']; choose from "
                                   "['ddp', 'remote']")
