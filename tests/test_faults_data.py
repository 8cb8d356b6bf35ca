"""A corrupt image in an image folder: its error comes back from a DataLoader worker as
the original one-line `vqkit: error`, and `validate --build` finds it without training
even when nothing is preloaded (``preload_mb: 0``)."""
from __future__ import annotations

import pytest
import yaml

from vqkit.cli import main
from vqkit.components.image_folder import write_example_images
from vqkit.data import hash_fraction

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, closed_port


@pytest.fixture
def corrupt_folder(tmp_path):
    folder = tmp_path / "images"
    files = write_example_images(folder)
    data = files[0].read_bytes()
    name = next(f"bad{i}.png" for i in range(100) if hash_fraction(f"bad{i}.png") >= 0.25)  # a train file
    bad = folder / name
    bad.write_bytes(data[: len(data) // 2])  # a valid header, the pixels cut short
    return folder, bad


def _recipe(tmp_path, folder, store, workers: int):
    recipe = {
        "vqkit": 1, "name": "corrupt", "seed": 0,
        "data": {"name": "image-folder", "params": {"root": str(folder), "image_size": 32, "preload_mb": 0,
                                                    "test_fraction": 0.25}},
        "encoder": {"name": "conv", "params": {"channels": [8, 8], "factor": 4, "latent_dim": 8}},
        "quantizer": {"name": "vq", "params": {"codebook_size": 16}},
        "decoder": {"name": "conv", "params": {"channels": [8, 8]}},
        "losses": [{"name": "pixel-l1"}],
        "train": {"steps": 2, "batch_size": 6, "num_workers": workers, "device": "cpu"},
        "eval": {"num_samples": 2, "batch_size": 2, "metrics": ["psnr"]},
        "tracking": {"experiment": "corrupt", "uri": store},
    }
    path = tmp_path / "corrupt.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_worker_error_is_the_original_one_line_error(tmp_path, corrupt_folder, store, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, bad = corrupt_folder
    assert main(["train", str(_recipe(tmp_path, folder, store, workers=1)), "--quiet"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and errors[0].startswith(f"vqkit: error: cannot read image {str(bad)!r}"), err
    assert "DataLoader worker" not in err and "Traceback" not in err


def test_validate_build_decodes_every_file_even_without_preloading(tmp_path, corrupt_folder, store, capsys):
    folder, bad = corrupt_folder
    recipe = _recipe(tmp_path, folder, store, workers=0)
    assert main(["validate", str(recipe)]) == 0  # the recipe itself is fine
    capsys.readouterr()
    assert main(["validate", "--build", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [line for line in err.strip().splitlines() if str(bad) in line]
    assert err.startswith(f"vqkit: error: {recipe}: cannot read image {str(bad)!r}")
    bad.unlink()
    assert main(["validate", "--build", str(recipe)]) == 0
