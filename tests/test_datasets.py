"""The built-in data sets: fashion-mnist, image-folder, natural-patches."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

from vqkit.components.fashion_mnist import DEFAULT_ROOT, INSTALL_HINT, ROOT_ENV, FashionMnist
from vqkit.components.image_folder import ImageFolder, split_files, write_example_images
from vqkit.components.natural_patches import SOURCES, NaturalPatches, skimage_data_dir
from vqkit.data import float_items, to_float
from vqkit.errors import VqkitError
from vqkit.plugins import get_registry


def check_items(ds, n: int = 4) -> None:
    """Items are float32 (C, H, W) in [-1, 1] and match get_batch."""
    idx = list(range(0, len(ds), max(1, len(ds) // n)))[:n]
    items = [ds[i] for i in idx]
    for x in items:
        assert x.dtype == torch.float32
        assert x.shape == (ds.channels, *ds.image_size)
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(ds.get_batch(idx), torch.stack(items))


def photo(name: str) -> Image.Image:
    with Image.open(skimage_data_dir() / SOURCES[name]) as img:
        return img.convert("RGB")


# =========================================================================== registry
@pytest.mark.parametrize("name, cls", [
    ("fashion-mnist", FashionMnist), ("image-folder", ImageFolder), ("natural-patches", NaturalPatches),
])
def test_registered_through_entry_points(name, cls):
    entry = get_registry().get("datasets", name)
    assert entry.cls is cls and entry.distribution == "vqkit"


# =========================================================================== fashion-mnist
def first_raw_images(n: int) -> np.ndarray:
    with gzip.open(Path(DEFAULT_ROOT) / "t10k-images-idx3-ubyte.gz", "rb") as fh:
        data = fh.read(16 + n * 784)
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, 28, 28)


def test_fashion_mnist_full_splits_padded_to_32():
    train = FashionMnist(split="train")
    test = FashionMnist(split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.channels == 1 and train.image_size == (32, 32)
    check_items(train)
    check_items(test)
    x = test.get_batch(range(8))
    # centred on background: a 2-pixel border of -1, the original pixels inside
    raw = torch.from_numpy(first_raw_images(8).copy()).float() / 127.5 - 1
    assert torch.equal(x[:, 0, 2:30, 2:30], raw)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert bool((x[:, 0][:, border] == -1).all())
    assert sorted(set(test.labels.tolist())) == list(range(10))


def test_fashion_mnist_resize_rgb_classes_limit():
    params = FashionMnist.Params(fit="resize", image_size=16, channels=3, classes=[1, 7], limit=50)
    ds = FashionMnist(params, split="test")
    assert len(ds) == 50 and ds.image_size == (16, 16) and ds.channels == 3
    assert set(ds.labels.tolist()) <= {1, 7}
    check_items(ds)
    x = ds.get_batch(range(len(ds)))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert float(x.std()) > 0.3  # real garments, not a constant


def test_fashion_mnist_pad_needs_room():
    with pytest.raises(pydantic.ValidationError, match="image_size >= 28"):
        FashionMnist.Params(image_size=16)
    with pytest.raises(pydantic.ValidationError, match="classes"):
        FashionMnist.Params(classes=[10])


def test_fashion_mnist_missing_files_names_install_command(tmp_path):
    with pytest.raises(VqkitError) as info:
        FashionMnist(FashionMnist.Params(root=str(tmp_path)), split="train")
    message = str(info.value)
    assert INSTALL_HINT in message and "apt-get install -y dataset-fashion-mnist" in message
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message


def test_fashion_mnist_raw_files_and_env_override(tmp_path, monkeypatch):
    # uncompressed idx files holding the first 20 real test images
    with gzip.open(Path(DEFAULT_ROOT) / "t10k-images-idx3-ubyte.gz", "rb") as fh:
        images = bytearray(fh.read(16 + 20 * 784))
    images[4:8] = (20).to_bytes(4, "big")
    with gzip.open(Path(DEFAULT_ROOT) / "t10k-labels-idx1-ubyte.gz", "rb") as fh:
        labels = bytearray(fh.read(8 + 20))
    labels[4:8] = (20).to_bytes(4, "big")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    ds = FashionMnist(split="test")
    assert len(ds) == 20
    reference = FashionMnist(FashionMnist.Params(root=DEFAULT_ROOT, limit=20), split="test")
    assert torch.equal(ds.get_batch(range(20)), reference.get_batch(range(20)))
    assert torch.equal(ds.labels, reference.labels)
    # a truncated file is reported with its path
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(images[:-100]))
    with pytest.raises(VqkitError, match="truncated or corrupt"):
        FashionMnist(split="test")


# =========================================================================== natural-patches
def test_natural_patch_sources_are_bundled_rgb_photographs():
    for name, filename in SOURCES.items():
        path = skimage_data_dir() / filename
        assert path.is_file(), name
        with Image.open(path) as img:
            assert img.mode == "RGB" and min(img.size) >= 256, name


def test_natural_patches_shapes_split_and_determinism():
    params = NaturalPatches.Params(patches_per_image=16, image_size=24)
    train = NaturalPatches(params, split="train", seed=3)
    test = NaturalPatches(params, split="test", seed=3)
    assert len(train) == 16 * len(params.train_images) and len(test) == 16 * len(params.test_images)
    assert not set(train.sources) & set(test.sources)
    assert train.channels == 3 and train.image_size == (24, 24)
    check_items(train)
    check_items(test)
    again = NaturalPatches(params, split="train", seed=3)
    assert torch.equal(again.get_batch(range(len(again))), train.get_batch(range(len(train))))
    other = NaturalPatches(params, split="train", seed=4)
    assert not torch.equal(other.get_batch(range(16)), train.get_batch(range(16)))
    # crops of one image do not depend on which other images are listed
    solo = NaturalPatches(params.model_copy(update={"train_images": ["coffee"]}), split="train", seed=3)
    k = params.train_images.index("coffee")
    assert torch.equal(solo.get_batch(range(16)), train.get_batch(range(16 * k, 16 * k + 16)))


def test_natural_patches_are_real_crops_of_the_source():
    params = NaturalPatches.Params(
        patches_per_image=5, image_size=16, scale=(1.0, 1.0), hflip=False, min_std=0,
        train_images=["astronaut"], test_images=["chelsea"],
    )
    ds = NaturalPatches(params, split="test", seed=0)
    src = np.asarray(photo("chelsea"))
    for i in range(len(ds)):
        crop = ((ds[i] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        ys, xs = np.nonzero((src[:-15, :-15] == crop[0, 0]).all(-1))
        assert any((src[y:y + 16, x:x + 16] == crop).all() for y, x in zip(ys, xs)), i


def test_natural_patches_params_validation_and_grey():
    with pytest.raises(pydantic.ValidationError, match="overlap"):
        NaturalPatches.Params(train_images=["astronaut"], test_images=["astronaut"])
    with pytest.raises(pydantic.ValidationError):
        NaturalPatches.Params(test_images=["camera"])  # not a bundled colour photograph
    ds = NaturalPatches(NaturalPatches.Params(patches_per_image=4, channels=1), split="test")
    assert ds.channels == 1
    check_items(ds)


# =========================================================================== image-folder
@pytest.fixture
def folder(tmp_path) -> Path:
    """Real photographs in many encodings, nested, with files that must be ignored."""
    root = tmp_path / "images"
    write_example_images(root, count=8)
    astro = photo("astronaut").resize((70, 45))
    astro.save(root / "wide.PNG")  # upper-case extension
    astro.convert("L").save(root / "grey.png")
    rgba = photo("coffee").resize((50, 60)).convert("RGBA")
    alpha = np.full((60, 50), 255, np.uint8)
    alpha[:, :25] = 0  # left half transparent -> white
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "sub" / "alpha.png")
    astro.convert("P").save(root / "palette.png")
    grey16 = (np.asarray(photo("chelsea").convert("L").resize((40, 40)), np.uint16) * 257)
    Image.fromarray(grey16).save(root / "deep16.png")
    (root / "sub" / "deeper").mkdir()
    photo("rocket").resize((64, 48)).save(root / "sub" / "deeper" / "rocket.jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"not read")
    return root


def image_folder(root: Path, split: str = "train", seed: int = 0, **params) -> ImageFolder:
    return ImageFolder(ImageFolder.Params(root=str(root), **params), split=split, seed=seed)


def test_image_folder_reads_all_modes_rgb_and_grey(folder):
    for channels in (3, 1):
        train = image_folder(folder, channels=channels, image_size=32, test_fraction=0.3)
        test = image_folder(folder, "test", channels=channels, image_size=32, test_fraction=0.3)
        assert sorted(train.files + test.files) == sorted([
            "img00.png", "sub/img01.png", "img02.png", "sub/img03.jpg", "img04.png", "sub/img05.png",
            "img06.png", "sub/img07.jpg", "wide.PNG", "grey.png", "sub/alpha.png", "palette.png",
            "deep16.png", "sub/deeper/rocket.jpeg",
        ])
        for ds in (train, test):
            assert ds.channels == channels and ds.image_size == (32, 32)
            check_items(ds, n=len(ds))
    everything = image_folder(folder, "train", test_fraction=0.0, image_size=32, train_crop="center")
    # transparent half composited over white; the 16-bit image is scaled, not clipped
    alpha = everything[everything.files.index("sub/alpha.png")]
    assert bool((alpha[:, :, :8] == 1).all()) and float(alpha[:, :, 24:].max()) < 1
    deep = everything[everything.files.index("deep16.png")]
    assert 0.2 < float(deep.std()) and -0.9 < float(deep.mean()) < 0.9


def test_image_folder_non_square_and_non_divisible_sizes(folder):
    for fit in ("crop", "stretch"):
        ds = image_folder(folder, image_size=[24, 40], fit=fit, test_fraction=0.0)
        assert ds.image_size == (24, 40)
        check_items(ds, n=len(ds))


def test_image_folder_exact_size_image_is_unchanged(tmp_path):
    img = photo("coffee").resize((32, 32))
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    for split in ("train", "test"):
        ds = image_folder(tmp_path, split, image_size=32, test_fraction=0.5)
        assert len(ds) == 1  # tiny folder: each split gets a file
        expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(ds[0], expected)


def test_image_folder_split_is_disjoint_and_stable_when_files_are_added(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    base = photo("astronaut").resize((20, 20))
    for k in range(60):
        base.rotate(k).save(root / f"{k:03d}.png")
    before = {s: set(image_folder(root, s, image_size=16, test_fraction=0.25).files) for s in ("train", "test")}
    assert not before["train"] & before["test"] and len(before["train"] | before["test"]) == 60
    assert 5 <= len(before["test"]) <= 25
    for k in range(60, 90):
        base.save(root / f"{k:03d}.png")
    after = {s: set(image_folder(root, s, image_size=16, test_fraction=0.25).files) for s in ("train", "test")}
    assert before["train"] <= after["train"] and before["test"] <= after["test"]
    # the split is a function of the relative paths only
    files = sorted(before["train"] | before["test"])
    assert split_files(files, 0.25) == {s: sorted(before[s]) for s in ("train", "test")}


def test_image_folder_random_crops_are_deterministic_per_seed_and_epoch(folder):
    kw = dict(image_size=32, test_fraction=0.0, hflip=True)
    a = image_folder(folder, seed=1, **kw)
    b = image_folder(folder, seed=1, preload_mb=0, **kw)  # decoded per access: same items
    everything = range(len(a))
    assert torch.equal(a.get_batch(everything), b.get_batch(everything))
    other_seed = image_folder(folder, seed=2, **kw)
    assert not torch.equal(a.get_batch(everything), other_seed.get_batch(everything))
    first = a.get_batch(everything)
    a.set_epoch(1)
    assert not torch.equal(first, a.get_batch(everything))
    a.set_epoch(0)
    assert torch.equal(first, a.get_batch(everything))
    # the test split is centred, independent of seed and epoch
    t1 = image_folder(folder, "test", seed=1, image_size=32, test_fraction=0.5)
    t2 = image_folder(folder, "test", seed=9, image_size=32, test_fraction=0.5, preload_mb=0)
    t2.set_epoch(5)
    assert torch.equal(t1.get_batch(range(len(t1))), t2.get_batch(range(len(t2))))


def test_image_folder_errors_name_the_folder_and_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(VqkitError, match="does not exist") as info:
        image_folder(missing)
    assert str(missing) in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(VqkitError) as info:
        image_folder(empty)
    assert str(empty) in str(info.value) and ".png, .jpg, .jpeg" in str(info.value)
    photo("coffee").resize((40, 40)).save(empty / "good.png")
    (empty / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(VqkitError, match="broken.png"):
        image_folder(empty, test_fraction=0.0)
    lazy = image_folder(empty, test_fraction=0.0, preload_mb=0)  # errors on access instead
    with pytest.raises(VqkitError, match="broken.png"):
        lazy.get_batch(range(len(lazy)))
    with pytest.raises(pydantic.ValidationError):
        ImageFolder.Params(root=str(empty), test_fraction=1.0)


# =========================================================================== DataLoader
def shuffled(ds) -> torch.utils.data.RandomSampler:
    return torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0))


def loader_batches(ds) -> list[torch.Tensor]:
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=shuffled(ds), drop_last=True)
    return list(loader)


@pytest.mark.parametrize("make", [
    lambda tmp: FashionMnist(FashionMnist.Params(limit=64), split="train"),
    lambda tmp: NaturalPatches(NaturalPatches.Params(patches_per_image=8), split="train"),
    lambda tmp: ImageFolder(ImageFolder.example_params(tmp), split="train", seed=0),
    lambda tmp: ImageFolder(ImageFolder.example_params(tmp).model_copy(update={"preload_mb": 0}), split="train"),
    lambda tmp: ImageFolder(ImageFolder.example_params(tmp).model_copy(
        update={"train_crop": "center", "image_size": 96}), split="train"),
], ids=["fashion-mnist", "natural-patches", "image-folder", "image-folder-lazy", "image-folder-stacked-large"])
def test_dataloader_batches_are_deterministic(make, tmp_path):
    ds = make(tmp_path)
    first = loader_batches(ds)
    assert len(first) == len(ds) // 4
    assert first[0].shape == (4, ds.channels, *ds.image_size) and first[0].dtype == torch.float32
    again = loader_batches(make(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    order = list(shuffled(ds))[:4]
    assert torch.equal(first[0], torch.stack([ds[int(i)] for i in order]))


def test_dataloader_worker_gives_the_same_items(folder):
    ds = image_folder(folder, image_size=32, test_fraction=0.0, preload_mb=0, hflip=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=1)
    (batch,) = list(loader)
    assert torch.equal(batch, ds.get_batch(range(len(ds))))


def test_float_items_same_values_small_and_large():
    for shape in [(5, 1, 8, 8), (3, 3, 128, 128)]:  # vectorized and one-by-one paths
        u8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        items = float_items(u8)
        assert len(items) == shape[0] and torch.equal(torch.stack(items), to_float(u8))
    assert float(to_float(torch.tensor([0, 255], dtype=torch.uint8)).sub(torch.tensor([-1.0, 1.0])).abs().max()) < 1e-6
