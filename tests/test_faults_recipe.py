"""Hostile recipes: every limit of vqkit.yamlsafe ends in one located ``vqkit: error``
line and exit 2, fast and in little memory, and no input gives a RecursionError.

Each case runs ``vqkit validate`` inside one child process that measures the wall time
and the peak of Python allocations (tracemalloc) of the call, and its peak RSS growth (limits: MAX_NODES 5000, MAX_DEPTH 64)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vqkit import yamlsafe

_MEASURE = r"""
import contextlib, io, json, resource, sys, time, tracemalloc
from vqkit.cli import main
import vqkit.recipe  # imports paid before measuring
out = []
for path in sys.argv[1:]:
    err = io.StringIO()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        main(["validate", path])
    seconds = time.perf_counter() - t0
    tracemalloc.start()  # a second call, measured for memory (tracemalloc slows it down)
    with contextlib.redirect_stderr(err):
        code = main(["validate", path])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    out.append({"path": path, "code": code, "seconds": seconds, "peak": peak, "rss_kb": rss,
                "err": err.getvalue()})
print(json.dumps(out))
"""


def _alias_bomb(levels: int, width: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


CASES = {
    # name: (text, expected words in the error, expected line)
    "bomb9": (_alias_bomb(9), "once aliases are expanded", None),
    "bomb6": (_alias_bomb(6), "once aliases are expanded", None),
    "flow1000": ("vqkit: 1\nname: " + "[" * 1000 + "]" * 1000 + "\n", "nest", 2),  # libyaml or our limit
    "block1000": ("vqkit: 1\n" + "".join("  " * i + f"k{i}:\n" for i in range(1000)) + "  " * 1000 + "v\n",
                  "nested more than", None),
    "self_alias": ("vqkit: 1\nname: &a [1, *a]\n", "refers to a value that contains it", 2),
    "many_keys": ("vqkit: 1\n" + "".join(f"k{i}: {i}\n" for i in range(6_000)), "more than 5000 values", None),
    "huge_file": ("vqkit: 1\n" + "".join(f"key_{i:07d}: {i}\n" for i in range(700_000)), "more than", 1),
}


def test_hostile_recipes_are_refused_fast_in_little_memory(tmp_path):
    paths = []
    for name, (text, _, _) in CASES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        paths.append(str(path))
    assert (tmp_path / "huge_file.yaml").stat().st_size > 12_000_000  # the 12 MB recipe
    assert len(CASES["bomb9"][0]) < 700  # the 606-byte bomb of the issue
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *paths], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = {r["path"]: r for r in json.loads(proc.stdout)}
    for name, (_, words, line) in CASES.items():
        r = results[str(tmp_path / f"{name}.yaml")]
        lines = r["err"].splitlines()
        assert r["code"] == 2, (name, r)
        assert len(lines) == 1 and lines[0].startswith(f"vqkit: error: {tmp_path / name}.yaml:"), (name, lines)
        assert words in lines[0] and "Traceback" not in r["err"] and "RecursionError" not in r["err"], (name, lines)
        if line is not None:
            assert f".yaml:{line}:" in lines[0], (name, lines)
        assert r["seconds"] < 0.5, (name, r["seconds"])
        assert r["peak"] < 20_000_000, (name, r["peak"])
        assert r["rss_kb"] < 100_000, (name, r["rss_kb"])


def test_limits_leave_real_recipes_alone_and_keep_yaml_semantics():
    text = "a: &x {b: [1, 2.5, true, null, '3']}\nc: *x\nd:\n  <<: *x\n  e: 2026-01-01\n"
    assert yamlsafe.safe_load(text) == __import__("yaml").safe_load(text)
    deepest = yamlsafe.MAX_DEPTH - 1  # lists inside the top mapping
    expected: list = []
    for _ in range(deepest - 1):
        expected = [expected]
    assert yamlsafe.safe_load("a: " + "[" * deepest + "]" * deepest) == {"a": expected}
    with pytest.raises(yamlsafe.YamlLimitError):
        yamlsafe.safe_load("a: " + "[" * (deepest + 1) + "]" * (deepest + 1))
    assert yamlsafe.safe_load("") is None


def test_unsafe_tags_stay_refused(tmp_path, capsys):
    from vqkit.cli import main

    path = tmp_path / "tag.yaml"
    path.write_text("vqkit: 1\nname: !!python/object/apply:os.system ['true']\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not allowed" in err and f"{path}:2:" in err


def test_set_values_are_read_with_the_same_limits(capsys):
    from vqkit.errors import VqkitError
    from vqkit.recipe import parse_override

    with pytest.raises(VqkitError) as info:
        parse_override("name=" + "[" * 1000 + "]" * 1000)
    assert "not valid YAML" in str(info.value)


def test_a_long_extends_chain_is_a_located_error_not_a_recursion_error(tmp_path, capsys):
    from pathlib import Path

    from vqkit.cli import main
    from vqkit.recipe import MAX_EXTENDS_DEPTH

    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    (tmp_path / "r0.yaml").write_text(quickstart.read_text())
    for i in range(1, 1200):  # far past Python's recursion limit
        (tmp_path / f"r{i}.yaml").write_text(f"extends: r{i - 1}.yaml\n")
    ok = tmp_path / f"r{MAX_EXTENDS_DEPTH - 1}.yaml"  # a chain of exactly MAX_EXTENDS_DEPTH files
    assert main(["validate", str(ok)]) == 0
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "r1199.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RecursionError" not in err
    assert f"`extends` chain deeper than {MAX_EXTENDS_DEPTH} recipe files" in err
    assert ":1:1: extends:" in err


# --------------------------------------------------------------------------- --set errors
def _two_losses(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(
        "vqkit: 1\nname: two\n"
        "data: {name: fashion-mnist, params: {image_size: 32}}\n"
        "encoder: {name: conv, params: {channels: [8], factor: 2, latent_dim: 8}}\n"
        "quantizer: {name: vq, params: {codebook_size: 16}}\n"
        "decoder: {name: conv, params: {channels: [8]}}\n"
        "losses:\n  - {name: pixel-l1}\n  - {name: pixel-l2}\n"
        "train: {steps: 10}\n"
    )
    return str(path)


SET_ERRORS = {
    # --set value: the one error line (after "vqkit: error: ")
    "losses.5.weight=1": "--set: losses.5.weight: cannot descend into losses.5: losses has 2 items (0 to 1)",
    "train.steps.every=1": "--set: train.steps.every: cannot descend into train.steps: it is 10, not a mapping or list",
    "nonexist.x=1": "--set: nonexist: unknown key 'nonexist'",
    "train.steps=[1": "--set: train.steps: value '[1' is not valid YAML: did not find expected ',' or ']' "
                      "(while parsing a flow sequence)",
    "losses.0=3": "--set: losses.0: must be a mapping (got 3)",
    "losses.4=[1]": "--set: losses.4: no such item: losses has 2 items (0 to 1); losses.2 adds one",
    "losses.-1.weight=2": "--set: losses.-1.weight: list indices count from 0 (no negative index -1)",
    # a list the recipe does not set has no items yet (its default is filled in afterwards)
    "eval.metrics.5=psnr": "--set: eval.metrics.5: eval.metrics is not in the recipe (its default applies): "
                           "set the whole list, e.g. --set 'eval.metrics=[...]'",
    "train.betas.1=0.5": "--set: train.betas.1: train.betas is not in the recipe (its default applies): "
                         "set the whole list, e.g. --set 'train.betas=[...]'",
}


@pytest.mark.parametrize("override", sorted(SET_ERRORS))
def test_set_errors_are_one_line_located_at_set(tmp_path, capsys, override):
    from vqkit.cli import main

    recipe = _two_losses(tmp_path)
    assert main(["validate", recipe]) == 0
    capsys.readouterr()
    assert main(["validate", recipe, "--set", override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vqkit: error: " + SET_ERRORS[override]), lines
    assert "LossRef" not in lines[0] and "Input should be" not in lines[0]


def test_errors_are_listed_in_the_order_of_the_file_then_of_the_set_options(tmp_path, capsys):
    from vqkit.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(
        "vqkit: 1\nname: bad\n"
        "encoder: {name: conv, params: {channels: [8], factor: z, latent_dim: 8}}\n"
        "data: {name: fashion-mnist, params: {image_size: 32, limt: 3}}\n"
        "quantizer: {name: vq, params: {codebook_size: 16}}\n"
        "decoder: {name: conv, params: {channels: [8]}}\n"
        "losses: [{name: pixel-l1}]\n"
        "train: {steps: x}\n"
        "eval: {batch_size: -1}\n"
    )
    sets = ["--set", "reset.evry=3", "--set", "quantizer.params.beta=q", "--set", "seed=s"]
    assert main(["validate", str(path), *sets]) == 2
    lines = [line.removeprefix("vqkit: error: ") for line in capsys.readouterr().err.strip().splitlines()]
    where = [line.split(": ")[0] + (": " + line.split(": ")[1] if line.startswith("--set") else "") for line in lines]
    assert where == [f"{path}:3:55", f"{path}:4:54", f"{path}:8:16", f"{path}:9:20",
                     "--set: reset.evry", "--set: quantizer.params.beta", "--set: seed"], lines


def test_a_problem_located_in_a_file_names_the_set_keys_below_it(capsys):
    """A component's own check (here fashion-mnist's classes) is located at its block in the
    file; when --set gave a key under it, the line says so."""
    from pathlib import Path

    from vqkit.cli import main

    quick = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert main(["validate", quick, "--set", "data.params.classes=[11]"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"vqkit: error: {quick}:") and "data.params: classes must be" in line, line
    assert line.endswith("(--set gave data.params.classes)"), line


@pytest.mark.parametrize("value, expected", [
    ("[32, 0]", "data.params.image_size.1: Input should be greater than or equal to 1 (got 0)"),
    ("0", "data.params.image_size: Input should be greater than or equal to 1 (got 0)"),
])
def test_a_value_that_fits_no_branch_of_a_union_is_one_error_without_type_names(tmp_path, capsys, value, expected):
    """image-folder's image_size is an int or an (h, w) pair: one line, the most specific
    branch's, with no pydantic branch names (`constrained-int`, `tuple[...]`) in the key."""
    from vqkit.cli import main

    recipe = tmp_path / "img.yaml"
    recipe.write_text(f"extends: vqkit:quickstart.yaml\ndata: {{name: image-folder, params: {{root: {tmp_path}}}}}\n")
    assert main(["validate", str(recipe), "--set", f"data.params.image_size={value}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"vqkit: error: --set: {expected}"), line
