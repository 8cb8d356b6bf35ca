"""Code-book telemetry: usage, perplexity and dead codes over a fixed window of samples.

:class:`CodebookMonitor` keeps the last ``window`` code assignments (samples, not steps)
in a ring buffer, so every number it reports is independent of the batch size and of
the number of processes: a step with 2 x 64 x 8 x 8 assignments fills the window
exactly as 4 steps with 64 x 8 x 8 would.

Metrics returned by :meth:`CodebookMonitor.metrics` (the trainer logs them to MLflow):

``codebook/usage``
    fraction of the ``K`` codes with at least one assignment in the window, in ``[0, 1]``;
``codebook/perplexity``
    ``exp(H)`` of the empirical code distribution in the window, in ``[1, K]``
    (``0.0`` before any assignment);
``codebook/dead``
    number of codes with no assignment in the window;
``codebook/resets``
    codes reset (by a reset policy) since the previous :meth:`~CodebookMonitor.metrics` call.

At the end of a run :meth:`CodebookMonitor.save_plots` writes a usage histogram and a
usage-over-time plot (PNG, matplotlib's Agg canvas; the global pyplot backend is not
touched).
"""
from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["HIST_PNG", "OVER_TIME_PNG", "CodebookMonitor"]

#: File names written by :meth:`CodebookMonitor.save_plots`.
HIST_PNG = "codebook_usage_hist.png"
OVER_TIME_PNG = "codebook_usage_over_time.png"

_HISTORY_KEYS = ("step", "usage", "perplexity", "dead", "resets")


class CodebookMonitor:
    """Code-usage statistics over the most recent ``window`` assignments.

    Args:
        codebook_size: number of codes ``K``.
        window: number of most recent assignments (samples) over which usage, perplexity
            and dead codes are computed.
    """

    def __init__(self, codebook_size: int, window: int = 65536):
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.codebook_size = int(codebook_size)
        self.window = int(window)
        self._ring = torch.zeros(self.window, dtype=torch.int64)  # last assignments
        self._pos = 0  # next slot to write
        self._filled = 0  # valid slots
        self._counts = torch.zeros(self.codebook_size, dtype=torch.int64)  # counts in window
        self._pending_resets = 0
        self.history: dict[str, list[float]] = {k: [] for k in _HISTORY_KEYS}
        #: (step, number of codes) of every reset, in order
        self.reset_events: list[tuple[int, int]] = []
        #: the reset policy's declared stats, as last recorded (logged as ``reset/<stat>``)
        self.policy_stats: dict[str, float] = {}

    # ------------------------------------------------------------------ updates
    def update(self, indices: torch.Tensor) -> None:
        """Add this step's assignments: int64 tensor of any shape, values in ``[0, K)``."""
        flat = indices.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
        if flat.numel() == 0:
            return
        if int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size:
            raise ValueError(
                f"code indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(flat.min())}, {int(flat.max())}]"
            )
        if flat.numel() >= self.window:  # only the most recent `window` survive
            flat = flat[-self.window:]
            self._ring.copy_(flat)
            self._pos = 0
            self._filled = self.window
            self._counts = torch.bincount(flat, minlength=self.codebook_size)
            return
        n = flat.numel()
        slots = (torch.arange(n) + self._pos) % self.window
        overwritten = max(0, self._filled + n - self.window)
        if overwritten:
            # the ring fills without wrapping until full, so the free slots come first and
            # the last `overwritten` slots held the oldest valid assignments
            old = self._ring[slots[n - overwritten:]]
            self._counts -= torch.bincount(old, minlength=self.codebook_size)
        self._ring[slots] = flat
        self._counts += torch.bincount(flat, minlength=self.codebook_size)
        self._pos = (self._pos + n) % self.window
        self._filled = min(self.window, self._filled + n)

    def record_stats(self, stats: Mapping[str, float]) -> None:
        """Keep the reset policy's declared stats (``policy.stats()``), the latest values."""
        self.policy_stats = {str(k): float(v) for k, v in stats.items()}

    def record_reset(self, step: int, n: int) -> None:
        """Note that ``n`` codes were reset at ``step``."""
        if n <= 0:
            return
        self._pending_resets += int(n)
        self.reset_events.append((int(step), int(n)))

    # ------------------------------------------------------------------ queries
    def counts(self) -> torch.Tensor:
        """Assignments per code in the window: int64 ``(K,)`` (a copy)."""
        return self._counts.clone()

    def snapshot(self) -> dict[str, float]:
        """Usage, perplexity and dead codes of the current window (no side effects)."""
        total = int(self._counts.sum())
        used = int((self._counts > 0).sum())
        if total == 0:
            perplexity = 0.0
        else:
            p = self._counts[self._counts > 0].double() / total
            perplexity = float(math.exp(float(-(p * p.log()).sum())))
        return {
            "codebook/usage": used / self.codebook_size,
            "codebook/perplexity": perplexity,
            "codebook/dead": float(self.codebook_size - used),
            **{f"reset/{k}": v for k, v in self.policy_stats.items()},
        }

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics at ``step`` (see the module docstring); appends them to
        :attr:`history` and clears the reset count reported."""
        out = self.snapshot()
        out["codebook/resets"] = float(self._pending_resets)
        self._pending_resets = 0
        self.history["step"].append(float(step))
        self.history["usage"].append(out["codebook/usage"])
        self.history["perplexity"].append(out["codebook/perplexity"])
        self.history["dead"].append(out["codebook/dead"])
        self.history["resets"].append(out["codebook/resets"])
        return out

    # ------------------------------------------------------------------ plots
    def save_plots(self, out_dir: pathlib.Path | str) -> list[pathlib.Path]:
        """Write ``out_dir/codebook_usage_hist.png`` (assignments per code in the window,
        codes sorted by count, and the distribution of counts) and
        ``out_dir/codebook_usage_over_time.png`` (usage and normalized perplexity at
        every :meth:`metrics` call, resets marked). Returns the two paths."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        k = self.codebook_size
        counts = self._counts.double()

        fig = Figure(figsize=(10, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2)
        ranked = torch.sort(counts, descending=True).values
        ax1.bar(range(k), ranked.numpy(), width=1.0, color="tab:blue")
        ax1.set_yscale("symlog", linthresh=1.0)
        ax1.set_xlabel("code (sorted by assignments)")
        ax1.set_ylabel(f"assignments in last {self._filled} samples")
        snap = self.snapshot()
        ax1.set_title(
            f"usage {100 * snap['codebook/usage']:.1f}%, dead {int(snap['codebook/dead'])}/{k}, "
            f"perplexity {snap['codebook/perplexity']:.1f}"
        )
        bins = min(50, max(1, int(counts.max().item()) + 1)) if counts.numel() else 1
        ax2.hist(counts.numpy(), bins=bins, color="tab:orange")
        ax2.set_xlabel("assignments per code")
        ax2.set_ylabel("number of codes")
        ax2.set_title("distribution of code counts")
        fig.tight_layout()
        hist_path = out / HIST_PNG
        fig.savefig(hist_path)

        fig = Figure(figsize=(8, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        steps = self.history["step"]
        ax.plot(steps, self.history["usage"], label="usage (fraction of codes used)")
        ax.plot(
            steps,
            [p / k for p in self.history["perplexity"]],
            label="perplexity / K",
        )
        for i, (s, _n) in enumerate(self.reset_events):
            ax.axvline(s, color="tab:red", alpha=0.25, lw=0.8, label="reset" if i == 0 else None)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("step")
        ax.set_title(f"code-book usage over time (K={k}, window {self.window} samples)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        time_path = out / OVER_TIME_PNG
        fig.savefig(time_path)
        return [hist_path, time_path]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "codebook_size": self.codebook_size,
            "window": self.window,
            "ring": self._ring.clone(),
            "pos": self._pos,
            "filled": self._filled,
            "counts": self._counts.clone(),
            "pending_resets": self._pending_resets,
            "history": {k: list(v) for k, v in self.history.items()},
            "reset_events": [list(e) for e in self.reset_events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["codebook_size"]) != self.codebook_size or int(state["window"]) != self.window:
            raise ValueError(
                f"monitor state is for K={state['codebook_size']}, window={state['window']}; "
                f"this monitor has K={self.codebook_size}, window={self.window}"
            )
        self._ring = state["ring"].clone().to(torch.int64)
        self._pos = int(state["pos"])
        self._filled = int(state["filled"])
        self._counts = state["counts"].clone().to(torch.int64)
        self._pending_resets = int(state["pending_resets"])
        self.history = {k: [float(x) for x in state["history"][k]] for k in _HISTORY_KEYS}
        self.reset_events = [(int(s), int(n)) for s, n in state["reset_events"]]


# --------------------------------------------------------------------------- several code-books
def stage_counts(indices: torch.Tensor, codebook_size: int, num_codebooks: int = 1) -> torch.Tensor:
    """Assignments per code of each code-book: float64 ``(S, K)`` from indices ``(B, h, w)``
    (``S = 1``) or ``(B, S, h, w)`` (a multi-code-book quantizer)."""
    idx = indices.detach().to("cpu", torch.int64)
    if num_codebooks == 1 and idx.dim() != 4:
        idx = idx.unsqueeze(1)
    per = idx.movedim(1, 0).reshape(num_codebooks, -1)
    return torch.stack([torch.bincount(row, minlength=codebook_size) for row in per]).double()


def usage_and_perplexity(counts: torch.Tensor) -> tuple[float, float] | None:
    """Fraction of codes used and ``exp(H)`` of the code distribution, each averaged over
    the code-books of ``counts`` ``(S, K)``; ``None`` before any assignment."""
    if float(counts.sum()) == 0:
        return None
    usage, perplexity = [], []
    for row in counts.double():
        used = row[row > 0]
        usage.append(used.numel() / row.numel())
        p = used / used.sum() if used.numel() else used
        perplexity.append(float(torch.exp(-(p * p.log()).sum())) if used.numel() else 0.0)
    return sum(usage) / len(usage), sum(perplexity) / len(perplexity)


class StagedMonitor:
    """The monitors of a multi-code-book quantizer, one per code-book, as one monitor.

    :meth:`metrics` and :meth:`snapshot` return the ``codebook/*`` keys of
    :class:`CodebookMonitor` aggregated over code-books (``usage`` and ``perplexity``
    averaged, ``dead`` and ``resets`` summed) and each code-book's own values as
    ``codebook/<s>/<metric>``; each code-book's reset policy's stats as ``reset/<s>/<stat>``,
    or, with one policy shared by all code-books, as ``reset/<stat>`` (:meth:`record_stats`).
    :meth:`save_plots` writes each code-book's two plots with a ``_<s>`` suffix. The
    monitors' state is kept by their managers.
    """

    _SUMMED = ("codebook/dead", "codebook/resets")

    def __init__(self, monitors: list[CodebookMonitor]):
        if not monitors:
            raise ValueError("StagedMonitor needs at least one monitor")
        self.monitors = list(monitors)
        self.codebook_size = self.monitors[0].codebook_size
        #: the stats of one reset policy shared by all code-books (``reset/<stat>``)
        self.policy_stats: dict[str, float] = {}

    def record_stats(self, stats: Mapping[str, float]) -> None:
        """Keep the shared reset policy's declared stats, the latest values."""
        self.policy_stats = {str(k): float(v) for k, v in stats.items()}

    def _combine(self, per: list[dict[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in per[0]:
            if key.startswith("codebook/"):
                values = [m[key] for m in per]
                out[key] = float(sum(values)) if key in self._SUMMED else float(sum(values) / len(values))
        for s, m in enumerate(per):
            for key, value in m.items():
                block, _, rest = key.partition("/")
                out[f"{block}/{s}/{rest}"] = value
        out.update({f"reset/{k}": v for k, v in self.policy_stats.items()})
        return out

    def snapshot(self) -> dict[str, float]:
        return self._combine([m.snapshot() for m in self.monitors])

    def metrics(self, step: int) -> dict[str, float]:
        return self._combine([m.metrics(step) for m in self.monitors])

    def save_plots(self, out_dir: pathlib.Path | str) -> list[pathlib.Path]:
        out = pathlib.Path(out_dir)
        paths = []
        for s, monitor in enumerate(self.monitors):
            for path in monitor.save_plots(out / f".stage{s}"):
                target = out / f"{path.stem}_{s}{path.suffix}"
                path.replace(target)
                paths.append(target)
            (out / f".stage{s}").rmdir()
        return paths
