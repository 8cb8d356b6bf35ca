"""CodebookMonitor: usage, perplexity and dead codes over a window of samples; plots; state."""
from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from vqkit.telemetry import HIST_PNG, OVER_TIME_PNG, CodebookMonitor


def _reference(history: list[int], k: int, window: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(history[-window:], dtype=torch.int64), minlength=k)


def test_uniform_and_single_code_extremes():
    m = CodebookMonitor(16, window=64)
    m.update(torch.arange(64) % 16)
    out = m.metrics(0)
    assert out["codebook/usage"] == 1.0
    assert out["codebook/dead"] == 0.0
    assert out["codebook/perplexity"] == pytest.approx(16.0)
    m.update(torch.full((64,), 3))  # the whole window is now code 3
    out = m.metrics(1)
    assert out["codebook/usage"] == 1 / 16
    assert out["codebook/dead"] == 15.0
    assert out["codebook/perplexity"] == pytest.approx(1.0)


def test_perplexity_is_exp_entropy_of_window():
    m = CodebookMonitor(4, window=100)
    m.update(torch.tensor([0] * 50 + [1] * 25 + [2] * 25))
    p = torch.tensor([0.5, 0.25, 0.25])
    assert m.metrics(0)["codebook/perplexity"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert m.metrics(0)["codebook/dead"] == 1.0


def test_empty_window():
    out = CodebookMonitor(8).metrics(0)
    assert out == {"codebook/usage": 0.0, "codebook/perplexity": 0.0, "codebook/dead": 8.0, "codebook/resets": 0.0}


def test_sliding_window_matches_reference_for_any_batch_sizes():
    k, window = 37, 500
    gen = torch.Generator().manual_seed(0)
    m = CodebookMonitor(k, window=window)
    history: list[int] = []
    for size in [1, 7, 300, 199, 2, 499, 500, 1200, 3, 64, 64, 64]:
        batch = torch.randint(0, k, (size,), generator=gen)
        m.update(batch.reshape(-1, 1) if size % 2 else batch)  # any shape
        history += batch.tolist()
        assert torch.equal(m.counts(), _reference(history, k, window)), f"after a batch of {size}"


def test_metrics_do_not_depend_on_batch_size():
    gen = torch.Generator().manual_seed(1)
    stream = torch.randint(0, 64, (8192,), generator=gen)
    big, small = CodebookMonitor(64, window=4096), CodebookMonitor(64, window=4096)
    for chunk in stream.split(2048):
        big.update(chunk)
    for chunk in stream.split(100):
        small.update(chunk)
    assert big.metrics(0) == small.metrics(0)


def test_resets_reported_once_and_recorded():
    m = CodebookMonitor(8)
    m.update(torch.arange(8))
    m.record_reset(10, 3)
    m.record_reset(20, 2)
    m.record_reset(25, 0)
    assert m.metrics(20)["codebook/resets"] == 5.0
    assert m.metrics(30)["codebook/resets"] == 0.0
    assert m.reset_events == [(10, 3), (20, 2)]
    assert m.history["step"] == [20.0, 30.0] and m.history["resets"] == [5.0, 0.0]


def test_rejects_out_of_range_indices():
    m = CodebookMonitor(8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        m.update(torch.tensor([0, 8]))
    with pytest.raises(ValueError):
        m.update(torch.tensor([-1]))


def test_state_roundtrip_through_safe_checkpoint():
    gen = torch.Generator().manual_seed(2)
    a = CodebookMonitor(32, window=300)
    for _ in range(5):
        a.update(torch.randint(0, 32, (128,), generator=gen))
    a.record_reset(3, 4)
    a.metrics(4)
    a.record_reset(5, 1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = CodebookMonitor(32, window=300)
    b.load_state_dict(torch.load(buf, weights_only=True))
    more = torch.randint(0, 32, (77,), generator=gen)
    a.update(more)
    b.update(more)
    assert a.metrics(6) == b.metrics(6)
    assert a.history == b.history and a.reset_events == b.reset_events
    with pytest.raises(ValueError, match="window"):
        CodebookMonitor(32, window=10).load_state_dict(a.state_dict())


def test_save_plots_writes_two_pngs(tmp_path):
    m = CodebookMonitor(64, window=1000)
    gen = torch.Generator().manual_seed(3)
    for step in range(10):
        m.update(torch.randint(0, 8 + 5 * step, (200,), generator=gen))
        if step == 4:
            m.record_reset(step, 10)
        m.metrics(step)
    paths = m.save_plots(tmp_path / "plots")
    assert [p.name for p in paths] == [HIST_PNG, OVER_TIME_PNG]
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 300
