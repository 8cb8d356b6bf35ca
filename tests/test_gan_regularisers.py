"""The discriminator's regularisers (vqkit.gan: R1, LeCam): values against hand
computations, their effect on a discriminator trained on real data, the recipe keys that
turn them on, and the trainer's use of them (lazy R1, LeCam's anchors in checkpoints)."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from tests.trainkit import all_tensors_equal, client
from vqkit import gan
from vqkit.components.patchgan import PatchGAN
from vqkit.errors import VqkitError
from vqkit.recipe import load_recipe
from vqkit.train import objective
from vqkit.train.checkpoint import latest_checkpoint, load_checkpoint
from vqkit.train.trainer import train

pytest_plugins = ("trainkit",)  # fixtures: store, workdir

TINY = {
    "vqkit": 1, "name": "gan-reg", "seed": 1,
    "data": {"name": "fashion-mnist", "params": {"image_size": 16, "fit": "resize", "limit": 64}},
    "encoder": {"name": "conv", "params": {"channels": [8, 8], "factor": 4, "latent_dim": 4}},
    "quantizer": {"name": "vq", "params": {"codebook_size": 16}},
    "decoder": {"name": "conv", "params": {"channels": [8, 8]}},
    "eval": {"num_samples": 16, "batch_size": 16},
}


def _linear_d(a: float, b: float = 0.3) -> nn.Conv2d:
    """D(x) = a·x + b per pixel: Σ_pixels D(x) has gradient a at every pixel."""
    d = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        d.weight.fill_(a)
        d.bias.fill_(b)
    return d


# --------------------------------------------------------------------------- R1
@pytest.mark.parametrize("scale", [None, 1024.0])
def test_r1_is_the_squared_input_gradient_of_the_summed_logits(scale):
    d = _linear_d(0.7)
    real = (torch.rand(3, 1, 5, 4) * 2 - 1).requires_grad_(True)
    got = gan.r1_penalty(real, d(real), scale=scale)
    assert got.item() == pytest.approx(0.7 ** 2 * 5 * 4, rel=1e-6)  # ‖a·1‖² over 20 pixels
    got.backward()  # differentiable in D's weights: d/da (a²·20) = 2a·20
    assert d.weight.grad.item() == pytest.approx(2 * 0.7 * 20, rel=1e-5)


def test_r1_ignores_the_logits_offset_and_counts_each_image():
    real = torch.zeros(4, 1, 2, 2, requires_grad=True)
    a = gan.r1_penalty(real, _linear_d(1.0, b=0.0)(real))
    b = gan.r1_penalty(real, _linear_d(1.0, b=5.0)(real))
    assert a.item() == b.item() == pytest.approx(4.0)  # a mean over images, not a sum


# --------------------------------------------------------------------------- LeCam
def test_lecam_penalty_by_hand():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 1.0])
    a_real, a_fake = torch.tensor(0.5), torch.tensor(-0.5)
    # relu(real - a_fake)² = [2.5², 0, 1²] ; relu(a_real - fake)² = [3.5², 0]
    want = (2.5 ** 2 + 1.0) / 3 + 3.5 ** 2 / 2
    assert gan.lecam_penalty(real, fake, a_real, a_fake).item() == pytest.approx(want)


def test_lecam_anchors_start_at_the_first_values_then_average():
    anchors = gan.LeCamAnchors()
    anchors.update(torch.tensor(2.0), torch.tensor(-2.0), decay=0.9)
    assert (anchors.real.item(), anchors.fake.item()) == (2.0, -2.0)
    anchors.update(torch.tensor(4.0), torch.tensor(0.0), decay=0.9)
    assert anchors.real.item() == pytest.approx(0.9 * 2 + 0.1 * 4)
    assert anchors.fake.item() == pytest.approx(0.9 * -2 + 0.1 * 0)
    copy = gan.LeCamAnchors()
    copy.load_state_dict(anchors.state_dict())
    assert copy.real.item() == anchors.real.item() and int(copy.updates) == 2


def test_discriminator_objective_adds_both_terms():
    torch.manual_seed(0)
    disc = PatchGAN(PatchGAN.Params(n_layers=1, channels=4), channels=1)
    real, fake = torch.rand(2, 1, 12, 12) * 2 - 1, torch.rand(2, 1, 12, 12) * 2 - 1
    anchors = gan.LeCamAnchors()
    got = objective.discriminator_objective(disc, "hinge", real, fake, r1=0.5, lecam=0.25, anchors=anchors)
    x = real.clone().requires_grad_(True)
    lr, lf = disc(x), disc(fake)
    want = (gan.hinge_d_loss(lr, lf) + 0.5 * gan.r1_penalty(x, lr)
            + 0.25 * gan.lecam_penalty(lr, lf, lr.mean(), lf.mean()))
    torch.testing.assert_close(got.total, want)
    assert {"loss/gan_d", "loss/gan_r1", "loss/gan_lecam", "gan/logits_real", "gan/logits_fake",
            "gan/lecam_anchor_real", "gan/lecam_anchor_fake"} <= set(got.terms)
    plain = objective.discriminator_objective(disc, "hinge", real, fake)
    assert set(plain.terms) == {"loss/gan_d", "gan/logits_real", "gan/logits_fake"}
    torch.testing.assert_close(plain.total, gan.hinge_d_loss(lr, lf))
    with pytest.raises(ValueError, match="anchors"):
        objective.discriminator_objective(disc, "hinge", real, fake, lecam=0.1)


# --------------------------------------------------------------------------- effects
def _photos(n: int = 16, size: int = 16) -> torch.Tensor:
    """Crops of scikit-image's photographs (the ``natural-patches`` data set)."""
    from vqkit.components.natural_patches import NaturalPatches

    data = NaturalPatches(NaturalPatches.Params(image_size=size, patches_per_image=n), split="train", seed=0)
    return torch.stack([data[i] for i in torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]])


def _train_disc(real: torch.Tensor, fake: torch.Tensor, steps: int, **reg) -> tuple[PatchGAN, gan.LeCamAnchors]:
    torch.manual_seed(0)
    disc = PatchGAN(PatchGAN.Params(n_layers=2, channels=8), channels=3)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    anchors = gan.LeCamAnchors()
    for _ in range(steps):
        d = objective.discriminator_objective(disc, "hinge", real, fake, anchors=anchors, **reg)
        opt.zero_grad()
        d.total.backward()
        opt.step()
    return disc, anchors


def _input_grad_sq(disc: nn.Module, x: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    return gan.r1_penalty(x, disc(x)).item()


def test_r1_flattens_the_discriminator_around_real_photographs():
    """Trained to tell photographs from blurred copies, a discriminator with R1 ends with a
    much smaller input gradient on the real images than the same one without."""
    real = _photos()
    fake = nn.functional.avg_pool2d(real, 3, stride=1, padding=1)
    free, _ = _train_disc(real, fake, 40)
    held, _ = _train_disc(real, fake, 40, r1=5.0)
    assert _input_grad_sq(held, real) < 0.5 * _input_grad_sq(free, real)


def test_lecam_keeps_the_logits_of_real_and_fake_closer():
    real = _photos()
    fake = nn.functional.avg_pool2d(real, 3, stride=1, padding=1)
    free, _ = _train_disc(real, fake, 40)
    held, anchors = _train_disc(real, fake, 40, lecam=1.0, lecam_decay=0.9)
    gap = {name: (d(real).mean() - d(fake).mean()).item() for name, d in (("free", free), ("held", held))}
    assert 0 < gap["held"] < 0.8 * gap["free"], gap
    assert anchors.real.item() > anchors.fake.item() and int(anchors.updates) == 40


# --------------------------------------------------------------------------- recipe + trainer
def _recipe(workdir, store, name="reg.yaml", **disc):
    recipe = {
        **TINY,
        "discriminator": {"name": "patchgan", "params": {"n_layers": 1, "channels": 8}, "start_step": 1, **disc},
        "losses": [{"name": "pixel-l1"}],
        "train": {"steps": 6, "batch_size": 8, "log_every": 1, "eval_every": 6, "image_every": 6,
                  "checkpoint_every": 3, "device": "cpu"},
        "tracking": {"uri": store, "experiment": "gan-reg", "output_dir": "runs"},
    }
    path = workdir / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"r1": -1.0}, "discriminator.r1"),
    ({"r1_every": 0}, "discriminator.r1_every"),
    ({"lecam_decay": 1.0}, "discriminator.lecam_decay"),
    ({"lecam": "strong"}, "discriminator.lecam"),
])
def test_bad_regulariser_keys_are_located_errors(workdir, store, bad, message):
    with pytest.raises(VqkitError) as err:
        load_recipe(_recipe(workdir, store, **bad))
    assert message in str(err.value) and "reg.yaml:" in str(err.value)


def test_trainer_applies_lazy_r1_and_logs_the_terms(workdir, store):
    result = train(load_recipe(_recipe(workdir, store, r1=1.0, r1_every=2, lecam=0.1)), quiet=True)
    mlflow = client(store)
    r1_steps = [m.step for m in mlflow.get_metric_history(result.run_id, "loss/gan_r1")]
    # the discriminator trains from step index 1; R1 on its 1st, 3rd, 5th step (logged as steps 2, 4, 6)
    assert r1_steps == [2, 4, 6]
    lecam = mlflow.get_metric_history(result.run_id, "loss/gan_lecam")
    assert [m.step for m in lecam] == [2, 3, 4, 5, 6]
    anchors = load_checkpoint(latest_checkpoint(result.run_dir / "checkpoints"))["lecam"]
    assert int(anchors["updates"]) == 5
    params = mlflow.get_run(result.run_id).data.params
    assert params["discriminator.r1"] == "1.0" and params["discriminator.lecam"] == "0.1"


def test_resume_with_regularisers_continues_bit_for_bit(workdir, store):
    """LeCam's anchors are checkpointed: a run stopped at step 3 and resumed ends with the
    same weights and anchors as a straight run (they would differ if the anchors restarted)."""
    from vqkit.cli import main

    over = {"r1": 1.0, "r1_every": 2, "lecam": 0.5, "lecam_decay": 0.5}
    straight = train(load_recipe(_recipe(workdir, store, "a.yaml", **over)), quiet=True)
    first = train(load_recipe(_recipe(workdir, store, "b.yaml", **over)), quiet=True, stop_after=3)
    assert main(["train", "--resume", first.run_id, "--quiet"]) == 0
    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(latest_checkpoint(first.run_dir / "checkpoints"))
    assert b["step"] == 6
    for key in ("model", "discriminator", "optimizers", "lecam"):
        all_tensors_equal(a[key], b[key], key)


def test_resume_that_turns_lecam_on_says_its_anchors_start_fresh(workdir, store, capsys):
    """A run trained without LeCam and resumed with it has no anchors to restore: a warning
    says so, and the anchors count only the resumed steps."""
    from vqkit.cli import main

    first = train(load_recipe(_recipe(workdir, store, "c.yaml")), quiet=True, stop_after=3)
    capsys.readouterr()
    assert main(["train", "--resume", first.run_id, "--set", "discriminator.lecam=0.5", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "vqkit: warning:" in err and "has no LeCam anchors" in err
    state = load_checkpoint(latest_checkpoint(first.run_dir / "checkpoints"))
    assert state["step"] == 6 and int(state["lecam"]["updates"]) == 3


def test_a_term_computed_on_some_steps_of_a_window_is_their_mean(workdir, store):
    """A logging window averages each term over the steps that computed it: R1 every 2nd
    discriminator step and a discriminator that starts at step index 1 are not diluted by
    the window's other steps (log_every 2 logs what log_every 1 logs, averaged)."""
    runs = {}
    for every in (1, 2):
        path = _recipe(workdir, store, f"every{every}.yaml", r1=1.0, r1_every=2, lecam=0.1)
        data = yaml.safe_load(path.read_text())
        data["train"]["log_every"] = every
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        runs[every] = train(load_recipe(path), quiet=True).run_id
    mlflow = client(store)

    def history(every, key):
        return {m.step: m.value for m in mlflow.get_metric_history(runs[every], key)}

    for key in ("loss/gan_r1", "loss/gan_d", "gan/logits_real", "loss/gan_lecam", "loss/pixel-l1"):
        each, window = history(1, key), history(2, key)
        assert sorted(window) == [s for s in (2, 4, 6) if s in each or s - 1 in each], key
        for step, value in window.items():
            computed = [each[s] for s in (step - 1, step) if s in each]
            assert value == pytest.approx(sum(computed) / len(computed), rel=1e-5), (key, step)
    # the discriminator trains from step index 1: the first window holds one of its steps
    assert history(2, "loss/gan_d")[2] == pytest.approx(history(1, "loss/gan_d")[2], rel=1e-5)


@pytest.mark.parametrize("disc, keys", [
    ({"r1": 1e39}, "discriminator.r1"),
    ({"r1": 1e30, "r1_every": 10**9}, "discriminator.r1 or discriminator.r1_every"),  # lazy R1's weight x every
])
def test_a_regulariser_that_overflows_the_discriminators_loss_is_named(workdir, store, capsys, disc, keys):
    """Each logged term is finite when R1's weight overflows the discriminator's loss: the
    one error line says that it is the discriminator's total that became inf, and its weights."""
    from vqkit.cli import main

    assert main(["train", str(_recipe(workdir, store, **disc)), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vqkit: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vqkit: error: training stopped: the loss became NaN/inf"), lines
    assert "the discriminator's loss=inf (loss/gan_d + 5e+38·loss/gan_r1)" in lines[0], lines
    # the advice fits the cause (the regulariser's weight, not the generator's settings) and
    # what there is: it fails at step 1, before the first checkpoint (step 3)
    assert lines[0].endswith(f"no checkpoint was written before it. Lower {keys}, then train again"), lines


def test_resume_that_drops_the_discriminator_says_so(workdir, store, capsys):
    """Adding a discriminator on resume is refused (there is no state for it); removing one
    (`--set discriminator=null`) goes on without it, with a warning, not silently."""
    from vqkit.cli import main

    first = train(load_recipe(_recipe(workdir, store, "d.yaml")), quiet=True, stop_after=3)
    capsys.readouterr()
    assert main(["train", "--resume", first.run_id, "--set", "discriminator=null", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "vqkit: warning:" in err and "holds a trained discriminator but the recipe has none" in err, err
