"""`kill -9` before a run's first checkpoint, then `vqkit train --resume RUN_ID`: one line
saying the run stopped before its first checkpoint (and how to start again), no MLflow
download text or progress bars, and the dead run is marked KILLED with ``vqkit.failure``.
A resume attempted while the run is still training in another process is refused and leaves
that run alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from vqkit.testing.sweeps import TINY_RECIPE

pytest_plugins = ("trainkit",)  # fixtures: store, workdir

RECIPE = {
    **TINY_RECIPE,
    "train": {**TINY_RECIPE["train"], "steps": 100000, "log_every": 1, "eval_every": 100000,
              "image_every": 100000, "checkpoint_every": 50000},
    "tracking": {"experiment": "early", "output_dir": "runs"},
}


def _env(store):
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=store)
    env.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
    return env


def _vqkit(capsys, *argv):
    """``vqkit ARGV`` in this process: ``(exit code, stderr)``."""
    from vqkit.cli import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_resume_of_a_run_killed_before_its_first_checkpoint(workdir, store, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)

    (workdir / "early.yaml").write_text(yaml.safe_dump(RECIPE))
    proc = subprocess.Popen([sys.executable, "-m", "vqkit.cli", "train", "early.yaml", "--quiet"], cwd=workdir,
                            env=_env(store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(tracking_uri=store)
    try:
        deadline = time.monotonic() + 240
        run = None
        while time.monotonic() < deadline:  # the run exists and has logged a few steps
            assert proc.poll() is None, "the run ended before it could be killed"
            runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
            if runs and len(client.get_metric_history(runs[0].info.run_id, "loss/total")) >= 3:
                run = runs[0]
                break
            time.sleep(0.2)
        assert run is not None
        run_id = run.info.run_id
        # still training: refused, and the run is left as it is
        code, err = _vqkit(capsys, "train", "--resume", run_id, "--quiet")
        assert code == 2, err
        assert err.strip().splitlines() == [
            f"vqkit: error: MLflow run {run_id} is still being trained by another process (its run dir "
            f"{workdir / 'runs' / run_id} is locked) and has no checkpoint yet; let it run, or stop it first"
        ], err
        assert client.get_run(run_id).info.status == "RUNNING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    code, err = _vqkit(capsys, "train", "--resume", run_id, "--quiet")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"vqkit: error: MLflow run {run_id} stopped before its first checkpoint (train.checkpoint_every=50000; "
        "last logged step "), err
    assert lines[0].endswith(
        f"nothing to resume; start it again with `vqkit train {workdir / 'runs' / run_id / 'recipe.yaml'}` "
        "(the run is now marked KILLED)"), lines[0]
    assert "Downloading" not in err and "Failed to download" not in err
    after = client.get_run(run_id)
    assert after.info.status == "KILLED"
    assert after.data.tags["vqkit.failure"].startswith("stopped before its first checkpoint")
    # asked again: the same truth, the status stays
    code, err = _vqkit(capsys, "train", "--resume", f"runs/{run_id}", "--quiet")
    assert code == 2 and "stopped before its first checkpoint" in err and "now marked" not in err, err


def test_a_prior_run_without_a_checkpoint_names_the_prior_command(tmp_path):
    """The advice names the command that trains that kind of recipe (`vqkit train` refuses a
    prior recipe)."""
    import json

    from vqkit.commands.train import nothing_to_resume
    from vqkit.errors import VqkitError
    from vqkit.tracking import RUN_INFO

    run_dir = tmp_path / "runs" / "abc"
    run_dir.mkdir(parents=True)
    (run_dir / RUN_INFO).write_text(json.dumps({"run_id": "abc"}))
    (run_dir / "recipe.yaml").write_text("vqkit: 1\nkind: prior\nname: p\ntrain: {checkpoint_every: 500}\n")
    with pytest.raises(VqkitError) as exc:
        nothing_to_resume(run_dir)
    assert str(exc.value).endswith(f"start it again with `vqkit prior train {run_dir.resolve() / 'recipe.yaml'}`"), exc.value
