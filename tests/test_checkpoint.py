"""Checkpoint files: atomic writes, safe loading, RNG round trip, latest/prune helpers."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from vqkit.errors import VqkitError
from vqkit.train import checkpoint as ckpt
from vqkit.train.schedule import WarmupSchedule, make_scheduler


def _state(step: int = 3) -> dict:
    return {"format": ckpt.FORMAT, "step": step, "model": {"w": torch.arange(4.0)}, "rng": ckpt.capture_rng()}


def test_save_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "c" / "step_00000003.pt"
    ckpt.save_checkpoint(path, _state(3))
    ckpt.save_checkpoint(path, _state(4))
    assert ckpt.load_checkpoint(path)["step"] == 4
    assert sorted(os.listdir(path.parent)) == ["step_00000003.pt"]  # no temp files left


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "final.pt"
    ckpt.save_checkpoint(path, _state(1))
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(path, {"format": 1, "model": {}, "bad": Boom()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["final.pt"]


def test_load_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": Evil()}, path)
    with pytest.raises(VqkitError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a zip", pickle.dumps({"a": 1})])
def test_load_reports_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(VqkitError, match="bad.pt"):
        ckpt.load_checkpoint(path)


def test_load_reports_missing_and_foreign_files(tmp_path):
    with pytest.raises(VqkitError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(VqkitError, match="not a vqkit checkpoint"):
        ckpt.load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": ckpt.FORMAT + 1, "model": {}}, tmp_path / "future.pt")
    with pytest.raises(VqkitError, match="newer vqkit"):
        ckpt.load_checkpoint(tmp_path / "future.pt")


def test_rng_states_round_trip_through_a_safe_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    path = tmp_path / "rng.pt"
    ckpt.save_checkpoint(path, _state())
    expected = (random.random(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng(ckpt.load_checkpoint(path)["rng"])
    got = (random.random(), np.random.randn(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_latest_and_prune(tmp_path):
    folder = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(folder) is None
    for step in (10, 20, 30):
        path = ckpt.save_checkpoint(ckpt.step_file(folder, step), _state(step))
        ckpt.write_latest(folder, path, step)
    assert ckpt.latest_checkpoint(folder).name == "step_00000030.pt"
    deleted = ckpt.prune_checkpoints(folder, keep=2)
    assert [p.name for p in deleted] == ["step_00000010.pt"]
    (folder / ckpt.LATEST).unlink()  # without the pointer, the highest step wins
    assert ckpt.latest_checkpoint(folder).name == "step_00000030.pt"


def test_the_newest_complete_file_wins_over_a_stale_pointer_and_temp_files_go(tmp_path):
    folder = tmp_path / "checkpoints"
    path = ckpt.save_checkpoint(ckpt.step_file(folder, 3), _state(3))
    ckpt.write_latest(folder, path, 3)
    # killed after final.pt (step 6) was renamed, before latest.json was rewritten
    ckpt.save_checkpoint(folder / "final.pt", _state(6))
    assert ckpt.latest_checkpoint(folder).name == "final.pt"
    # a finished run resumed with more steps: a later step file beats the old final.pt
    ckpt.save_checkpoint(ckpt.step_file(folder, 9), _state(9))
    assert [p.name for p in ckpt.checkpoint_candidates(folder)] == [
        "step_00000009.pt", "final.pt", "step_00000003.pt"]
    for name in (".step_00000012.pt.tmp-4242", ".final.pt.tmp-1", ".last.pt.tmp", ".latest.json.tmp-7"):
        (folder / name).write_bytes(b"partial")
    removed = ckpt.remove_temp_files(folder)
    assert len(removed) == 4 and sorted(p.name for p in folder.iterdir()) == [
        "final.pt", "latest.json", "step_00000003.pt", "step_00000009.pt"]


def test_newest_intact_skips_damaged_files_and_says_so(tmp_path):
    folder = tmp_path / "checkpoints"
    ckpt.save_checkpoint(ckpt.step_file(folder, 3), _state(3))
    ckpt.save_checkpoint(ckpt.step_file(folder, 6), _state(6))
    ckpt.step_file(folder, 6).write_bytes(b"garbage")
    said = []
    path, state = ckpt.newest_intact(folder, warn=said.append)
    assert path.name == "step_00000003.pt" and state["step"] == 3
    assert len(said) == 1 and "step_00000006.pt is not a vqkit checkpoint" in said[0]
    ckpt.step_file(folder, 3).write_bytes(b"")
    with pytest.raises(VqkitError, match="no intact checkpoint"):
        ckpt.newest_intact(folder)


def test_a_failing_write_names_the_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "step_00000001.pt"
    real_open = open

    class Full:  # a file on a disk that fills up after 100 bytes
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(ckpt, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError) as info:  # torch reports it as "unexpected pos": not here
        ckpt.save_checkpoint(path, _state(1))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


def test_schedule_shapes():
    s = WarmupSchedule("cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0) and s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    assert s(9) == pytest.approx(0.55)
    lin = WarmupSchedule("linear", 0, 10, 0.0)
    assert lin(5) == pytest.approx(0.5)
    assert WarmupSchedule("constant", 2, 10)(7) == 1.0
    with pytest.raises(ValueError):
        WarmupSchedule("step")


def test_scheduler_state_loads_safely(tmp_path):
    from vqkit.recipe import TrainConfig

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(steps=10, schedule="cosine", warmup_steps=2))
    for _ in range(3):
        opt.step()
        sched.step()
    path = tmp_path / "s.pt"
    torch.save({"format": 1, "model": {}, "sched": sched.state_dict()}, path)
    state = ckpt.load_checkpoint(path)
    opt2 = torch.optim.Adam([p], lr=1.0)
    sched2 = make_scheduler(opt2, TrainConfig(steps=10, schedule="cosine", warmup_steps=2))
    sched2.load_state_dict(state["sched"])
    assert sched2.get_last_lr() == sched.get_last_lr()
