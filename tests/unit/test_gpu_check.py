"""The GPU check's parts that cannot be run here and must not rot: the wheels it carries follow lit_impala's
requirements, every CUDA test is in the files it runs, and its one command fits the device tool.
The rehearsal of the whole check on CPU: tests/integration/test_gpu_check.py."""

import re
import subprocess
from importlib import metadata

import pytest

from benchmarks import gpu_check
from tests.conftest import REPO


def test_the_wheels_are_what_the_gpu_image_lacks_at_the_versions_tested_here():
    plan = gpu_check.wheel_plan()
    # lit_impala's own needs (pyproject.toml) and theirs, e.g. LightningCLI's jsonargparse[signatures] extra
    assert {"torchrl", "tensordict", "gymnasium", "ale-py", "jsonargparse", "docstring-parser",
            "typeshed-client"} <= set(plan)
    assert not set(plan) & gpu_check.DEVICE_IMAGE  # torch, lightning, numpy, ... are there already
    assert not set(plan) & set(gpu_check.LEFT_OUT)  # W&B, envpool, the mp4 writer: left out on purpose
    assert all(plan[name] == metadata.version(name) for name in plan)


def test_a_needed_package_that_is_not_installed_here_is_named():
    with pytest.raises(LookupError, match="no-such-package-xyz"):
        gpu_check.wheel_plan(["no-such-package-xyz"])


def test_the_plan_follows_requirements_as_python_3_12_reads_them(monkeypatch):
    """A requirement for Python < 3.12 only is not carried; one for the GPU's Python is (a marker the machine
    running the tests would read the other way)."""
    requirements = {"root-pkg": ['old-pkg; python_version < "3.12"', 'new-pkg; python_version >= "3.12"'],
                    "new-pkg": [], "old-pkg": []}

    class Distribution:
        def __init__(self, name):
            self.requires, self.version = requirements[name], "1.0"

    def distribution(name):
        if name not in requirements:
            raise metadata.PackageNotFoundError(name)
        return Distribution(name)

    monkeypatch.setattr(gpu_check.metadata, "distribution", distribution)
    assert gpu_check.wheel_plan(["root-pkg"]) == {"new-pkg": "1.0", "root-pkg": "1.0"}


def test_every_cuda_test_is_marked_gpu_and_in_the_files_the_check_runs():
    marked = {str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", path.read_text())}
    uses_cuda = {str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
                 if re.search(r"torch\.cuda\.is_available\(\)", path.read_text())}
    assert marked == set(gpu_check.GPU_TESTS), "GPU_TESTS in benchmarks/gpu_check.py lists the files with gpu tests"
    assert uses_cuda <= marked, f"tests that look for CUDA without the gpu mark: {sorted(uses_cuda - marked)}"


def test_the_device_command_is_one_offline_line_the_device_tool_takes():
    command = gpu_check.device_command()
    assert len(command) < gpu_check.DEVICE_COMMAND_LIMIT and "\n" not in command
    assert "--no-index" in command and f"{gpu_check.WHEELHOUSE}/*.whl" in command
    assert command.endswith("python3 -m benchmarks.gpu_check run --out $OUT")
    wheel = f"{gpu_check.WHEELHOUSE}/torchrl-0.14.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    assert subprocess.run(["git", "check-ignore", "-q", wheel], cwd=REPO).returncode == 0  # carried, not committed


def test_every_step_at_its_time_limit_still_fits_the_gpu_time(tmp_path):
    steps = gpu_check.steps(tmp_path, dry_run=False)
    assert [step.name for step in steps] == ["cuda_tests", "vtrace", "fit_pong", "train_pong"]
    assert sum(step.limit_s for step in steps) <= gpu_check.STEPS_BUDGET_S <= 540
