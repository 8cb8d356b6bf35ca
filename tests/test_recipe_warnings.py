"""Recipe warnings: settings that validate but cannot do what they say (a reset that never
fires) are one located ``vqkit: warning:`` line each, printed once, never an error."""
from __future__ import annotations

import json
from pathlib import Path

from vqkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def quickstart(tmp_path, old: str, new: str) -> Path:
    text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    assert old in text
    path = tmp_path / "r.yaml"
    path.write_text(text.replace(old, new))
    return path


def where(path: Path, needle: str, value: str) -> str:
    """``line:col`` of ``value`` on the line holding ``needle``."""
    i, text = next((i, t) for i, t in enumerate(path.read_text().splitlines()) if needle in t)
    return f"{i + 1}:{text.index(needle) + text[text.index(needle):].index(value) + 1}"


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("vqkit: warning:")]


def test_a_reset_every_more_steps_than_the_run_has_is_warned_at_its_key(tmp_path, capsys):
    recipe = quickstart(tmp_path, "{name: random, every: 100, stop_step: 1200}", "{name: random, every: 2000}")
    assert main(["validate", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{recipe}: ok"
    assert warnings_in(err) == [
        f"vqkit: warning: {recipe}:{where(recipe, 'every: 2000', '2000')}: reset.every: 2000 > train.steps 1500: "
        "reset policy 'random' never runs (its first call would be at step 1999; steps run 0 to 1499)"]
    # --set moves the warning to the option; the JSON report lists it with the ok recipe
    assert main(["validate", str(recipe), "--set", "train.steps=3000", "--json"]) == 0
    out, err = capsys.readouterr()
    assert warnings_in(err) == [] and json.loads(out)[0]["warnings"] == []
    # a start_step past the last step is warned at start_step
    assert main(["validate", str(recipe), "--set", "reset.every=10", "--set", "reset.start_step=1500"]) == 0
    assert warnings_in(capsys.readouterr().err) == [
        "vqkit: warning: --set: reset.start_step: 1500: reset policy 'random' never runs (its first call would be "
        "at step 1509; steps run 0 to 1499)"]
    assert main(["validate", str(recipe), "--set", "reset.every=5000", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)[0]
    assert report["ok"] and [w["path"] for w in report["warnings"]] == ["reset.every"]
    assert report["warnings"][0]["file"] == "--set"
    assert len(warnings_in(err)) == 1


def test_a_stop_step_before_the_first_reset_is_warned(tmp_path, capsys):
    recipe = quickstart(tmp_path, "stop_step: 1200", "stop_step: 98, start_step: 10")
    assert main(["validate", str(recipe)]) == 0
    assert warnings_in(capsys.readouterr().err) == [
        f"vqkit: warning: {recipe}:{where(recipe, 'stop_step: 98', '98')}: reset.stop_step: 98 comes before the "
        "first reset (at step 99: every 100 steps from start_step 10): reset policy 'random' never runs"]
    # steps are 0-based: the first reset is after step 99, so a stop_step of 99 keeps it
    assert main(["validate", str(recipe), "--set", "reset.stop_step=99"]) == 0
    assert warnings_in(capsys.readouterr().err) == []
    # a policy that never resets has nothing to warn about
    assert main(["validate", str(recipe), "--set", "reset.name=none"]) == 0
    assert warnings_in(capsys.readouterr().err) == []


def test_the_warning_is_printed_once_per_command(tmp_path, capsys):
    """A sweep validates the recipe once per child: the warning is still one line."""
    recipe = quickstart(tmp_path, "{name: random, every: 100, stop_step: 1200}", "{name: random, every: 2000}")
    code = main(["sweep", str(recipe), "--grid", "train.lr=0.001,0.002,0.003", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(warnings_in(err)) == 1 and "reset.every: 2000 > train.steps 1500" in err


def test_a_loss_or_discriminator_starting_after_the_last_step_is_warned(tmp_path, capsys):
    """Steps run 0 .. train.steps - 1 and a part starts at step >= start_step: a start_step
    of train.steps or more means the part never acts (a short --set train.steps on a GAN
    recipe, say), which is one warning at each start_step, not an error."""
    recipe = ROOT / "recipes" / "perceptual" / "disc-features-tuned.yaml"
    assert main(["validate", str(recipe), "--set", "train.steps=100", "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)[0]
    assert report["ok"] and [w["path"] for w in report["warnings"]] == ["losses.1.start_step", "discriminator.start_step"]
    lines = warnings_in(err)
    assert len(lines) == 2
    assert lines[0].endswith("losses.1.start_step: 100 >= train.steps 100: loss 'discriminator-features' never "
                             "applies (steps run 0 to 99)")
    assert "disc-features.yaml:" in lines[1] and "discriminator.start_step: 100 >= train.steps 100: the " \
        "discriminator never trains" in lines[1]
    # with R1 and LeCam the warning says they never act either
    assert main(["validate", str(recipe), "--set", "train.steps=50", "--set", "discriminator.r1=0.1",
                 "--set", "discriminator.lecam=0.1"]) == 0
    assert "its adversarial term, R1, LeCam and any discriminator-feature loss never act" in capsys.readouterr().err
    # one step more and both act (from step 100, the last one)
    assert main(["validate", str(recipe), "--set", "train.steps=101"]) == 0
    assert warnings_in(capsys.readouterr().err) == []
