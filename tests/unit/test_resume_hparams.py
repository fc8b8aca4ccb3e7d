"""Which model hyper-parameters a resumed run takes: the checkpoint's, and for an option added after the checkpoint
was written, the option's default (what the run that wrote it did), never this command's config value."""

from lit_impala.checkpoints import model_hparams
from lit_impala.config import argument_defaults
from lit_impala.learner import ImpalaModule


def checkpoint_with(hparams: dict) -> dict:
    return {"hyper_parameters": hparams, "lit_impala": {"format": 2}}


def test_an_option_newer_than_the_checkpoint_takes_its_default():
    written = {"observation_shape": [4], "action_space": {"type": "discrete", "n": 2}, "lr": 0.002}
    hparams = model_hparams(checkpoint_with(written), argument_defaults(ImpalaModule))
    assert hparams["lr"] == 0.002  # the checkpoint's own value
    assert hparams["value_normalization"] == "none"  # not written then: its default, whatever the config says
    assert hparams["optimizer"] == "rmsprop" and hparams["normalize_advantages"] is False
    assert "observation_shape" in hparams and hparams["observation_shape"] == [4]


def test_the_checkpoints_values_win_over_the_defaults():
    written = {"observation_shape": [4], "action_space": {}, "value_normalization": "popart", "value_norm_beta": 0.1}
    hparams = model_hparams(checkpoint_with(written), argument_defaults(ImpalaModule))
    assert hparams["value_normalization"] == "popart" and hparams["value_norm_beta"] == 0.1


def test_a_checkpoint_without_hyper_parameters_gets_none_added():
    assert model_hparams({"state_dict": {}}, argument_defaults(ImpalaModule)) == {}
