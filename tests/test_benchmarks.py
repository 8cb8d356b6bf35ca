"""The benchmark scripts that docs/performance.md cites still run and report what the docs
read from them (tiny sizes: this checks the scripts, not the speed)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:  # onednn_tiles imports its sibling quantizer.py
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quantizer_point_reports_bound_rates_and_a_passing_check(capsys):
    q = _load("quantizer")
    res = q.bench_point(64, 16, 512, 0.25, 1, torch.device("cpu"), with_vqp=False, peak_flops=None)
    q.print_point(res, markdown=True)
    out = capsys.readouterr().out
    assert "2048^3 torch.mm" in out
    if q.onednn_linear_works():
        assert res["onednn_peak"] > 0 and "oneDNN's fp32 matmul" in out
    methods = {(r["ema"], r["method"]) for r in res["rows"]}
    assert {(False, "vqkit"), (True, "vqkit"), (False, "cdist"), (True, "taming")} <= methods
    assert "check OK" in out


def test_breakdown_splits_a_step_and_handles_small_latents(capsys):
    b = _load("quantizer_breakdown")
    b.main(["--k", "32", "--d", "16", "--images", "2", "--repeats", "1", "--threads", "1"])
    big = capsys.readouterr().out
    assert "tile GEMMs" in big and "argmax" in big and "step at" in big
    b.main(["--k", "32", "--d", "16", "--images", "2", "--size", "4", "--repeats", "1", "--threads", "1"])
    small = capsys.readouterr().out
    assert "searched as flattened rows" in small and "tile GEMMs" not in small and "step at" in small


def test_onednn_tiles_gives_vqkits_indices(capsys):
    t = _load("onednn_tiles")
    if not t.onednn_linear_works():
        pytest.skip("this torch build has no oneDNN packed linear")  # the pinned CPU wheel has it
    t.main(["--k", "64", "--d", "16", "--images", "2", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "same indices: True" in out
    assert "oneDNN forward" in out and "2048^3 bf16 torch.mm" in out
