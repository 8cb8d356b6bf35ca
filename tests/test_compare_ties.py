"""Runs with equal results: `vqkit compare --plot` keeps every run's line visible (a line drawn
exactly over another gets its own line style and markers), and ties are sorted the same way
everywhere (by value, then run name, then id), whatever order the runs come in."""
from __future__ import annotations

import csv
import io

from vqkit.cli import main
from vqkit.commands.compare import plot_metrics, runs_table
from vqkit.tracking import Tracker, search_runs

pytest_plugins = ("trainkit",)  # fixtures: store, mlflow_template


def log_run(store, tmp_path, name, psnr):
    t = Tracker(store, "ties", name, stderr=io.StringIO())
    run_id = t.start()
    t.attach(tmp_path / "runs" / name.replace(" ", "_"))
    t.log_params({"reset.name": name.split()[0]})
    for step, value in ((1, psnr - 1), (2, psnr)):
        t.log_metrics({"eval/psnr": value}, step=step)
    assert t.finish()
    return run_id


def test_ties_sort_by_name_and_identical_lines_stay_visible(store, tmp_path, capsys, monkeypatch):
    for name, psnr in (("a none", 13.5), ("c split", 13.5), ("b random", 14.0), ("d kmeans", 13.5)):
        log_run(store, tmp_path, name, psnr)
    assert main(["compare", "--experiment", "ties", "--tracking-uri", store, "--sort", "eval/psnr",
                 "--format", "csv"]) == 0
    order = [row["run"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))]
    assert order == ["b random", "a none", "c split", "d kmeans"]
    runs = search_runs(store, "ties")
    for given in (runs, runs[::-1]):  # the sweep summary's order and compare's: the same table
        assert [r["run_name"] for r in runs_table(store, given, ["eval/psnr"], sort="eval/psnr").runs] == order

    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot_metrics(store, runs, ["eval/psnr"], tmp_path / "plot.png")
    (fig,) = figures
    lines = fig.axes[0].get_lines()
    assert len(lines) == 4
    styles = {(line.get_linestyle(), line.get_marker()) for line in lines}
    assert len(styles) == 4, styles  # three identical curves, each drawn differently
