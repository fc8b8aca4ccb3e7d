"""The command line, through the real entry point with tiny sizes; what a user reads (messages, exit codes)
through a ``python -m lit_impala`` subprocess."""

import argparse
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from lit_impala.callbacks import EpisodeStats
from lit_impala.cli import FULL_ERROR_ENV, ConfigError, cli_main
from lit_impala.wandb_history import read_history
from tests.cli_runner import FORK_SERVER, FRESH_ENV, run_lit_impala
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "cartpole.yaml")


def tiny(tmp_path, *extra):
    return [
        "--config", CONFIG,
        "--trainer.max_steps=6",
        "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.num_actors=1",
        "--data.envs_per_actor=4",
        "--data.unroll_length=5",
        "--data.batch_size=4",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def test_fit_smoke_with_the_shipped_config(tmp_path, capsys):
    cli = cli_main(["fit", *tiny(tmp_path)])
    module = cli.trainer.lightning_module
    assert cli.trainer.global_step == 6
    assert EpisodeStats.of(cli.trainer).env_frames == 6 * 5 * 4
    assert module.network.policy_head.out_features == 2  # linked from the env, not written in the YAML
    assert cli.datamodule.actors is None  # actors shut down at the end
    out = capsys.readouterr().out
    assert "Training stopped after 6 updates and 120 env frames" in out
    assert "Checkpoints:" in out
    cli.trainer.logger.experiment.finish()  # flush: in a `fit` process, exiting does this
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline_runs, "the W&B logger must write an offline run"
    deadline = time.monotonic() + 20
    while not (history := read_history(offline_runs[0])) and time.monotonic() < deadline:
        time.sleep(0.5)  # under CPU load wandb's service may write the records after finish() returns
    logged = set().union(*history)
    for key in ("progress/env_frames", "progress/frames_per_second", "episode/return", "loss/total", "loss/policy",
                "loss/baseline", "loss/entropy", "train/entropy", "train/lr", "policy_lag/mean", "rho/mean",
                "train/grad_norm"):
        assert key in logged, f"{key} missing from the W&B history: {sorted(logged)}"
    assert max(row.get("progress/env_frames", 0) for row in history) == 6 * 5 * 4
    # ModelCheckpoint never saved before the end, so it writes last.ckpt itself: FinalCheckpoint adds no last-v1.ckpt
    assert [path.name for path in tmp_path.rglob("last*.ckpt")] == ["last.ckpt"], "one final checkpoint"


PHASES = ("imports", "set-up", "first rollout", "first update", "target reached", "end of fit")


def test_fit_ends_with_the_seconds_of_each_phase(tmp_path):
    """The shipped CartPole config as typed, to a low target: the last line says when each phase ended, from process
    start, in order and within the wall time measured outside; its 2 actors are forks of the preloaded server. Started
    afresh, as typed: no warning, from its imports or later."""
    run = run_lit_impala(["fit", "--config", CONFIG, "--trainer.enable_progress_bar=false",
                          "--episode_stats.stop_at_return=25", "--trainer.max_steps=300"], tmp_path, fresh=True)
    assert run.returncode == 0, run.tail()
    assert not re.search(r"\.py:\d+: ", run.output), run.tail()  # Python's and Lightning's warnings: "path.py:line: "
    line = next((line for line in run.stdout.splitlines() if line.startswith("Seconds from process start: ")), None)
    assert line is not None, run.tail()
    found = re.findall(r"([a-z -]+) (\d+\.\d)(?:,|$)", line.removeprefix("Seconds from process start: "))
    assert tuple(name.strip() for name, _ in found) == PHASES, line
    seconds = [float(value) for _, value in found]
    assert seconds == sorted(seconds) and 0 < seconds[0] and seconds[-1] <= run.wall_s, (line, run.wall_s)
    assert run.spawned_actors == 2, run.descendant_commands
    assert any(FORK_SERVER in cmdline for cmdline in run.descendant_commands.values()), run.descendant_commands


def test_passes_per_batch_takes_more_updates_and_counts_each_frame_once(tmp_path):
    """3 passes over each batch: 6 updates learn from 2 batches; the user reads 2 batches' frames, and the
    observation statistics in the checkpoint saw each frame once."""
    run = run_lit_impala(["fit", *tiny(tmp_path, "--data.passes_per_batch=3", "--model.normalize_observations=true",
                                       "--trainer.logger=false")], tmp_path)
    assert run.returncode == 0, run.tail()
    assert "Training stopped after 6 updates and 40 env frames" in run.stdout, run.tail()
    # No warning: Python's and Lightning's both print "path.py:line: message"
    assert not re.search(r"\.py:\d+: ", run.output), run.tail()
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6
    assert checkpoint["state_dict"]["network.normalizer.count"].item() == 2 * 5 * 4


def test_the_learning_options_of_the_family_configs_run_together(tmp_path):
    """Adam, advantage normalisation, PopArt and the clipped value loss in one run of minibatches: 2 passes of 3
    minibatches over each batch of 6 unrolls are 6 updates of 2 unrolls that learn from one batch, whose frames and
    observations count once; the value statistics learn from the first pass's minibatches only, and what they learnt
    is in the weights the run ends with."""
    cli = cli_main(["fit", *tiny(tmp_path, "--data.batch_size=6", "--data.passes_per_batch=2",
                                 "--data.minibatches_per_pass=3", "--model.normalize_observations=true",
                                 "--model.optimizer=adam",
                                 "--model.loss_reduction=mean", "--model.normalize_advantages=true",
                                 "--model.value_normalization=popart", "--model.value_norm_beta=0.5",
                                 "--model.value_clip=0.2", "--model.ent_coef=0.03", "--model.ent_coef_final=0.0",
                                 "--trainer.logger=false")])
    assert cli.trainer.global_step == 6
    assert EpisodeStats.of(cli.trainer).env_frames == 6 * 5
    assert cli.model.network.normalizer.count.item() == 6 * 5
    assert isinstance(cli.trainer.optimizers[0], torch.optim.Adam)
    value_normalizer = cli.model.network.value_normalizer
    assert value_normalizer.updates.item() == 3  # the first pass's 3 minibatches, not the second pass's
    assert value_normalizer.mean.item() != 0.0 and value_normalizer.std.item() != 1.0
    assert cli.model.entropy_coefficient() == 0.0  # the entropy schedule's end, at trainer.max_steps


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", CONFIG, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["lr"] == yaml.safe_load(open(CONFIG))["model"]["lr"]
    assert config["data"]["env_id"] == "CartPole-v1"
    assert "observation_shape" not in config["model"] and "action_space" not in config["model"]  # linked
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    cli = cli_main(["fit", "--config", str(saved), *tiny(tmp_path)[2:], "--trainer.logger=false"])
    assert cli.trainer.global_step == 6


def test_help_documents_the_arguments(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    text = capsys.readouterr().out
    for documented in ("clip_pg_rho_threshold", "rho-bar", "envs_per_actor", "unroll_length", "stop_at_return"):
        assert documented in text


BAD_INPUTS = [
    # the four of the issue, as typed
    ("--data.env_id NoSuchEnv-v9", "NoSuchEnv-v9"),
    ("--model.lr=-1", "model.lr: expected a PositiveFloat (v>0), got -1"),
    ("--model.clip_rho_threshold=0", "model.clip_rho_threshold: expected a PositiveFloat (v>0) or null, got 0"),
    ("--ckpt_path=MISSING", "does not exist"),
    # unknown keys and ill-typed values (jsonargparse's own errors), on the command line and in a YAML file
    ("--model.learning_rate=0.1", "learning_rate"),
    ("CONFIG_WITH_UNKNOWN_KEY", "env_idd"),
    ("--model.pg_target=acme", "model.pg_target: expected one of 'paper', 'rlax', got 'acme'"),
    ("--data.num_actors=two", "data.num_actors"),
    # envs and spaces
    ("--data.env_id=CartPole-v9", "CartPole-v9"),
    ("--data.env_id=FrozenLake-v1", "Env 'FrozenLake-v1' has observation space Discrete(16)"),
    ("--data.env_id=Blackjack-v1", "Env 'Blackjack-v1' has observation space Tuple"),
    ("--data.env_id=nosuchmodule:Foo-v0", "nosuchmodule"),
    ("--data.hide_observation_indices=[7]", "hide_observation_indices [7] are outside"),
    ("--model.encoder=transformer",
     "model.encoder: expected one of 'mlp', 'resnet', 'nature', 'rllib', 'minatar', got 'transformer'"),
    # sizes
    ("--data.unroll_length=0", "data.unroll_length: expected a PositiveInt (v>0), got 0"),
    ("--data.batch_size=0", "data.batch_size: expected a PositiveInt (v>0), got 0"),
    ("--data.envs_per_actor=-2", "data.envs_per_actor: expected a PositiveInt (v>0), got -2"),
    ("--data.passes_per_batch=0", "data.passes_per_batch: expected a PositiveInt (v>0), got 0"),
    ("--data.minibatches_per_pass=3", "batch_size 2 does not split into minibatches_per_pass=3 minibatches"),
    # learning hyper-parameters
    ("--model.lr=0", "model.lr: expected a PositiveFloat (v>0), got 0"),
    ("--model.clip_c_threshold=-1", "model.clip_c_threshold: expected a PositiveFloat (v>0) or null, got -1"),
    ("--model.policy_clip=0", "model.policy_clip: expected a PositiveFloat (v>0) or null, got 0"),
    ("--model.discount=1.5", "model.discount: expected a ClosedUnitInterval (v>=0 and v<=1), got 1.5"),
    ("--model.lambda_=1.5", "model.lambda_: expected a ClosedUnitInterval (v>=0 and v<=1), got 1.5"),
    ("--model.reward_clip=0", "model.reward_clip: expected a PositiveFloat (v>0) or null, got 0"),
    ("--model.value_norm_beta=0", "value_norm_beta must be in (0, 1] (the statistics' step), got 0.0"),
    ("--model.optimizer=sgd", "model.optimizer: expected one of 'rmsprop', 'adam', got 'sgd'"),
    ("--trainer.max_steps=-1", "trainer.max_steps, which is -1"),
    ("--model.lr_decay=false --model.ent_coef_final=0 --trainer.max_steps=-1",
     "model.ent_coef_final is reached at trainer.max_steps, which is -1"),
    ("--episode_stats.return_window=0", "episode_stats.return_window: expected a PositiveInt (v>0), got 0"),
    # settings that contradict each other
    ("--data.actors=remote --trainer.accelerator=cpu --trainer.devices=2 --trainer.strategy=ddp",
     "data.actors remote needs a single learner process, got 2"),
    ("--data.actors=remote --data.inference=server", "inference: server is for local actors"),
    ("--data.inference=server --data.inference_device=gpu0", "inference_device: 'gpu0' is not a torch device"),
    ("--data.inference=gpu", "data.inference: expected one of 'actor', 'server', got 'gpu'"),
    ("--model.use_lstm=true --model.shared_encoder=false", "shared_encoder=False is for feed-forward agents"),
    # checkpoints
    ("--ckpt_path=CORRUPT", "cannot be read"),
    ("--ckpt_path=OTHER_ENV", "was written for a different env or network"),
    ("--ckpt_path=UNSAFE", "was refused unread: it holds a Python object that is not plain data (posix.system)"),
]
TINY = ["--trainer.max_steps=4", "--data.num_actors=1", "--data.envs_per_actor=2", "--data.unroll_length=5",
        "--data.batch_size=2", "--trainer.logger=false"]


def other_env_checkpoint(directory):
    """A real checkpoint of an Acrobot agent (6 observations, 3 actions)."""
    callbacks = ('[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                 '"init_args": {"dirpath": "%s", "save_last": true}}]')
    cli_main(["fit", "--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.max_steps=2", "--trainer.callbacks=" + callbacks % directory, "--data.env_id=Acrobot-v1",
              "--data.num_actors=1", "--data.envs_per_actor=2", "--data.unroll_length=5", "--data.batch_size=2"])
    return directory / "last.ckpt"


class RunsCode:
    """A pickled object that runs a shell command when it is unpickled (what a hostile checkpoint holds)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def unsafe_checkpoint(directory):
    """A real checkpoint's content plus an object that would create ``directory / "code_ran"`` if unpickled."""
    checkpoint = torch.load(REPO / "tests" / "data" / "format1_cartpole_step30.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["note"] = RunsCode(f"touch {directory / 'code_ran'}")
    torch.save(checkpoint, directory / "hostile.ckpt")
    return directory / "hostile.ckpt"


def resolve(override: str, directory) -> list[str]:
    if override == "CONFIG_WITH_UNKNOWN_KEY":
        config = directory / "typo.yaml"
        config.write_text("data:\n  env_idd: CartPole-v1\n")
        return ["--config", str(config)]
    if override == "--ckpt_path=MISSING":
        return [f"--ckpt_path={directory / 'missing.ckpt'}"]
    if override == "--ckpt_path=CORRUPT":
        corrupt = directory / "corrupt.ckpt"
        corrupt.write_bytes(b"PK\x03\x04 half a checkpoint")
        return [f"--ckpt_path={corrupt}"]
    if override == "--ckpt_path=UNSAFE":
        return [f"--ckpt_path={unsafe_checkpoint(directory)}"]
    if override == "--ckpt_path=OTHER_ENV":
        return [f"--ckpt_path={other_env_checkpoint(directory / 'acrobot')}"]
    return override.split(" ")


AS_TYPED = 4  # the first bad inputs start `python -m lit_impala` afresh; the rest are forked with the imports done
SAME_BOTH_WAYS = "--model.lr=-1"  # one of those four, run both ways


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Every bad input typed at the real CLI, two at a time. The issue's four start ``python -m lit_impala`` as a
    user does (~5 s of imports each); the others are the same command forked from a server that has imported it
    (``tests/preloaded_lit_impala``: what they test comes after the imports), and ``SAME_BOTH_WAYS`` runs both ways
    (``test_a_preloaded_command_prints_what_a_fresh_one_prints``)."""
    directories = {override: tmp_path_factory.mktemp("bad") for override, _ in BAD_INPUTS}
    directories["preloaded"] = tmp_path_factory.mktemp("bad")
    commands = {override: ["fit", "--config", CONFIG, *TINY, *resolve(override, directories[override])]
                for override, _ in BAD_INPUTS}
    commands["preloaded"] = commands[SAME_BOTH_WAYS]
    fresh = {override for override, _ in BAD_INPUTS[:AS_TYPED]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {override: pool.submit(run_lit_impala, commands[override], directories[override], 120.0,
                                          fresh=override in fresh)
                   for override in commands}
        return {override: future.result() for override, future in futures.items()}


@pytest.mark.slow  # the table: 4 commands of ~5 s and 37 forked ones of ~1 s, two at a time
@pytest.mark.parametrize("override, message", BAD_INPUTS, ids=[o for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2_before_actors_start(bad_input_runs, override, message):
    run = bad_input_runs[override]
    assert run.returncode == 2, run.tail()
    assert "Traceback" not in run.output, run.tail()
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], run.tail()
    assert run.stderr.rstrip().endswith(error_lines[0]), run.tail()  # the last thing the user reads
    # A short message: at most Lightning's few start-up lines (seed, GPU/TPU) before it.
    assert len(run.output.strip().splitlines()) <= 5, run.tail()
    assert run.spawned_actors == 0, "the error must come before any actor process starts"


def test_a_hostile_checkpoint_runs_no_code(bad_input_runs):
    """The refusal above comes before anything in the file is unpickled: the command it holds never ran (and
    the same file with full unpickling does run it: the check can fail)."""
    run = bad_input_runs["--ckpt_path=UNSAFE"]
    (hostile,) = [arg.split("=", 1)[1] for arg in run.args if arg.startswith("--ckpt_path=")]
    marker = Path(hostile).parent / "code_ran"
    assert not marker.exists()
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_the_bad_input_table_is_large():
    assert len(BAD_INPUTS) >= 20


def test_a_preloaded_command_prints_what_a_fresh_one_prints(bad_input_runs):
    """The forked copies stand for ``python -m lit_impala``: the same input gives the same output and exit code both
    ways."""
    fresh, forked = bad_input_runs[SAME_BOTH_WAYS], bad_input_runs["preloaded"]
    assert SAME_BOTH_WAYS in [override for override, _ in BAD_INPUTS[:AS_TYPED]]
    assert not fresh.preloaded and forked.preloaded != bool(os.environ.get(FRESH_ENV))
    assert forked.args == fresh.args
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.spawned_actors == fresh.spawned_actors == 0


def test_full_error_shows_the_traceback_for_debugging(tmp_path):
    run = run_lit_impala(["fit", "--config", CONFIG, *TINY, "--model.lr=-1"], tmp_path, env={FULL_ERROR_ENV: "1"})
    assert run.returncode == 1 and "Traceback (most recent call last)" in run.stderr, run.tail()
    assert 'Parser key "model.lr":\n  Not of type PositiveFloat: -1' in run.stderr


def test_python_callers_get_exceptions_not_exits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="sync_actors: true is for local actors"):
        cli_main(["fit", "--config", CONFIG, *TINY, "--data.actors=remote", "--data.sync_actors=true"])
    with pytest.raises(argparse.ArgumentError, match="learning_rate"):
        cli_main(["fit", "--config", CONFIG, *TINY, "--model.learning_rate=0.1"])


def test_the_module_config_selects_the_pg_target(tmp_path, monkeypatch):
    """``model.pg_target`` reaches the learner: a tiny CartPole fit with the rlax target and lambda 0.5."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main([
        "fit", "--config", str(REPO / "configs" / "cartpole.yaml"), "--model.pg_target=rlax", "--model.lambda_=0.5",
        "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=null", "--trainer.enable_checkpointing=false",
        "--data.num_actors=1", "--data.envs_per_actor=4", "--data.unroll_length=5", "--data.batch_size=4",
    ])
    assert cli.model.hparams.pg_target == "rlax"
    assert cli.trainer.global_step == 3
    with pytest.raises(argparse.ArgumentError, match="acme"):  # a Literal: refused at parse time
        cli_main(["fit", "--config", str(REPO / "configs" / "cartpole.yaml"), "--model.pg_target=acme"])
