"""Declared stats of perceptual losses, discriminators and reset policies (``stats()``,
:class:`vqkit.interfaces.ReportsStats`): checked by the contract suites and logged during
training under their recipe block (``losses/<name>/<stat>``, ``discriminator/<stat>``,
``reset/<stat>``), like a quantizer's ``quantizer/<stat>``."""
from __future__ import annotations

import pytest
import torch
import yaml

from vqkit.cli import main
from vqkit.components.patchgan import PatchGAN
from vqkit.components.pixel import PixelL1
from vqkit.components.resets import RandomReset
from vqkit.testing import contract_checks
from vqkit.testing.contracts import NotApplicable
from vqkit.testing.fakedist import install_fake_distribution
from vqkit.testing.sweeps import TINY_RECIPE, sqlite_store

pytest_plugins = ("trainkit",)

STATS_PLUGIN = '''
import torch
from vqkit import hookimpl
from vqkit.components.patchgan import PatchGAN
from vqkit.components.pixel import PixelL1
from vqkit.components.resets import RandomReset


class StatL1(PixelL1):
    """L1 distance that reports its largest pixel error."""

    def forward(self, reconstruction, target, discriminator=None):
        err = (reconstruction - target).abs()
        self._last = {"max_error": float(err.detach().max()), "share/above_0.5": float((err > 0.5).float().mean())}
        return err.mean()

    def stats(self):
        return getattr(self, "_last", {})


class StatPatchGAN(PatchGAN):
    """PatchGAN that reports the mean logit of its last forward."""

    def forward(self, x):
        logits = super().forward(x)
        self._mean = float(logits.detach().mean())
        return logits

    def stats(self):
        return {"mean_logit": self._mean} if hasattr(self, "_mean") else {}


class StatRandom(RandomReset):
    """Random resets that report how many codes are below the threshold."""

    def stats(self):
        return {"below_threshold": float((self.counts < self.params.threshold).sum())}


@hookimpl
def vqkit_register_perceptual_losses(register):
    register("stat-l1", StatL1)


@hookimpl
def vqkit_register_discriminators(register):
    register("stat-patchgan", StatPatchGAN)


@hookimpl
def vqkit_register_reset_policies(register):
    register("stat-random", StatRandom)
'''


def _check(kind: str, name: str):
    return next(c for c in contract_checks(kind) if c.__name__ == name)


@pytest.fixture
def stats_plugin(tmp_path, use_registry):
    use_registry(None)  # rebuilt from the entry points, the fake distribution's included
    with install_fake_distribution(tmp_path / "dist", "vqkit-stats", "0.1.0", {"vqkit_stats_mod": STATS_PLUGIN},
                                   {"stats": "vqkit_stats_mod"}):
        import vqkit_stats_mod

        yield vqkit_stats_mod
    use_registry(None)


def test_contract_suites_check_declared_stats(stats_plugin):
    mod = stats_plugin
    _check("perceptual_losses", "check_loss_stats")(mod.StatL1)
    _check("discriminators", "check_discriminator_stats")(mod.StatPatchGAN)
    _check("reset_policies", "check_stats")(mod.StatRandom)
    # components that declare none: the checks do not apply (skipped, with the reason)
    for kind, name, cls in (("perceptual_losses", "check_loss_stats", PixelL1),
                            ("discriminators", "check_discriminator_stats", PatchGAN),
                            ("reset_policies", "check_stats", RandomReset)):
        with pytest.raises(NotApplicable, match="declares no stats"):
            _check(kind, name)(cls)

    class IntStat(mod.StatL1):
        def stats(self):
            return {"count": 3}

    class BadName(mod.StatPatchGAN):
        def stats(self):
            return {"mean logit": 0.5}

    class Unstable(mod.StatL1):
        calls = 0

        def stats(self):
            type(self).calls += 1
            return {f"call{type(self).calls}": 1.0}

    class NaNStat(mod.StatRandom):
        def stats(self):
            return {"below_threshold": float("nan")}

    with pytest.raises(AssertionError, match=r"IntStat: stat 'count' must be a plain float, got int \(it is logged as losses/<loss>/count\)"):
        _check("perceptual_losses", "check_loss_stats")(IntStat)
    with pytest.raises(AssertionError, match=r"BadName: stat name 'mean logit' must be /-separated words"):
        _check("discriminators", "check_discriminator_stats")(BadName)
    with pytest.raises(AssertionError, match=r"Unstable: stats names changed between two forwards"):
        _check("perceptual_losses", "check_loss_stats")(Unstable)
    with pytest.raises(AssertionError, match=r"NaNStat: stat 'below_threshold' is nan"):
        _check("reset_policies", "check_stats")(NaNStat)


def test_declared_stats_are_logged_under_their_block(stats_plugin, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = sqlite_store(tmp_path)
    recipe = tmp_path / "stats.yaml"
    recipe.write_text(yaml.safe_dump({
        **TINY_RECIPE,
        "losses": [{"name": "stat-l1"}],
        "discriminator": {"name": "stat-patchgan", "params": {"channels": 8, "n_layers": 2}, "start_step": 2},
        "reset": {"name": "stat-random", "every": 2},
    }, sort_keys=False))
    assert main(["train", str(recipe), "--quiet", "--set", f"tracking.uri={uri}"]) == 0
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    metrics = run.data.metrics
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "losses/stat-l1/max_error")}
    assert sorted(history) == [2, 4] and all(0 < v < 100 for v in history.values())
    assert 0 <= metrics["losses/stat-l1/share/above_0.5"] <= 1
    # the discriminator's from its start step on (averaged over the window: steps 3 and 4)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "discriminator/mean_logit")] == [4]
    # the reset policy's, the value at the end of each window: 16 codes, counts restart after a plan
    below = client.get_metric_history(run.info.run_id, "reset/below_threshold")
    assert [m.step for m in below] == [2, 4] and all(0 <= m.value <= 16 for m in below)
    assert "quantizer/perplexity" in metrics


def test_per_code_book_policies_stats_are_logged_per_code_book():
    from vqkit.telemetry import CodebookMonitor, StagedMonitor

    monitors = [CodebookMonitor(4), CodebookMonitor(4)]
    staged = StagedMonitor(monitors)
    for s, m in enumerate(monitors):
        m.update(torch.tensor([0, 1, 1]))
        m.record_stats({"below_threshold": float(s + 2)})
    out = staged.metrics(1)
    assert out["reset/0/below_threshold"] == 2.0 and out["reset/1/below_threshold"] == 3.0
    assert "reset/below_threshold" not in out and out["codebook/0/usage"] == 0.5
    staged.record_stats({"below_threshold": 5.0})  # one policy shared by the code-books
    assert staged.snapshot()["reset/below_threshold"] == 5.0
