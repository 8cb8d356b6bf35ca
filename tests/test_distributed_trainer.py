"""The real trainer under torchrun, 2 processes (gloo): ranks hold bit-identical weights.

With ``vq`` (EMA and learned code-book, k-means initialisation), a reset policy and a
PatchGAN discriminator trained alongside, every rank writes its model (code-book
included) and discriminator state after every reset and at the end
(``VQKIT_DEBUG_STATE_DIR``, :meth:`vqkit.train.autoencoder.AutoencoderFamily._dump_state`); the test
compares the files tensor by tensor.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

pytest_plugins = ("trainkit",)  # fixtures: store (a migrated MLflow sqlite store)

CASES = {
    "learned-kmeans-init-kmeans-reset": (
        {"codebook_size": 32, "kmeans_init": True, "kmeans_iters": 2},
        {"name": "kmeans", "every": 2, "params": {"iters": 2, "buffer_size": 256}},
    ),
    "ema-jukebox-reset": (
        {"codebook_size": 32, "ema": True},
        {"name": "jukebox", "every": 2, "params": {"threshold": 4.0, "buffer_size": 256}},
    ),
}


def _recipe(store: str, quantizer: dict, reset: dict) -> dict:
    return {
        "vqkit": 1, "name": "ddp-identity", "seed": 0,
        "data": {"name": "fashion-mnist", "params": {"image_size": 16, "fit": "resize", "limit": 64}},
        "encoder": {"name": "conv", "params": {"channels": [8, 8], "factor": 4, "latent_dim": 8}},
        "quantizer": {"name": "vq", "params": quantizer},
        "decoder": {"name": "conv", "params": {"channels": [8, 8]}},
        "losses": [{"name": "pixel-l1"}, {"name": "discriminator-features", "weight": 0.1}],
        "discriminator": {"name": "patchgan", "params": {"n_layers": 2, "channels": 8}, "loss": "hinge",
                          "weight": 0.5, "start_step": 1, "adaptive_weight": True},
        "reset": reset,
        "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "grad_clip": 1.0, "log_every": 6, "eval_every": 6,
                  "image_every": 6, "checkpoint_every": 6, "device": "cpu"},
        "eval": {"num_samples": 8, "batch_size": 8, "metrics": ["psnr"]},
        "tracking": {"experiment": "ddp-identity", "uri": store},
    }


# torchrun jobs run one at a time (same xdist worker)
@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("case", list(CASES))
def test_ranks_hold_identical_weights_after_every_reset_and_at_the_end(tmp_path, store, case):
    quantizer, reset = CASES[case]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(store, quantizer, reset), sort_keys=False))
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               VQKIT_DEBUG_STATE_DIR=str(dumps))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "vqkit.cli", "train", str(path), "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = sorted({p.name.rsplit("-rank", 1)[0] for p in dumps.glob("*.pt")})
    assert "end" in tags and any(t.startswith("reset-") for t in tags), f"no reset happened: {tags}"
    for tag in tags:
        r0 = torch.load(dumps / f"{tag}-rank0.pt", weights_only=True)
        r1 = torch.load(dumps / f"{tag}-rank1.pt", weights_only=True)
        assert r0["discriminator"], "no discriminator state"
        for part in ("model", "discriminator"):
            assert set(r0[part]) == set(r1[part])
            for key, value in r0[part].items():
                assert torch.equal(value, r1[part][key]), f"{tag}: {part}.{key} differs between ranks"
