"""Checkpoint files: an interrupted write leaves the previous file whole; reading refuses anything but tensors
and plain data unless trusted; the learning-rate schedule a resumed run continues with (float64 hand cases)."""

import fractions
import os

import pytest
import torch

from lit_impala.checkpoint_io import (
    PARTIAL_SUFFIX,
    CheckpointFiles,
    UnreadableCheckpoint,
    UnsafeCheckpoint,
    read_checkpoint,
    remove_partial_files,
    write_atomically,
)
from lit_impala.schedule import budget_problem, fit_to_budget, linear_schedule, linear_value


def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "last.ckpt"
    write_atomically(target, lambda file: file.write(b"old, complete"))

    def dies_halfway(file):
        file.write(b"new, half")
        raise KeyboardInterrupt  # a kill mid-write, as far as this process can tell

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, dies_halfway)
    assert target.read_bytes() == b"old, complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "the partial file is removed"
    # What a SIGKILL leaves instead (no Python cleanup): a hidden partial file, which the next run removes.
    leftover = tmp_path / f".last.ckpt.abc123{PARTIAL_SUFFIX}"
    leftover.write_bytes(b"half")
    assert remove_partial_files(tmp_path) == [leftover] and target.exists()


def test_files_are_written_in_their_own_directory_with_the_users_permissions(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))  # never used
    target = tmp_path / "sub" / "a.ckpt"
    CheckpointFiles().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    assert read_checkpoint(target)["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not (tmp_path / "elsewhere").exists()


def test_reading_refuses_objects_unless_trusted(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}, "note": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UnsafeCheckpoint, match=r"refused unread: .* \(fractions.Fraction\).* --trust_checkpoint true"):
        read_checkpoint(path)
    assert read_checkpoint(path, trust=True)["note"] == fractions.Fraction(1, 3)
    io = CheckpointFiles(trust=True)
    assert io.load_checkpoint(path)["note"] == fractions.Fraction(1, 3)
    with pytest.raises(UnsafeCheckpoint):
        CheckpointFiles().load_checkpoint(path)


@pytest.mark.parametrize("content, problem", [
    (b"", "cannot be read"),
    (b"PK\x03\x04 half a zip", "cannot be read"),
    (None, "does not exist"),
    ("not a dict", "is not a Lightning checkpoint"),
])
def test_reading_names_an_unreadable_file(tmp_path, content, problem):
    path = tmp_path / "bad.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UnreadableCheckpoint, match=problem) as error:
        read_checkpoint(path)
    assert repr(str(path)) in str(error.value)


def test_a_checkpoint_read_once_is_handed_over_not_read_again(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": {}}, path)
    io = CheckpointFiles()
    content = {"state_dict": {}, "read": "by the CLI"}
    io.hand_over(path, content)
    path.unlink()  # a second read would fail
    assert io.load_checkpoint(str(tmp_path / "." / "a.ckpt")) is content


def _rates(schedule, steps):
    rates = []
    for _ in range(steps):
        rates.append(schedule.optimizer.param_groups[0]["lr"])
        schedule.optimizer.step()
        schedule.step()
    return rates


def _fresh(total_steps, decay=True, lr=0.002):
    optimizer = torch.optim.RMSprop([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return linear_schedule(optimizer, total_steps, decay)


def test_a_resumed_schedule_goes_on_as_in_a_run_given_the_new_budget():
    # The saved schedule: a 40-update run, restored at its end (lr 0 there).
    saved = _fresh(40)
    _rates(saved, 40)
    restored = _fresh(80)
    restored.optimizer.load_state_dict(saved.optimizer.state_dict())  # as Lightning restores them
    restored.load_state_dict(saved.state_dict())
    assert restored.optimizer.param_groups[0]["lr"] == 0.0 and restored.total_iters == 40
    line = fit_to_budget(restored, step=40, total_steps=80, decay=True)
    assert line is not None and "decayed to 0 at update 40" in line and "decays to 0 at update 80" in line
    expected = [0.002 * (1 - step / 80) for step in range(40, 80)]  # the closed form, from the paper's schedule
    assert _rates(restored, 40) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    reference = _fresh(80)  # a run given 80 updates from the start
    assert _rates(reference, 80)[40:] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_a_schedule_resumed_with_its_own_budget_is_left_as_it_was():
    saved = _fresh(100)
    _rates(saved, 30)
    restored = _fresh(100)
    restored.optimizer.load_state_dict(saved.optimizer.state_dict())
    restored.load_state_dict(saved.state_dict())
    assert fit_to_budget(restored, step=30, total_steps=100, decay=True) is None
    assert _rates(restored, 5) == pytest.approx([0.002 * (1 - s / 100) for s in range(30, 35)])


def test_turning_the_decay_off_on_resume_keeps_the_rate_constant():
    saved = _fresh(100)
    _rates(saved, 30)
    restored = _fresh(100, decay=False)
    restored.optimizer.load_state_dict(saved.optimizer.state_dict())
    restored.load_state_dict(saved.state_dict())
    assert "is constant" in fit_to_budget(restored, step=30, total_steps=100, decay=False)
    assert _rates(restored, 3) == [0.002] * 3


def test_the_entropy_schedule_is_a_line_from_its_start_to_its_end_held_after_it():
    # model.ent_coef 0.05 -> model.ent_coef_final 0.01 over 400 updates, by hand
    assert linear_value(0.05, 0.01, 0, 400) == 0.05
    assert linear_value(0.05, 0.01, 100, 400) == pytest.approx(0.04, abs=1e-15)
    assert linear_value(0.05, 0.01, 300, 400) == pytest.approx(0.02, abs=1e-15)
    assert linear_value(0.05, 0.01, 400, 400) == pytest.approx(0.01, abs=1e-15)
    assert linear_value(0.05, 0.01, 900, 400) == pytest.approx(0.01, abs=1e-15)  # an extended run, before resume
    assert linear_value(0.0, 0.02, 200, 400) == pytest.approx(0.01, abs=1e-15)  # it may rise as well
    assert budget_problem(-1, lr_decay=False, ent_coef_final=0.01).startswith(
        "model.ent_coef_final is reached at trainer.max_steps, which is -1")
    assert budget_problem(None, lr_decay=True, ent_coef_final=None).startswith("model.lr_decay decays")
    assert budget_problem(None, lr_decay=False, ent_coef_final=None) is None  # nothing runs over a budget
    assert budget_problem(1, lr_decay=True, ent_coef_final=0.0) is None
