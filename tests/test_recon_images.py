"""The reconstructions a training run gives ``mlflow.log_image``, read back from the MLflow
store of a tiny real run: nearly square (pairs of original and reconstruction side by side,
4 x 4 pairs for 16 test images) so MLflow's 256-pixel thumbnails show each image large,
while the named ``grids/recon_<step>.png`` keeps its 2-row layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.test_train import write_recipe
from tests.trainkit import client
from vqkit.cli import main

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, workdir

SIZE, SCALE = 16, 4  # 16-pixel test images, enlarged x4 (to 64 pixels) in both PNGs


def test_logged_image_pairs_each_original_with_its_reconstruction(workdir, store):
    recipe = write_recipe(
        workdir, data={"name": "fashion-mnist", "params": {"limit": 64, "image_size": SIZE, "fit": "resize"}},
        train={"steps": 2, "image_every": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 2},
        tracking={"uri": store, "experiment": "pairs"},
    )
    assert main(["train", str(recipe), "--quiet"]) == 0
    mlflow = client(store)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("pairs").experiment_id])
    run_id = run.info.run_id
    local = Path(mlflow.download_artifacts(run_id, "", str(workdir / "dl")))

    # the named grid: 16 originals over their 16 reconstructions, 2-pixel gaps, as before
    with Image.open(local / "grids" / "recon_000002.png") as im:
        grid = np.asarray(im.convert("RGB"))
    s, pad = SIZE * SCALE, 2 * SCALE
    assert grid.shape[:2] == (2 * s + 3 * pad, 16 * s + 17 * pad)

    def grid_tile(row: int, i: int) -> np.ndarray:
        y, x = pad + row * (s + pad), pad + i * (s + pad)
        return grid[y:y + s, x:x + s]

    # the image logged under key "reconstructions" at step 2, and MLflow's thumbnail of it
    names = sorted(p.name for p in (local / "images").iterdir())
    (png,) = [n for n in names if n.startswith("reconstructions+step+2+") and n.endswith(".png")]
    (webp,) = [n for n in names if n.startswith("reconstructions+step+2+") and n.endswith("+compressed.webp")]
    with Image.open(local / "images" / png) as im:
        pairs = np.asarray(im.convert("RGB"))
    h, w = pairs.shape[:2]
    assert w <= 2.2 * h  # 8 tiles wide, 4 high (the strip is 16 x 2)
    with Image.open(local / "images" / webp) as thumb:
        assert max(thumb.size) == 256 and thumb.width * s / w >= 256 / 10  # each image >= 25 px

    # 4 rows of 4 pairs; in pair i: test image i, then 1 gap pixel, then its reconstruction
    gap, pair_gap = 1 * SCALE, 4 * SCALE
    assert (h, w) == (4 * s + 5 * pair_gap, 4 * (2 * s + gap) + 5 * pair_gap)
    white = np.full(3, 255, dtype=np.uint8)
    for i in range(16):
        y = pair_gap + (i // 4) * (s + pair_gap)
        x = pair_gap + (i % 4) * (2 * s + gap + pair_gap)
        assert np.array_equal(pairs[y:y + s, x:x + s], grid_tile(0, i)), f"original {i}"
        assert np.array_equal(pairs[y:y + s, x + s + gap:x + 2 * s + gap], grid_tile(1, i)), f"reconstruction {i}"
        assert (pairs[y:y + s, x + s:x + s + gap] == white).all()  # the separator inside a pair
    assert not np.array_equal(grid_tile(0, 0), grid_tile(1, 0))  # a 2-step model does not copy its input
