"""The plugin distributions in plugins/ (vqkit-fsq, vqkit-residual), installed as a user
would (`make setup`: `pip install -e plugins/vqkit-fsq -e plugins/vqkit-residual`): found
through their entry points, their own test suites (vqkit's contract suite included), their
recipes validated, trained for a few steps and read back."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqkit.cli import main
from vqkit.model import VQModel
from vqkit.plugins import get_registry

pytest_plugins = ("trainkit",)  # fixtures: store (a migrated MLflow sqlite store)

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"
#: quantizer name -> (distribution, its folder, capability declared)
DISTS = {
    "fsq": ("vqkit-fsq", PLUGINS / "vqkit-fsq", "fixed_codebook"),
    "residual": ("vqkit-residual", PLUGINS / "vqkit-residual", "multi_codebook"),
}
#: a few steps on 192 Fashion-MNIST images
SHORT = [
    "data.params.limit=192", "train.steps=4", "train.batch_size=16", "train.log_every=2",
    "train.eval_every=4", "train.image_every=4", "train.checkpoint_every=4", "train.warmup_steps=1",
    "train.device=cpu", "eval.num_samples=32", "eval.batch_size=32",
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("name", sorted(DISTS))
def test_installed_and_registered_from_its_distribution(name):
    dist, folder, capability = DISTS[name]
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        pytest.fail(f"{dist} is not installed: `make setup` installs it (pip install --no-deps -e {folder.relative_to(ROOT)})")
    entry = get_registry().get("quantizers", name)
    assert (entry.distribution, entry.version, entry.plugin) == (dist, version, name)
    assert entry.cls.capabilities()[capability] is True
    # listed with the other quantizers, so tests/test_contracts.py runs the contract suite on it
    assert entry in get_registry().entries("quantizers")


@pytest.mark.parametrize("name", sorted(DISTS))
def test_the_distributions_own_test_suite_passes(name):
    """What `tox -e fsq-plugin` / `tox -e residual-plugin` run, against this vqkit."""
    _, folder, _ = DISTS[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "tests"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout, proc.stdout[-1000:]


def test_plugin_recipes_validate(capsys):
    recipes = sorted(str(p) for p in PLUGINS.glob("vqkit-*/recipes/*.yaml"))
    assert len(recipes) == 4
    assert main(["validate", *recipes]) == 0, capsys.readouterr().err
    quickstarts = [r for r in recipes if "quickstart" in r]
    assert main(["validate", "--build", *quickstarts, *_sets("data.params.limit=64")]) == 0, capsys.readouterr().err


def test_fsq_with_a_code_replacing_reset_is_rejected_with_a_location(workdir, capsys):
    child = workdir / "fsq-random.yaml"
    child.write_text(f"extends: {PLUGINS / 'vqkit-fsq/recipes/quickstart-fsq.yaml'}\nreset: {{name: random}}\n")
    assert main(["validate", str(child)]) == 2
    err = capsys.readouterr().err
    assert f"{child}:2:" in err and "reset.name" in err, err
    assert "'random'" in err and "'fsq'" in err and "vqkit-fsq" in err and "fixed code-book" in err, err


def _only_run(store: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def test_fsq_quickstart_trains_and_decodes_exactly_from_its_checkpoint(workdir, store, capsys):
    recipe = PLUGINS / "vqkit-fsq/recipes/quickstart-fsq.yaml"
    assert main(["train", str(recipe), "--quiet", *_sets(*SHORT, f"tracking.uri={store}")]) == 0
    client, run = _only_run(store)
    assert run.info.status == "FINISHED"
    assert run.data.params["quantizer.name"] == "fsq"
    assert run.data.params["quantizer.params.levels"] == "[8, 5, 5, 5]"
    assert "quantizer.params.codebook_size" not in run.data.params  # the vq block was replaced, not merged
    assert run.data.tags["vqkit.component.quantizer"] == "fsq (vqkit-fsq 0.1.0)"
    assert "vqkit-fsq==0.1.0" in run.data.tags["vqkit.plugins"]
    assert "vqkit-residual" not in run.data.tags["vqkit.plugins"]
    metrics = run.data.metrics
    assert 5.0 < metrics["eval/psnr"] < 60.0
    assert 0 < metrics["quantizer/usage"] <= 1 and metrics["quantizer/perplexity"] >= 1  # its stats
    assert "loss/commitment" not in metrics and "loss/codebook" not in metrics
    run_dir = workdir / "runs" / run.info.run_id
    model, _ = VQModel.from_checkpoint(run_dir / "checkpoints" / "final.pt")
    model.eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model.encode(x)
        assert torch.equal(model.quantizer.decode_indices(out.indices), out.quantized)
    capsys.readouterr()
    assert main(["eval", run.info.run_id, "--json", "--num-samples", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval/psnr"] == pytest.approx(run.data.metrics["eval/psnr"], abs=1e-6)


def test_residual_quickstart_trains_with_per_stage_resets(workdir, store, capsys):
    """256 codes per stage and 1024 latents per step: both stages have dead codes, and
    each stage's own policy replaces them (logged per code-book)."""
    recipe = PLUGINS / "vqkit-residual/recipes/quickstart-residual.yaml"
    sets = _sets(*SHORT, f"tracking.uri={store}", "reset.every=2", "reset.stop_step=null",
                 "quantizer.params.codebook_size=256")
    assert main(["train", str(recipe), "--quiet", *sets]) == 0
    client, run = _only_run(store)
    assert run.info.status == "FINISHED"
    assert run.data.params["quantizer.name"] == "residual"
    assert run.data.params["quantizer.params.stages"] == "2"
    assert run.data.tags["vqkit.component.quantizer"] == "residual (vqkit-residual 0.1.0)"
    assert "vqkit-residual==0.1.0" in run.data.tags["vqkit.plugins"]
    metrics = run.data.metrics
    assert 5.0 < metrics["eval/psnr"] < 60.0
    for s in (0, 1):
        resets = client.get_metric_history(run.info.run_id, f"codebook/{s}/resets")
        assert sum(m.value for m in resets) > 0, f"stage {s}: no code was reset"
        assert 0 < metrics[f"quantizer/stage{s}/rel_error"]
    assert metrics["quantizer/stage1/rel_error"] < metrics["quantizer/stage0/rel_error"]
    run_dir = workdir / "runs" / run.info.run_id
    model, _ = VQModel.from_checkpoint(run_dir / "checkpoints" / "final.pt")
    model.eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model.encode(x)
        assert out.indices.shape == (2, 2, 8, 8)
        assert torch.equal(model.quantizer.decode_indices(out.indices), out.quantized)


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_comparison_is_one_sweep_per_data_set_and_the_timing_script_reads_it(capsys):
    """docs/quantizers.md: `vqkit sweep recipes/quantizers/<data set>.yaml` plans the linked
    quantizer / reset children (fsq with `reset: none`), each named for its blocks; and
    benchmarks/quantizers.py times exactly those children's quantizers."""
    for recipe, names in (("fashion-mnist", ["quantizer=vq reset=random", "quantizer=fsq(levels=[8,6,5]) reset=none",
                                             "quantizer=fsq(levels=[4,4,4,4]) reset=none",
                                             "quantizer=residual reset=random"]),
                          ("natural-patches", ["quantizer=vq reset=random", "quantizer=fsq reset=none",
                                               "quantizer=residual reset=random"])):
        path = str(ROOT / "recipes" / "quantizers" / f"{recipe}.yaml")
        assert main(["sweep", path, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert [line.split("  ", 1)[1] for line in out.splitlines() if "/" in line.split("  ")[0]] == names, out
    doc = (ROOT / "docs" / "quantizers.md").read_text()  # the commands it shows are these
    assert re.findall(r"^vqkit sweep (\S+)", doc, re.M) == ["recipes/quantizers/fashion-mnist.yaml",
                                                          "recipes/quantizers/natural-patches.yaml"]
    bench = _load_script(ROOT / "benchmarks" / "quantizers.py")
    assert bench.main(["--rounds", "2", "--threads", "1", "--batch", "4"]) == 0
    timing = capsys.readouterr().out
    assert "| quantizer=fsq(levels=[8,6,5]) reset=none |" in timing and timing.count("| quantizer=vq reset=random | ") == 2
    assert timing.count("| quantizer=residual reset=random |") == 2, timing
