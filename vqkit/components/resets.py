"""Code-book reset policies: ``none``, ``random``, ``jukebox`` and ``kmeans``.

A policy watches the encoder outputs ``z`` float ``(N, D)`` (in the quantizer's code space,
``Quantizer.to_code_space``: unit vectors for cosine codes) and their code indices int64
``(N,)`` through :meth:`~vqkit.interfaces.CodebookResetPolicy.observe` (every step, the
data of all ranks) and, when the trainer asks (every ``reset.every`` steps), returns a
:class:`~vqkit.interfaces.ResetPlan` naming dead codes and the vectors, in encoder-output
space, that replace them. Policies never touch the quantizer: the trainer's
:class:`~vqkit.train.codebook.CodebookManager` applies the plan and resets the state that
depends on the replaced codes (the quantizer's EMA statistics, optimizer moments).

Guarantees of the built-in policies:

* only codes the policy considers dead are in a plan;
* the vectors of one plan are pairwise distinct (candidates are de-duplicated first, and
  drawn without replacement; when there are fewer distinct candidates than dead codes,
  only that many codes are reset);
* the policy's own usage statistics for the replaced codes are reset, so a fresh code is
  not declared dead again before it had a chance;
* all randomness comes from the policy's own ``torch.Generator`` (seeded from the
  ``seed`` context argument), and :meth:`state_dict` holds it with every buffer and
  counter, so a restored policy makes exactly the plans the original would have.

``state_dict()`` holds tensors and plain Python only (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from vqkit import hookimpl
from vqkit.interfaces import CodebookResetPolicy, Params, ResetPlan

__all__ = ["JukeboxReset", "KMeansReset", "NoReset", "RandomReset", "distinct_rows"]


# =========================================================================== helpers
def distinct_rows(x: torch.Tensor) -> torch.Tensor:
    """The distinct rows of ``x`` ``(N, D)``, in a deterministic (sorted) order."""
    if x.shape[0] <= 1:
        return x
    return torch.unique(x, dim=0)


def _choose(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct positions out of ``n``, uniformly at random (int64 CPU ``(k,)``)."""
    return torch.randperm(n, generator=gen)[:k]


def _noisy(vectors: torch.Tensor, scale: torch.Tensor | float, noise: float, gen: torch.Generator) -> torch.Tensor:
    """``vectors + noise * scale * N(0, 1)``; the noise is drawn on the CPU generator."""
    if noise <= 0 or vectors.numel() == 0:
        return vectors
    eps = torch.randn(vectors.shape, generator=gen, dtype=torch.float32).to(vectors.device, vectors.dtype)
    return vectors + noise * scale * eps


def _drop_duplicates(indices: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first of any codes that ended up with identical vectors."""
    if vectors.shape[0] <= 1:
        return indices, vectors
    _, inverse = torch.unique(vectors, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), vectors.shape[0], dtype=torch.int64, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(vectors.shape[0], device=inverse.device), reduce="amin")
    keep = torch.sort(first).values
    return indices[keep.to(indices.device)], vectors[keep.to(vectors.device)]


def _finish(
    codebook: torch.Tensor, indices: torch.Tensor, vectors: torch.Tensor
) -> ResetPlan | None:
    """A plan on the code-book's device and dtype (``None`` when empty), sorted by index."""
    if indices.numel() == 0:
        return None
    indices = indices.to(device=codebook.device, dtype=torch.int64)
    vectors = vectors.to(device=codebook.device, dtype=codebook.dtype)
    indices, vectors = _drop_duplicates(indices, vectors)
    order = torch.argsort(indices)
    return ResetPlan(indices[order].contiguous(), vectors[order].contiguous())


class _SampleBuffer:
    """Ring buffer of the most recent encoder outputs ``(size, D)`` float32.

    A batch larger than the buffer contributes a random subset of its rows (drawn with
    the policy's generator). Storage is allocated on the device of the first batch.
    """

    def __init__(self, size: int, dim: int):
        self.size = size
        self.dim = dim
        self.data: torch.Tensor | None = None
        self.pos = 0
        self.filled = 0

    def add(self, z: torch.Tensor, gen: torch.Generator) -> None:
        z = z.detach().to(torch.float32)
        if self.data is None:
            self.data = torch.zeros(self.size, self.dim, dtype=torch.float32, device=z.device)
        if z.shape[0] > self.size:
            z = z[_choose(z.shape[0], self.size, gen).to(z.device)]
        n = z.shape[0]
        slots = (torch.arange(n, device=self.data.device) + self.pos) % self.size
        self.data[slots] = z.to(self.data.device)
        self.pos = (self.pos + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def rows(self) -> torch.Tensor:
        if self.data is None:
            return torch.zeros(0, self.dim)
        return self.data[: self.filled]

    def state_dict(self) -> dict[str, Any]:
        return {
            "data": None if self.data is None else self.data.clone(),
            "pos": self.pos,
            "filled": self.filled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        data = state["data"]
        if data is not None and tuple(data.shape) != (self.size, self.dim):
            raise ValueError(
                f"buffer state has shape {tuple(data.shape)}, expected ({self.size}, {self.dim}); "
                "was it saved with another buffer_size or latent dimension?"
            )
        self.data = None if data is None else data.clone()
        self.pos = int(state["pos"])
        self.filled = int(state["filled"])


class _SeededPolicy(CodebookResetPolicy):
    """Shared construction, generator and state handling of the built-in policies."""

    def __init__(self, params: Params | None = None, *, codebook_size: int, dim: int, seed: int = 0):
        self.params = params if params is not None else self.Params()
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _check_batch(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim or indices.shape != (z.shape[0],):
            raise ValueError(
                f"{type(self).__name__}.observe expects z (N, {self.dim}) and indices (N,), "
                f"got {tuple(z.shape)} and {tuple(indices.shape)}"
            )

    def _counts(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.bincount(indices.detach().reshape(-1).cpu(), minlength=self.codebook_size).to(torch.float64)

    def _pick_dead(self, dead: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` of the dead codes ``dead`` (int64 ``(m,)``, ``n <= m``), at random."""
        if n >= dead.numel():
            return dead
        return dead[_choose(dead.numel(), n, self.generator)]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"].clone())


# =========================================================================== none
class NoReset(CodebookResetPolicy):
    """Never reset codes."""

    #: tells the contract suite (:mod:`vqkit.testing.reset_contracts`) to expect no plans
    never_resets = True

    def __init__(self, params: Params | None = None, *, codebook_size: int = 0, dim: int = 0, seed: int = 0):
        self.params = params or self.Params()

    def plan(self, codebook, step) -> ResetPlan | None:
        return None


class _CountThresholdParams(Params):
    threshold: float = Field(
        1.0, ge=0, description="a code with fewer assignments than this since the previous "
        "reset check is dead (counted over all ranks)"
    )


# =========================================================================== random
class RandomReset(_SeededPolicy):
    """Re-draw dead codes from random encoder outputs of the latest batch."""

    class Params(_CountThresholdParams):
        noise: float = Field(
            0.01, ge=0, description="std of the Gaussian noise added to each drawn encoder output, "
            "as a fraction of the per-dimension std of the batch"
        )

    def __init__(self, params: Params | None = None, *, codebook_size: int, dim: int, seed: int = 0):
        super().__init__(params, codebook_size=codebook_size, dim=dim, seed=seed)
        self.counts = torch.zeros(self.codebook_size, dtype=torch.float64)
        self.observed = 0  # batches since the previous plan
        self.latest: torch.Tensor | None = None  # (N, D) float32, the latest batch

    def observe(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        self._check_batch(z, indices)
        self.counts += self._counts(indices)
        self.observed += 1
        self.latest = z.detach().to(torch.float32).clone()

    def plan(self, codebook: torch.Tensor, step: int) -> ResetPlan | None:
        if self.observed == 0 or self.latest is None:
            return None  # nothing seen since the last check: no evidence that a code is dead
        dead = torch.nonzero(self.counts < self.params.threshold).flatten()
        self.counts.zero_()
        self.observed = 0
        if dead.numel() == 0:
            return None
        candidates = distinct_rows(self.latest)
        n = min(dead.numel(), candidates.shape[0])
        codes = self._pick_dead(dead, n)
        drawn = candidates[_choose(candidates.shape[0], n, self.generator).to(candidates.device)]
        scale = self.latest.std(dim=0) if self.latest.shape[0] > 1 else 0.0
        vectors = _noisy(drawn, scale, self.params.noise, self.generator)
        return _finish(codebook, codes, vectors)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "counts": self.counts.clone(),
            "observed": self.observed,
            "latest": None if self.latest is None else self.latest.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.counts = state["counts"].clone().to(torch.float64)
        self.observed = int(state["observed"])
        self.latest = None if state["latest"] is None else state["latest"].clone()


# =========================================================================== jukebox
class JukeboxReset(_SeededPolicy):
    """Replace codes whose EMA usage fell below a threshold by recent encoder outputs (Jukebox)."""

    class Params(Params):
        decay: float = Field(
            0.99, gt=0, lt=1, description="decay of the exponential moving average of each code's "
            "assignments per step (bias-corrected)"
        )
        threshold: float = Field(
            1.0, ge=0, description="a code whose average assignments per step (over all ranks) is "
            "below this is dead"
        )
        buffer_size: int = Field(
            16384, ge=1, description="recent encoder outputs kept as replacement candidates"
        )
        noise: float = Field(
            0.0, ge=0, description="std of the Gaussian noise added to each replacement, as a "
            "fraction of the per-dimension std of the buffer"
        )

    def __init__(self, params: Params | None = None, *, codebook_size: int, dim: int, seed: int = 0):
        super().__init__(params, codebook_size=codebook_size, dim=dim, seed=seed)
        self.usage = torch.zeros(self.codebook_size, dtype=torch.float64)  # EMA assignments/step
        self.steps = 0  # observed batches (for the bias correction)
        self.buffer = _SampleBuffer(self.params.buffer_size, self.dim)

    def observe(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        self._check_batch(z, indices)
        self.steps += 1
        # bias-corrected EMA: after the first batch usage equals its counts
        rate = (1.0 - self.params.decay) / (1.0 - self.params.decay ** self.steps)
        self.usage += (self._counts(indices) - self.usage) * rate
        self.buffer.add(z, self.generator)

    def plan(self, codebook: torch.Tensor, step: int) -> ResetPlan | None:
        if self.steps == 0:
            return None
        dead = torch.nonzero(self.usage < self.params.threshold).flatten()
        if dead.numel() == 0:
            return None
        rows = self.buffer.rows()
        candidates = distinct_rows(rows)
        n = min(dead.numel(), candidates.shape[0])
        if n == 0:
            return None
        codes = self._pick_dead(dead, n)
        drawn = candidates[_choose(candidates.shape[0], n, self.generator).to(candidates.device)]
        scale = rows.std(dim=0) if rows.shape[0] > 1 else 0.0
        vectors = _noisy(drawn, scale, self.params.noise, self.generator)
        plan = _finish(codebook, codes, vectors)
        if plan is not None:  # fresh codes start at the threshold, not at their dead usage
            self.usage[plan.indices.cpu()] = self.params.threshold
        return plan

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "usage": self.usage.clone(),
            "steps": self.steps,
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.usage = state["usage"].clone().to(torch.float64)
        self.steps = int(state["steps"])
        self.buffer.load_state_dict(state["buffer"])


# =========================================================================== kmeans
def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(N, M)`` between rows of ``x`` and ``c`` (>= 0)."""
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return d.clamp_min_(0.0)


#: conditioned k-means++ draws its centres in at most this many rounds
SEED_ROUNDS = 32


def seed_given_centers(
    x: torch.Tensor, centers: torch.Tensor, n: int, gen: torch.Generator
) -> torch.Tensor:
    """k-means++ seeding of ``n`` new centres among the rows of ``x`` ``(N, D)`` (distinct
    rows, ``n <= N``), given existing ``centers`` ``(M, D)`` (``M`` may be 0): new centres
    are drawn with probability proportional to the squared distance of a row to its
    nearest centre so far, in at most :data:`SEED_ROUNDS` rounds (each round draws a batch
    without replacement, then updates the distances with one matrix product). Returns
    row positions int64 ``(n,)``, all different."""
    if centers.shape[0]:
        nearest = _sq_dist(x, centers).min(dim=1).values.double().cpu()
    else:
        nearest = torch.ones(x.shape[0], dtype=torch.float64)
    taken = torch.zeros(x.shape[0], dtype=torch.bool)
    chosen: list[torch.Tensor] = []
    have = 0
    rounds = min(n, SEED_ROUNDS)
    for r in range(rounds):
        m = -(-(n - have) // (rounds - r))  # ceil: spread what is left over the rounds left
        weights = torch.where(taken, torch.zeros_like(nearest), nearest)
        positive = int((weights > 0).sum())
        if positive < m or not bool(torch.isfinite(weights).all()):
            weights = (~taken).to(torch.float64)  # too few rows away from every centre
        pick = torch.multinomial(weights, m, replacement=False, generator=gen)
        chosen.append(pick)
        taken[pick] = True
        have += m
        if have < n:
            d = _sq_dist(x, x[pick.to(x.device)]).min(dim=1).values.double().cpu()
            nearest = torch.minimum(nearest, d)
    return torch.cat(chosen)


class KMeansReset(_SeededPolicy):
    """Re-fit dead codes with k-means over a buffer of recent encoder outputs."""

    class Params(_CountThresholdParams):
        buffer_size: int = Field(
            16384, ge=1, description="recent encoder outputs kept for the k-means fit"
        )
        iters: int = Field(10, ge=0, description="Lloyd iterations of the k-means fit")
        once: bool = Field(
            False, description="fit only at the first check that finds dead codes, then never "
            "again (use reset.start_step to choose when)"
        )

    def __init__(self, params: Params | None = None, *, codebook_size: int, dim: int, seed: int = 0):
        super().__init__(params, codebook_size=codebook_size, dim=dim, seed=seed)
        self.counts = torch.zeros(self.codebook_size, dtype=torch.float64)
        self.observed = 0
        self.fits = 0  # plans returned so far
        self.buffer = _SampleBuffer(self.params.buffer_size, self.dim)

    def observe(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        self._check_batch(z, indices)
        self.counts += self._counts(indices)
        self.observed += 1
        self.buffer.add(z, self.generator)

    def plan(self, codebook: torch.Tensor, step: int) -> ResetPlan | None:
        if self.observed == 0 or (self.params.once and self.fits > 0):
            return None
        dead_mask = self.counts < self.params.threshold
        self.counts.zero_()
        self.observed = 0
        dead = torch.nonzero(dead_mask).flatten()
        if dead.numel() == 0:
            return None
        x = distinct_rows(self.buffer.rows())
        n = min(dead.numel(), x.shape[0])
        if n == 0:
            return None
        codes = self._pick_dead(dead, n)
        live = codebook.detach().to(device=x.device, dtype=torch.float32)[~dead_mask.to(codebook.device)]
        centroids = self._fit(x, live, n)
        plan = _finish(codebook, codes, centroids)
        if plan is not None:
            self.fits += 1
        return plan

    def _fit(self, x: torch.Tensor, live: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` new centroids ``(n, D)`` fitted to ``x`` jointly with the ``live`` codes:
        k-means++ seeding conditioned on the live codes, then Lloyd iterations over all
        centroids, keeping the new ones."""
        from vqkit.ops.kmeans import kmeans

        seeds = x[seed_given_centers(x, live, n, self.generator).to(x.device)]
        init = torch.cat([live, seeds], dim=0)
        centroids, _, _ = kmeans(x, init.shape[0], self.params.iters, self.generator, init=init)
        return centroids[live.shape[0]:]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "counts": self.counts.clone(),
            "observed": self.observed,
            "fits": self.fits,
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.counts = state["counts"].clone().to(torch.float64)
        self.observed = int(state["observed"])
        self.fits = int(state["fits"])
        self.buffer.load_state_dict(state["buffer"])


@hookimpl
def vqkit_register_reset_policies(register):
    register("none", NoReset)
    register("random", RandomReset)
    register("jukebox", JukeboxReset)
    register("kmeans", KMeansReset)
