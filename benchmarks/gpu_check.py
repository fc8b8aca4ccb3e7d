"""The GPU check: one prepared command that measures what only a GPU machine can, within ~8 minutes of its time.

The GPU machines lent to this project have torch with CUDA, lightning and numpy, Python 3.12 and no package registry,
but none of torchrl, tensordict, gymnasium, ale-py or jsonargparse. So:

1. Here, with the registry: ``python -m benchmarks.gpu_check wheelhouse`` downloads into ``.whl/`` (git ignores it)
   the Python 3.12 wheels of what the GPU image lacks, at the versions installed here (``wheel_plan``), and checks
   that they and the checkout stay under the carry budget (``CARRY_BUDGET_MIB``).
2. There, with the checkout and ``.whl/`` carried: the one line ``python -m benchmarks.gpu_check command`` prints.
   It installs the wheels offline into ``/tmp/site`` and runs ``python3 -m benchmarks.gpu_check run --out $OUT``:
   the CUDA tests, ``benchmarks.vtrace`` (a CUDA row beside the CPU one), ``benchmarks.fit`` on Pong with the deep
   ResNet (``configs/atari_gpu.yaml``: per-actor and server inference, the learner on CUDA) and a few minutes of
   Pong training with the same config, each step a
   subprocess with its own time limit, so that one hung step cannot take the others' time. It prints a table and
   writes ``$OUT/gpu_check.json`` (and each step's log) with the GPU's name.
3. The rehearsal, here and in the test suite: ``python -m benchmarks.gpu_check run --dry-run`` runs the same steps
   on this machine's CPU with tiny budgets (the CUDA tests then skip, each with its reason) and checks the wheel plan
   against what is installed here, so that neither the steps nor the plan can rot unnoticed.

Left out on purpose, to stay within the budget: envpool (its wheel is 51 MiB: ``import envpool`` loads its MuJoCo,
ViZDoom and other engines' libraries, so they cannot be dropped; Pong steps on gymnasium + ale-py, on the GPU machine's
16 cores), W&B (the steps log to CSV) and imageio-ffmpeg (no videos are recorded).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from benchmarks.common import RESULTS_DIR_VARIABLE, OneLineErrorParser, print_table

REPO = Path(__file__).resolve().parent.parent
WHEELHOUSE = ".whl"  # relative to the repository root; in .gitignore
STEPS_BUDGET_S = 540  # every step at its limit: the whole command stays under ~8 minutes of GPU time with the install
CARRY_BUDGET_MIB = 60.0  # the checkout's tracked files and the wheels together (the device takes 64 MiB in all)
DEVICE_COMMAND_LIMIT = 2000  # characters the device tool takes for one command
PYTHON_TAG, PLATFORMS = "3.12", ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                  "manylinux2014_x86_64", "manylinux1_x86_64"]

# What lit_impala needs at run time for Pong, CartPole and the tests the check runs (pyproject.toml's dependencies
# and the atari extra), less what the check leaves out (module docstring).
ROOTS = ["torchrl", "tensordict", "gymnasium", "jsonargparse[signatures]", "ale-py"]
LEFT_OUT = {"wandb": "the steps log to CSV", "imageio-ffmpeg": "no videos", "envpool": "51 MiB (module docstring)"}
# The GPU image's packages (the device tool's KINDS.md, read 2026-11-17), by normalised name: not carried.
DEVICE_IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# The machine the wheels are for: requirement markers are evaluated for it, not for this machine.
DEVICE_MARKERS = {"python_version": PYTHON_TAG, "python_full_version": f"{PYTHON_TAG}.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython"}

# Every test that needs CUDA is marked `gpu` and lives in one of these files (tests/unit/test_gpu_check.py checks):
# collecting the whole suite there would import packages the GPU image does not have (W&B, MinAtar, ...).
GPU_TESTS = ["tests/unit/test_vtrace.py", "tests/integration/test_inference_cuda.py",
             "tests/integration/test_cuda_learner.py"]
PONG = str(REPO / "configs" / "atari_gpu.yaml")  # the Atari config for a GPU learner (deep ResNet)
CSV_LOGGER = "--trainer.logger=lightning.pytorch.loggers.CSVLogger"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_plan(roots: list[str] = ROOTS) -> dict[str, str]:
    """``name -> version``: every package ``roots`` need (with the extras named), following each one's requirements as
    the GPU machine's Python would, less what its image has; at the versions installed here, which the tests pass with.
    Raises ``LookupError`` naming a package that is needed but not installed here."""
    from packaging.requirements import Requirement

    plan: dict[str, str] = {}
    pending = [Requirement(root) for root in roots]
    seen: set[tuple[str, frozenset]] = set()
    while pending:
        requirement = pending.pop()
        name = normalise(requirement.name)
        if (name, frozenset(requirement.extras)) in seen or name in DEVICE_IMAGE or name in LEFT_OUT:
            continue
        seen.add((name, frozenset(requirement.extras)))
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise LookupError(f"{name} (needed by the GPU check's wheels) is not installed here") from None
        plan[name] = distribution.version
        for line in distribution.requires or []:
            needed = Requirement(line)
            wanted = [{**DEVICE_MARKERS, "extra": extra} for extra in ["", *requirement.extras]]
            if needed.marker is None or any(needed.marker.evaluate(environment) for environment in wanted):
                pending.append(needed)
    return dict(sorted(plan.items()))


def tracked_bytes() -> int:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in names if name and (REPO / name.decode()).is_file())


def wheel_files(directory: Path) -> dict[str, Path]:
    """``name -> wheel`` in ``directory``, by the normalised distribution name in each file name."""
    return {normalise(path.name.split("-")[0]): path for path in sorted(directory.glob("*.whl"))}


def build_wheelhouse(directory: Path) -> int:
    plan = wheel_plan()
    directory.mkdir(exist_ok=True)
    for stale in set(wheel_files(directory)) - set(plan):  # one version of each, nothing the plan dropped
        wheel_files(directory)[stale].unlink()
    for name, version in plan.items():
        existing = wheel_files(directory).get(name)
        if existing is not None and f"-{version}-" in existing.name:
            continue
        if existing is not None:
            existing.unlink()
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", PYTHON_TAG, "--implementation", "cp", "-d", str(directory),
                   *[flag for platform in PLATFORMS for flag in ("--platform", platform)], f"{name}=={version}"]
        if subprocess.run(command).returncode != 0:
            print(f"gpu_check wheelhouse: error: no Python {PYTHON_TAG} wheel of {name}=={version}", file=sys.stderr)
            return 1
    return report_wheelhouse(directory, plan) or check_installable(directory)


def check_installable(directory: Path) -> int:
    """pip's own answer, offline: would these wheels install on the GPU machine's Python and platform?"""
    command = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-index", "--no-deps",
               "--only-binary=:all:", "--python-version", PYTHON_TAG, "--implementation", "cp",
               *[flag for platform in PLATFORMS for flag in ("--platform", platform)],
               "--target", str(directory / "dry-run-target"), *map(str, sorted(directory.glob("*.whl")))]
    if subprocess.run(command).returncode != 0:
        print(f"gpu_check wheelhouse: error: the wheels in {directory} do not install on Python {PYTHON_TAG}",
              file=sys.stderr)
        return 1
    print(f"pip: every wheel installs on CPython {PYTHON_TAG} ({', '.join(PLATFORMS[:1])} ...), offline")
    return 0


def report_wheelhouse(directory: Path, plan: dict[str, str]) -> int:
    wheels = wheel_files(directory)
    mib = {name: path.stat().st_size / 2**20 for name, path in wheels.items()}
    checkout = tracked_bytes() / 2**20
    print_table(f"Wheels for the GPU machine (Python {PYTHON_TAG}) in {directory}", ["package", "version", "MiB"],
                [[name, plan.get(name, "not in the plan"), mib[name]] for name in wheels])
    total = checkout + sum(mib.values())
    print(f"checkout {checkout:.1f} MiB + wheels {sum(mib.values()):.1f} MiB = {total:.1f} MiB "
          f"(budget {CARRY_BUDGET_MIB:g} MiB)")
    missing = sorted(set(plan) - set(wheels))
    if missing or total > CARRY_BUDGET_MIB:
        problem = (f"missing wheels {missing}" if missing
                   else f"{total:.1f} MiB is over the {CARRY_BUDGET_MIB:g} MiB budget")
        print(f"gpu_check wheelhouse: error: {problem}", file=sys.stderr)
        return 1
    return 0


def device_command() -> str:
    """The one line to run on the GPU machine from the repository root, ``.whl`` carried, ``$OUT`` its output folder."""
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
            f"{WHEELHOUSE}/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1; "
            f"python3 -m benchmarks.gpu_check run --out $OUT")


# --- the steps -------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One measurement: a command run as a subprocess with its own time limit, and what to read from its output."""

    name: str
    command: list[str]
    limit_s: float
    read: str  # which reader turns its output into figures (READERS)
    cwd: Path | None = None  # None: the output folder (the runs' files stay there, not in the checkout)
    status: str = "not run"
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


def steps(out: Path, dry_run: bool) -> list[Step]:
    """The check's steps; ``dry_run``: the same commands with budgets and sizes for a 2-core CPU machine."""
    python = sys.executable
    # Pong: the shipped config, with what the GPU image lacks (W&B, the mp4 writer) left out; the learner on CUDA.
    pong = ["--data.env_backend=gymnasium", CSV_LOGGER]
    if dry_run:  # tiny: 1 actor x 2 envs, 2 x 5 steps per update (the deep ResNet on CPU is slow)
        pong += ["--data.num_actors=1", "--data.envs_per_actor=2", "--data.batch_size=2", "--data.unroll_length=5"]
    callbacks = json.dumps([
        {"class_path": "lit_impala.callbacks.ProgressBar", "init_args": {"log_every_s": 10}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "train" / "checkpoints"), "save_last": True}},
    ])
    train_s = 6 if dry_run else 150
    return [
        Step("cuda_tests", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
                            "--override-ini=addopts=", *GPU_TESTS], 100, "pytest", cwd=REPO),
        Step("vtrace", [python, "-m", "benchmarks.vtrace", *(["--lengths", "20", "--batches", "32",
                                                               "--min-run-time", "0.05"] if dry_run else
                                                              ["--min-run-time", "0.25"])], 45, "vtrace"),
        Step("fit_pong", [python, "-m", "benchmarks.fit", "--config", PONG, "--name", "fit_pong_gpu",
                          # the rehearsal: per-actor inference only (both modes of benchmarks.fit are tested on
                          # CartPole in tests/integration/test_benchmarks.py), to keep the suite short
                          *(["--seconds", "2", "--warmup", "1", "--ceiling-seconds", "1", "--inference", "actor"]
                            if dry_run else
                            ["--seconds", "30", "--warmup", "15", "--ceiling-seconds", "5"]),
                          *pong, f"--trainer.logger.save_dir={out / 'fit'}", "--trainer.enable_progress_bar=false"],
             120 if dry_run else 170, "fit"),
        Step("train_pong", [python, "-m", "lit_impala", "fit", "--config", PONG, *pong,
                            f"--trainer.logger.save_dir={out / 'train'}",
                            f"--trainer.max_time=00:00:{train_s // 60:02d}:{train_s % 60:02d}",
                            f"--trainer.callbacks={callbacks}", "--trainer.log_every_n_steps=5"],
             train_s + 60, "train"),
    ]


def read_pytest(output: str, out: Path) -> dict:
    summary = re.findall(r"^=*\s*(\d+ (?:passed|skipped|failed|error|deselected).*?) in [\d.]+s", output, re.M)
    reasons = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", output)))
    return {"summary": summary[-1] if summary else "no summary", "skip_reasons": reasons}


def read_vtrace(output: str, out: Path) -> dict:
    rows = json.loads((out / "results" / "vtrace.json").read_text())["rows"]
    return {"rows": [{k: row[k] for k in ("device", "T", "B", "ours_us", "torchrl_us", "speedup")} for row in rows]}


def read_fit(output: str, out: Path) -> dict:
    result = json.loads((out / "results" / "fit_pong_gpu.json").read_text())
    return {"learner_device": next(iter(result["fits"].values()))["learner_device"],
            "ceiling_frames_per_second": result["ceiling"]["frames_per_second"],
            **{f"{mode}_frames_per_second": fit["frames_per_second"] for mode, fit in result["fits"].items()},
            **{f"{mode}_updates_per_second": fit["updates_per_second"] for mode, fit in result["fits"].items()}}


def read_train(output: str, out: Path) -> dict:
    """The last logged row of each metric of the Pong run's CSV log."""
    (log,) = (out / "train").glob("lightning_logs/version_*/metrics.csv")
    last: dict[str, float] = {}
    with open(log) as file:
        for row in csv.DictReader(file):
            last.update({key: float(value) for key, value in row.items() if value not in ("", None)})
    return {key: last[key] for key in ("step", "progress/env_frames", "progress/frames_per_second",
                                       "progress/updates_per_second", "episode/return", "progress/train_s")
            if key in last}


READERS = {"pytest": read_pytest, "vtrace": read_vtrace, "fit": read_fit, "train": read_train}


def rounded(value):
    """Figures to 4 significant digits (timings vary more than that between runs)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def run_step(step: Step, out: Path, environment: dict[str, str]) -> None:
    log_path = out / f"{step.name}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(step.command, cwd=step.cwd or out, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
        try:
            code = process.wait(timeout=step.limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the step and every process it started
            process.wait()
            code = None
    step.seconds = time.monotonic() - start
    output = log_path.read_text(errors="replace")
    passed = code == 0 or (step.read == "pytest" and code == 5)  # 5: pytest collected nothing to run
    step.status = "passed" if passed else ("timed out" if code is None else f"failed (exit {code})")
    try:
        step.figures = rounded(READERS[step.read](output, out))
    except Exception as error:  # a step that failed has nothing to read; say so instead of hiding the step's result
        step.figures = {"unread": f"{type(error).__name__}: {error}"}
        if passed:
            step.status = "failed (no figures)"
    print(f"{step.name}: {step.status} in {step.seconds:.0f} s {json.dumps(step.figures)[:400]}", flush=True)


def environment_facts() -> dict:
    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for name in ("lightning", "torchrl", "tensordict", "gymnasium", "ale-py", "jsonargparse"):
        try:
            facts[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            facts[name] = None
    return facts


def run(out: Path, dry_run: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    facts = environment_facts()
    print(f"GPU check{' (dry run, CPU)' if dry_run else ''}: {json.dumps(facts)}", flush=True)
    problems = []
    if not dry_run and facts["gpu"] is None:
        problems.append("no CUDA device: run it with --dry-run for the rehearsal on CPU")
    if dry_run:
        try:
            plan = wheel_plan()
            print(f"wheel plan: {len(plan)} wheels: {', '.join(f'{n}=={v}' for n, v in plan.items())}")
        except LookupError as error:
            problems.append(f"wheel plan: {error}")
        if len(device_command()) > DEVICE_COMMAND_LIMIT:
            problems.append(f"the device command has {len(device_command())} characters (limit {DEVICE_COMMAND_LIMIT})")
    if problems:
        for problem in problems:
            print(f"gpu_check: error: {problem}", file=sys.stderr)
        return 2
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # steps run in `out`
    environment = {**os.environ, RESULTS_DIR_VARIABLE: str(out / "results"), "WANDB_MODE": "disabled",
                   "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
    if dry_run:
        environment["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal is the CPU path, even on a machine with a GPU
    started = time.monotonic()
    done = []
    for step in steps(out, dry_run):
        run_step(step, out, environment)
        done.append(step)
    total_s = time.monotonic() - started
    print_table(f"GPU check on {facts['gpu'] or 'CPU (dry run)'}, {total_s:.0f} s",
                ["step", "status", "seconds", "figures"],
                [[s.name, s.status, s.seconds, json.dumps(s.figures)[:160]] for s in done])
    summary = {"dry_run": dry_run, "machine": facts, "total_s": total_s, "steps": [asdict(s) for s in done]}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if all(s.status == "passed" for s in done) else 1


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="what", required=True)
    wheelhouse = commands.add_parser("wheelhouse", help="download the wheels the GPU image lacks into .whl/")
    wheelhouse.add_argument("--dir", type=Path, default=REPO / WHEELHOUSE)
    commands.add_parser("command", help="print the one line to run on the GPU machine")
    checking = commands.add_parser("run", help="run the check (on the GPU machine; --dry-run: rehearse it on CPU)")
    checking.add_argument("--out", type=Path, default=None, help="where the summary and logs go (default: $OUT)")
    checking.add_argument("--dry-run", action="store_true", help="every step on this machine's CPU, tiny budgets")
    args = parser.parse_args(argv)
    if args.what == "wheelhouse":
        return build_wheelhouse(args.dir)
    if args.what == "command":
        print(device_command())
        return 0
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        parser.error("run needs --out DIR (or $OUT)")
    return run(out.resolve(), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
