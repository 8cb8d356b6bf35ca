"""Plugin loading through real entry points of fake installed distributions."""
from __future__ import annotations

import json
import warnings

import pytest

from tests import plugin_examples as ex
from vqkit.cli import main
from vqkit.errors import VqkitError
from vqkit.plugins import PluginWarning, build_registry, get_registry
from vqkit.testing import install_fake_distribution


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
    monkeypatch.setenv("VQKIT_DISABLE_PLUGINS", "vqkit-huber, other")
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_mod3", ex.GOOD):
        registry = build_registry()
    assert next(p for p in registry.plugins if p.name == "vqkit-huber").status == "blocked"
    assert "huber" not in registry.names("perceptual_losses")


def test_duplicate_names_name_both_distributions(tmp_path):
    with _fake(tmp_path, "vqkit-huber", "vqkit_huber_a", ex.GOOD), \
         _fake(tmp_path, "vqkit-huber-fork", "vqkit_huber_b", ex.DUPLICATE, version="0.1"):
        with pytest.raises(VqkitError) as info:
            build_registry()
    msg = str(info.value)
    assert "duplicate perceptual loss 'huber'" in msg
    assert "vqkit-huber)" in msg and "vqkit-huber-fork" in msg


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
        "components": {},
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


def test_quantizer_without_replace_codes_must_declare_a_fixed_codebook(tmp_path):
    source = ex.FIXED_QUANTIZER.replace("    fixed_codebook = True\n", "")
    with _fake(tmp_path, "vqkit-undeclared", "vqkit_undeclared_mod", source):
        with pytest.warns(PluginWarning, match="does not implement replace_codes.*fixed_codebook = True"):
            registry = build_registry()
    assert next(p for p in registry.plugins if p.name == "vqkit-undeclared").status == "broken"
