"""Plugin loading through real entry points of fake installed distributions."""
from __future__ import annotations

import json
import re
import warnings

import pytest

from tests import plugin_examples as ex
from tests.trainkit import all_tensors_equal
from vqkit.cli import main
from vqkit.errors import VqkitError
from vqkit.plugins import PluginWarning, build_registry, get_registry
from vqkit.testing import install_fake_distribution

pytest_plugins = ("trainkit",)  # fixture: store (a migrated MLflow sqlite store)


def _fake(tmp_path, dist, module, source, ep_name=None, version="1.2.3"):
    return install_fake_distribution(
        tmp_path / dist, dist, version, {module: source}, {ep_name or dist: module}
    )


def test_builtins_come_through_the_entry_point_group():
    registry = get_registry()
    builtin = [p for p in registry.plugins if p.distribution == "vqkit"]
    assert builtin and all(p.status == "ok" for p in builtin)
    entry = registry.get("perceptual_losses", "pixel-l1")
    assert entry.distribution == "vqkit" and entry.plugin == "pixel"


def test_third_party_plugin_is_loaded_with_its_distribution(tmp_path):
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_mod", ex.GOOD):
        registry = build_registry()
    entry = registry.get("perceptual_losses", "huber")
    assert (entry.distribution, entry.version, entry.plugin) == ("vqkit-huber", "1.2.3", "vqkit-huber")
    assert entry.summary == "Huber distance between pixels."
    assert entry.params_schema()["properties"]["delta"]["default"] == 1.0
    assert "vqkit-huber==1.2.3" in registry.distributions()


def test_broken_import_is_skipped_with_warning_and_listed(tmp_path):
    with _fake(tmp_path, "vqkit-broken", "vqkit_broken_mod", ex.BROKEN_IMPORT):
        with pytest.warns(PluginWarning, match="vqkit-broken.*failed to import.*this_module_does_not_exist"):
            registry = build_registry()
    info = next(p for p in registry.plugins if p.name == "vqkit-broken")
    assert info.status == "broken" and "ModuleNotFoundError" in info.error
    # the rest still works, and lookups mention the broken plugin
    assert "pixel-l1" in registry.names("perceptual_losses")
    with pytest.raises(VqkitError, match="broken plugins not loaded: vqkit-broken"):
        registry.get("perceptual_losses", "huber")


def test_hook_that_raises_marks_plugin_broken(tmp_path):
    with _fake(tmp_path, "vqkit-bad-hook", "vqkit_bad_hook_mod", ex.BROKEN_HOOK):
        with pytest.warns(PluginWarning, match="raised while registering"):
            registry = build_registry()
    info = next(p for p in registry.plugins if p.name == "vqkit-bad-hook")
    assert info.status == "broken" and "plugin bug while registering" in info.error


@pytest.mark.parametrize("source,match", [
    (ex.MISSPELT_HOOK, "unknown hook"),
    (ex.NOT_A_COMPONENT, "must be a subclass of vqkit.interfaces.Encoder"),
])
def test_invalid_plugins_are_broken_not_silent(tmp_path, source, match):
    with _fake(tmp_path, "vqkit-invalid", "vqkit_invalid_mod", source):
        with pytest.warns(PluginWarning, match=match):
            registry = build_registry()
    assert next(p for p in registry.plugins if p.name == "vqkit-invalid").status == "broken"


def test_a_misspelt_hook_is_named_with_the_hook_it_likely_means(tmp_path):
    with _fake(tmp_path, "vqkit-misspelt", "vqkit_misspelt_mod", ex.MISSPELT_HOOK):
        with pytest.warns(PluginWarning) as record:
            registry = build_registry()
    [warning] = [str(r.message) for r in record]
    assert warning == (
        "plugin 'vqkit-misspelt' (distribution vqkit-misspelt) implements an unknown hook: "
        "'vqkit_register_quantisers' (did you mean 'vqkit_register_quantizers'?); skipped"), warning
    error = next(p for p in registry.plugins if p.name == "vqkit-misspelt").error
    assert error == "unknown hook 'vqkit_register_quantisers' (did you mean 'vqkit_register_quantizers'?)"


def test_strict_mode_makes_broken_plugins_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_STRICT_PLUGINS", "1")
    with _fake(tmp_path, "vqkit-broken", "vqkit_broken_mod2", ex.BROKEN_IMPORT):
        with pytest.raises(VqkitError, match="vqkit-broken.*failed to import.*VQKIT_STRICT_PLUGINS=1"):
            build_registry()


def test_plugins_command_still_lists_under_strict_mode(tmp_path, monkeypatch, capsys, use_registry):
    monkeypatch.setenv("VQKIT_STRICT_PLUGINS", "1")
    use_registry(None)
    with _fake(tmp_path, "vqkit-broken", "vqkit_broken_mod5", ex.BROKEN_IMPORT):
        assert main(["plugins"]) == 0
        out, err = capsys.readouterr()
        assert "broken" in out
        assert err.startswith("vqkit: warning: plugin 'vqkit-broken' (distribution vqkit-broken) failed to import")
        assert main(["components"]) == 2
        assert "VQKIT_STRICT_PLUGINS=1" in capsys.readouterr().err


def test_disabled_plugins_are_blocked(tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_DISABLE_PLUGINS", "vqkit-huber, vqkit-huber:other")
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_mod3", ex.GOOD):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)  # vqkit-huber:other matches nothing
            registry = build_registry()
    assert next(p for p in registry.plugins if p.name == "vqkit-huber").status == "blocked"
    assert "huber" not in registry.names("perceptual_losses")


def test_a_disable_item_that_matches_no_entry_point_is_warned_with_a_suggestion(
    tmp_path, monkeypatch, capsys, use_registry
):
    monkeypatch.setenv("VQKIT_DISABLE_PLUGINS", "vqkit-hubr")
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_mod5", ex.GOOD):
        with pytest.warns(PluginWarning) as record:
            registry = build_registry()
    [warning] = [str(r.message) for r in record]
    assert warning.startswith(
        "VQKIT_DISABLE_PLUGINS: 'vqkit-hubr' matches no installed plugin entry point, so it blocks nothing "
        "(did you mean 'vqkit-huber'? valid: "), warning
    assert "huber" in registry.names("perceptual_losses")  # nothing was blocked
    # through the CLI: one warning line, the command still works
    monkeypatch.setenv("VQKIT_DISABLE_PLUGINS", "jukebx")
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_mod6", ex.GOOD):
        use_registry(None)  # built by the command
        assert main(["plugins"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("vqkit: warning: VQKIT_DISABLE_PLUGINS: 'jukebx' matches no installed plugin entry point"), err


def test_blocking_the_bare_name_of_a_builtin_entry_point_is_warned(tmp_path, monkeypatch):
    """A third-party entry point named like a built-in one (`resets`): the bare name blocks
    both, and the warning says so and how to block only the third-party one."""
    builtin = next(p.name for p in get_registry().plugins if p.distribution == "vqkit")
    monkeypatch.setenv("VQKIT_DISABLE_PLUGINS", builtin)
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_mod7", ex.GOOD, ep_name=builtin):
        with pytest.warns(PluginWarning) as record:
            registry = build_registry()
    [warning] = [str(r.message) for r in record]
    assert warning == (
        f"VQKIT_DISABLE_PLUGINS: {builtin!r} also blocks the built-in plugin {builtin!r} of vqkit (its components "
        f"are not available); to block only another distribution's entry point of that name write "
        f"DIST:{builtin} (here: vqkit-huber:{builtin})"
    )
    assert [p.status for p in registry.plugins if p.name == builtin] == ["blocked", "blocked"]
    monkeypatch.setenv("VQKIT_DISABLE_PLUGINS", f"vqkit-huber:{builtin}")  # the precise form: silent
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_mod8", ex.GOOD, ep_name=builtin):
        with warnings.catch_warnings():
            warnings.simplefilter("error", PluginWarning)
            registry = build_registry()
    assert [p.status for p in registry.plugins if p.name == builtin] == ["ok", "blocked"]


def test_name_clash_is_one_warning_and_fatal_only_where_the_name_is_used(tmp_path):
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_a", ex.GOOD), \
         _fake(tmp_path, "vqkit-huber-fork", "vqkit_huber_b", ex.DUPLICATE, version="0.1"):
        with pytest.warns(PluginWarning) as record:
            registry = build_registry()
    assert len(record) == 1
    msg = str(record[0].message)
    assert "perceptual loss 'huber' is ambiguous" in msg
    assert "vqkit-huber 1.2.3" in msg and "vqkit-huber-fork 0.1" in msg
    # other names still work; the ambiguous one names both distributions and the fix
    assert registry.get("perceptual_losses", "pixel-l1").distribution == "vqkit"
    with pytest.raises(VqkitError, match=r"ambiguous.*vqkit-huber-fork 0.1.*VQKIT_DISABLE_PLUGINS=vqkit-huber-fork"):
        registry.get("perceptual_losses", "huber")
    assert [e.distribution for e in registry.entries("perceptual_losses", "huber")] == ["vqkit-huber", "vqkit-huber-fork"]


def test_strict_mode_keeps_a_name_clash_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_STRICT_PLUGINS", "1")
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_c", ex.GOOD), \
         _fake(tmp_path, "vqkit-huber-fork", "vqkit_huber_d", ex.DUPLICATE, version="0.1"):
        with pytest.raises(VqkitError, match="'huber' is ambiguous.*VQKIT_STRICT_PLUGINS=1"):
            build_registry()


def test_clash_with_a_builtin_leaves_plugins_and_other_recipes_working(tmp_path, capsys, use_registry, monkeypatch):
    """A distribution registering `vq` (entry point also named `vq`): `vqkit plugins` lists
    the clash, a recipe not using `vq` validates, one using it fails located with both
    distributions and the entry point to block; blocking it gives back the built-in."""
    use_registry(None)
    with _fake(tmp_path, "vqkit-evil", "vqkit_evil_mod", ex.CLASHING_VQ, ep_name="vq", version="1.0"), \
         _fake(tmp_path, "vqkit-grid", "vqkit_grid_clash", ex.FIXED_QUANTIZER, ep_name="grid", version="0.1.0"):
        assert main(["plugins"]) == 0
        out, err = capsys.readouterr()
        assert re.search(r"^vq +vqkit-evil +1\.0 +ok +1\b", out, re.M)
        assert "name clashes (only recipes using these names fail):" in out
        assert err.count("vqkit: warning:") == 1 and "quantizer 'vq' is ambiguous" in err
        assert main(["plugins", "--json"]) == 0
        evil = [p for p in json.loads(capsys.readouterr().out) if p["distribution"] == "vqkit-evil"]
        assert evil[0]["clashes"] and "vqkit-evil 1.0" in evil[0]["clashes"][0]

        use_registry(None)
        assert main(["validate", _swap_recipe(tmp_path)]) == 0
        use_registry(None)
        assert main(["validate", QUICKSTART]) == 2
        err = capsys.readouterr().err
        assert (
            f"vqkit: error: {QUICKSTART}:10:19: quantizer.name: quantizer 'vq' is ambiguous: registered by "
            "plugin 'vq' (distribution vqkit 0.1.0) and by plugin 'vq' (distribution vqkit-evil 1.0); block "
            "the third-party one with VQKIT_DISABLE_PLUGINS=vqkit-evil:vq (or uninstall its distribution)"
        ) in err

        monkeypatch.setenv("VQKIT_DISABLE_PLUGINS", "vqkit-evil:vq")
        registry = use_registry(build_registry())
        assert registry.get("quantizers", "vq").distribution == "vqkit"
        assert main(["validate", QUICKSTART]) == 0


def test_hookimpl_with_fewer_arguments_is_accepted(tmp_path):
    with _fake(tmp_path, "vqkit-fewer", "vqkit_fewer_mod", ex.FEWER_ARGS):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            registry = build_registry()
    assert next(p for p in registry.plugins if p.name == "vqkit-fewer").status == "ok"


def test_plugins_cli_lists_broken_ones_as_json(tmp_path, capsys, use_registry):
    with _fake(tmp_path, "vqkit-broken", "vqkit_broken_mod4", ex.BROKEN_IMPORT):
        with pytest.warns(PluginWarning):
            use_registry(build_registry())
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    broken = [p for p in data if p["name"] == "vqkit-broken"]
    assert broken == [{
        "name": "vqkit-broken", "distribution": "vqkit-broken", "version": "1.2.3",
        "module": "vqkit_broken_mod4", "status": "broken",
        "error": "ModuleNotFoundError: No module named 'this_module_does_not_exist_anywhere'",
        "components": {}, "clashes": [],
    }]
    assert main(["plugins"]) == 0
    assert "broken" in capsys.readouterr().out


# ----------------------------------------------------------------------------- capabilities
QUICKSTART = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")


def _swap_recipe(tmp_path, reset="none"):
    path = tmp_path / "grid.yaml"
    path.write_text(
        f"extends: {QUICKSTART}\n"
        "quantizer: {name: grid, params: {levels: [4, 4]}}\n"
        f"reset: {{name: {reset}}}\n"
    )
    return str(path)


def test_fixed_codebook_quantizer_with_a_resetting_policy_is_a_located_validate_error(
    tmp_path, capsys, use_registry
):
    with _fake(tmp_path, "vqkit-grid", "vqkit_grid_cap", ex.FIXED_QUANTIZER, ep_name="grid", version="0.1.0"):
        registry = use_registry(build_registry())
        entry = registry.get("quantizers", "grid")
        assert entry.cls.capabilities() == {"fixed_codebook": True, "multi_codebook": False}
        assert main(["validate", _swap_recipe(tmp_path)]) == 0
        capsys.readouterr()
        bad = _swap_recipe(tmp_path, reset="random")
        assert main(["validate", bad]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [
            f"vqkit: error: {bad}:3:15: reset.name: reset policy 'random' (vqkit 0.1.0) replaces codes, "
            "but quantizer 'grid' (vqkit-grid 0.1.0) has a fixed code-book (it declares "
            "fixed_codebook = True); use `reset: {name: none}` or another quantizer"
        ]
        # the same rule through --set
        assert main(["validate", _swap_recipe(tmp_path), "--set", "reset.name=kmeans"]) == 2
        assert "reset.name: reset policy 'kmeans'" in capsys.readouterr().err


def test_loss_that_needs_a_discriminator_is_checked_without_build(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(f"extends: {QUICKSTART}\nlosses:\n  - {{name: pixel-l1}}\n  - {{name: discriminator-features}}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:4:12: losses.1.name: loss 'discriminator-features' (vqkit 0.1.0) needs a discriminator" in err
    assert main(["validate", str(path), "--set", "discriminator={name: patchgan}"]) == 0
    # a discriminator block that is not a mapping: its own error, with the form, and no second one
    assert main(["validate", str(path), "--set", "discriminator=patchgan"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["vqkit: error: --set: discriminator: must be a mapping (got 'patchgan'); a component is named "
                     "inside its block: {name: patchgan}"], lines
    # a child that removes its parent's discriminator: the error says where
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {QUICKSTART}\ndiscriminator: {{name: patchgan}}\nlosses:\n  - {{name: pixel-l1}}\n"
                     "  - {name: discriminator-features}\n")
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text("extends: child.yaml\ndiscriminator:\n")
    assert main(["validate", str(grandchild)]) == 2
    err = capsys.readouterr().err
    assert f"but the recipe has no `discriminator` block (`discriminator` is null at {grandchild}:2:1)" in err, err


def test_quantizer_without_replace_codes_must_declare_a_fixed_codebook(tmp_path):
    source = ex.FIXED_QUANTIZER.replace("    fixed_codebook = True\n", "")
    with _fake(tmp_path, "vqkit-undeclared", "vqkit_undeclared_mod", source):
        with pytest.warns(PluginWarning, match="does not implement replace_codes.*fixed_codebook = True"):
            registry = build_registry()
    assert next(p for p in registry.plugins if p.name == "vqkit-undeclared").status == "broken"


def test_components_text_shows_full_types_descriptions_and_capabilities(tmp_path, capsys, use_registry):
    with _fake(tmp_path, "vqkit-grid", "vqkit_grid_list", ex.FIXED_QUANTIZER, ep_name="grid", version="0.1.0"):
        use_registry(build_registry())
        assert main(["components", "quantizers", "grid"]) == 0
    out = capsys.readouterr().out
    assert "grid (vqkit-grid 0.1.0): Rounds a bounded projection of each latent to a fixed grid (test plugin)." in out
    assert "capabilities: fixed_codebook = True, multi_codebook = False" in out
    assert re.search(r"^levels +list\[int ≥ 2\] \(≥ 1 items\) +\[3, 3\] +grid points per projected dimension$", out, re.M)
    assert main(["components", "reset_policies", "random"]) == 0
    assert re.search(r"^threshold +float ≥ 0 +1\.0 +a code with fewer assignments", capsys.readouterr().out, re.M)
    assert main(["components", "perceptual_losses", "disc*"]) == 0
    assert "capabilities: needs_discriminator = True" in capsys.readouterr().out


# ----------------------------------------------------------------------------- at run time
def _tiny_recipe(tmp_path, store, quantizer, reset):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "vqkit: 1\nname: tiny\nseed: 3\n"
        "data: {name: fashion-mnist, params: {limit: 96}}\n"
        "encoder: {name: conv, params: {channels: [8, 16], factor: 4, latent_dim: 8}}\n"
        f"quantizer: {quantizer}\n"
        "decoder: {name: conv, params: {channels: [16, 8]}}\n"
        "losses: [{name: pixel-l1}]\n"
        f"reset: {reset}\n"
        "train: {steps: 6, batch_size: 8, log_every: 2, eval_every: 6, image_every: 6, checkpoint_every: 6, device: cpu}\n"
        "eval: {num_samples: 16, batch_size: 16}\n"
        f"tracking: {{experiment: tiny, uri: '{store}', output_dir: '{tmp_path / 'runs'}'}}\n"
    )
    return str(path)


def test_multi_codebook_quantizer_trains_with_resets_per_code_book(tmp_path, store, capsys, use_registry):
    from mlflow import MlflowClient

    from vqkit.recipe import load_recipe
    from vqkit.train.checkpoint import latest_checkpoint, load_checkpoint
    from vqkit.train.trainer import train

    with _fake(tmp_path, "vqkit-two", "vqkit_two_mod", ex.MULTI_QUANTIZER, ep_name="two", version="0.1.0"):
        use_registry(build_registry())
        recipe = _tiny_recipe(tmp_path, store, "{name: two-stage, params: {stages: 2, codebook_size: 64}}",
                              "{name: random, every: 2}")
        assert main(["train", recipe]) == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    m = run.data.metrics
    for s in (0, 1):  # each code-book has its monitor; the aggregate sums dead codes and resets
        assert 0 < m[f"codebook/{s}/usage"] <= 1
    assert m["codebook/dead"] == m["codebook/0/dead"] + m["codebook/1/dead"]
    resets = {s: sum(x.value for x in client.get_metric_history(run.info.run_id, f"codebook/{s}/resets")) for s in (0, 1)}
    assert resets[0] > 0 and resets[1] > 0, resets  # 64 codes, 8x4 latents a step: dead codes reset
    assert m["quantizer/stages"] == 2.0
    assert run.data.tags["vqkit.component.quantizer"] == "two-stage (vqkit-two 0.1.0)"
    state = load_checkpoint(tmp_path / "runs" / run.info.run_id / "checkpoints" / "final.pt")
    assert len(state["codebook"]["stages"]) == 2

    # stopped after 4 steps and resumed: the same code-books, policies and monitors as straight
    with _fake(tmp_path, "vqkit-two", "vqkit_two_mod", ex.MULTI_QUANTIZER, ep_name="two", version="0.1.0"):
        use_registry(build_registry())
        first = train(load_recipe(recipe), quiet=True, stop_after=4)
        assert main(["train", "--resume", str(first.run_dir), "--quiet"]) == 0
    resumed = load_checkpoint(latest_checkpoint(first.run_dir / "checkpoints"))
    assert resumed["step"] == 6
    for key in ("model", "codebook"):
        all_tensors_equal(state[key], resumed[key], key)


def test_not_implemented_at_run_time_is_a_user_error_naming_the_component(tmp_path, store, capsys, use_registry):
    source = ex.MULTI_QUANTIZER.replace(
        "    def stage_inputs(self, z, indices):\n",
        "    def stage_inputs(self, z, indices):\n        raise NotImplementedError('residuals are not kept')\n",
    )
    with _fake(tmp_path, "vqkit-two", "vqkit_two_lazy", source, ep_name="two", version="0.1.0"):
        use_registry(build_registry())
        recipe = _tiny_recipe(tmp_path, store, "{name: two-stage}", "{name: random, every: 2}")
        assert main(["train", recipe]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "vqkit: error: quantizer: quantizer two-stage (vqkit-two 0.1.0) does not implement stage_inputs() "
        "(residuals are not kept); it cannot be used this way (check its documented capabilities, or "
        "report it to its distribution)"
    )
    assert "Traceback" not in err


def test_not_implemented_while_building_is_a_located_user_error(tmp_path, capsys, use_registry):
    source = ex.FIXED_QUANTIZER.replace(
        "        super().__init__()\n        self.levels",
        "        super().__init__()\n        raise NotImplementedError('only dim == len(levels)')\n        self.levels",
    )
    with _fake(tmp_path, "vqkit-grid", "vqkit_grid_build", source, ep_name="grid", version="0.1.0"):
        use_registry(build_registry())
        recipe = _swap_recipe(tmp_path)
        assert main(["validate", recipe]) == 0
        assert main(["validate", "--build", recipe, "--set", "data.params.limit=16"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (  # at the quantizer block of the recipe that sets it (line 2)
        f"vqkit: error: {recipe}:2:12: quantizer: quantizer grid (vqkit-grid 0.1.0) cannot be built this way: "
        "only dim == len(levels)"
    )


def test_usage_of_several_code_books_is_counted_per_code_book():
    import torch

    from vqkit.telemetry import stage_counts, usage_and_perplexity

    one = stage_counts(torch.tensor([[[0, 1], [1, 1]]]), 4)  # (B, h, w), one code-book
    assert one.tolist() == [[1, 3, 0, 0]]
    two = stage_counts(torch.tensor([[[[0, 1]], [[2, 2]]]]), 4, num_codebooks=2)  # (B, S, h, w)
    assert two.tolist() == [[1, 1, 0, 0], [0, 0, 2, 0]]
    usage, perplexity = usage_and_perplexity(two)
    assert usage == pytest.approx((2 / 4 + 1 / 4) / 2) and perplexity == pytest.approx((2.0 + 1.0) / 2)
    assert usage_and_perplexity(torch.zeros(2, 4)) is None
