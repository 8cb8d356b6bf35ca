"""Mismatches that only show when the parts meet (an image too small for the
discriminator or for a loss's network, a plugin component's own shape error) are caught by
``vqkit validate --build`` and by ``vqkit train`` before it creates an MLflow run: one
located ``vqkit: error`` naming the component, exit 2, no run left FAILED. A run that does
fail after it was created carries the ``vqkit.failure`` tag."""
from __future__ import annotations

import re

import pytest
import yaml

from tests.trainkit import located_at
from vqkit.cli import main
from vqkit.components.image_folder import write_example_images
from vqkit.plugins import build_registry
from vqkit.testing import install_fake_distribution

pytest_plugins = ("trainkit",)  # fixtures: store, workdir

# a decoder whose output is one pixel short: its own shape error shows only when parts meet
SHORT_DECODER = '''
import torch
from vqkit import hookimpl
from vqkit.components.conv import ConvDecoder


class ShortDecoder(ConvDecoder):
    """The conv decoder, cropping its output by one pixel."""

    def forward(self, z):
        return super().forward(z)[..., :-1, :-1]


@hookimpl
def vqkit_register_decoders(register):
    register("short", ShortDecoder)
'''

# a loss that works on the dry batch but refuses the images of a training step
LATE_LOSS = '''
import torch
from vqkit import hookimpl
from vqkit.errors import VqkitError
from vqkit.interfaces import Params, PerceptualLoss


class LateLoss(PerceptualLoss):
    """Fails at training time only."""

    class Params(Params):
        pass

    def __init__(self, params, *, channels=3):
        super().__init__()

    def forward(self, reconstruction, target, discriminator=None):
        if self.training:
            raise VqkitError("late: the loss server went away")
        return (reconstruction - target).abs().mean()


@hookimpl
def vqkit_register_perceptual_losses(register):
    register("late", LateLoss)
'''


# a discriminator whose backward cannot itself be differentiated (R1 needs that)
ONCE_DISC = '''
import torch
from torch.autograd.function import once_differentiable
from vqkit import hookimpl
from vqkit.components.patchgan import PatchGAN


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OnceDisc(PatchGAN):
    """A PatchGAN whose input goes through a once-differentiable square."""

    def forward(self, x):
        return super().forward(_Square.apply(x))


@hookimpl
def vqkit_register_discriminators(register):
    register("once", OnceDisc)
'''


def _recipe(tmp_path, store, **blocks):
    folder = tmp_path / "images"
    if not folder.is_dir():
        write_example_images(folder)
    recipe = {
        "vqkit": 1, "name": "meet", "seed": 0,
        "data": {"name": "image-folder", "params": {"root": str(folder), "image_size": 64, "test_fraction": 0.25}},
        "encoder": {"name": "conv", "params": {"channels": [8, 8], "factor": 4, "latent_dim": 8}},
        "quantizer": {"name": "vq", "params": {"codebook_size": 16}},
        "decoder": {"name": "conv", "params": {"channels": [8, 8]}},
        "losses": [{"name": "pixel-l1"}],
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 2, "image_every": 2,
                  "checkpoint_every": 2, "device": "cpu"},
        "eval": {"num_samples": 4, "batch_size": 4, "metrics": ["psnr"]},
        "tracking": {"experiment": "meet", "uri": store, "output_dir": str(tmp_path / "runs")},
    }
    recipe.update(blocks)
    path = tmp_path / "meet.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)



def _runs(store):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


PATCHGAN = {"name": "patchgan", "params": {"n_layers": 6}, "start_step": 0}
CASES = {
    "patchgan-too-deep": (
        {"discriminator": PATCHGAN}, ("discriminator:",),
        "discriminator: discriminator 'patchgan' with n_layers=6 needs images of at least 192x192 px",
    ),
    "lpips-alex-too-small": (
        {"losses": [{"name": "pixel-l1"}, {"name": "lpips", "weight": 0.1, "params": {"net": "alex"}}],
         "encoder": {"name": "conv", "params": {"channels": [8, 8], "factor": 4, "latent_dim": 8}}},
        ("losses:", "name: pixel-l1", "name: lpips"),
        "losses.1: lpips: AlexNet needs images of at least 31x31, got 16x16",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_build_and_train_catch_what_shows_when_parts_meet(tmp_path, store, capsys, case):
    blocks, located, expected = CASES[case]
    recipe = _recipe(tmp_path, store, **blocks)
    sets = ["--set", "data.params.image_size=16"] if "16x16" in expected else []
    assert main(["validate", recipe, *sets]) == 0  # each part is valid alone
    capsys.readouterr()
    assert main(["validate", "--build", recipe, *sets]) == 2
    err = capsys.readouterr().err
    # located at the block in the recipe file (line and column), as validate's own problems are
    assert re.match(f"vqkit: error: {located_at(recipe, *located)}: {re.escape(expected)}", err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["train", recipe, "--quiet", *sets]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    # located in the recipe file as by validate --build
    assert len(lines) == 1 and re.match(f"vqkit: error: {located_at(recipe, *located)}: {re.escape(expected)}", lines[0]), err
    assert _runs(store) == []  # refused before any MLflow run was created


def test_every_loss_and_the_discriminator_are_reported_at_once(tmp_path, store, capsys):
    recipe = _recipe(tmp_path, store, discriminator=PATCHGAN, losses=[
        {"name": "pixel-l1"}, {"name": "lpips", "weight": 0.1, "params": {"net": "alex"}}])
    assert main(["validate", "--build", recipe, "--set", "data.params.image_size=16"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[3] for line in lines] == ["losses.1", "discriminator"], lines


def test_a_plugin_components_own_shape_error_is_located_and_names_it(tmp_path, store, capsys, use_registry):
    with install_fake_distribution(tmp_path / "d", "vqkit-short", "0.2.0", {"vqkit_short_mod": SHORT_DECODER},
                                   {"short": "vqkit_short_mod"}):
        use_registry(build_registry())
        recipe = _recipe(tmp_path, store, decoder={"name": "short", "params": {"channels": [8, 8]}})
        assert main(["validate", recipe]) == 0
        capsys.readouterr()
        assert main(["validate", "--build", recipe]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(f"vqkit: error: {located_at(recipe, 'decoder:')}: " + re.escape(
            "decoder: decoder short (vqkit-short 0.2.0) failed to decode (a dry batch of "
            "2x3x64x64 images): returned (2, 3, 63, 63), expected (2, 3, 64, 64)"), err.strip()), err
        assert main(["train", recipe, "--quiet"]) == 2
        assert "decoder short (vqkit-short 0.2.0) failed to decode" in capsys.readouterr().err
        assert _runs(store) == []


def test_the_dry_batch_leaves_the_training_unchanged(tmp_path, store):
    """The check runs in eval mode without gradients and restores buffers and RNGs: an EMA
    code-book, its usage and the random stream are what they were."""
    import torch

    from vqkit.recipe import load_recipe
    from vqkit.train.build import build_all, check_parts_meet

    recipe = load_recipe(_recipe(tmp_path, store, quantizer={"name": "vq", "params": {"codebook_size": 16, "ema": True}},
                                 discriminator=dict(PATCHGAN, params={"n_layers": 2})))
    built = build_all(recipe, check=False)
    built.model.train()
    built.discriminator.eval()
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    check_parts_meet(built)
    assert torch.equal(torch.rand(3), expected)
    assert built.model.training and built.model.quantizer.training and not built.discriminator.training
    for k, v in built.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_run_that_fails_after_it_was_created_is_tagged(tmp_path, store, capsys, use_registry):
    with install_fake_distribution(tmp_path / "d", "vqkit-late", "0.1.0", {"vqkit_late_mod": LATE_LOSS},
                                   {"late": "vqkit_late_mod"}):
        use_registry(build_registry())
        recipe = _recipe(tmp_path, store, losses=[{"name": "late"}])
        assert main(["validate", "--build", recipe]) == 0
        assert main(["train", recipe, "--quiet"]) == 2
    assert "vqkit: error: late: the loss server went away" in capsys.readouterr().err
    [run] = _runs(store)
    assert run.info.status == "FAILED"
    assert run.data.tags["vqkit.failure"] == "late: the loss server went away"


def test_r1_on_a_discriminator_that_cannot_be_differentiated_twice(tmp_path, store, capsys, use_registry):
    with install_fake_distribution(tmp_path / "d", "vqkit-once", "0.1.0", {"vqkit_once_mod": ONCE_DISC},
                                   {"once": "vqkit_once_mod"}):
        use_registry(build_registry())
        disc = {"name": "once", "params": {"n_layers": 2}, "start_step": 0}
        assert main(["validate", "--build", _recipe(tmp_path, store, discriminator=disc)]) == 0
        recipe = _recipe(tmp_path, store, discriminator={**disc, "r1": 1.0})
        assert main(["train", recipe, "--quiet"]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.match(f"vqkit: error: {located_at(recipe, 'discriminator:')}: " + re.escape(
            "discriminator: discriminator once (vqkit-once 0.1.0) failed to take R1's gradient "
            "penalty (discriminator.r1: a second derivative)"), lines[0]), err
        assert "once_differentiable" in err and "Traceback" not in err
        assert _runs(store) == []


@pytest.mark.parametrize("size, what", [(10**13, r"one tensor of [\d,.]+ GiB"), (10**20, r"a size past 2\^63")])
def test_a_component_too_large_for_memory_is_a_located_error(tmp_path, store, capsys, size, what):
    """A size no machine can allocate (more bytes than a process can address, or an element
    count past 64 bits) is the user's setting, not a bug: one located line naming the
    component, exit 2, no run."""
    recipe = _recipe(tmp_path, store, quantizer={"name": "vq", "params": {"codebook_size": size}})
    assert main(["validate", recipe]) == 0
    capsys.readouterr()
    for command in (["validate", "--build", recipe], ["train", recipe, "--quiet"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert re.match(f"vqkit: error: {located_at(recipe, 'quantizer:')}: " + re.escape(
            "quantizer: quantizer vq (vqkit ") + r"[^)]*\) does not fit in memory with these params \(" + what
            + r"\); lower its sizes", lines[0]), err
    assert _runs(store) == []


def test_validate_build_checks_what_train_needs_of_the_machine(tmp_path, store, capsys, monkeypatch):
    """`validate --build` ok means `train` does not refuse: the eval metrics' weights and the
    device are checked too, located at their keys."""
    import torch

    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "empty-cache"))
    recipe = _recipe(tmp_path, store, eval={"num_samples": 4, "batch_size": 4, "metrics": ["psnr", "lpips"]})
    assert main(["validate", recipe]) == 0
    capsys.readouterr()
    assert main(["validate", "--build", recipe]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert re.match(f"vqkit: error: {located_at(recipe, 'metrics:')}: eval.metrics: eval metric lpips needs the pretrained "
                    "AlexNet weights, not found at ", line), line
    if not torch.cuda.is_available():
        assert main(["validate", "--build", _recipe(tmp_path, store), "--set", "train.device=cuda"]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("vqkit: error: --set: train.device: train.device is 'cuda' but CUDA is not available"), line
    assert main(["validate", _recipe(tmp_path, store), "--set", "train.device=tpu"]) == 2
    assert "train.device: must be auto, cpu, cuda or cuda:N (got 'tpu')" in capsys.readouterr().err


def test_a_build_problem_under_a_set_option_names_it(tmp_path, store, capsys):
    """Located at the block in the file, and the --set keys under that block named: the bad
    value may be one of them rather than the file's."""
    recipe = _recipe(tmp_path, store, discriminator=dict(PATCHGAN, params={"n_layers": 2}))
    assert main(["validate", "--build", recipe, "--set", "discriminator.params.n_layers=6"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert re.match(f"vqkit: error: {located_at(recipe, 'discriminator:')}: discriminator: discriminator 'patchgan' with "
                    "n_layers=6 needs images", line), line
    assert line.endswith("(--set gave discriminator.params.n_layers)"), line


def test_an_output_dir_that_is_a_file_is_refused_before_a_run_exists(tmp_path, store, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    for sub in ("", "/below"):
        recipe = _recipe(tmp_path, store, tracking={"experiment": "meet", "uri": store, "output_dir": f"{afile}{sub}"})
        for command in (["validate", "--build", recipe], ["train", recipe, "--quiet"]):
            assert main(command) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and re.match(
                f"vqkit: error: {located_at(recipe, 'output_dir:')}: tracking.output_dir: {re.escape(str(afile))} is a "
                "file, not a folder for run dirs", lines[0]), lines
    assert _runs(store) == []


def test_a_failing_discriminator_is_reported_once_not_again_by_its_feature_loss(tmp_path, store, capsys):
    recipe = _recipe(tmp_path, store, discriminator=PATCHGAN,
                     losses=[{"name": "pixel-l1"}, {"name": "discriminator-features"}])
    assert main(["validate", "--build", recipe]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "discriminator: discriminator 'patchgan' with n_layers=6 needs images" in lines[0], lines
