"""``python -m lit_impala.export`` as a user types it, on the checkpoint of a tiny real CartPole run: the TorchScript
and ONNX files give the checkpoint's network's outputs on CartPole's own observations, and the snippets of
README.md#seeing-what-the-agent-does play an episode with them in a process that imports neither lit_impala nor (for
ONNX) torch; a bad input is one ``error:`` line, exit code 2, and nothing written at ``--output``."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from lit_impala.checkpoint_io import read_checkpoint
from lit_impala.export import load_network
from tests.cli_runner import run_lit_impala
from tests.conftest import REPO
from tests.integration.test_cli import RunsCode, tiny, unsafe_checkpoint

EXPORT = "lit_impala.export"

# The snippets of README.md#seeing-what-the-agent-does, as typed there: run from the directory holding the
# exported files. test_the_readme_shows_these_snippets keeps the two the same.
SNIPPETS = {
    "torchscript": """\
import gymnasium as gym
import torch

policy = torch.jit.load("cartpole.pt")  # torch alone: no lit_impala
env = gym.make("CartPole-v1")
observation, _ = env.reset(seed=0)
episode_return, done = 0.0, False
while not done:
    action, policy_params, value = policy(torch.as_tensor(observation).unsqueeze(0))  # a batch of one
    observation, reward, terminated, truncated, _ = env.step(action.item())
    episode_return, done = episode_return + reward, terminated or truncated
print(f"return {episode_return}")
""",
    "onnx": """\
import gymnasium as gym
import onnxruntime

policy = onnxruntime.InferenceSession("cartpole.onnx")  # onnxruntime alone: no torch, no lit_impala
env = gym.make("CartPole-v1")
observation, _ = env.reset(seed=0)
episode_return, done = 0.0, False
while not done:
    action, policy_params, value = policy.run(None, {"observation": observation[None]})  # a batch of one
    observation, reward, terminated, truncated, _ = env.step(action.item())
    episode_return, done = episode_return + reward, terminated or truncated
print(f"return {episode_return}")
""",
}
FILE_NAMES = {"torchscript": "cartpole.pt", "onnx": "cartpole.onnx"}
# Runs a snippet file as `python snippet.py` would, then says which of these packages it imported.
WATCHED_IMPORTS = """\
import runpy, sys
runpy.run_path(sys.argv[1], run_name="__main__")
print("imported:", ",".join(sorted({name.split(".")[0] for name in sys.modules} & {"lit_impala", "torch"})))
"""


def _needs_onnx(format: str) -> None:
    if format == "onnx":
        for package in ("onnxscript", "onnxruntime"):
            pytest.importorskip(package, reason="ONNX export needs the export extra (onnx, onnxscript, onnxruntime)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The last checkpoint of a 6-update CartPole run through the real command."""
    directory = tmp_path_factory.mktemp("cartpole_run")
    run = run_lit_impala(["fit", *tiny(directory, "--trainer.logger=false")], directory)
    assert run.returncode == 0, run.tail()
    return next(directory.rglob("last.ckpt"))


def _export(checkpoint: Path, cwd: Path, *args: str):
    return run_lit_impala(["--ckpt_path", str(checkpoint), *args], cwd, timeout_s=120.0, module=EXPORT)


@pytest.mark.parametrize("format", ["torchscript", "onnx"])
def test_the_exported_policy_is_the_checkpoints_and_the_readme_snippet_plays_with_it(checkpoint, format, tmp_path):
    _needs_onnx(format)
    run = _export(checkpoint, tmp_path, "--output", FILE_NAMES[format])
    assert run.returncode == 0, run.tail()
    assert run.stderr == "", run.tail()
    assert run.stdout.strip() == (
        f"Exported update 6 to {FILE_NAMES[format]} ({format}): observation float32 [N, 4] -> action int64 [N], "
        "policy_params float32 [N, 2], value float32 [N]; outputs equal the network's on random batches of N = 1, 3")
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".cli_")) == [FILE_NAMES[format]]

    # The file's outputs are the checkpoint's network's on the observations CartPole itself gives.
    network = load_network(read_checkpoint(checkpoint))
    env = gym.make("CartPole-v1")
    observation, _ = env.reset(seed=0)
    observations = []
    for _ in range(16):  # random play: new episodes start where one ends
        observations.append(torch.as_tensor(observation))
        observation, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            observation, _ = env.reset()
    observations = torch.stack(observations)  # [16, 4] float32
    with torch.no_grad():
        output = network(observations.unsqueeze(0))
    expected = (network.distribution.mode(output.policy_params[0]), output.policy_params[0], output.baseline[0])
    if format == "torchscript":
        got = torch.jit.load(str(tmp_path / "cartpole.pt"))(observations)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(tmp_path / "cartpole.onnx"))
        got = [torch.from_numpy(out) for out in session.run(None, {"observation": observations.numpy()})]
    torch.testing.assert_close(tuple(got), expected)

    # The snippet of README.md#seeing-what-the-agent-does, as a file, run where the file is.
    (tmp_path / "play.py").write_text(SNIPPETS[format])
    played = subprocess.run([sys.executable, "-c", WATCHED_IMPORTS, "play.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert played.returncode == 0, played.stderr[-3000:]
    lines = played.stdout.splitlines()
    assert lines[0].startswith("return ") and float(lines[0].split()[1]) >= 1.0, played.stdout
    assert lines[1] == ("imported: torch" if format == "torchscript" else "imported: "), played.stdout


def test_the_readme_shows_these_snippets():
    readme = (REPO / "README.md").read_text()
    for format, snippet in SNIPPETS.items():
        assert f"```python\n{snippet}```" in readme, f"README.md lacks the {format} snippet this test runs"


# --- bad input -----------------------------------------------------------------------------------------------------


BAD_INPUTS = {  # name -> (arguments after --ckpt_path, what the one line says); CKPT: the run's checkpoint
    "missing_checkpoint": (["missing.ckpt", "--output", "policy.pt"],
                           "error: checkpoint 'missing.ckpt' does not exist"),
    "torn_checkpoint": (["torn.ckpt", "--output", "policy.pt"], "error: checkpoint 'torn.ckpt' cannot be read"),
    "unknown_format": (["CKPT", "--output", "policy.pt", "--format", "tflite"],
                       "error: argument --format: invalid choice: 'tflite'"),
    "unknown_suffix": (["CKPT", "--output", "policy.bin"],
                       "error: --output 'policy.bin': its suffix '.bin' names no format; use .pt (torchscript) or "
                       ".onnx (onnx), or give --format"),
    "contradicting_format": (["CKPT", "--output", "policy.pt", "--format", "onnx"],
                             "error: --output 'policy.pt' is a torchscript suffix, but --format is onnx"),
    "no_output": (["CKPT"], "error: the following arguments are required: --output"),
    "unsafe_checkpoint": (["hostile.ckpt", "--output", "policy.pt"],
                          "error: checkpoint 'hostile.ckpt' was refused unread: it holds a Python object that is not "
                          "plain data (posix.system)"),
}


@pytest.fixture(scope="module")
def bad_input_runs(checkpoint, tmp_path_factory) -> dict:
    """Each bad input typed, two commands at a time (each is ~5 s of imports on one core)."""
    commands = {}
    for name, (args, _) in BAD_INPUTS.items():
        directory = tmp_path_factory.mktemp(name)
        (directory / "torn.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")
        if name == "unsafe_checkpoint":
            unsafe_checkpoint(directory)  # hostile.ckpt, whose unpickling would create code_ran
        commands[name] = (directory, ["--ckpt_path", *[str(checkpoint) if arg == "CKPT" else arg for arg in args]])
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_lit_impala, typed, directory, 120.0, module=EXPORT)
                   for name, (directory, typed) in commands.items()}
        return {name: (commands[name][0], future.result()) for name, future in futures.items()}


def _assert_one_line_and_nothing_written(run, directory: Path, message: str) -> None:
    assert run.returncode == 2, run.tail()
    assert run.stderr.splitlines() == [run.stderr.strip()] and run.stderr.startswith(message), run.tail()
    assert "Traceback" not in run.output and run.stdout == "", run.tail()
    written = [path.name for path in directory.iterdir() if path.name.startswith(("policy", ".policy"))]
    assert written == [], f"left at --output: {written}"


@pytest.mark.slow  # 7 subprocesses of ~5 s of imports each
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(bad_input_runs, name):
    directory, run = bad_input_runs[name]
    _assert_one_line_and_nothing_written(run, directory, BAD_INPUTS[name][1])
    assert not (directory / "code_ran").exists(), "nothing in a refused checkpoint was unpickled"


def test_onnx_without_its_packages_is_one_line_and_a_failed_export_keeps_the_previous_file(checkpoint, tmp_path):
    """onnx and onnxscript made unimportable, as where the export extra is not installed; the file a previous
    export wrote stays as it was."""
    previous = tmp_path / "policy.onnx"
    previous.write_bytes(b"the previous export")
    block = "import runpy, sys; sys.modules['onnx'] = sys.modules['onnxscript'] = None; " \
            f"runpy.run_module('{EXPORT}', run_name='__main__', alter_sys=True)"
    run = subprocess.run([sys.executable, "-c", block, "--ckpt_path", str(checkpoint), "--output", "policy.onnx"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip() == ("error: --format onnx needs the packages onnx, onnxscript, not installed here: "
                                  "pip install -e \".[export]\" (onnx, onnxscript, onnxruntime)"), run.stderr[-3000:]
    assert previous.read_bytes() == b"the previous export"
    assert [path.name for path in tmp_path.iterdir()] == ["policy.onnx"], "no temporary file left"


def test_a_trusted_checkpoint_is_unpickled_and_exported(checkpoint, tmp_path):
    """``--trust_checkpoint true`` (what the refusal's message says to add; ``--trust_checkpoint`` alone works too)
    reads a file holding a Python object: its code runs, as the flag's help warns."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["note"] = RunsCode(f"touch {tmp_path / 'code_ran'}")
    torch.save(content, tmp_path / "trusted.ckpt")
    run = _export(tmp_path / "trusted.ckpt", tmp_path, "--output", "policy.pt", "--trust_checkpoint", "true")
    assert run.returncode == 0, run.tail()
    assert (tmp_path / "code_ran").exists() and (tmp_path / "policy.pt").is_file()
