"""Training under faults: `kill -9` at chosen instants (inside a checkpoint write, before
its rename, right after final.pt is renamed, at an arbitrary moment) then `--resume`;
damaged and foreign checkpoint files; a run folder that cannot be created and a full
file system. MLflow contents are read back from the sqlite store."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from vqkit.cli import main
from vqkit.testing.sweeps import TINY_RECIPE
from vqkit.train import checkpoint as ckpt

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, closed_port

STEPS = 8
TINY = {
    **TINY_RECIPE,
    "train": {**TINY_RECIPE["train"], "steps": STEPS, "log_every": 1, "image_every": 100, "checkpoint_every": 3,
              "keep_checkpoints": 3},
    "eval": {**TINY_RECIPE["eval"], "metrics": ["psnr"]},
    "tracking": {"experiment": "faults", "output_dir": "runs"},
}

#: a `vqkit train` child that SIGKILLs itself at a chosen instant of its checkpoint writes
_KILLED_AT = r"""
import os, signal, sys
from vqkit.train import checkpoint as c
instant, target = sys.argv[1], sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if instant == "mid_write":  # some bytes of the target's temp file written
    original_write = c._Recording.write
    def write(self, data):
        n = original_write(self, data)
        if target in self.f.name and self.f.tell() > 2000:
            die()
        return n
    c._Recording.write = write
else:
    original_replace = os.replace
    def replace(src, dst, *a, **k):
        if instant == "before_rename" and str(dst).endswith(target):
            die()
        original_replace(src, dst, *a, **k)
        if instant == "after_rename" and str(dst).endswith(target):
            die()
    os.replace = replace
from vqkit.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture
def workdir(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "tracking": {**TINY["tracking"], "uri": store}}))
    return tmp_path


def _only_run(uri: str):
    client = _client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    return client, run


def _assert_every_step_once(uri: str) -> None:
    client, run = _only_run(uri)
    assert run.info.status == "FINISHED"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
        if key.startswith("eval/"):
            assert sorted(steps) == [4, 8], (key, steps)  # the final eval once
        elif not key.startswith("system/"):
            assert sorted(steps) == list(range(1, STEPS + 1)), (key, steps)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


# =========================================================================== kill -9, resume
@pytest.mark.parametrize(
    "instant, target",
    [
        ("mid_write", "step_00000006.pt"),  # inside the second checkpoint's write
        ("before_rename", "step_00000006.pt"),  # complete temp file, not renamed
        ("after_rename", "final.pt"),  # final.pt in place, latest.json still on step 6
        ("external", ""),  # kill -9 from outside, once the first checkpoint exists
    ],
)
def test_kill_9_then_resume_logs_every_metric_step_exactly_once(workdir, store, instant, target):
    argv = ["train", "tiny.yaml", "--quiet"]
    if instant == "external":
        proc = subprocess.Popen([sys.executable, "-m", "vqkit.cli", *argv], cwd=workdir, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not list(workdir.glob("runs/*/checkpoints/step_00000003.pt")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
        proc = subprocess.run([sys.executable, "-c", _KILLED_AT, instant, target, *argv], cwd=workdir,
                              env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, getattr(proc, "stderr", "")
    (run_dir,) = (workdir / "runs").iterdir()
    if instant in ("mid_write", "before_rename"):
        assert _temp_files(run_dir / "checkpoints")  # what the kill left behind
    done = subprocess.run([sys.executable, "-m", "vqkit.cli", "train", "--resume", str(run_dir), "--quiet"],
                          cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if instant == "after_rename":  # the newest complete file is final.pt: nothing redone
        assert "nothing to do" in done.stderr
    _assert_every_step_once(store)
    assert not _temp_files(run_dir), _temp_files(run_dir)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints"))["step"] == STEPS


# =========================================================================== damaged files
def _flip_bytes_inside_largest_tensor(path: Path, n: int = 2000) -> None:
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    n = min(n, info.file_size)
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_refused_and_resume_falls_back_to_an_intact_one(workdir, store, capsys):
    assert main(["train", "tiny.yaml", "--quiet"]) == 0
    client, run = _only_run(store)
    run_dir = workdir / "runs" / run.info.run_id
    final = run_dir / "checkpoints" / "final.pt"
    _flip_bytes_inside_largest_tensor(final)
    capsys.readouterr()
    # the file itself: refused, named, the run left as it was
    assert main(["train", "--resume", str(final), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"vqkit: error: checkpoint {final} is damaged: its content does not match the SHA-256 digest "
        "written with it (bytes changed on disk or in a copy)"]
    assert main(["eval", str(final)]) == 2
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    # the run dir: the newest intact checkpoint (step 6), saying so; steps 7..8 not logged twice
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"vqkit: warning: checkpoint {final} is damaged" in err
    assert f"resuming from {run_dir / 'checkpoints' / 'step_00000006.pt'}, the newest intact checkpoint" in err
    _assert_every_step_once(store)
    assert ckpt.load_checkpoint(final)["step"] == STEPS  # rewritten whole by the resumed leg


@pytest.mark.parametrize("content", [b"hello world\n", b"PK\x03\x04 not really a zip", b""])
def test_a_file_that_is_not_a_checkpoint_is_named_exit_2(workdir, capsys, content):
    path = workdir / "notes.pt"
    path.write_bytes(content)
    for argv in (["train", "--resume", str(path)], ["eval", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vqkit: error: {path} is not a vqkit checkpoint") and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_flipped_bytes_fail_the_digest_and_format_1_files_still_load(tmp_path):
    import torch

    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(path, {"format": ckpt.FORMAT, "step": 1, "model": {"w": torch.randn(4096)}})
    assert ckpt.load_checkpoint(path)["step"] == 1
    _flip_bytes_inside_largest_tensor(path, n=1)
    with pytest.raises(Exception, match="is damaged"):
        ckpt.load_checkpoint(path)
    old = tmp_path / "old.pt"
    torch.save({"format": 1, "step": 2, "model": {"w": torch.zeros(2)}}, old)  # vqkit before digests
    assert ckpt.load_checkpoint(old)["step"] == 2


# =========================================================================== OSError
def test_a_run_folder_that_cannot_be_created_is_refused_before_the_run_exists(workdir, store, capsys):
    """A file where the runs folder should be: one line at the option, and no MLflow run
    (it used to be created, then marked FAILED)."""
    (workdir / "blocked").write_text("a file where the runs folder should be\n")
    assert main(["train", "tiny.yaml", "--quiet", "--set", "tracking.output_dir=blocked/runs"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == "vqkit: error: --set: tracking.output_dir: blocked is a file, not a folder for run dirs", lines
    client = _client(store)
    experiment = client.get_experiment_by_name("faults")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []


def test_a_full_file_system_fails_the_run_and_keeps_the_previous_checkpoints(workdir, store, capsys, monkeypatch):
    """The second checkpoint's write meets ENOSPC after 4 kB (a fake `open` in the
    checkpoint module: what torch reports as `unexpected pos`)."""
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "step_00000006" in str(path) else f

    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)
    assert main(["train", "tiny.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err and "unexpected pos" not in err, err
    _, run = _only_run(store)
    step6 = workdir / "runs" / run.info.run_id / "checkpoints" / "step_00000006.pt"
    step3 = step6.with_name("step_00000003.pt")
    assert lines[0].startswith(f"vqkit: error: {step6}: No space left on device (ENOSPC)")
    assert f"the newest checkpoint, {step3}, is intact" in lines[0]
    assert run.info.status == "FAILED" and "No space left" in run.data.tags["vqkit.failure"]
    assert ckpt.load_checkpoint(step3)["step"] == 3 and not step6.exists()
    assert not _temp_files(step6.parent)
    digest = hashlib.sha256(step3.read_bytes()).hexdigest()
    monkeypatch.setattr(ckpt, "open", real_open, raising=False)
    assert main(["train", "--resume", run.info.run_id, "--quiet"]) == 0  # the disk has room again
    assert hashlib.sha256(step3.read_bytes()).hexdigest() == digest or not step3.exists()
    _assert_every_step_once(store)


# =========================================================================== other runs' status
def test_resuming_a_finished_run_from_a_file_logs_a_new_run(workdir, store, capsys):
    assert main(["train", "tiny.yaml", "--quiet"]) == 0
    client, first = _only_run(store)
    final = workdir / "runs" / first.info.run_id / "checkpoints" / "final.pt"
    assert main(["train", "--resume", str(final), "--quiet", "--set", "train.steps=10"]) == 0
    assert "is logged as a new run" in capsys.readouterr().err
    runs = {r.info.run_id: r for r in client.search_runs([first.info.experiment_id])}
    assert len(runs) == 2 and runs[first.info.run_id].info.status == "FINISHED"
    (new_id,) = set(runs) - {first.info.run_id}
    new = runs[new_id]
    assert new.info.status == "FINISHED"
    assert json.loads(new.data.tags["vqkit.resumed_from"]) == {"run_id": first.info.run_id,
                                                               "checkpoint": str(final), "step": STEPS}
    assert sorted(m.step for m in client.get_metric_history(new_id, "loss/total")) == [9, 10]
    assert (workdir / "runs" / new_id / "checkpoints" / "final.pt").is_file()
    assert sorted(m.step for m in client.get_metric_history(first.info.run_id, "loss/total")) == list(range(1, 9))


def test_a_resume_that_fails_before_training_leaves_a_finished_run_finished(workdir, store, capsys, monkeypatch):
    from vqkit.tracking import Tracker

    assert main(["train", "tiny.yaml", "--quiet"]) == 0
    client, run = _only_run(store)

    def read_only(self):
        if self.run_dir is None:
            return
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.run_dir / "run.json.tmp"))

    monkeypatch.setattr(Tracker, "_write_run_info", read_only)
    capsys.readouterr()
    assert main(["train", "--resume", run.info.run_id, "--quiet", "--set", "train.steps=12"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system (EROFS); the MLflow run keeps its status FINISHED" in err
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and "vqkit.failure" not in after.data.tags


def test_an_interrupt_on_a_full_disk_ends_killed_without_a_traceback(workdir, store, capsys, monkeypatch):
    from vqkit.train.autoencoder import AutoencoderFamily

    original_step = AutoencoderFamily.train_step

    def step(self, x, step):
        if step == 4:  # Ctrl-C / SIGTERM during step 5, with the disk now full
            def full(path, *a, **k):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            monkeypatch.setattr(ckpt, "open", full, raising=False)
            raise KeyboardInterrupt
        return original_step(self, x, step)

    monkeypatch.setattr(AutoencoderFamily, "train_step", step)
    assert main(["train", "tiny.yaml", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted at step 4; no checkpoint written" in err
    assert "No space left on device" in err
    client, run = _only_run(store)
    assert run.info.status == "KILLED"
    folder = workdir / "runs" / run.info.run_id / "checkpoints"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(folder))["step"] == 3 and not _temp_files(folder)


# =========================================================================== interrupts
def test_an_interrupt_during_an_evaluation_is_evaluated_on_resume(workdir, store, capsys, monkeypatch):
    """Ctrl-C / SIGTERM while step 4's evaluation runs: the checkpoint of step 4 remembers
    that its evaluation (and images) are not done, and the resumed leg does them at step 4,
    once, before training on (was: step 4's eval/* were never logged)."""
    from vqkit.train.autoencoder import AutoencoderFamily

    original = AutoencoderFamily.evaluate
    calls = []

    def evaluate(self):
        calls.append(self)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(AutoencoderFamily, "evaluate", evaluate)
    assert main(["train", "tiny.yaml", "--quiet"]) == 130
    assert "interrupted at step 4" in capsys.readouterr().err
    (run_dir,) = (workdir / "runs").iterdir()
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert len(calls) == 3  # step 4 again on resume, then step 8
    _assert_every_step_once(store)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_training_step_waits_for_the_step_and_its_metrics(workdir, store, capsys,
                                                                          monkeypatch, signum):
    """A signal that arrives inside a training step (mid optimizer update) is held until the
    step and its metrics are complete: the checkpoint holds whole steps and the resumed run
    has every metric step once."""
    from vqkit.train.autoencoder import AutoencoderFamily

    original_step = AutoencoderFamily.train_step

    def step(self, x, step):
        if step == 4:  # the fifth step: the signal comes before its update
            os.kill(os.getpid(), signum)
        return original_step(self, x, step)

    monkeypatch.setattr(AutoencoderFamily, "train_step", step)
    assert main(["train", "tiny.yaml", "--quiet"]) == 130
    assert "interrupted at step 5" in capsys.readouterr().err
    monkeypatch.setattr(AutoencoderFamily, "train_step", original_step)
    (run_dir,) = (workdir / "runs").iterdir()
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints"))["step"] == 5
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    _assert_every_step_once(store)


def test_a_second_signal_inside_a_step_interrupts_at_once_without_a_partial_checkpoint(workdir, store, capsys,
                                                                                       monkeypatch):
    """Two signals inside one step: the second interrupts there; the weights may hold part
    of the update, so no checkpoint is written and the resume starts from the newest one
    (step 3), logging every step once."""
    from vqkit.train.autoencoder import AutoencoderFamily

    original_step = AutoencoderFamily.train_step

    def step(self, x, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(self, x, step)

    monkeypatch.setattr(AutoencoderFamily, "train_step", step)
    assert main(["train", "tiny.yaml", "--quiet"]) == 130
    assert "interrupted inside step 5 (a second signal)" in capsys.readouterr().err
    monkeypatch.setattr(AutoencoderFamily, "train_step", original_step)
    (run_dir,) = (workdir / "runs").iterdir()
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints"))["step"] == 3
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    _assert_every_step_once(store)


def test_resuming_a_run_another_process_is_training_is_refused(workdir, store, capsys):
    """The run lock is held (another `vqkit train` on that run dir): a resume does not train
    alongside it in the same folder and MLflow run."""
    from vqkit.runtime import hold_run_lock

    assert main(["train", "tiny.yaml", "--quiet", "--set", "train.steps=3"]) == 0
    (run_dir,) = (workdir / "runs").iterdir()
    lock = subprocess.Popen([sys.executable, "-c", "import sys, time; from vqkit.runtime import hold_run_lock; "
                             "l = hold_run_lock(sys.argv[1]); print(l is not None, flush=True); time.sleep(120)",
                             str(run_dir)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert lock.stdout.readline().strip() == "True"
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir), "--quiet", "--set", "train.steps=6"]) == 2
        assert "is being trained by another process right now" in capsys.readouterr().err
    finally:
        lock.kill()
        lock.wait()
        lock.stdout.close()
    free = hold_run_lock(run_dir)  # free again once that process is gone
    assert free is not None
    free.release()


#: a `vqkit train` child that sends itself SIGTERM at chosen instants: ``interrupt``: once
#: inside step 5 (the run checkpoints step 5 on its way out) and again while that interrupt
#: checkpoint is being written; ``periodic``: once while step 3's periodic checkpoint is
#: being written; ``final``: once while ``final.pt`` is being written (the signal lands
#: after the temp file has its first 2000 bytes); ``logging``: once while the first periodic
#: checkpoint (step 3) is being logged to MLflow, after its file is written.
_SIGNALLED_AT = r"""
import os, signal, sys
from vqkit.train import checkpoint as c
from vqkit.train.autoencoder import AutoencoderFamily
case = sys.argv[1]
target = {"interrupt": "step_00000005.pt", "periodic": "step_00000003.pt", "final": "final.pt",
          "logging": None}[case]
sent = []
from vqkit.tracking import Tracker
original_log_artifact = Tracker.log_artifact
def log_artifact(self, path, *args, **kwargs):
    if case == "logging" and str(path).endswith("last.pt") and not sent:
        sent.append(1)
        sys.stderr.write("test: SIGTERM sent while logging the checkpoint\n")
        os.kill(os.getpid(), signal.SIGTERM)
    return original_log_artifact(self, path, *args, **kwargs)
Tracker.log_artifact = log_artifact
original_write = c._Recording.write
def write(self, data):
    n = original_write(self, data)
    if target and target in self.f.name and self.f.tell() > 2000 and not sent:
        sent.append(1)
        sys.stderr.write(f"test: SIGTERM sent while writing {target}\n")
        os.kill(os.getpid(), signal.SIGTERM)
    return n
c._Recording.write = write
original_step = AutoencoderFamily.train_step
def step(self, x, step):
    if case == "interrupt" and step == 4:
        os.kill(os.getpid(), signal.SIGTERM)
    return original_step(self, x, step)
AutoencoderFamily.train_step = step
from vqkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("case, step", [("interrupt", 5), ("periodic", 3)])
def test_a_signal_during_a_checkpoint_write_waits_for_the_write(workdir, store, case, step):
    """SIGTERM while a checkpoint is being written (the interrupt checkpoint, after a first
    SIGTERM; or a periodic one) waits for the write: the file is complete and renamed, the
    run ends KILLED with exit 130 and no traceback, no temp file is left, and the resume
    continues from that checkpoint (was: KeyboardInterrupt inside `torch.save`, a traceback
    ending in `RuntimeError: ... unexpected pos`, no checkpoint)."""
    proc = subprocess.run([sys.executable, "-c", _SIGNALLED_AT, case, "train", "tiny.yaml", "--quiet"],
                          cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (run_dir,) = (workdir / "runs").iterdir()
    path = run_dir / "checkpoints" / f"step_{step:08d}.pt"
    assert f"vqkit: interrupted at step {step}; checkpoint {path}" in proc.stderr, proc.stderr
    assert not _temp_files(run_dir), _temp_files(run_dir)
    assert ckpt.latest_checkpoint(run_dir / "checkpoints") == path
    assert ckpt.load_checkpoint(path)["step"] == step  # complete: its digest verifies
    client, run = _only_run(store)
    assert run.info.status == "KILLED"
    done = subprocess.run([sys.executable, "-m", "vqkit.cli", "train", "--resume", str(run_dir), "--quiet"],
                          cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_every_step_once(store)
    assert not _temp_files(run_dir), _temp_files(run_dir)


def test_a_signal_while_a_checkpoint_is_logged_still_logs_it(workdir, store):
    """SIGTERM after the checkpoint file is written but while it is being logged to MLflow
    waits for the logging: the run ends KILLED with the `vqkit.last_checkpoint` tag of that
    step (was: the tag was never set, since the way-out checkpoint is skipped for a step
    already saved, and a resume from the store found no checkpoint)."""
    proc = subprocess.run([sys.executable, "-c", _SIGNALLED_AT, "logging", "train", "tiny.yaml", "--quiet"],
                          cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "test: SIGTERM sent while logging the checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    client, run = _only_run(store)
    assert run.info.status == "KILLED"
    assert json.loads(run.data.tags["vqkit.last_checkpoint"]) == {"artifact": "checkpoints/last.pt", "step": 3}
    assert "checkpoints/last.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}


def test_a_signal_during_the_final_checkpoint_write_lets_the_run_finish(workdir, store):
    """SIGTERM while ``final.pt`` is being written comes after the last step: the file is
    written whole, the run ends FINISHED (exit 0, no traceback, no temp file), and
    every step is logged once; a resume has nothing to do."""
    proc = subprocess.run([sys.executable, "-c", _SIGNALLED_AT, "final", "train", "tiny.yaml", "--quiet"],
                          cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test: SIGTERM sent while writing final.pt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (run_dir,) = (workdir / "runs").iterdir()
    final = run_dir / "checkpoints" / "final.pt"
    assert ckpt.load_checkpoint(final)["step"] == STEPS  # complete: its digest verifies
    assert not _temp_files(run_dir), _temp_files(run_dir)
    client, run = _only_run(store)
    assert run.info.status == "FINISHED"
    assert "checkpoints/final.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    _assert_every_step_once(store)
    again = subprocess.run([sys.executable, "-m", "vqkit.cli", "train", "--resume", str(run_dir), "--quiet"],
                           cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    _assert_every_step_once(store)


@pytest.mark.parametrize("fault", ["sigterm", "kill-9"])
def test_a_resume_between_logged_steps_logs_what_a_straight_run_logs(workdir, store, fault):
    """With ``log_every: 4``, a run interrupted inside step 5 (SIGTERM: checkpoint at step 5)
    or killed at step 7 (``kill -9``: the periodic checkpoint of step 6) resumes with the
    terms it had summed since step 4 (the checkpoint's ``window``), so its values at step 8
    are bit for bit a straight run's (were: the mean of the resumed steps only)."""
    over = ["--set", "train.log_every=4"]
    assert main(["train", "tiny.yaml", "--quiet", *over, "--set", "tracking.experiment=straight",
                 "--set", "tracking.output_dir=straight-runs"]) == 0
    client = _client(store)
    (straight,) = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    if fault == "sigterm":
        proc = subprocess.run([sys.executable, "-c", _SIGNALLED_AT, "interrupt", "train", "tiny.yaml", "--quiet", *over],
                              cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 130, proc.stderr
    else:
        proc = subprocess.run([sys.executable, "-c", _KILLED_AT, "after_rename", "step_00000006.pt",
                               "train", "tiny.yaml", "--quiet", *over],
                              cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    (run_dir,) = (workdir / "runs").iterdir()
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints"))["window"]["n"] == (
        1 if fault == "sigterm" else 2)
    done = subprocess.run([sys.executable, "-m", "vqkit.cli", "train", "--resume", str(run_dir), "--quiet"],
                          cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    client, run = _only_run(store)
    keys = [k for k in straight.data.metrics if k.startswith(("loss/", "codebook/", "train/"))]
    assert "loss/total" in keys
    for key in keys:
        want = [(m.step, m.value) for m in client.get_metric_history(straight.info.run_id, key)]
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert got == sorted(want), key
