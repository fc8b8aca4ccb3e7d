"""``python -m lit_impala.export``: a checkpoint's acting policy as one file that runs without lit_impala, in
TorchScript (``.pt``, ``torch.jit.load``) or ONNX (``.onnx``, onnxruntime alone; the ``export`` extra).

The exported policy is the network as the actors run it, the observation preprocessing it holds in its graph (the
running observation normaliser, the uint8 -> [0, 1] pixel scaling): it takes a batch of observations ``[N, *obs]``
as the training env wrappers give them (``envs.factory.make_gym_env``: CartPole's float32 vectors, MinAtar's
``[C, 10, 10]`` uint8 images of 0 / 255, Atari's ``[4, 84, 84]`` uint8 frame stacks, a dict observation packed
into one float32 vector) and returns

    action         [N, *action_shape]  what the env receives: the greedy action (the distribution's mode; with
                                       ``--sample`` a draw), mapped into a Box's bounds as in training
    policy_params  [N, P]              the action distribution's parameters (logits; or mean and log std)
    value          [N]                 V(observation), in the returns' units

An LSTM policy takes and returns its core state too: ``(observation, h, c) -> (action, policy_params, value,
next_h, next_c)``, each state ``[N, H]``. Zeros start an episode; zeroing a row when its env starts a new episode
is the caller's job (the actors do it at ``is_init``), as is carrying ``next_h, next_c`` into the next step.

The file records what it takes and returns (``lit_impala.json`` among the TorchScript archive's extra files; the
ONNX model's ``lit_impala`` metadata entry). ``export_policy`` runs the exported graph against the network on
random observations before the file replaces ``--output`` (written beside it and renamed: never half-written).
A bad argument or checkpoint is one ``error:`` line and exit code 2, as for ``python -m lit_impala``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lit_impala.checkpoint_io import read_checkpoint, write_atomically
from lit_impala.checkpoints import ResumePoint, check_fits, check_format, model_hparams, upgrade
from lit_impala.cli import FULL_ERROR_ENV
from lit_impala.config import argument_defaults
from lit_impala.core.networks import AgentOutput, ImpalaAgent
from lit_impala.learner import ImpalaModule

SUFFIX_FORMATS = {".pt": "torchscript", ".onnx": "onnx"}  # --output's suffix -> the format it implies
FORMATS = tuple(SUFFIX_FORMATS.values())
ONNX_EXPORT_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) imports
METADATA_NAME = "lit_impala.json"  # the TorchScript extra file (ONNX: the metadata key "lit_impala")
OBSERVATION_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
CHECK_BATCH_SIZES = (1, 3)  # the exported file must equal the network on batches of these sizes (N = 1: one env)


class BadInput(ValueError):
    """A bad argument, checkpoint or output path: the command's one ``error:`` line, exit code 2."""


class ExportMismatch(RuntimeError):
    """The exported graph's outputs differ from the network's: a bug (of the exporter or ours), not bad input."""


# --- what the exported policy takes ------------------------------------------------------------------------------


class ObservationSpec(NamedTuple):
    """One observation as the exported policy takes it (a batch is ``[N, *shape]`` of ``dtype``).

    The one place that knows an observation is a single tensor: a policy taking several named inputs (a dict
    observation unpacked) would change this, ``random_observations`` and the input names of ``_signature``.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def observation_spec(network: ImpalaAgent, dtype: torch.dtype | None = None) -> ObservationSpec:
    """What ``network`` takes per observation from the training env wrappers: uint8 pixels for a pixel encoder
    (every image env here: Atari, MinAtar, MiniGrid), float32 otherwise (vectors, packed dict observations);
    ``dtype`` for an env that gives something else (float images). The graph is traced for this dtype: the pixel
    encoders scale uint8 by 1/255 and take floats as already scaled."""
    return ObservationSpec(network.observation_shape, dtype or (torch.uint8 if network.is_pixel else torch.float32))


def random_observations(spec: ObservationSpec, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """``[batch_size, *spec.shape]`` observations to trace and check with: any pixel value, floats of a few units
    (outside the normaliser's clip of 10 sometimes, so the clip is checked too)."""
    shape = (batch_size, *spec.shape)
    if spec.dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return (4.0 * torch.randn(shape, generator=generator)).to(spec.dtype)


# --- the exported modules ---------------------------------------------------------------------------------------


class InputCheck(nn.Module):
    """Refuses observations other than ``[N, *shape]`` of ``dtype``, which a traced graph would take silently (a
    float image through a graph traced for uint8 pixels is not scaled by 1/255). Scripted (``torch.jit.script``) it
    stays a real check inside the traced TorchScript graph; ONNX runtimes check their inputs themselves."""

    def __init__(self, spec: ObservationSpec):
        super().__init__()
        self.shape = list(spec.shape)
        self.dtype = spec.dtype
        self.expected = f"a {spec.dtype_name} tensor [N, {', '.join(str(size) for size in spec.shape)}]"

    def forward(self, observation: Tensor) -> Tensor:
        if observation.dtype != self.dtype or observation.shape[1:] != self.shape:
            same_dtype = "" if observation.dtype == self.dtype else " of another dtype"
            raise ValueError("observation must be " + self.expected + ", got shape " + str(observation.shape)
                             + same_dtype)
        return observation


class ExportedPolicy(nn.Module):
    """The acting forward of a feed-forward ``network``: ``observation [N, *obs] -> (action [N, *action_shape],
    policy_params [N, P], value [N])`` (module docstring); ``sample``: a random action instead of the mode."""

    def __init__(self, network: ImpalaAgent, sample: bool = False):
        super().__init__()
        self.network = network
        self.sample = sample
        self.input_check: nn.Module = nn.Identity()  # export_policy scripts an InputCheck in for TorchScript

    def forward(self, observation: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._act(self.network(self.input_check(observation).unsqueeze(0)))  # T = 1, as the actors act

    def _act(self, output: AgentOutput) -> tuple[Tensor, Tensor, Tensor]:
        policy_params = output.policy_params.squeeze(0)  # [N, P]
        distribution = self.network.distribution
        drawn = distribution.sample(policy_params) if self.sample else distribution.mode(policy_params)
        return distribution.to_env_action(drawn), policy_params, output.baseline.squeeze(0)


class ExportedRecurrentPolicy(ExportedPolicy):
    """The acting forward of an LSTM ``network``: ``(observation [N, *obs], h [N, H], c [N, H]) -> (action,
    policy_params, value, next_h, next_c)``; no reset inside (module docstring)."""

    def forward(self, observation: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        output = self.network(self.input_check(observation).unsqueeze(0), (h, c))
        next_h, next_c = (state.squeeze(0) for state in output.core_states)  # [1, N, H] -> [N, H]
        return (*self._act(output), next_h, next_c)


def policy_module(network: ImpalaAgent, sample: bool = False) -> ExportedPolicy:
    """``network`` wrapped for export (a copy on the CPU, without gradients, in eval mode)."""
    network = copy.deepcopy(network).cpu().eval().requires_grad_(False)
    return (ExportedRecurrentPolicy if network.use_lstm else ExportedPolicy)(network, sample).eval()


class Signature(NamedTuple):
    """The exported graph's inputs and outputs: ``{name: (shape with "N" for the batch, dtype name)}``."""

    inputs: dict[str, tuple[list, str]]
    outputs: dict[str, tuple[list, str]]


def _signature(network: ImpalaAgent, spec: ObservationSpec) -> Signature:
    distribution = network.distribution
    inputs = {"observation": (["N", *spec.shape], spec.dtype_name)}
    outputs = {
        "action": (["N", *distribution.sample_shape], str(distribution.sample_dtype).removeprefix("torch.")),
        "policy_params": (["N", distribution.param_size], "float32"),
        "value": (["N"], "float32"),
    }
    if network.use_lstm:
        state = (["N", network.core.hidden_size], "float32")
        inputs |= {"h": state, "c": state}
        outputs |= {"next_h": state, "next_c": state}
    return Signature(inputs, outputs)


# --- checkpoint -> network --------------------------------------------------------------------------------------


def load_network(checkpoint: dict, name: str = "checkpoint") -> ImpalaAgent:
    """The acting network of ``checkpoint`` (as ``checkpoint_io.read_checkpoint`` returns it; ``name`` for messages)
    with its weights, in eval mode. It is the learner's own: an ``ImpalaModule`` made from the checkpoint's model
    hyper-parameters, so it is built exactly as in training. A ``ValueError`` naming ``name`` if it cannot be."""
    check_format(checkpoint, repr(name))
    checkpoint = upgrade(checkpoint)
    hparams = model_hparams(checkpoint, argument_defaults(ImpalaModule))
    if "observation_shape" not in hparams or "action_space" not in hparams:
        raise ValueError(f"checkpoint {name!r} holds no ImpalaModule hyper-parameters (observation_shape, "
                         "action_space): it was not written by lit_impala's learner")
    try:
        module = ImpalaModule(**hparams)
    except TypeError as error:  # an argument this version does not have: a newer lit_impala wrote it
        raise ValueError(f"checkpoint {name!r} does not fit this version of lit_impala's ImpalaModule: "
                         f"{error}") from None
    check_fits(ResumePoint(Path(name), checkpoint), module)
    module.load_state_dict(checkpoint["state_dict"])
    return module.network.eval()


# --- network -> file --------------------------------------------------------------------------------------------


class ExportedFile(NamedTuple):
    """What ``export_policy`` wrote."""

    path: Path
    format: str
    signature: Signature
    checked_batch_sizes: tuple[int, ...]  # the file equals the network on random observation batches of these N
    sampled: bool  # the action is a draw (checked for its shape and dtype only)


def format_for(path: str | Path, format: str | None = None) -> str:
    """The format ``path`` is written in: ``format``, or the one its suffix implies; a ``BadInput`` naming both when
    they contradict each other or neither says."""
    implied = SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if format is not None and format not in FORMATS:
        raise BadInput(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if format is None and implied is None:
        raise BadInput(f"--output {str(path)!r}: its suffix {Path(path).suffix!r} names no format; use "
                       + " or ".join(f"{suffix} ({name})" for suffix, name in SUFFIX_FORMATS.items())
                       + ", or give --format")
    if format is not None and implied is not None and format != implied:
        raise BadInput(f"--output {str(path)!r} is a {implied} suffix, but --format is {format}")
    return format or implied


def check_onnx_installed() -> None:
    """A ``BadInput`` naming what to install when ONNX export is not available here."""
    missing = [name for name in ONNX_EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise BadInput(f"--format onnx needs the packages {', '.join(missing)}, not installed here: "
                       "pip install -e \".[export]\" (onnx, onnxscript, onnxruntime)")


def export_policy(
    network: ImpalaAgent,
    path: str | Path,
    format: str | None = None,
    example_observation: Tensor | None = None,
    sample: bool = False,
    metadata: dict | None = None,
) -> ExportedFile:
    """Write ``network``'s acting policy to ``path`` (module docstring) and return what was written.

    Args:
        network: an ``ImpalaAgent`` (``load_network`` gives a checkpoint's).
        path: the file; replaced only once the new one is complete and checked.
        format: ``torchscript`` or ``onnx``; None: from ``path``'s suffix (``.pt``, ``.onnx``).
        example_observation: ``[N, *obs]`` as the env wrappers give them; its dtype is the one the graph takes.
            None: random ones of ``observation_spec(network)``.
        sample: the exported action is a random draw from the policy instead of its mode.
        metadata: more to record in the file (the checkpoint, the env), plain JSON data.
    """
    format = format_for(path, format)
    if format == "onnx":
        check_onnx_installed()
    spec = observation_spec(network) if example_observation is None else ObservationSpec(
        tuple(example_observation.shape[1:]), example_observation.dtype)
    if spec.shape != network.observation_shape:
        raise ValueError(f"example_observation {list(example_observation.shape)} is not [N, "
                         f"{', '.join(map(str, network.observation_shape))}], what the network takes")
    if example_observation is None or example_observation.shape[0] < 2:
        # torch.export makes a batch of 1 a constant; any N >= 2 stays the dynamic batch size
        example_observation = random_observations(spec, 2, torch.Generator().manual_seed(0))
    policy = policy_module(network, sample)
    signature = _signature(network, spec)
    description = {
        "format": format,
        "action": "sample" if sample else "mode",
        "inputs": {name: {"shape": shape, "dtype": dtype} for name, (shape, dtype) in signature.inputs.items()},
        "outputs": {name: {"shape": shape, "dtype": dtype} for name, (shape, dtype) in signature.outputs.items()},
        **(metadata or {}),
    }
    example_inputs = _inputs(network, example_observation)
    if format == "torchscript":
        policy.input_check = torch.jit.script(InputCheck(spec))
        data = _torchscript_bytes(policy, example_inputs, description)
    else:
        data = _onnx_bytes(policy, example_inputs, signature, description)
    checked = _check(data, format, policy, spec, sample)
    write_atomically(path, lambda file: file.write(data))
    return ExportedFile(Path(path), format, signature, checked, sample)


def _inputs(network: ImpalaAgent, observation: Tensor) -> tuple[Tensor, ...]:
    """The exported graph's inputs for ``observation [N, *obs]``: an LSTM's zero state ``(h, c)`` after it."""
    state = network.initial_state(observation.shape[0], "cpu")
    return (observation,) if state is None else (observation, *state)


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence what the exporters say about themselves, not about our model: torch.jit.trace's deprecation, the
    shape checks a trace keeps as constants (the observation's shape is fixed; the batch size stays dynamic, which
    ``_check`` confirms), torch.onnx's notes on optional torchvision ops, and torch.export's on its own internals
    (nn.LSTM's flat weights, size checks, h and c sharing the batch dimension)."""
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated")
            for message in (r".*LeafSpec", r"_check_is_size will be removed", r"The tensor attributes .*_flat_weights",
                            r"# The axis name: batch will not be used"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        registration_log.setLevel(level)


def _torchscript_bytes(policy: ExportedPolicy, example_inputs: tuple[Tensor, ...], description: dict) -> bytes:
    with _quiet_exporters():
        traced = torch.jit.trace(policy, example_inputs, check_trace=False)  # _check compares, on other batch sizes
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={METADATA_NAME: json.dumps(description)})
    return buffer.getvalue()


def _onnx_bytes(policy: ExportedPolicy, example_inputs: tuple[Tensor, ...], signature: Signature,
                description: dict) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporters():
        # The dynamo exporter (torch.export; needs onnxscript): the TorchScript-based one is deprecated since 2.9.
        program = torch.onnx.export(
            policy, example_inputs, input_names=list(signature.inputs), output_names=list(signature.outputs),
            dynamic_shapes={name: {0: batch} for name in signature.inputs}, dynamo=True, external_data=False,
            verbose=False,
        )
    program.model.metadata_props["lit_impala"] = json.dumps(description)
    return program.model_proto.SerializeToString()


def _check(data: bytes, format: str, policy: ExportedPolicy, spec: ObservationSpec, sample: bool) -> tuple[int, ...]:
    """Run the exported ``data`` and ``policy`` on the same random observations of each ``CHECK_BATCH_SIZES``;
    an ``ExportMismatch`` if any output differs (a sampled action is only checked for its shape). ONNX without
    onnxruntime installed: not checked, ``()``."""
    if format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return ()
    run = _torchscript_runner(data) if format == "torchscript" else _onnx_runner(data)
    generator = torch.Generator().manual_seed(1)
    network = policy.network
    for batch_size in CHECK_BATCH_SIZES:
        inputs = _inputs(network, random_observations(spec, batch_size, generator))
        if network.use_lstm:  # a state in the middle of an episode, not only the zeros of its start
            inputs = (inputs[0], *(torch.randn(state.shape, generator=generator) for state in inputs[1:]))
        with torch.no_grad():
            expected = policy(*inputs)
        exported = run(inputs)
        for index, (name, want, got) in enumerate(zip(_signature(network, spec).outputs, expected, exported,
                                                      strict=True)):
            try:
                if sample and index == 0:  # a draw: of the same shape and dtype
                    torch.testing.assert_close(torch.zeros_like(got), torch.zeros_like(want))
                else:
                    torch.testing.assert_close(got, want)
            except AssertionError as error:
                raise ExportMismatch(f"the exported {format} policy's {name} differs from the network's on a batch of "
                                     f"{batch_size}: {' '.join(str(error).split())}") from None
    return CHECK_BATCH_SIZES


def _torchscript_runner(data: bytes):
    loaded = torch.jit.load(io.BytesIO(data))
    return lambda inputs: loaded(*inputs)


def _onnx_runner(data: bytes):
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]

    def run(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        outputs = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True)})
        return [torch.from_numpy(output) for output in outputs]

    return run


# --- the command --------------------------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a ``BadInput`` (one line, exit 2) instead of the usage and the message."""

    def error(self, message: str):
        raise BadInput(message)


def _flag(value: str) -> bool:
    """``--trust_checkpoint`` alone, or ``--trust_checkpoint true`` as ``python -m lit_impala`` spells it."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(
        prog="python -m lit_impala.export",
        description="Export a checkpoint's acting policy to one file that runs without lit_impala: TorchScript (.pt, "
                    "torch.jit.load) or ONNX (.onnx, onnxruntime). It takes observations [N, *obs] as the training "
                    "env wrappers give them and returns action, policy_params and value (an LSTM policy also takes h, "
                    "c and returns next_h, next_c; zero them where an episode starts).",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint file (e.g. runs/checkpoints/cartpole/"
                                                           "last.ckpt)")
    parser.add_argument("--output", required=True, help="the file to write: .pt (TorchScript) or .onnx (ONNX)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: from --output's suffix")
    parser.add_argument("--sample", action="store_true",
                        help="the exported action is a draw from the policy (default: its mode, the greedy action)")
    parser.add_argument("--observation_dtype", choices=tuple(OBSERVATION_DTYPES), default=None,
                        help="what the env gives; default: uint8 for pixel encoders, float32 otherwise")
    parser.add_argument("--trust_checkpoint", type=_flag, nargs="?", const=True, default=False, metavar="true|false",
                        help="unpickle everything in --ckpt_path, which runs any code the file holds: only for a "
                             "checkpoint you made yourself or whose author you trust")
    return parser.parse_args(argv)


def export_checkpoint(args: argparse.Namespace) -> tuple[ExportedFile, dict]:
    """The command's work: ``args`` -> the file written and the checkpoint it came from."""
    format = format_for(args.output, args.format)
    if Path(args.output).is_dir():
        raise BadInput(f"--output {args.output!r} is a directory: name the file to write")
    if format == "onnx":
        check_onnx_installed()  # before reading a checkpoint
    if Path(args.ckpt_path).is_dir():
        raise BadInput(f"--ckpt_path {args.ckpt_path!r} is a directory: name a checkpoint file in it (last.ckpt)")
    try:
        checkpoint = read_checkpoint(args.ckpt_path, trust=args.trust_checkpoint)
        network = load_network(checkpoint, args.ckpt_path)
    except ValueError as error:  # missing, unreadable, unsafe, of a newer format or another network
        raise BadInput(str(error)) from None
    dtype = OBSERVATION_DTYPES[args.observation_dtype] if args.observation_dtype else None
    example = random_observations(observation_spec(network, dtype), 2, torch.Generator().manual_seed(0))
    data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    metadata = {
        "checkpoint": {"file": Path(args.ckpt_path).name, "update": checkpoint.get("global_step")},
        "env": {key: value for key, value in data_hparams.items() if value is not None and key in
                ("env_id", "max_episode_steps", "observation_key", "hide_observation_indices", "atari_options",
                 "action_mask_key")},
        "action_space": checkpoint["hyper_parameters"]["action_space"],
    }
    if checkpoint["hyper_parameters"].get("observation_parts"):  # a dict observation: the packed vector's order
        metadata["observation_parts"] = checkpoint["hyper_parameters"]["observation_parts"]
    return export_policy(network, args.output, format, example, args.sample, metadata), checkpoint


def describe(exported: ExportedFile, checkpoint: dict) -> str:
    """What the command prints: the file, its inputs and outputs, and the check."""
    def tensors(named: dict) -> str:
        return ", ".join(f"{name} {dtype} [{', '.join(map(str, shape))}]" for name, (shape, dtype) in named.items())

    sizes = ", ".join(map(str, exported.checked_batch_sizes))
    outputs = "outputs but the action (a draw)" if exported.sampled else "outputs"
    checked = (f"{outputs} equal the network's on random batches of N = {sizes}" if sizes
               else "not checked here (onnxruntime is not installed)")
    return (f"Exported update {checkpoint.get('global_step', '?')} to {exported.path} ({exported.format}): "
            f"{tensors(exported.signature.inputs)} -> {tensors(exported.signature.outputs)}; {checked}")


def main(argv: list[str] | None = None) -> None:
    """``python -m lit_impala.export``: a bad input is one ``error:`` line and exit code 2
    (``LIT_IMPALA_FULL_ERROR=1``: the traceback); a file that fails its check, one line and exit code 1."""
    try:
        exported, checkpoint = export_checkpoint(parse_arguments(argv))
    except BadInput as error:
        if os.environ.get(FULL_ERROR_ENV) == "1":
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except ExportMismatch as error:
        if os.environ.get(FULL_ERROR_ENV) == "1":
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print(describe(exported, checkpoint), flush=True)


if __name__ == "__main__":
    main()
