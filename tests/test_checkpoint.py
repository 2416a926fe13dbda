import os
import random

import numpy as np
import pytest
import torch

from trainer.core.checkpoint import (
    copy_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.core.errors import UserError


def _state():
    return {"model": {"w": torch.randn(64, 64)}, "progress": {"epoch": 3, "step": 90}, "rng": rng_state()}


def test_round_trip_with_weights_only(tmp_path):
    state = _state()
    path = save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["progress"] == state["progress"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    torch.load(path, weights_only=True)  # loadable by anyone with the safe loader


def test_truncated_file_is_named(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"last\.pt: truncated"):
        load_checkpoint(path)


def test_flipped_bytes_are_caught_by_the_checksum(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "last.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data, where torch.load alone notices nothing
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"last\.pt: corrupt checkpoint \(checksum mismatch"):
        load_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "trainer-checkpoint/1", "x": Payload()}, path)
    with pytest.raises(UserError, match="refused, it needs arbitrary unpickling"):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a checkpoint written by this framework"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(UserError, match="truncated or not a checkpoint"):
        load_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_copy_survives_replacing_the_source(tmp_path):
    last = save_checkpoint({"v": torch.tensor(1)}, tmp_path / "last.pt")
    best = copy_checkpoint(last, tmp_path / "best.pt")
    save_checkpoint({"v": torch.tensor(2)}, last)
    assert load_checkpoint(best)["v"].item() == 1 and load_checkpoint(last)["v"].item() == 2


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    save_checkpoint({"rng": rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert (
        torch.equal(expected[0], again[0])
        and np.array_equal(expected[1], again[1])
        and expected[2] == again[2]
    )


def _progress(step):
    return {"model": {"w": torch.full((4,), float(step))}, "progress": {"step": step}}


def test_history_keeps_the_newest_and_prunes_only_after_saving(tmp_path):
    from trainer.core.checkpoint import keep_history

    for step in (10, 20, 30):
        last = save_checkpoint(_progress(step), tmp_path / "last.pt")
        keep_history(last, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-000000020.pt", "step-000000030.pt"]
    assert load_checkpoint(tmp_path / "step-000000030.pt")["progress"]["step"] == 30
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "step-000000030.pt")  # a link, not a copy
    keep_history(last, 30, keep=1)  # keep_last=1: no history is written
    assert len(list(tmp_path.glob("step-*.pt"))) == 2


def test_newest_valid_falls_back_past_damaged_files(tmp_path, caplog):
    from trainer.core.checkpoint import keep_history, newest_valid

    for step in (10, 20):
        keep_history(save_checkpoint(_progress(step), tmp_path / "last.pt"), step, keep=3)
    (tmp_path / "last.pt").unlink()
    save_checkpoint(_progress(30), tmp_path / "last.pt")
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:200])  # the newest is truncated
    path, state = newest_valid(tmp_path)
    assert path.name == "step-000000020.pt" and state["progress"]["step"] == 20
    assert "last.pt: truncated" in caplog.text
    for p in tmp_path.glob("*.pt"):
        p.write_bytes(b"junk")
    with pytest.raises(UserError, match="no valid checkpoint"):
        newest_valid(tmp_path)


def test_stale_temporaries_are_removed(tmp_path):
    from trainer.core.checkpoint import remove_stale_temporaries

    (tmp_path / ".last.pt.123.tmp").write_bytes(b"half")
    save_checkpoint(_progress(1), tmp_path / "last.pt")
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_is_a_clear_error_and_the_old_checkpoint_survives(tmp_path, monkeypatch):
    import errno

    save_checkpoint(_progress(1), tmp_path / "last.pt")

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("trainer.core.checkpoint.torch.save", disk_full)
    with pytest.raises(
        UserError, match=r"last\.pt: could not write the checkpoint \(No space left on device\)"
    ):
        save_checkpoint(_progress(2), tmp_path / "last.pt")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_background_writer_snapshots_the_state_and_reports_errors(tmp_path):
    from trainer.core.checkpoint import CheckpointWriter

    weights = torch.zeros(4)
    writer = CheckpointWriter(tmp_path, keep_last=1)
    writer.save({"model": {"w": weights}, "progress": {"step": 1}}, step=1, last=True, best=True)
    weights += 1  # training goes on while the write is in flight
    writer.wait()
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.zeros(4))
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt")

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    import trainer.core.checkpoint

    original, trainer.core.checkpoint.torch.save = trainer.core.checkpoint.torch.save, disk_full
    try:
        writer.save({"model": {"w": weights}, "progress": {"step": 2}}, step=2, last=True, best=False)
        with pytest.raises(UserError, match="could not write the checkpoint"):
            writer.wait()  # the background failure surfaces in the training thread
    finally:
        trainer.core.checkpoint.torch.save = original
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["step"] == 1
