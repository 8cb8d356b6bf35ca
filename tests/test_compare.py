"""`vqkit compare` on runs logged straight to a sqlite store (no training): run-id prefixes
and names, sorting by a metric's direction, output formats, unknown metrics, counter totals,
params that never differ, sweep parents, and the --plot / --grid images."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from PIL import Image

from vqkit.cli import main
from vqkit.commands.compare import metric_direction
from vqkit.tracking import Tracker
from vqkit.train.trainer import save_recon_grid

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template, closed_port


def log_run(store, tmp_path, name, params, history, experiment="cmp", tags=None, images=()):
    """A finished run with ``params`` and metric ``history`` {key: [(step, value)]}."""
    t = Tracker(store, experiment, name, stderr=io.StringIO())
    run_id = t.start()
    t.attach(tmp_path / "runs" / name.replace(" ", "_"))
    t.log_params(params)
    if tags:
        t.set_tags(tags)
    for key, points in history.items():
        for step, value in points:
            t.log_metrics({key: value}, step=step)
    for step, seed in images:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
        path = save_recon_grid(x, x.flip(0), tmp_path / "img" / name / f"recon_{step:06d}.png")
        t.log_image_grid(path, "reconstructions", step)
    assert t.finish()
    return run_id


@pytest.fixture
def runs(tmp_path, store):
    """Three runs differing in reset policy and K, plus params that must not show."""
    ids = {}
    for name, reset, k, psnr, lpips, resets in (
        ("reset=none K=256", "none", 256, 20.0, 0.30, [0.0, 0.0]),
        ("reset=jukebox K=256", "jukebox", 256, 22.0, 0.25, [3.0, 2.0]),
        ("reset=jukebox K=1024", "jukebox", 1024, 21.0, 0.20, [5.0, 4.0]),
    ):
        params = {"reset.name": reset, "quantizer.params.codebook_size": k, "seed": 0,
                  "reset.params": "{}" if reset == "none" else "x", "tracking.run_name": name,
                  "tracking.description": f"about {name}"}
        if reset != "none":
            params.pop("reset.params")
            params["reset.params.threshold"] = 1.0
        ids[name] = log_run(store, tmp_path, name, params, {
            "eval/psnr": [(1, psnr - 2), (2, psnr)], "eval/lpips": [(2, lpips)],
            "codebook/resets": [(1, resets[0]), (2, resets[1])]}, images=[(2, 7)])
    return ids


def test_metric_direction():
    assert [metric_direction(m) for m in ("eval/psnr", "eval/ssim", "codebook/usage", "codebook/perplexity")] == \
        ["max"] * 4
    assert [metric_direction(m) for m in ("eval/lpips", "loss/total", "codebook/dead", "time/step_s")] == \
        ["min"] * 4


def test_prefixes_names_and_errors(runs, store, capsys):
    a, b = runs["reset=none K=256"], runs["reset=jukebox K=1024"]
    assert main(["compare", a[:6], "reset=jukebox K=1024", "--tracking-uri", store, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in rows] == [a, b]
    # params that name or describe runs, or are empty blocks, never show as differences
    assert set(rows[0]["params"]) == {"reset.name", "quantizer.params.codebook_size", "reset.params.threshold"}
    assert rows[0]["params"]["reset.params.threshold"] is None
    assert rows[1]["metrics"]["codebook/resets (total)"] == 9.0  # a counter is summed over the run
    assert rows[1]["metrics"]["eval/psnr"] == 21.0
    # unknown prefix or name: located error with suggestions; an ambiguous name lists its runs
    assert main(["compare", "reset=jukebox K=102", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqkit: error: no MLflow run with id, id prefix or name 'reset=jukebox K=102'")
    assert "did you mean 'reset=jukebox K=1024'?" in err
    log_run(store, store_dir(store), "reset=none K=256", {"seed": 1}, {})
    assert main(["compare", "reset=none K=256", "--tracking-uri", store]) == 2
    err = capsys.readouterr().err
    assert "'reset=none K=256' matches 2 runs" in err and a[:8] in err
    assert main(["compare", "--experiment", "cpm", "--tracking-uri", store]) == 2
    assert "did you mean 'cmp'?" in capsys.readouterr().err


def store_dir(store):
    from pathlib import Path

    return Path(store[len("sqlite:///"):]).parent


def test_sort_formats_and_unknown_metrics(runs, store, capsys):
    base = ["compare", "--experiment", "cmp", "--tracking-uri", store]
    assert main([*base, "--sort", "eval/psnr", "--format", "csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0][:3] == ["run", "id", "status"]  # csv: one row per run
    assert [r[0] for r in table[1:]] == ["reset=jukebox K=256", "reset=jukebox K=1024", "reset=none K=256"]
    assert main([*base, "--sort", "eval/lpips", "--format", "markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    # three runs: one column per run, best (lowest LPIPS) first
    assert md[1].startswith("|---|") and md[0].split(" | ")[1].startswith("reset=jukebox K=1024")
    assert main([*base, "--sort", "eval/lpips", "--reverse", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("reset=none K=256,")
    # three runs as a text table: one column per run; the counter's total is labelled
    assert main([*base, "--metrics", "eval/psnr,codebook/resets"]) == 0
    out = capsys.readouterr().out
    assert "reset=none K=256" in out.splitlines()[0] and out.splitlines()[2].startswith("status")
    assert "codebook/resets (total)" in out and "{}" not in out and "tracking.run_name" not in out
    # unknown metrics are errors with a suggestion, every one at once
    assert main([*base, "--sort", "eval/psrn", "--metrics", "eval/psnr,eval/ssmi"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "--metrics: no run has a metric 'eval/ssmi'" in err[0] and "valid: codebook/resets" in err[0]
    assert "--sort: no run has a metric 'eval/psrn' (did you mean 'eval/psnr'?" in err[1]


def test_many_runs_are_rows_and_a_sweep_parent_stands_for_its_children(tmp_path, store, capsys):
    parent = log_run(store, tmp_path, "study sweep K", {"sweep.children": 4}, {},
                     tags={"vqkit.sweep.role": "parent"})
    for k in (16, 32, 64, 128):
        log_run(store, tmp_path, f"K={k}", {"quantizer.params.codebook_size": k},
                {"eval/psnr": [(1, 10.0 + k / 100)]}, tags={"mlflow.parentRunId": parent})
    assert main(["compare", parent[:8], "--tracking-uri", store, "--sort", "eval/psnr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["run", "id", "status", "quantizer.params.codebook_size"]
    assert [line.split()[0] for line in lines[2:]] == ["K=128", "K=64", "K=32", "K=16"]
    # --experiment leaves the parent out
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", store, "--format", "json"]) == 0
    assert sorted(r["run_name"] for r in json.loads(capsys.readouterr().out)) == ["K=128", "K=16", "K=32", "K=64"]


def test_plot_and_grid_images(runs, store, tmp_path, capsys):
    plot, grid = tmp_path / "out" / "plot.png", tmp_path / "out" / "grid.png"
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", store, "--sort", "eval/psnr",
                 "--plot", str(plot), "--grid", str(grid)]) == 0
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.width > 500
    with Image.open(grid) as im:
        sheet = im.convert("RGB")
    # the test images, then one labelled row per run (same size as the originals' row)
    with Image.open(next((tmp_path / "img").glob("*/recon_000002.png"))) as one:
        half = one.height // 2
    assert sheet.height == 4 * half
    # each run's row holds its reconstructions: the flipped originals, pasted right of the labels
    label_w = sheet.width - one.width
    originals = sheet.crop((label_w, 0, sheet.width, half))
    row = sheet.crop((label_w, half, sheet.width, 2 * half))
    assert originals.tobytes() != row.tobytes()
    assert sheet.crop((0, half, label_w, 2 * half)).getextrema() != ((255, 255),) * 3  # a label is drawn
    # a run without reconstruction images: a clear error
    log_run(store, tmp_path, "no images", {"seed": 5}, {"eval/psnr": [(1, 1.0)]})
    assert main(["compare", "no images", "--tracking-uri", store, "--grid", str(grid)]) == 2
    assert "no reconstruction images" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["compare", "deadbeef"],
    ["compare", "--experiment", "sweep-demo"],
    ["compare", "deadbeef", "--tracking-uri", "mlruns"],
    ["eval", "deadbeef", "--no-log"],
    ["eval", "deadbeef"],
    ["sample", "deadbeef", "-o", "x.png"],
    ["ui", "--print"],
])
def test_read_only_commands_never_create_a_store(argv, tmp_path, monkeypatch, capsys):
    """A lookup in a folder with no store is one `vqkit: error:` line (exit 2) and leaves the
    folder empty: no mlflow.db, no lock file, no mlruns/ (they were created before)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqkit: error: ") and "store" in err[0], err
    assert sorted(p.name for p in empty.iterdir()) == []


def test_image_grids_leave_mlflow_images_folder_to_log_image(tmp_path, store):
    """MLflow's UI parses every file directly in images/ as a log_image file (key+step+N+
    timestamp+T+uuid[+compressed].ext); one other file hides all of the run's images. A grid
    logged by the tracker goes to grids/ by name and to images/ only through log_image."""
    from mlflow import MlflowClient

    run_id = log_run(store, tmp_path, "grid run", {"seed": 0}, {"eval/psnr": [(5, 1.0)]}, images=[(5, 1)])
    client = MlflowClient(store)
    assert [a.path for a in client.list_artifacts(run_id, "grids")] == ["grids/recon_000005.png"]
    names = [a.path.split("/", 1)[1] for a in client.list_artifacts(run_id, "images")]
    assert names and all(n.startswith("reconstructions+step+5+timestamp+") for n in names), names
    assert client.get_run(run_id).data.tags.get("mlflow.loggedImages")
