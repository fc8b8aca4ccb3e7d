"""The learner on a GPU, as a user runs it: `fit` with the learner on CUDA and the actors on CPU solves CartPole, and
the weights the actors act with are the CUDA learner's, published after every update.

Marked ``gpu``: skipped with its reason without CUDA; ``benchmarks/gpu_check.py`` runs it on a GPU machine, whose
image has no W&B and no mp4 writer, hence the CSV logger and the evaluation without a video.
"""

import json
import re
from functools import partial

import pytest
import torch

from lit_impala.core.distributions import make_distribution
from lit_impala.core.networks import ImpalaAgent
from lit_impala.data import ImpalaDataModule
from lit_impala.schema import to_time_major
from tests.cli_runner import assert_all_gone, run_lit_impala
from tests.conftest import REPO

ACCELERATOR = "gpu"  # "cpu" runs the same checks here, to try a change to them without a GPU
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ACCELERATOR == "gpu" and not torch.cuda.is_available(),
                                 reason="needs CUDA: the learner runs on the GPU")]
CONFIG = str(REPO / "configs" / "cartpole.yaml")


def arguments(tmp_path, *extra):
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True}},
        {"class_path": "lit_impala.callbacks.EvaluationCallback",
         "init_args": {"every_n_steps": 10_000, "num_episodes": 3, "record_video": False}},
    ]
    return ["fit", "--config", CONFIG, f"--trainer.accelerator={ACCELERATOR}", "--trainer.devices=1",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
            f"--trainer.callbacks={json.dumps(callbacks)}", *extra]


def test_fit_with_the_learner_on_cuda_solves_cartpole(tmp_path):
    run = run_lit_impala(arguments(tmp_path, "--trainer.enable_progress_bar=false"), tmp_path, timeout_s=300)
    assert run.returncode == 0, run.tail()
    if ACCELERATOR == "gpu":
        assert re.search(r"GPU available: True \(cuda\), used: True", run.output), run.tail()
    summary = re.search(r"Training stopped after (\d+) updates and (\d+) env frames; mean return of the last "
                        r"\d+ episodes: (-?\d+\.\d)", run.stdout)
    assert summary, run.tail()
    assert float(summary.group(3)) >= 475.0, run.tail()  # the config's stop_at_return, reached before its budget
    assert int(summary.group(1)) < 2000, run.tail()
    assert "Traceback" not in run.output
    assert_all_gone(run.descendants)


def test_weights_published_from_cuda_reach_the_actors():
    """Per-actor inference: CPU actors act with exactly the weights the CUDA learner published, version by version."""
    device = "cuda" if ACCELERATOR == "gpu" else "cpu"
    data = ImpalaDataModule("CartPole-v1", num_actors=2, envs_per_actor=4, unroll_length=10, batch_size=4, seed=2)
    factory = partial(ImpalaAgent, tuple(data.observation_shape), make_distribution(data.env_facts.action_space),
                      policy_init_scale=3.0)
    torch.manual_seed(0)
    network = factory().to(device)
    data.start_actors(network, factory, version=3)
    try:
        stream = iter(data.train_dataloader())
        for version in (3, 4):
            if version == 4:  # a learner step on the GPU, then its publication
                with torch.no_grad():
                    for parameter in network.parameters():
                        parameter.add_(0.3 * torch.randn_like(parameter))
                data.publish_weights(network, version)
            checked = 0
            for _ in range(50):
                trajectory = to_time_major(next(stream).to(device))
                mine = trajectory.policy_version == version
                if not mine.any():
                    continue  # unrolls acted before the publication
                with torch.no_grad():
                    output = network(trajectory.observation, None, trajectory.is_init)
                log_prob = network.distribution.log_prob(output.policy_params, trajectory.action)
                torch.testing.assert_close(log_prob[mine], trajectory.behaviour_log_prob[mine], atol=1e-4, rtol=0)
                checked += int(mine.sum())
                if checked >= 200:
                    break
            assert checked >= 200, f"too few steps acted with version {version}: {checked}"
    finally:
        data.stop_actors()
