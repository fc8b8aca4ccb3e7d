"""The command line, through the real entry point with tiny sizes."""

import os
import time

import pytest
import yaml

from lit_impala.cli import cli_main
from lit_impala.wandb_history import read_history
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
    assert module.env_frames == 6 * 5 * 4
    assert module.network.policy_head.out_features == 2  # linked from the env, not written in the YAML
    assert cli.datamodule.collector is None  # actors shut down at the end
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
    for key in ("env_frames", "frames_per_second", "episode/return", "loss/total", "loss/policy", "loss/baseline",
                "loss/entropy", "entropy", "lr", "policy_lag/mean", "rho/mean", "grad_norm"):
        assert key in logged, f"{key} missing from the W&B history: {sorted(logged)}"
    assert max(row.get("env_frames", 0) for row in history) == 6 * 5 * 4
    assert list(tmp_path.rglob("last.ckpt")), "a final checkpoint must be saved"


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
    # unknown keys, on the command line and in a YAML file
    ("--model.learning_rate=0.1", "learning_rate"),
    ("CONFIG_WITH_UNKNOWN_KEY", "env_idd"),
    # envs and spaces
    ("--data.env_id=CartPole-v9", "CartPole-v9"),
    ("--data.env_id=FrozenLake-v1", "Env 'FrozenLake-v1' has observation space Discrete(16)"),
    ("--data.env_id=Blackjack-v1", "Env 'Blackjack-v1' has observation space Tuple"),
    ("--data.hide_observation_indices=[7]", "hide_observation_indices [7] are outside"),
    ("--model.encoder=transformer", "unknown encoder 'transformer'"),
    # sizes
    ("--data.unroll_length=0", "unroll_length must be a positive integer, got 0"),
    ("--data.batch_size=0", "batch_size must be a positive integer, got 0"),
    ("--data.num_actors=0", "num_actors must be a positive integer, got 0"),
    ("--data.envs_per_actor=-2", "envs_per_actor must be a positive integer, got -2"),
    # learning hyper-parameters
    ("--model.lr=-1", "lr must be > 0, got -1"),
    ("--model.lr=0", "lr must be > 0, got 0"),
    ("--model.clip_rho_threshold=0", "clip_rho_threshold must be > 0"),
    ("--model.clip_c_threshold=-1", "clip_c_threshold must be > 0"),
    ("--model.clip_pg_rho_threshold=0", "clip_pg_rho_threshold must be > 0"),
    ("--model.discount=1.5", "discount must be in [0, 1], got 1.5"),
    ("--model.discount=-0.1", "discount must be in [0, 1], got -0.1"),
    ("--model.lambda_=1.5", "lambda_ must be in [0, 1], got 1.5"),
    ("--model.reward_clip=0", "reward_clip must be > 0"),
    # checkpoints
    ("--ckpt_path=MISSING", "does not exist"),
    ("--ckpt_path=CORRUPT", "cannot be read"),
    ("--ckpt_path=OTHER_ENV", "was written for a different env or network"),
]


@pytest.fixture(scope="module")
def other_env_checkpoint(tmp_path_factory):
    """A real checkpoint of an Acrobot agent (6 observations, 3 actions)."""
    directory = tmp_path_factory.mktemp("acrobot")
    callbacks = '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "%s", "save_last": true}}]'
    cli_main(["fit", "--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.max_steps=2", "--trainer.callbacks=" + callbacks % directory, "--data.env_id=Acrobot-v1",
              "--data.num_actors=1", "--data.envs_per_actor=2", "--data.unroll_length=5", "--data.batch_size=2"])
    return directory / "last.ckpt"


def resolve(override: str, tmp_path, other_env_checkpoint) -> list[str]:
    if override == "CONFIG_WITH_UNKNOWN_KEY":
        config = tmp_path / "typo.yaml"
        config.write_text("data:\n  env_idd: CartPole-v1\n")
        return ["--config", str(config)]
    if override == "--ckpt_path=MISSING":
        return [f"--ckpt_path={tmp_path / 'missing.ckpt'}"]
    if override == "--ckpt_path=CORRUPT":
        corrupt = tmp_path / "corrupt.ckpt"
        corrupt.write_bytes(b"PK\x03\x04 half a checkpoint")
        return [f"--ckpt_path={corrupt}"]
    if override == "--ckpt_path=OTHER_ENV":
        return [f"--ckpt_path={other_env_checkpoint}"]
    return [override]


@pytest.mark.parametrize("override, message", BAD_INPUTS, ids=[o for o, _ in BAD_INPUTS])
def test_bad_input_is_named_before_actors_start(tmp_path, capsys, override, message, other_env_checkpoint):
    import psutil

    with pytest.raises((SystemExit, ValueError)) as error:
        cli_main(["fit", *tiny(tmp_path), "--trainer.logger=false", *resolve(override, tmp_path, other_env_checkpoint)])
    captured = capsys.readouterr()
    text = str(error.value) + captured.err + captured.out
    assert message in text
    assert "Traceback" not in text  # a message, not a worker's traceback
    # the error came before any actor process was spawned (W&B's service may be a child; actors are not)
    actors = [p for p in psutil.Process(os.getpid()).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert not actors


def test_the_bad_input_table_is_large():
    assert len(BAD_INPUTS) >= 15
