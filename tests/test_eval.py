"""`vqkit eval` and the training-time evaluation on real Fashion-MNIST images: the standard
LPIPS whatever the training loss's settings, results written back into the run (read from
the sqlite store), checkpoints without a run, metric choice and user errors.

Needs the converted LPIPS backbones (`vqkit weights fetch lpips`, done by `make test`, which
sets VQKIT_REQUIRE_WEIGHTS=1 so that they fail instead of skipping without them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from vqkit.cli import main
from vqkit.lpips.weights import backbone_path
from vqkit.metrics import FD_METRIC, MetricSet
from vqkit.model import VQModel
from vqkit.train.build import build_datasets
from vqkit.train.checkpoint import load_checkpoint, save_checkpoint

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template

TINY = {
    "vqkit": 1,
    "name": "tiny-eval",
    "seed": 1,
    "data": {"name": "fashion-mnist", "params": {"limit": 96}},
    "encoder": {"name": "conv", "params": {"channels": [8, 16], "factor": 4, "latent_dim": 8}},
    "quantizer": {"name": "vq", "params": {"codebook_size": 32}},
    "decoder": {"name": "conv", "params": {"channels": [16, 8]}},
    "losses": [{"name": "pixel-l1"}],
    "train": {"steps": 4, "batch_size": 16, "log_every": 2, "eval_every": 4, "image_every": 4,
              "checkpoint_every": 4, "device": "cpu"},
    "eval": {"num_samples": 32, "batch_size": 32, "metrics": ["psnr", "lpips"]},
    "tracking": {"experiment": "eval"},
}


@pytest.fixture(scope="module", autouse=True)
def pretrained_weights():
    missing = [str(backbone_path(net)) for net in ("alex", "vgg") if not backbone_path(net).is_file()]
    if missing:  # `make test` (CI) sets VQKIT_REQUIRE_WEIGHTS=1 after fetching them: then this fails
        why = f"converted LPIPS backbones not in the cache ({', '.join(missing)}); run `vqkit weights fetch lpips`"
        if os.environ.get("VQKIT_REQUIRE_WEIGHTS") == "1":
            pytest.fail(f"{why}; VQKIT_REQUIRE_WEIGHTS=1 requires them")
        pytest.skip(why)


@pytest.fixture
def workdir(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return tmp_path


def train_tiny(workdir: Path, capsys, **over) -> tuple[str, Path]:
    recipe = {**TINY, **over}
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["train", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    run_id = out.split("MLflow run ")[1].split()[0]
    return run_id, workdir / "runs" / run_id / "checkpoints" / "final.pt"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def standard_lpips(checkpoint: Path, n: int) -> float:
    model, recipe = VQModel.from_checkpoint(checkpoint)
    model.eval()
    _, test = build_datasets(recipe)
    x = test.get_batch(torch.arange(n))
    metrics = MetricSet(["lpips"])
    with torch.no_grad():
        metrics.update(model(x)[0], x)
    return metrics.compute()["eval/lpips"]


def test_training_eval_lpips_is_the_standard_metric_whatever_the_loss_settings(workdir, store, capsys):
    """Issue 14.6: a recipe's `lpips` loss with `reduction: sum` on a random network must
    not change `eval/lpips` (it used to be that loss, times the batch size)."""
    losses = [{"name": "pixel-l1"},
              {"name": "lpips", "weight": 0.1, "params": {"pretrained_backbone": False, "reduction": "sum"}}]
    run_id, final = train_tiny(workdir, capsys, losses=losses)
    (logged,) = client(store).get_metric_history(run_id, "eval/lpips")
    assert logged.step == 4
    assert logged.value == pytest.approx(standard_lpips(final, 32), rel=1e-5)
    assert 0.0 < logged.value < 1.0


def each_key_step_once(mlflow, run_id) -> dict[str, list[int]]:
    """{key: steps} of every metric of a run, asserting that no (key, step) is there twice."""
    out = {}
    for key in mlflow.get_run(run_id).data.metrics:
        steps = [m.step for m in mlflow.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
        out[key] = steps
    return out


def test_eval_writes_its_results_back_into_the_run(workdir, store, capsys):
    """`eval/<m>` at a step means the recipe's `eval.num_samples` test images: a write-back
    with those settings adds only what training did not measure at that step (a value the
    run has is the same measurement: kept, never a second row); other `--num-samples` go
    under `eval_n<N>/<m>`. Every (key, step) stays in the store once, however often eval runs."""
    run_id, final = train_tiny(workdir, capsys)  # eval.num_samples 32, metrics psnr and lpips, 4 steps
    mlflow = client(store)
    trained = {k: mlflow.get_metric_history(run_id, k)[0].value for k in ("eval/psnr", "eval/lpips", "eval/usage")}
    for _ in range(2):  # the same write-back twice: nothing is logged twice
        assert main(["eval", run_id, "--json", "--metrics", "psnr,ssim,lpips"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["logged_to_run"] == run_id and result["step"] == 4 and result["num_samples"] == 32
    assert result["eval/psnr"] == pytest.approx(trained["eval/psnr"], rel=1e-5)
    assert sorted(result["kept"]) == ["eval/lpips", "eval/perplexity", "eval/psnr", "eval/ssim", "eval/usage"]
    steps = each_key_step_once(mlflow, run_id)
    assert steps["eval/ssim"] == [4] and steps["eval/psnr"] == [4]  # ssim: not computed in training
    assert {k: mlflow.get_metric_history(run_id, k)[0].value for k in trained} == trained

    # other settings: a key of their own, at the same step
    assert main(["eval", run_id, "--json", "--metrics", "psnr,ssim,lpips", "--num-samples", "48"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["logged_to_run"] == run_id and result["num_samples"] == 48 and result["kept"] == []
    assert result["eval/lpips"] == pytest.approx(standard_lpips(final, 48), rel=1e-5)
    assert sorted(result["logged"]) == [f"eval_n48/{m}" for m in ("lpips", "perplexity", "psnr", "ssim", "usage")]
    steps = each_key_step_once(mlflow, run_id)
    assert steps["eval_n48/lpips"] == [4] and steps["eval/lpips"] == [4]
    assert mlflow.get_run(run_id).data.metrics["eval_n48/lpips"] == pytest.approx(result["eval/lpips"])
    tags = mlflow.get_run(run_id).data.tags
    assert tags["vqkit.eval.num_samples"] == "48"
    assert json.loads(tags["vqkit.eval.backbones"]) == {"lpips": "lpips-v0.1 alexnet imagenet"}
    assert json.loads(tags["vqkit.eval.metrics"]) == ["psnr", "ssim", "lpips"]
    assert main(["eval", run_id, "--metrics", "psnr,ssim,lpips", "--num-samples", "48"]) == 0
    assert "already in the run" in capsys.readouterr().out
    each_key_step_once(mlflow, run_id)

    # --no-log leaves the run as it is
    assert main(["eval", run_id, "--no-log", "--metrics", "psnr", "--num-samples", "16"]) == 0
    assert "not logged (--no-log)" in capsys.readouterr().out
    assert "eval_n16/psnr" not in mlflow.get_run(run_id).data.metrics
    assert mlflow.get_run(run_id).data.tags["vqkit.eval.num_samples"] == "48"


def test_eval_reports_the_frechet_distance(workdir, store, capsys):
    data = {"name": "fashion-mnist", "params": {"limit": 520}}
    run_id, _ = train_tiny(workdir, capsys, data=data, train={**TINY["train"], "steps": 2, "eval_every": 100})
    assert main(["eval", run_id, "--json", "--metrics", f"lpips,{FD_METRIC}", "--num-samples", "520"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 520
    assert result[f"eval/{FD_METRIC}"] > 0 and 0 < result["eval/lpips"] < 1
    run = client(store).get_run(run_id)  # 520 images, not the recipe's eval.num_samples: eval_n520/
    assert run.data.metrics[f"eval_n520/{FD_METRIC}"] == pytest.approx(result[f"eval/{FD_METRIC}"])
    assert json.loads(run.data.tags["vqkit.eval.backbones"])[FD_METRIC].startswith("vgg16 imagenet relu5_3")
    # fewer test images than the Fréchet distance needs: one error line, exit 2
    assert main(["eval", run_id, "--metrics", FD_METRIC, "--num-samples", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vqkit: error: eval metric {FD_METRIC} needs at least 512 test images, got 100; raise "
                   "eval.num_samples (--num-samples) or use a larger test split"]


def test_eval_of_a_checkpoint_without_a_run_only_prints(workdir, store, capsys):
    run_id, final = train_tiny(workdir, capsys)
    state = load_checkpoint(final)
    state["run"] = {}
    lone = workdir / "lone.pt"
    save_checkpoint(lone, state)
    before = len(client(store).get_metric_history(run_id, "eval/psnr"))
    assert main(["eval", str(lone), "--metrics", "psnr"]) == 0
    out = capsys.readouterr().out
    assert "eval/psnr" in out and "not logged: the checkpoint belongs to no MLflow run" in out
    assert len(client(store).get_metric_history(run_id, "eval/psnr")) == before


def test_eval_on_other_data_prints_without_logging(workdir, store, capsys):
    run_id, _ = train_tiny(workdir, capsys)
    assert main(["eval", run_id, "--json", "--metrics", "psnr", "--set", "data.params.classes=[0, 1]"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["logged_to_run"] is None and result["data"]["params"]["classes"] == [0, 1]
    assert len(client(store).get_metric_history(run_id, "eval/psnr")) == 1


def test_eval_user_errors(workdir, store, capsys, tmp_path, monkeypatch):
    run_id, _ = train_tiny(workdir, capsys)
    assert main(["eval", run_id, "--metrics", "psnr,lpip"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vqkit: error: --metrics: unknown metric 'lpip' (did you mean 'lpips'? valid: {FD_METRIC}, lpips, psnr, ssim)"
    )
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "empty-cache"))
    assert main(["eval", run_id, "--metrics", "lpips"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqkit: error: eval metric lpips needs the pretrained AlexNet")
    assert "run `vqkit weights fetch lpips`" in err[0]
