"""Without a TTY (a log file, CI, nohup) `vqkit train` prints a plain progress line every
``train.log_every`` steps once ``TrainLoop.progress_every_s`` seconds have passed since the
last one, besides the line of every evaluation; ``--quiet`` prints none."""
from __future__ import annotations

import io
import re

import pytest

from vqkit.recipe import load_recipe
from vqkit.train.trainer import Trainer

pytest_plugins = ("trainkit",)  # fixture: store


def _recipe(tmp_path, store):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "vqkit: 1\nname: tiny\nseed: 0\n"
        "data: {name: fashion-mnist, params: {limit: 64}}\n"
        "encoder: {name: conv, params: {channels: [8], factor: 2, latent_dim: 4}}\n"
        "quantizer: {name: vq, params: {codebook_size: 8}}\n"
        "decoder: {name: conv, params: {channels: [8]}}\n"
        "losses: [{name: pixel-l1}]\n"
        "train: {steps: 6, batch_size: 4, log_every: 2, eval_every: 6, image_every: 6, checkpoint_every: 6, device: cpu}\n"
        "eval: {num_samples: 8, batch_size: 8, metrics: [psnr]}\n"
        f"tracking: {{experiment: tiny, uri: '{store}', output_dir: '{tmp_path / 'runs'}'}}\n"
    )
    return load_recipe(path)


@pytest.mark.parametrize("every_s, quiet, steps", [(0.0, False, [2, 4, 6]), (3600.0, False, [6]), (0.0, True, [])])
def test_progress_lines_without_a_tty(tmp_path, store, monkeypatch, every_s, quiet, steps):
    monkeypatch.setattr(Trainer, "progress_every_s", every_s, raising=False)
    out = io.StringIO()  # not a TTY
    Trainer(_recipe(tmp_path, store), quiet=quiet, stdout=out, stderr=io.StringIO()).run()
    lines = [line for line in out.getvalue().splitlines() if re.match(r"vqkit: step \d+/6 ", line)]
    assert [int(re.match(r"vqkit: step (\d+)/", line).group(1)) for line in lines] == steps, out.getvalue()
    for line in lines:
        assert "loss/total=" in line and "time/step_s=" in line, line
    assert ("eval/psnr=" in lines[-1]) if lines else True
