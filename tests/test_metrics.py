"""Evaluation metrics (vqkit.metrics) on real photographs: the standard LPIPS against the
official values, the VGG16 Fréchet distance (0 for a set against itself, growing with
noise), known degradations ranked in the right order, missing weights and bad names.

The pretrained networks are the converted files `make test` creates once
(`vqkit weights fetch lpips`); without them these tests skip, or fail under `make test`
(VQKIT_REQUIRE_WEIGHTS=1).
"""
from __future__ import annotations

import importlib.util
import json
import os
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.errors import VqkitError
from vqkit.lpips.weights import backbone_path
from vqkit.metrics import FD_METRIC, FD_MIN_SAMPLES, METRICS, MetricSet, check_metric_names, frechet_distance

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def pretrained_weights():
    missing = [str(backbone_path(net)) for net in ("alex", "vgg") if not backbone_path(net).is_file()]
    if missing:  # `make test` (CI) sets VQKIT_REQUIRE_WEIGHTS=1 after fetching them: then this fails
        why = f"converted LPIPS backbones not in the cache ({', '.join(missing)}); run `vqkit weights fetch lpips`"
        if os.environ.get("VQKIT_REQUIRE_WEIGHTS") == "1":
            pytest.fail(f"{why}; VQKIT_REQUIRE_WEIGHTS=1 requires them")
        pytest.skip(why)


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    """512 real 16x16 colour crops of a photograph (scikit-image's chelsea), in [-1, 1]
    (16 px: the smallest VGG16 takes, to keep the Fréchet tests cheap)."""
    from vqkit.components.natural_patches import NaturalPatches

    p = NaturalPatches.Params(image_size=16, patches_per_image=FD_MIN_SAMPLES, train_images=["rocket"],
                              test_images=["chelsea"])
    data = NaturalPatches(p, split="test", seed=0)
    return data.get_batch(torch.arange(len(data)))


@pytest.fixture(scope="module")
def against_crops(crops):
    """``evaluate(names, recon)`` against ``crops``; the real images' Fréchet statistics
    are computed once for the module (MetricSet's ``cache_real``)."""
    cached = MetricSet(["psnr", "ssim", "lpips", FD_METRIC], cache_real=True)

    def run(names, recon):
        for i in range(0, len(crops), 256):
            cached.update(recon[i:i + 256], crops[i:i + 256])
        result = cached.compute()
        return {k: v for k, v in result.items() if k.split("/")[1] in names}

    return run


def noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def blurred(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = 3
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t**2 / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def evaluate(names, recon, original, batch: int = 128) -> dict[str, float]:
    metrics = MetricSet(names)
    for i in range(0, len(original), batch):
        metrics.update(recon[i:i + batch], original[i:i + batch])
    return metrics.compute()


# ----------------------------------------------------------------------------- LPIPS
def test_identical_images_have_lpips_zero_and_fd_zero(crops):
    result = evaluate(["psnr", "ssim", "lpips", FD_METRIC], crops, crops)
    assert result["eval/lpips"] == 0.0
    assert result["eval/psnr"] == 100.0 and result["eval/ssim"] == pytest.approx(1.0, abs=1e-6)
    assert abs(result[f"eval/{FD_METRIC}"]) < 1e-6


def test_lpips_matches_the_official_lpips_to_1e_4():
    """The values of the `lpips` package 0.1.4 (AlexNet, v0.1) stored by
    benchmarks/lpips_reference.py --write-test-values, on the same photograph pairs."""
    spec = importlib.util.spec_from_file_location("lpips_reference", ROOT / "benchmarks" / "lpips_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    expected = json.loads((ROOT / "tests" / "data" / "lpips_reference.json").read_text())["alex"]
    pairs = ref.make_pairs(small=True)
    assert [name for name, _, _ in pairs] == list(expected)
    for name, a, b in pairs:
        got = evaluate(["lpips"], torch.from_numpy(b)[None], torch.from_numpy(a)[None])["eval/lpips"]
        assert got == pytest.approx(expected[name], abs=1e-4), name


def test_lpips_is_the_mean_of_per_image_distances_whatever_the_batching(crops):
    from vqkit.lpips import LPIPS

    x, y = crops[:40], noisy(crops[:40], 0.1)
    up = lambda t: torch.nn.functional.interpolate(t, size=32, mode="bilinear", align_corners=False)  # noqa: E731
    per_image = LPIPS.pretrained("alex")(up(y), up(x))
    for batch in (40, 7):
        assert evaluate(["lpips"], y, x, batch)["eval/lpips"] == pytest.approx(float(per_image.mean()), rel=1e-5)


def test_known_degradations_rank_in_order(crops, against_crops):
    names = ["psnr", "ssim", "lpips", FD_METRIC]
    by_noise = [against_crops(names, noisy(crops, s)) for s in (0.03, 0.1, 0.3)]
    by_blur = [against_crops(names, blurred(crops, s)) for s in (0.6, 1.2, 2.4)]
    for series in (by_noise, by_blur):
        for key, sign in (("eval/psnr", -1), ("eval/ssim", -1), ("eval/lpips", 1), (f"eval/{FD_METRIC}", 1)):
            values = [r[key] for r in series]
            assert all(sign * (b - a) > 0 for a, b in zip(values, values[1:])), (key, values)


# ----------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_matches_the_closed_form():
    import scipy.linalg

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((200, 6)) * 2.0 + 1.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(torch.from_numpy(a), torch.from_numpy(a))) < 1e-9


def test_fd_grows_with_added_noise_and_caches_the_real_statistics(crops, against_crops):
    values = [against_crops([FD_METRIC], noisy(crops, s))[f"eval/{FD_METRIC}"] for s in (0.0, 0.05, 0.1, 0.2)]
    assert values[0] < 1e-4 * values[1]
    assert values[1] < values[2] < values[3]
    # the cached real statistics give the same number as a fresh computation
    fresh = evaluate([FD_METRIC], noisy(crops, 0.1), crops, 512)[f"eval/{FD_METRIC}"]
    assert fresh == pytest.approx(values[2], rel=1e-4)


def test_fd_needs_the_stated_minimum_sample_count(crops):
    metrics = MetricSet([FD_METRIC])
    metrics.update(crops[:FD_MIN_SAMPLES - 1], crops[:FD_MIN_SAMPLES - 1])
    with pytest.raises(VqkitError, match=f"at least {FD_MIN_SAMPLES} test images, got {FD_MIN_SAMPLES - 1}"):
        metrics.compute()


# ----------------------------------------------------------------------------- names, weights
def test_unknown_metric_names_are_reported_with_suggestions():
    with pytest.raises(VqkitError) as err:
        check_metric_names(["psnr", "lpip", "fid"])
    text = str(err.value)
    assert "unknown metric 'lpip'" in text and "did you mean 'lpips'" in text and "'fid'" in text
    assert check_metric_names([" psnr", "psnr", "lpips "]) == ["psnr", "lpips"]


def test_recipe_schema_offers_exactly_the_metrics():
    from vqkit.recipe import EvalConfig

    allowed = typing.get_args(typing.get_args(EvalConfig.model_fields["metrics"].annotation)[0])
    assert set(allowed) == set(METRICS)


@pytest.mark.parametrize("name, net", [("lpips", "alex"), (FD_METRIC, "vgg")])
def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch, name, net):
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(VqkitError, match=r"needs the pretrained .* run `vqkit weights fetch lpips`") as err:
        MetricSet(["psnr", name])
    assert str(tmp_path / "empty" / "lpips" / f"{net}_backbone.pt") in str(err.value)


def test_backbones_are_described_for_tags():
    small = torch.zeros(2, 1, 28, 28)
    metrics = MetricSet(["psnr", "lpips"])
    metrics.update(small, small)
    assert metrics.backbones == {"lpips": "lpips-v0.1 alexnet imagenet (images resized from 28x28 to 32x32)"}
    assert metrics.compute()["eval/lpips"] == 0.0
