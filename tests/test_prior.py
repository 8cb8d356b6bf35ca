"""The prior family: the transformer's causality and KV-cached sampling, the code cache,
`vqkit prior train` (MLflow contents, link to the autoencoder run, exact resume, NaN stop)
and `vqkit sample`, on a tiny autoencoder trained on real Fashion-MNIST images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from tests.trainkit import all_tensors_equal
from vqkit.cli import main
from vqkit.components.transformer_prior import TransformerPrior
from vqkit.interfaces import Prior
from vqkit.prior.codes import file_sha256, load_or_compute_codes
from vqkit.recipe import load_recipe
from vqkit.testing.prior_contracts import check_prior_causal, check_prior_sample
from vqkit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vqkit.train.trainer import train

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, workdir

AE = {
    "vqkit": 1, "name": "tiny-ae", "seed": 3,
    "data": {"name": "fashion-mnist", "params": {"limit": 96}},
    "encoder": {"name": "conv", "params": {"channels": [8, 16], "factor": 8, "latent_dim": 8}},
    "quantizer": {"name": "vq", "params": {"codebook_size": 16}},
    "decoder": {"name": "conv", "params": {"channels": [16, 8]}},
    "losses": [{"name": "pixel-l1"}],
    "train": {"steps": 2, "batch_size": 16, "log_every": 1, "eval_every": 2, "image_every": 2,
              "checkpoint_every": 2, "device": "cpu"},
    "eval": {"num_samples": 16, "batch_size": 16},
}


def prior_recipe(ae: str, store: str, **train) -> dict:
    return {
        "vqkit": 1, "kind": "prior", "name": "tiny-prior", "seed": 5,
        "autoencoder": {"run": ae, "cache_dir": "codes"},
        "prior": {"name": "transformer", "class_conditional": True,
                  "params": {"dim": 16, "layers": 1, "heads": 2, "dropout": 0.1}},
        "train": {"steps": 6, "batch_size": 8, "log_every": 2, "eval_every": 3, "image_every": 3,
                  "checkpoint_every": 3, "schedule": "cosine", "warmup_steps": 1, "device": "cpu", **train},
        "eval": {"num_samples": 40, "batch_size": 20, "grid_samples": 10},
        "tracking": {"uri": store, "experiment": "tiny"},
    }


@pytest.fixture
def autoencoder(workdir, store):
    """A 2-step autoencoder (4x4 grids of 16 codes) tracked in experiment 'tiny'."""
    path = workdir / "ae.yaml"
    path.write_text(yaml.safe_dump({**AE, "tracking": {"uri": store, "experiment": "tiny"}}))
    return train(load_recipe(path), quiet=True)


def write(workdir, name: str, data: dict):
    path = workdir / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


# =========================================================================== the transformer
def _tiny(classes: int = 0) -> TransformerPrior:
    torch.manual_seed(0)
    return TransformerPrior(TransformerPrior.Params(dim=16, layers=2, heads=2), codebook_size=8,
                            grid=(2, 3), num_classes=classes).eval()


def test_future_codes_do_not_change_past_logits():
    p = _tiny(classes=2)
    codes = torch.randint(0, 8, (4, 6))
    labels = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        base = p(codes, labels)
        for t in range(6):
            other = codes.clone()
            other[:, t] = (other[:, t] + 3) % 8
            changed = p(other, labels)
            assert torch.equal(changed[:, : t + 1], base[:, : t + 1])  # position t predicts code t
            if t < 5:
                assert not torch.allclose(changed[:, t + 1:], base[:, t + 1:])  # later ones see it


def test_kv_cache_sampling_equals_full_recomputation():
    p = _tiny(classes=3)
    labels = torch.tensor([0, 1, 2, 2, 1])
    for kw in ({}, {"temperature": 0.6}, {"top_k": 3}, {"top_p": 0.7, "temperature": 1.3}):
        cached = p.sample(5, labels, generator=torch.Generator().manual_seed(11), **kw)
        full = Prior.sample(p, 5, labels, generator=torch.Generator().manual_seed(11), **kw)
        assert torch.equal(cached, full), kw
    # ... and the cache's logits are the full forward's logits at every position
    codes = cached.reshape(5, -1)
    cache = p.new_cache(5)
    x = p._start(5, labels, codes.device)
    with torch.no_grad():
        full_logits = p(codes, labels)
        for t in range(codes.shape[1]):
            step = p.step(x, cache, t)
            torch.testing.assert_close(step, full_logits[:, t], atol=1e-5, rtol=1e-5)
            x = p.tok(codes[:, t])[:, None]


def test_filter_logits_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(Prior.filter_logits(logits), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(Prior.filter_logits(logits, top_k=2), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(Prior.filter_logits(logits, top_p=0.8), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(Prior.filter_logits(logits, top_p=0.81), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    cold = Prior.filter_logits(logits, temperature=0.1)
    assert cold[0, 0] > 0.99


class _Leaky(TransformerPrior):
    """Attends to the future: the causal contract must catch it."""

    def forward(self, codes, labels=None):
        out = super().forward(codes, labels)
        return out + codes.float().mean(dim=1, keepdim=True)[..., None]


class _BadCache(TransformerPrior):
    """Samples with a cache that forgets the first position."""

    def step(self, x, cache, pos):
        if pos > 0:
            cache.k[:, :, :, 0] = 0
        return super().step(x, cache, pos)


def test_contract_catches_a_non_causal_prior_and_a_wrong_cache():
    with pytest.raises(AssertionError, match="not causal"):
        check_prior_causal(_Leaky)
    with pytest.raises(AssertionError, match="recomputing the whole prefix"):
        check_prior_sample(_BadCache)


# =========================================================================== the code cache
def test_codes_are_cached_by_checkpoint_digest_and_recomputed_when_it_changes(autoencoder, workdir):
    ckpt = autoencoder.checkpoint
    first = load_or_compute_codes(ckpt, workdir / "cache", batch_size=32)
    assert first.computed and first.grid == (4, 4) and first.codebook_size == 16
    assert first.train.shape == (96, 4, 4) and first.test.shape == (96, 4, 4)
    assert first.train_labels is not None and first.num_classes <= 10
    again = load_or_compute_codes(ckpt, workdir / "cache", batch_size=32)
    assert not again.computed and torch.equal(again.train, first.train)
    assert torch.equal(again.test_labels, first.test_labels)
    # the autoencoder changes (other code vectors): other digest, codes recomputed
    state = load_checkpoint(ckpt)
    key = next(k for k in state["model"] if k.startswith("quantizer.") and state["model"][k].shape[:1] == (16,)
               and state["model"][k].is_floating_point() and state["model"][k].dim() == 2)
    state["model"][key] = torch.flip(state["model"][key], dims=[0])
    save_checkpoint(ckpt, state)
    changed = load_or_compute_codes(ckpt, workdir / "cache", batch_size=32)
    assert changed.computed and changed.sha256 == file_sha256(ckpt) != first.sha256
    assert not torch.equal(changed.train, first.train)
    assert sorted(p.name for p in (workdir / "cache").glob("*.pt")) == sorted([f"{first.sha256}.pt", f"{changed.sha256}.pt"])
    # a damaged cache file is recomputed, not trusted
    (workdir / "cache" / f"{changed.sha256}.pt").write_bytes(b"garbage")
    assert load_or_compute_codes(ckpt, workdir / "cache", batch_size=32).computed


# =========================================================================== training and sampling
def test_prior_train_logs_links_and_resumes_bit_for_bit(autoencoder, workdir, store, capsys):
    from vqkit.commands.prior import run_prior_train

    ae_dir = str(autoencoder.run_dir)
    straight = write(workdir, "a.yaml", prior_recipe(ae_dir, store))
    assert main(["prior", "train", straight, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test_bpd=" in out
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
            if r.data.tags.get("vqkit.family") == "prior"]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["vqkit.autoencoder.run_id"] == autoencoder.run_id
    assert run.data.tags["mlflow.parentRunId"] == autoencoder.run_id  # same experiment: nested
    # tagged like an autoencoder run: each component (the prior's, and the frozen autoencoder's
    # it decodes with) and only the distributions they come from, not every one installed
    from vqkit import __version__

    assert run.data.tags["vqkit.component.prior"] == f"transformer (vqkit {__version__})"
    assert run.data.tags["vqkit.component.prior.plugin"] == "transformer_prior"
    assert run.data.tags["vqkit.component.autoencoder.quantizer"] == f"vq (vqkit {__version__})"
    assert run.data.tags["vqkit.component.autoencoder.data"] == f"fashion-mnist (vqkit {__version__})"
    assert run.data.tags["vqkit.plugins"] == f"vqkit=={__version__}"
    assert run.data.params["prior.params.dim"] == "16" and run.data.params["kind"] == "prior"
    bpd = [m.value for m in client.get_metric_history(run.info.run_id, "prior/test_bpd")]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "prior/test_bpd")] == [3, 6]
    assert all(0 < v < 4.01 + 1.0 for v in bpd)  # 16 codes: 4 bits/dim is uniform
    assert client.get_metric_history(run.info.run_id, "prior/train_bpd")
    run_dir = workdir / "runs" / run.info.run_id
    with Image.open(run_dir / "grids" / "samples_000006.png") as grid:
        assert grid.width > 64 and grid.height > 64
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert "grids/samples_000006.png" in artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert images and all(p.startswith("images/samples+step+") for p in images), images

    # stop after 3 steps, resume by run dir: the same final state as the straight run
    args = type("A", (), {"recipe": write(workdir, "b.yaml", prior_recipe(ae_dir, store)), "overrides": [],
                          "resume": None, "quiet": True})
    run_prior_train(args, stop_after=3)
    first = sorted((workdir / "runs").glob("*/checkpoints/step_00000003.pt"))
    first = [p for p in first if load_checkpoint(p)["run"]["run_id"] != run.info.run_id]
    assert len(first) == 1
    assert main(["prior", "train", "--resume", str(first[0].parent.parent), "--quiet"]) == 0
    a = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    b = load_checkpoint(latest_checkpoint(first[0].parent))
    assert b["step"] == a["step"] == 6
    for key in ("model", "optimizers", "schedulers", "rng"):
        all_tensors_equal(a[key], b[key], key)


def test_sample_command_writes_grid_and_codes(autoencoder, workdir, store, capsys):
    recipe = write(workdir, "p.yaml", prior_recipe(str(autoencoder.checkpoint), store, steps=2, eval_every=2,
                                                   image_every=2, checkpoint_every=2))
    assert main(["prior", "train", recipe, "--quiet"]) == 0
    run_dir = next(p for p in (workdir / "runs").iterdir() if (p / "checkpoints" / "final.pt").is_file()
                   and load_checkpoint(p / "checkpoints" / "final.pt").get("family") == "prior")
    capsys.readouterr()
    argv = ["sample", str(run_dir), "--n", "6", "--class", "2", "--top-k", "4", "--seed", "1",
            "-o", "s.png", "--codes", "c.npy"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 6
    codes = np.load(workdir / "c.npy")
    assert codes.shape == (6, 4, 4) and codes.dtype == np.int64 and 0 <= codes.min() and codes.max() < 16
    with Image.open(workdir / "s.png") as grid:
        assert grid.width > 64
    assert main(argv[:-4] + ["--codes", "d.npy"]) == 0  # same seed, same codes
    assert np.array_equal(codes, np.load(workdir / "d.npy"))
    # user errors: one line, exit 2
    for bad, message in (
        (["--class", "99"], "--class must be in [0,"),
        (["--temperature", "0"], "--temperature must be > 0"),
    ):
        assert main(["sample", str(run_dir), "-o", "x.png", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["sample", str(autoencoder.checkpoint), "-o", "x.png"]) == 2
    assert "not a prior's" in capsys.readouterr().err


def test_prior_quality_benchmark_prints_the_prior_and_its_references(autoencoder, workdir, store, capsys,
                                                                     monkeypatch):
    """benchmarks/prior_quality.py at a tiny size: one JSON line with the prior's feature
    distance and bits per code next to its references (floor, independent codes)."""
    import importlib.util
    from pathlib import Path

    # the distance refuses fewer than 512 images (a measurement); this checks the script on 16
    monkeypatch.setattr("vqkit.metrics.FD_MIN_SAMPLES", 8)

    recipe = write(workdir, "q.yaml", prior_recipe(str(autoencoder.checkpoint), store, steps=2, eval_every=2,
                                                   image_every=2, checkpoint_every=2))
    assert main(["prior", "train", recipe, "--quiet", "--set", "train.warmup_steps=0"]) == 0
    run_dir = next(p for p in (workdir / "runs").iterdir() if (p / "checkpoints" / "final.pt").is_file()
                   and load_checkpoint(p / "checkpoints" / "final.pt").get("family") == "prior")
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=store).get_run(run_dir.name)
    assert run.info.run_name == "tiny-prior warmup_steps=0"  # named for its --set, as `vqkit train`
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "prior_quality.py"
    spec = importlib.util.spec_from_file_location("prior_quality", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    capsys.readouterr()
    bench.main([str(run_dir), "--n", "16", "--batch-size", "16"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 16 and out["test_grids"] == 96  # the autoencoder's test split (limit 96)
    for key in ("fd_prior_vs_recon", "fd_floor_other_recon_vs_recon", "fd_independent_vs_recon"):
        assert np.isfinite(out[key]) and out[key] >= 0, key
    # 16 codes: a uniform model has 4 bits per code; a model fitted to the train codes fewer
    assert 0 < out["test_bpd_independent"] < 4.0 and 0 < out["test_bpd_prior"] < 6.0
    with pytest.raises(SystemExit, match="need 200 test images"):
        bench.main([str(run_dir), "--n", "100"])


def test_prior_recipe_errors_are_located(autoencoder, workdir, store, capsys):
    data = prior_recipe(str(autoencoder.checkpoint), store)
    data["prior"]["params"]["dimm"] = 3
    data["autoencoder"].pop("run")
    path = write(workdir, "bad.yaml", data)
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "prior.params.dimm: unknown key 'dimm' (did you mean 'dim'?" in err
    assert "autoencoder: name the trained autoencoder" in err
    # the autoencoder trainer refuses a prior recipe, and vice versa
    good = write(workdir, "good.yaml", prior_recipe(str(autoencoder.checkpoint), store))
    assert main(["train", good]) == 2
    assert "vqkit prior train" in capsys.readouterr().err
    ae = workdir / "ae.yaml"
    assert main(["prior", "train", str(ae)]) == 2
    assert "autoencoder recipe" in capsys.readouterr().err
    missing = write(workdir, "m.yaml", prior_recipe("runs/nope", store))
    assert main(["prior", "train", missing]) == 2
    assert "autoencoder" in capsys.readouterr().err
    # validate --build: finds the autoencoder and builds the prior for its grid
    assert main(["validate", "--build", good]) == 0
    assert main(["validate", "--build", missing]) == 2
    assert "autoencoder.run: autoencoder: checkpoint or run dir not found" in capsys.readouterr().err


def test_nan_loss_stops_the_prior_with_one_error_line(autoencoder, workdir, store, capsys):
    recipe = write(workdir, "n.yaml", prior_recipe(str(autoencoder.checkpoint), store, lr=1e30, grad_clip=None,
                                                   steps=6, checkpoint_every=1))
    assert main(["prior", "train", recipe, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "Traceback" not in err
    for p in (workdir / "runs").glob("*/checkpoints/step_*.pt"):
        state = load_checkpoint(p)
        if state.get("family") == "prior":
            assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_nll_matches_cross_entropy_in_bits():
    p = _tiny()
    codes = torch.randint(0, 8, (3, 6))
    with torch.no_grad():
        nats = F.cross_entropy(p(codes).reshape(-1, 8), codes.reshape(-1))
    # an untrained prior is close to uniform over 8 codes: 3 bits per dimension
    assert abs(float(nats) / np.log(2) - 3.0) < 0.2


def test_readme_prior_recipe_example_validates_like_the_shipped_recipe(tmp_path):
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", (root / "README.md").read_text(), re.S)
                 if "kind: prior" in b)
    path = tmp_path / "prior.yaml"
    path.write_text(block)
    example = load_recipe(path).to_dict()
    shipped = load_recipe(root / "recipes" / "prior-fashion.yaml").to_dict()
    assert example["prior"] == shipped["prior"] and example["autoencoder"] == shipped["autoencoder"]
    assert example["train"]["steps"] == shipped["train"]["steps"]


def test_fd_samples_below_the_frechet_minimum_is_refused_before_training(capsys):
    """It was found only after training, with the run FAILED and no checkpoint."""
    from pathlib import Path

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "prior-fashion.yaml")
    assert main(["validate", recipe, "--set", "eval.fd_samples=4"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vqkit: error: --set: eval.fd_samples: needs at least 512 (the Frechet distance's minimum), or 0 for off; got 4")
    assert main(["validate", recipe, "--set", "eval.fd_samples=512"]) == 0


def test_kind_prior_on_an_autoencoder_recipe_is_one_error(tmp_path, capsys):
    recipe = tmp_path / "p.yaml"
    recipe.write_text("extends: vqkit:quickstart.yaml\nkind: prior\n")
    assert main(["validate", str(recipe)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"vqkit: error: {recipe}:2:7: kind: a prior recipe (kind: prior) has no autoencoder blocks, but "
                     "this one has data, encoder, quantizer, decoder, reset, losses (does it extend an autoencoder "
                     "recipe?); it names its trained autoencoder in `autoencoder: {run: ...}`"], lines
