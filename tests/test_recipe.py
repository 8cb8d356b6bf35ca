"""Recipe loading, inheritance, overrides, validation and normalization."""
from __future__ import annotations

import re
import textwrap

import pytest
import yaml

from tests import schema_plugin
from vqkit.errors import VqkitError
from vqkit.plugins import build_registry
from vqkit.recipe import load_recipe

GOOD = """\
vqkit: 1
name: test
seed: 3
data: {name: t-folder, params: {root: /data}}
encoder: {name: t-conv, params: {channels: [8, 16], latent_dim: 4}}
quantizer: {name: t-vq, params: {codebook_size: 64}}
decoder: {name: t-conv}
losses:
  - {name: pixel-l1}
  - {name: pixel-l2, weight: 0.5, start_step: 10}
train: {steps: 20, batch_size: 4}
"""


@pytest.fixture(autouse=True)
def _schema_registry(use_registry):
    use_registry(build_registry(extra_plugins=[("schema-test", schema_plugin)]))


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path, overrides=()):
    with pytest.raises(VqkitError) as info:
        load_recipe(path, overrides)
    return [str(p) for p in info.value.problems]


def test_good_recipe_is_normalized_with_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    data = recipe.to_dict()
    assert data["encoder"]["params"] == {"channels": [8, 16], "latent_dim": 4, "activation": "silu"}
    assert data["decoder"]["params"] == {"channels": [64, 32]}
    assert data["quantizer"]["params"] == {"codebook_size": 64, "beta": 0.25}
    assert data["losses"][1] == {"name": "pixel-l2", "params": {}, "weight": 0.5, "start_step": 10}
    assert data["reset"]["name"] == "none" and data["reset"]["every"] == 100
    assert data["train"]["lr"] == pytest.approx(2e-4)
    assert data["tracking"]["experiment"] == "vqkit"
    # normalizing is idempotent: the normalized recipe validates to itself
    again = load_recipe(write(tmp_path, recipe.to_yaml(), "n.yaml"))
    assert again.to_dict() == data and again.sha256() == recipe.sha256()
    flat = recipe.flat_params()
    assert flat["quantizer.params.codebook_size"] == 64
    assert flat["losses.1.weight"] == 0.5
    assert recipe.params_of("encoder").latent_dim == 4


def test_misspelt_component_gives_location_and_suggestion(tmp_path):
    path = write(tmp_path, GOOD.replace("name: t-vq", "name: t-vqq"))
    [msg] = problems(path)
    assert msg.startswith(f"{path}:6:19: quantizer.name: unknown quantizer 't-vqq'")
    assert "did you mean 't-vq'?" in msg and re.search(r"valid: [^)]*\bt-vq\b", msg)  # other plugins may be installed


def test_all_errors_are_collected(tmp_path):
    text = GOOD.replace("latent_dim: 4", "latent_dim: four").replace("steps: 20", "steps: 20, stepz: 3")
    text = text.replace("name: pixel-l2", "name: pixel-l3").replace("codebook_size: 64", "codebook_size: 64, bta: 1")
    msgs = problems(write(tmp_path, text))
    assert len(msgs) == 4, msgs
    joined = "\n".join(msgs)
    assert ":5:" in joined and "encoder.params.latent_dim: Input should be a valid integer" in joined
    assert "train.stepz: unknown key 'stepz' (did you mean 'steps'?" in joined
    assert "losses.1.name: unknown perceptual loss 'pixel-l3' (did you mean 'pixel-l2'?" in joined
    assert "quantizer.params.bta: unknown key 'bta' (did you mean 'beta'?" in joined
    assert "provided by schema-test" in joined


@pytest.mark.parametrize("mutation,expected", [
    (lambda t: t.replace("seed: 3", "seed: [3]"), "seed: Input should be a valid integer"),
    (lambda t: t.replace("weight: 0.5", "weight: -1"), "losses.1.weight: Input should be greater than or equal to 0"),
    # no infinite or NaN numbers: in the recipe's own blocks and in a component's params
    (lambda t: t.replace("weight: 0.5", "weight: .inf"), "losses.1.weight: Input should be a finite number"),
    (lambda t: t.replace("train: {steps: 20, batch_size: 4}", "train: {steps: 20, batch_size: 4, lr: .nan}"),
     "train.lr: Input should be a finite number"),
    (lambda t: t.replace("codebook_size: 64}", "codebook_size: 64, beta: 1e400}"),
     "quantizer.params.beta: Input should be a finite number"),
    # a YAML boolean where a number is expected is a mistake, not 1 or 0 (e.g. `r1: true`)
    (lambda t: t.replace("weight: 0.5", "weight: true"), "losses.1.weight: expected a number, got true"),
    (lambda t: t.replace("train: {steps: 20, batch_size: 4}", "train: {steps: false}"),
     "train.steps: expected a number, got false"),
    (lambda t: t.replace("train: {steps: 20, batch_size: 4}", "train: {betas: [true, 0.9]}"),
     "train.betas: expected a number, got true"),
    (lambda t: t.replace("codebook_size: 64}", "codebook_size: true}"),
     "quantizer.params.codebook_size: expected a number, got true"),
    # seeds numpy/torch can take; Adam's betas in [0, 1)
    (lambda t: t.replace("seed: 3", "seed: 99999999999999999999999"), "seed: Input should be less than or equal to 4294967295"),
    (lambda t: t.replace("seed: 3", "seed: -1"), "seed: Input should be greater than or equal to 0"),
    # PyYAML reads 1e3 (no dot) as text: say so for a whole number
    (lambda t: t.replace("train: {steps: 20, batch_size: 4}", "train: {steps: 1e3}"),
     "train.steps: must be a whole number (got '1e3', which YAML reads as text: write it out, 1000)"),
    (lambda t: t.replace("train: {steps: 20, batch_size: 4}", "train: {betas: [1.5, 0.9]}"),
     "train.betas.0: Input should be less than 1"),
    # only plain YAML: names, not lists or mappings, as keys; no !!binary (bytes became names)
    (lambda t: t.replace("decoder: {name: t-conv}", "decoder: {name: t-conv, ? [a, b] : 1}"),
     "decoder: a key must be a name, not a list"),
    (lambda t: t.replace("decoder: {name: t-conv}", "decoder: {name: !!binary dC1jb252}"),
     "YAML error: tag 'tag:yaml.org,2002:binary' is not allowed"),
    (lambda t: t + "? {a: 1}\n: 2\n", "a key must be a name, not a mapping"),
    # keys YAML reads as something else: a date, a boolean (YAML 1.1's on/off/yes/no)
    (lambda t: t.replace("decoder: {name: t-conv}", "decoder: {name: t-conv, 2020-01-01: 1}"),
     "decoder: key '2020-01-01' is read by YAML as a date, not a name; quote it if a name is meant"),
    (lambda t: t.replace("decoder: {name: t-conv}", "decoder: {name: t-conv, on: 1}"),
     "decoder: key 'on' is read by YAML as a boolean, not a name"),
    (lambda t: t + "tracking: {experiment: ''}\n", "tracking.experiment: must not be empty"),
    (lambda t: t.replace("activation", "x") + "", None),
    (lambda t: t.replace("train: {steps: 20, batch_size: 4}", "train: {optimizer: sgd}"), "train.optimizer: must be 'adam' or 'adamw'"),
    (lambda t: t.replace("train: {steps: 20, batch_size: 4}", "train: {optimizer: AdamW}"),
     "train.optimizer: must be 'adam' or 'adamw' (did you mean 'adamw'?)"),
    (lambda t: t.replace("losses:\n  - {name: pixel-l1}\n  - {name: pixel-l2, weight: 0.5, start_step: 10}\n", "losses: []\n"), "losses: List should have at least 1 item"),
    (lambda t: t.replace("data: {name: t-folder, params: {root: /data}}", "data: {name: t-folder}"), "data.params.root: required key is missing"),
    (lambda t: t.replace("vqkit: 1", "vqkit: 2"), "vqkit: unsupported recipe schema version 2"),
    (lambda t: t.replace("vqkit: 1\n", ""), "vqkit: required key is missing"),
    (lambda t: t + "decoder: {name: t-conv}\n", "decoder: duplicate key 'decoder' (first at line 7)"),
    (lambda t: t + "extra_block: 1\n", "extra_block: unknown key 'extra_block'"),
])
def test_bad_values(tmp_path, mutation, expected):
    text = mutation(GOOD)
    if expected is None:
        load_recipe(write(tmp_path, text))  # a harmless change still validates
        return
    msgs = problems(write(tmp_path, text))
    assert any(expected in m for m in msgs), msgs
    assert all(m.startswith(str(tmp_path)) for m in msgs), msgs


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, GOOD.replace("decoder: {name: t-conv}", "decoder: {name: t-conv"))
    [msg] = problems(path)
    assert msg.startswith(f"{path}:8:") and "YAML error" in msg


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['echo hi']", "!!python/name:os.system", "!!python/object:os.PathLike {}"])
def test_python_tags_are_refused(tmp_path, tag):
    path = write(tmp_path, GOOD.replace("name: test", f"name: {tag}"))
    [msg] = problems(path)
    assert msg.startswith(f"{path}:2:7:") and "is not allowed" in msg


def test_missing_and_empty_files(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [f"recipe file not found: {tmp_path / 'nope.yaml'}"]
    assert problems(write(tmp_path, "")) == [f"{tmp_path / 'r.yaml'}:1:1: recipe is empty"]
    assert "a recipe must be a mapping" in problems(write(tmp_path, "- a\n- b\n"))[0]


def test_extends_merges_and_reports_child_locations(tmp_path):
    write(tmp_path, GOOD, "base.yaml")
    child = write(tmp_path, """\
        extends: base.yaml
        name: child
        quantizer: {params: {beta: 0.5}}
        losses:
          - {name: pixel-l2}
        """, "child.yaml")
    data = load_recipe(child).to_dict()
    assert data["name"] == "child"
    assert data["quantizer"] == {"name": "t-vq", "params": {"codebook_size": 64, "beta": 0.5}}
    assert [loss["name"] for loss in data["losses"]] == ["pixel-l2"]  # lists are replaced
    # an error in the parent points at the parent file, one in the child at the child
    write(tmp_path, GOOD.replace("latent_dim: 4", "latent_dim: x"), "base.yaml")
    write(tmp_path, "extends: base.yaml\ntrain: {steps: -1}\n", "child.yaml")
    msgs = problems(child)
    assert any(m.startswith(f"{tmp_path / 'base.yaml'}:5:") and "latent_dim" in m for m in msgs), msgs
    assert any(m.startswith(f"{child}:2:") and "train.steps" in m for m in msgs), msgs


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    # located at the `extends` that closes the cycle (b.yaml's)
    assert problems(tmp_path / "a.yaml") == [
        f"{tmp_path / 'b.yaml'}:1:10: extends: `extends` cycle: {tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> "
        f"{tmp_path / 'a.yaml'}"]
    write(tmp_path, "extends: gone.yaml\nname: x\n", "c.yaml")
    [msg] = problems(tmp_path / "c.yaml")
    assert msg.startswith(f"{tmp_path / 'c.yaml'}:1:") and "gone.yaml" in msg


def test_set_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["train.steps=17", "quantizer.params.beta=0.1", "losses.0.weight=2", "tracking.uri=sqlite:///x.db", "encoder.params.channels=[4, 8]"])
    data = recipe.to_dict()
    assert data["train"]["steps"] == 17 and data["quantizer"]["params"]["beta"] == 0.1
    assert data["losses"][0]["weight"] == 2.0 and data["tracking"]["uri"] == "sqlite:///x.db"
    assert data["encoder"]["params"]["channels"] == [4, 8]
    msgs = problems(path, ["train.steps=abc"])
    assert msgs == ["--set: train.steps: Input should be a valid integer, unable to parse string as an integer (got 'abc')"]
    assert "expects KEY.PATH=VALUE" in problems(path, ["train.steps"])[0]
    assert "cannot descend into losses.9" in problems(path, ["losses.9.weight=1"])[0]


def test_normalized_recipe_is_plain_yaml(tmp_path):
    text = load_recipe(write(tmp_path, GOOD)).to_yaml()
    assert yaml.safe_load(text)["name"] == "test"


def test_a_component_whose_name_changes_is_replaced_not_merged(tmp_path):
    """extends: the child's block replaces the parent's when its `name` differs (params,
    and keys like reset.every, are not inherited); the same name keeps merging."""
    write(tmp_path, GOOD + "reset: {name: random, every: 7, params: {threshold: 2.0}}\n", "base.yaml")
    child = write(tmp_path, """\
        extends: base.yaml
        quantizer: {name: vq, params: {codebook_size: 32}}
        reset: {name: none}
        encoder: {params: {latent_dim: 8}}
        """, "child.yaml")
    data = load_recipe(child).to_dict()
    assert data["quantizer"]["name"] == "vq" and data["quantizer"]["params"]["codebook_size"] == 32
    assert data["quantizer"]["params"]["beta"] == 0.25  # vq's default, not inherited
    assert data["reset"] == {"name": "none", "params": {}, "every": 100, "start_step": 0, "stop_step": None}
    assert data["encoder"]["params"] == {"channels": [8, 16], "latent_dim": 8, "activation": "silu"}
    # an error in the swapped block points at the child, never at the parent's params
    write(tmp_path, "extends: base.yaml\nquantizer: {name: vq, params: {codebook_sise: 32}}\n", "bad.yaml")
    [msg] = problems(tmp_path / "bad.yaml")
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:2:32: quantizer.params.codebook_sise: unknown key"), msg


@pytest.mark.parametrize("overrides", [
    ["quantizer.name=vq", "quantizer.params.codebook_size=32"],
    ["quantizer={name: vq, params: {codebook_size: 32}}"],
])
def test_set_swaps_a_component_by_the_same_rule(tmp_path, overrides):
    data = load_recipe(write(tmp_path, GOOD), overrides).to_dict()
    assert data["quantizer"]["name"] == "vq"
    assert data["quantizer"]["params"]["codebook_size"] == 32 and data["quantizer"]["params"]["beta"] == 0.25


def test_set_mapping_with_the_same_name_merges_like_extends(tmp_path):
    path = write(tmp_path, GOOD)
    data = load_recipe(path, ["quantizer={name: t-vq, params: {beta: 0.5}}", "train={steps: 13}"]).to_dict()
    assert data["quantizer"]["params"] == {"codebook_size": 64, "beta": 0.5}
    assert data["train"]["steps"] == 13 and data["train"]["batch_size"] == 4
    # a loss is a component block too: a new name replaces its weight and start_step
    data = load_recipe(path, ["losses.1.name=pixel-l1"]).to_dict()
    assert data["losses"][1] == {"name": "pixel-l1", "params": {}, "weight": 1.0, "start_step": 0}
    # an error in a key a merging --set gave is located at --set
    msgs = problems(path, ["quantizer={params: {codebook_size: 1}}"])
    assert msgs == ["--set: quantizer.params.codebook_size: Input should be greater than or equal to 2 (got 1) [quantizer 't-vq', provided by schema-test]"], msgs


def test_missing_component_name_lists_the_registered_names(tmp_path):
    # e.g. a discriminator block holding only `r1:`: which names could go there?
    text = GOOD.replace("quantizer: {name: t-vq, params: {codebook_size: 64}}", "quantizer: {params: {codebook_size: 64}}")
    msgs = problems(write(tmp_path, text))
    [msg] = [m for m in msgs if "quantizer.name" in m]
    assert "quantizer.name: required key is missing (valid: " in msg and re.search(r"valid: [^)]*\bt-vq\b", msg), msg


def test_binary_and_set_tags_are_refused_in_set_values(tmp_path):
    path = write(tmp_path, GOOD)
    for value in ("!!binary dC12cQ==", "!!set {a}"):
        with pytest.raises(VqkitError) as exc:
            load_recipe(path, [f"quantizer.name={value}"])
        assert "is not valid YAML: could not determine a constructor" in str(exc.value), str(exc.value)


def test_a_name_in_other_case_is_suggested(tmp_path):
    msgs = problems(write(tmp_path, GOOD.replace("name: t-vq", "name: T-VQ")))
    assert any("quantizer.name: unknown quantizer 'T-VQ' (did you mean 't-vq'?" in m for m in msgs), msgs


def test_a_dotted_key_in_a_file_says_to_nest_it(tmp_path):
    [msg] = problems(write(tmp_path, GOOD + "quantizer.beta: 0.5\n"))
    assert msg.endswith("a dotted key is --set syntax: in a recipe file, nest it (quantizer: {beta: ...})"), msg


def test_extends_of_a_shipped_recipe_by_its_bare_name_suggests_the_prefix(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text("extends: quickstart.yaml\nname: child\n")
    [msg] = problems(path)
    assert msg == (f"{path}:1:10: extends: recipe file not found: {tmp_path / 'quickstart.yaml'} "
                   "(vqkit ships a recipe of that name: extends: vqkit:quickstart.yaml)"), msg


def test_extends_of_a_directory_is_located_at_the_value(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text(f"name: child\nextends: {tmp_path}\n")
    assert problems(path) == [f"{path}:2:10: extends: {tmp_path} is a directory, not a recipe file"]
