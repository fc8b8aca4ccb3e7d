"""The command's fork server (lit_impala.actors.preloaded_start): a second call changes nothing (a test module that a
run imports calls it too), and a start method already chosen is left alone. Each case in a fresh interpreter, since
the start method is chosen once per process."""

import os
import subprocess
import sys

from tests.conftest import REPO

CALL = "from lit_impala.actors.preloaded_start import start_preloaded_forkserver as start\nimport multiprocessing\n"


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "MP_START_METHOD"}
    return subprocess.run([sys.executable, "-c", CALL + code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**environment, "PYTHONPATH": str(REPO), **env})


def test_a_second_call_keeps_the_fork_server():
    done = run("print(start(), start(), multiprocessing.get_start_method())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "forkserver"]


def test_a_start_method_already_chosen_is_left_alone():
    chosen = run("multiprocessing.set_start_method('spawn')\nprint(start(), multiprocessing.get_start_method())")
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.split() == ["False", "spawn"]
    asked = run("print(start(), multiprocessing.get_start_method(allow_none=True))", MP_START_METHOD="spawn")
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.split() == ["False", "None"]
