"""Interrupting ``vqkit train --nproc 2``: Ctrl-C in a terminal (SIGINT to the command's
process group) or SIGTERM to the command alone (what a sweep's cancel or a scheduler sends)
stops both ranks at the same step. Rank 0 writes that step's checkpoint and ends the MLflow
run KILLED; the command exits 130 with one ``vqkit: interrupted at step`` line and
no traceback from any rank or from torchrun. Resumed with ``--nproc 2``, the run finishes
with every step logged once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.trainkit import tiny_recipe
from vqkit.train import checkpoint as ckpt

pytest_plugins = ("trainkit",)  # fixtures: store (a migrated MLflow sqlite store)

STEPS = 5000  # never reached: the run is interrupted once it has a checkpoint


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupting_a_two_process_run_stops_both_ranks_at_one_step(tmp_path, store, how):
    from mlflow import MlflowClient

    recipe = tiny_recipe({"name": "fashion-mnist", "params": {"image_size": 16, "fit": "resize", "limit": 64}},
                         {"steps": STEPS, "batch_size": 8, "log_every": 1, "eval_every": 10_000,
                          "image_every": 10_000, "checkpoint_every": 3},
                         {"num_samples": 8, "batch_size": 8, "metrics": ["psnr"]},
                         tracking={"experiment": "ddp-interrupt", "uri": store})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = subprocess.Popen([sys.executable, "-m", "vqkit.cli", "train", "tiny.yaml", "--nproc", "2", "--quiet"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group, as a terminal's foreground job
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("runs/*/checkpoints/step_00000006.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err  # as a single-process run on Ctrl-C or SIGTERM
    assert "Traceback" not in err and "[rank" not in err and "Exception" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("vqkit: interrupted at step")]
    step = int(line.split("step ")[1].split(";")[0])
    assert STEPS > step >= 6
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert ckpt.load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")["step"] == step
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp-interrupt").experiment_id])
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == list(range(1, step + 1))

    done = subprocess.run([sys.executable, "-m", "vqkit.cli", "train", "--resume", str(run_dir), "--nproc", "2",
                           "--quiet", "--set", f"train.steps={step + 3}"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    history = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/total"))
    assert history == list(range(1, step + 4))
