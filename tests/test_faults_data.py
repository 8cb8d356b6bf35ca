"""A corrupt image in an image folder: its error comes back from a DataLoader worker as
the original one-line `vqkit: error`, and `validate --build` finds it without training
even when nothing is preloaded (``preload_mb: 0``)."""
from __future__ import annotations

import re

import pytest

from tests.trainkit import image_folder_recipe, located_at
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



def _recipe(tmp_path, folder, store, workers: int, batch_size: int = 6, preload_mb: int = 0):
    return image_folder_recipe(tmp_path / "corrupt.yaml", folder, store, batch_size=batch_size, num_workers=workers,
                               preload_mb=preload_mb)


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
    assert re.match(f"vqkit: error: {located_at(recipe, 'data:')}: " + re.escape(f"data: cannot read image {str(bad)!r}"), err)
    bad.unlink()
    assert main(["validate", "--build", str(recipe)]) == 0


@pytest.mark.parametrize("preload_mb", [0, 64])
def test_validate_build_reports_every_bad_image_of_both_splits_at_once(tmp_path, store, capsys, preload_mb):
    """Two bad files (a text file named .jpg, a truncated PNG), one per split: one
    `validate --build` names both, preloaded or not; preloaded, `train` refuses with both
    too, before any MLflow run."""
    folder = tmp_path / "images"
    files = write_example_images(folder)
    data = files[0].read_bytes()
    test_name = next(f"trunc{i}.png" for i in range(100) if hash_fraction(f"trunc{i}.png") < 0.25)
    train_name = next(f"notes{i}.jpg" for i in range(100) if hash_fraction(f"notes{i}.jpg") >= 0.25)
    (folder / test_name).write_bytes(data[: len(data) // 2])
    (folder / train_name).write_text("not an image\n")
    recipe = _recipe(tmp_path, folder, store, workers=0, preload_mb=preload_mb)
    assert main(["validate", "--build", str(recipe)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    named = sorted(name for name in (test_name, train_name) for line in lines if str(folder / name) in line)
    assert named == sorted([test_name, train_name]) and len(lines) == 2, lines
    assert all(re.match(f"vqkit: error: {located_at(recipe, 'data:')}: data: cannot read image ", line) for line in lines), lines
    if not preload_mb:  # training decodes lazily: it stops at the first bad file it reads
        return
    assert main(["train", str(recipe), "--quiet"]) == 2  # preloaded: every bad file, before any run
    assert sorted(capsys.readouterr().err.strip().splitlines()) == sorted(lines)  # located alike
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=store).search_runs(["0"]) == [] and len(
        MlflowClient(tracking_uri=store).search_experiments()) == 1  # no run, no experiment made


def test_a_long_list_of_bad_images_is_capped(tmp_path, store, capsys):
    folder = tmp_path / "images"
    write_example_images(folder)
    for i in range(30):
        (folder / f"junk{i:02d}.jpg").write_text("junk\n")
    recipe = _recipe(tmp_path, folder, store, workers=0)
    assert main(["validate", "--build", str(recipe)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 21 and re.match(
        f"vqkit: error: {located_at(recipe, 'data:')}: " + re.escape("data: ... and 10 more images that cannot"), lines[-1]), lines


def test_validate_build_reports_a_train_split_smaller_than_one_batch(tmp_path, store, capsys):
    folder = tmp_path / "images"
    write_example_images(folder)
    recipe = _recipe(tmp_path, folder, store, workers=0, batch_size=512)
    assert main(["validate", "--build", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(
        f"vqkit: error: {located_at(recipe, 'train:', 'batch_size:')}: train.batch_size: the train split has ", err[0]), err
    assert "fewer than one global batch (512 x 1 processes = 512)" in err[0]
