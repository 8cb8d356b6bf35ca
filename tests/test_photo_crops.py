"""The ``photo-crops`` data set on real photographs (scikit-image's, found in the package)."""
from __future__ import annotations

import pytest
import torch

from vqkit.components.natural_patches import SOURCES, skimage_data_dir
from vqkit.components.photo_crops import PhotoCrops
from vqkit.errors import VqkitError


def params(**over):
    base = dict(root=str(skimage_data_dir()), train_files=[SOURCES["astronaut"], SOURCES["rocket"]],
                test_files=[SOURCES["coffee"]], image_size=16, patches_per_image=6)
    return PhotoCrops.Params(**{**base, **over})


def test_splits_come_from_their_own_photographs_and_are_deterministic():
    train, test = PhotoCrops(params(), split="train", seed=2), PhotoCrops(params(), split="test", seed=2)
    assert len(train) == 12 and len(test) == 6
    assert train.sources == [SOURCES["astronaut"], SOURCES["rocket"]] and test.sources == [SOURCES["coffee"]]
    assert train.source_index.tolist() == [0] * 6 + [1] * 6
    x = test.get_batch(torch.arange(6))
    assert x.shape == (6, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, PhotoCrops(params(), split="test", seed=2).get_batch(torch.arange(6)))
    assert not torch.equal(x, PhotoCrops(params(), split="test", seed=3).get_batch(torch.arange(6)))
    # the same photograph cut under another split name gives the same crops: nothing depends on the split
    swapped = PhotoCrops(params(train_files=[SOURCES["coffee"]], test_files=[SOURCES["rocket"]]), split="train", seed=2)
    assert torch.equal(swapped.get_batch(torch.arange(6)), x)


def test_sources_are_shrunk_to_source_max_side():
    big = PhotoCrops(params(source_max_side=None, scale=(1.0, 1.0)), split="test")
    small = PhotoCrops(params(source_max_side=64, scale=(1.0, 1.0)), split="test")
    # a 16-px crop of a photograph shrunk to 64 px covers far more of the scene: rougher
    rough = lambda d: float(d.get_batch(torch.arange(6)).diff(dim=-1).abs().mean())  # noqa: E731
    assert rough(small) > rough(big)


def test_overlap_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        params(test_files=[SOURCES["rocket"]])
    with pytest.raises(VqkitError, match=r"photo-crops: '.*nothere\.jpg' not found \(data.params.root is"):
        PhotoCrops(params(root=str(tmp_path), test_files=["nothere.jpg"]), split="test")
