"""The argument types are the one statement of what a value may be: Python callers get the errors the CLI gives."""

import math

import pytest

from lit_impala.callbacks import EpisodeStats, EvaluationCallback, ProgressBar
from lit_impala.config import PositiveInt, check_arguments
from lit_impala.data import ImpalaDataModule
from lit_impala.learner import ImpalaModule

CARTPOLE_FACTS = {"observation_shape": [4], "action_space": {"type": "discrete", "n": 2}}


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "lr must be a PositiveFloat, got -1.0"),
    ({"lr": 0}, "lr must be a PositiveFloat, got 0"),
    ({"discount": 1.5}, "discount must be a ClosedUnitInterval, got 1.5"),
    ({"lambda_": -0.1}, "lambda_ must be a ClosedUnitInterval, got -0.1"),
    ({"clip_rho_threshold": 0.0}, "clip_rho_threshold must be a PositiveFloat, got 0.0"),
    ({"reward_clip": 0.0}, "reward_clip must be a PositiveFloat, got 0.0"),
    ({"ent_coef": -0.01}, "ent_coef must be a NonNegativeFloat, got -0.01"),
    ({"hidden_dim": 0}, "hidden_dim must be a PositiveInt, got 0"),
    ({"hidden_dim": True}, "hidden_dim must be a PositiveInt, got True"),
    ({"encoder": "transformer"},
     "encoder must be one of ['mlp', 'resnet', 'nature', 'rllib', 'minatar'], got 'transformer'"),
    ({"pg_target": "acme"}, "pg_target must be one of ['paper', 'rlax'], got 'acme'"),
    ({"observation_shape": [4, 0]}, "observation_shape must be positive"),
])
def test_the_learner_names_a_bad_argument(kwargs, message):
    with pytest.raises(ValueError) as error:
        ImpalaModule(**{**CARTPOLE_FACTS, **kwargs})
    assert message in str(error.value)


def test_optional_thresholds_accept_none():
    module = ImpalaModule(**CARTPOLE_FACTS, clip_rho_threshold=None, clip_c_threshold=None, reward_clip=None,
                          max_grad_norm=None)
    assert module.hparams.clip_rho_threshold is None


@pytest.mark.parametrize("kwargs, message", [
    ({"num_actors": 0}, "num_actors must be a PositiveInt, got 0"),
    ({"batch_size": -2}, "batch_size must be a PositiveInt, got -2"),
    ({"max_actor_restarts": -1}, "max_actor_restarts must be a NonNegativeInt, got -1"),
    ({"remote_node_timeout_s": 0}, "remote_node_timeout_s must be a PositiveFloat, got 0"),
    ({"remote_node_timeout_s": math.nan}, "remote_node_timeout_s must be a PositiveFloat, got nan"),
    ({"actors": "cloud"}, "actors must be one of ['local', 'remote'], got 'cloud'"),
    ({"actors": "remote", "sync_actors": True}, "sync_actors: true is for local actors"),
    ({"actors": "remote", "remote_launcher": "external"}, "remote_launcher: external needs remote_tcp_port"),
    ({"remote_join_timeout_s": 0}, "remote_join_timeout_s must be a PositiveFloat, got 0"),
    ({"actors": "remote", "remote_launcher": "external", "remote_tcp_port": 29500},
     "remote_launcher: external needs remote_bind_address, the address of this host the actors connect to"),
])
def test_the_data_module_names_a_bad_argument(kwargs, message):
    with pytest.raises(ValueError) as error:
        ImpalaDataModule(**kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize("build, message", [
    (lambda: EpisodeStats(return_window=0), "return_window must be a PositiveInt, got 0"),
    (lambda: EvaluationCallback(every_n_steps=0), "every_n_steps must be a PositiveInt, got 0"),
    (lambda: EvaluationCallback(video_fps=-1), "video_fps must be a PositiveInt, got -1"),
    (lambda: ProgressBar(log_every_s=0), "log_every_s must be a PositiveFloat, got 0"),
])
def test_callbacks_name_a_bad_argument(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


def test_only_optional_restricted_numbers_and_literals_are_checked():
    def f(count: PositiveInt, name: str, anything: int | str, maybe: PositiveInt | None = None):
        check_arguments(f, locals())

    f(1, "x", "y")
    f(1, "x", -5, None)
    with pytest.raises(ValueError, match="maybe must be a PositiveInt, got 0"):
        f(1, "x", 0, 0)
