"""A resume on CPU continues with the run's CPU thread count: a different count changes the
float sums of convolutions and matrix products, so the resumed run would not be the
uninterrupted one bit for bit (a sweep child trained with the launcher's 3 threads, resumed
by hand with 2, was not). The checkpoint records the count; ``vqkit train --resume`` uses it
when the user did not choose one (``OMP_NUM_THREADS``), and warns when they chose another."""
from __future__ import annotations

import torch
import yaml

from tests.trainkit import all_tensors_equal, tiny_recipe
from vqkit.cli import main
from vqkit.recipe import load_recipe
from vqkit.train.checkpoint import latest_checkpoint, load_checkpoint
from vqkit.train.trainer import train

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, workdir

TINY = tiny_recipe(
    {"name": "fashion-mnist", "params": {"limit": 192}},
    {"steps": 4, "batch_size": 16, "log_every": 2, "eval_every": 4, "image_every": 4, "checkpoint_every": 2},
    {"num_samples": 16, "batch_size": 16},
    seed=3, channels=(8, 16), codebook_size=32,
)


def write_recipe(folder, name, **over):
    path = folder / name
    path.write_text(yaml.safe_dump({**TINY, **over}, sort_keys=False))
    return path


def test_a_resume_uses_the_runs_thread_count_unless_told_otherwise(workdir, store, capsys, monkeypatch):
    over = dict(tracking={"uri": store, "experiment": "threads", "output_dir": "runs"})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        straight = train(load_recipe(write_recipe(workdir, "a.yaml", **over)), quiet=True)
        first = train(load_recipe(write_recipe(workdir, "b.yaml", **over)), quiet=True, stop_after=2)
        assert load_checkpoint(first.checkpoint)["threads"] == 1
        # resumed in a process with 2 threads and no OMP_NUM_THREADS: the run's 1 thread
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert main(["train", "--resume", str(first.run_dir)]) == 0
        err = capsys.readouterr().err
        assert "vqkit: note: resuming with the run's 1 CPU thread (this process had 2), so that it continues " \
               "bit for bit; set OMP_NUM_THREADS to choose another count" in err, err
        b = load_checkpoint(latest_checkpoint(first.run_dir / "checkpoints"))
        a = load_checkpoint(straight.checkpoint)
        assert b["step"] == 4 and b["threads"] == 1
        for key in ("model", "optimizers", "codebook", "rng"):
            all_tensors_equal(a[key], b[key], key)
        # the user's own count is kept, with a warning that the run will not be bit-identical
        torch.set_num_threads(1)
        again = train(load_recipe(write_recipe(workdir, "c.yaml", **over)), quiet=True, stop_after=2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert main(["train", "--resume", str(again.run_dir), "--quiet"]) == 0
        err = capsys.readouterr().err
        assert "vqkit: warning: the run trained with 1 CPU thread, this process uses 2 (OMP_NUM_THREADS=2): " \
               "the resumed run is not bit-identical to an uninterrupted one" in err, err
        assert load_checkpoint(latest_checkpoint(again.run_dir / "checkpoints"))["threads"] == 2
    finally:
        torch.set_num_threads(before)
