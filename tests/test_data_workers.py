"""``train.num_workers`` above the CPUs this process may use: vqkit starts as many
data-loader workers as there are CPUs, says so in one note (not under ``--quiet``), and
PyTorch's own "suggested max number of worker" warning never shows."""
from __future__ import annotations

import os
import warnings

import pytest

from tests.trainkit import image_folder_recipe
from vqkit.cli import main
from vqkit.components.image_folder import write_example_images
from vqkit.train.data import StepBatches

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template


def _recipe(tmp_path, store, workers: int):
    folder = tmp_path / "images"
    write_example_images(folder)
    return image_folder_recipe(tmp_path / "workers.yaml", folder, store, batch_size=4, num_workers=workers)


def _worker_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "data-loader worker" in line or "DataLoader" in line]


@pytest.mark.parametrize("quiet", [False, True])
def test_more_workers_than_cpus_are_capped_with_one_note(tmp_path, store, capsys, monkeypatch, quiet):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # a 1-CPU machine
    recipe = _recipe(tmp_path, store, workers=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["train", str(recipe), *(["--quiet"] if quiet else [])])
    err = capsys.readouterr().err
    assert code == 0, err
    assert [str(w.message) for w in caught if "DataLoader" in str(w.message)] == []
    if quiet:
        assert _worker_lines(err) == []
    else:
        assert _worker_lines(err) == [
            "vqkit: note: train.num_workers is 3 but this process may use 1 CPU: 1 data-loader worker"]


def test_the_cap_leaves_the_batches_unchanged(tmp_path, monkeypatch):
    """Fewer workers read the same images in the same order."""
    from vqkit.components.image_folder import ImageFolder, ImageFolderParams

    write_example_images(tmp_path / "images")
    data = ImageFolder(ImageFolderParams(root=str(tmp_path / "images"), image_size=32), split="train", seed=0)
    want = list(StepBatches(data, 4, seed=0, num_workers=0).iterate(0, 3))
    notes: list[str] = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    capped = StepBatches(data, 4, seed=0, num_workers=2, note=notes.append)
    assert capped.num_workers == 1 and len(notes) == 1
    got = list(capped.iterate(0, 3))
    assert all((a == b).all() for a, b in zip(want, got, strict=True))
