"""Code-book health during training: feed the reset policy and the monitor, apply resets.

The trainer calls :meth:`CodebookManager.after_step` once per optimizer step. It

1. flattens this rank's encoder outputs ``z`` ``(B, D, h, w)`` to ``(N, D)``, maps them
   into the quantizer's code space (``quantizer.to_code_space``: unit vectors for cosine
   codes, so that a policy compares like with like, e.g. k-means fits the directions the
   search uses), flattens the indices ``(B, h, w)`` to ``(N,)``, and gathers both from
   every rank
   (:meth:`DistContext.all_gather_cat`), so that the policy and the monitor see the same
   data on every rank;
2. calls ``policy.observe`` and ``monitor.update``;
3. when a reset is due (``step >= reset.start_step``, ``(step + 1) % reset.every == 0``,
   ``step <= reset.stop_step``), calls ``policy.plan`` on rank 0 only, broadcasts the
   plan (its size first, then indices and vectors), checks it, and on every rank applies
   it identically: ``quantizer.replace_codes`` (which resets the quantizer's state of
   those codes, e.g. EMA statistics), then zeroes the per-row optimizer state
   (Adam ``exp_avg``, ``exp_avg_sq``, ...) of those rows for every parameter of
   ``quantizer.code_parameters()`` in every optimizer that holds it, and records the
   reset in the monitor.

So the code-books of all ranks stay bit-identical.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from vqkit.errors import RecipeWarning
from vqkit.interfaces import CodebookResetPolicy, Quantizer, ResetPlan
from vqkit.telemetry import CodebookMonitor

if TYPE_CHECKING:  # pragma: no cover
    from vqkit.recipe import ResetRef
    from vqkit.train.distributed import DistContext

__all__ = ["CodebookManager", "StagedCodebookManager", "codebook_manager", "check_plan", "reset_due", "reset_optimizer_rows"]


def reset_due(step: int, every: int, start_step: int = 0, stop_step: int | None = None) -> bool:
    """Whether a reset is due after optimizer step ``step`` (0-based)."""
    if step < start_step or (stop_step is not None and step > stop_step):
        return False
    return (step + 1) % every == 0


def check_plan(plan: ResetPlan, codebook: torch.Tensor, who: str = "reset policy") -> None:
    """Raise ``RuntimeError`` if ``plan`` breaks the :class:`ResetPlan` contract for a
    code-book ``(K, D)``: int64 ``(n,)`` unique indices in ``[0, K)``, finite vectors
    ``(n, D)``, pairwise distinct."""
    k, d = codebook.shape
    idx, vec = plan.indices, plan.vectors
    problems = []
    if idx.dtype != torch.int64 or idx.dim() != 1:
        problems.append(f"indices must be int64 (n,), got {idx.dtype} {tuple(idx.shape)}")
    if vec.dim() != 2 or vec.shape[1] != d or vec.shape[0] != idx.shape[0]:
        problems.append(f"vectors must be ({idx.shape[0]}, {d}), got {tuple(vec.shape)}")
    if not problems and idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= k:
            problems.append(f"indices must lie in [0, {k})")
        if torch.unique(idx).numel() != idx.numel():
            problems.append("indices contain duplicates")
        if not torch.isfinite(vec).all():
            problems.append("vectors contain NaN or inf")
        elif torch.unique(vec, dim=0).shape[0] != vec.shape[0]:
            problems.append("two reset codes got the same vector")
    if problems:
        raise RuntimeError(f"{who} returned an invalid ResetPlan: " + "; ".join(problems))


def reset_optimizer_rows(
    params: Iterable[torch.nn.Parameter],
    optimizers: Iterable[torch.optim.Optimizer],
    idx: torch.Tensor,
) -> int:
    """Zero rows ``idx`` of every per-row state tensor (same shape as its parameter,
    e.g. Adam ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``) of ``params`` in every
    optimizer that holds them. Scalar state (``step``) is left alone. Returns the number
    of state tensors touched."""
    touched = 0
    params = list(params)
    for opt in optimizers:
        for p in params:
            state = opt.state.get(p)
            if not state:
                continue
            for value in state.values():
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape == p.shape:
                    value[idx.to(value.device)] = 0
                    touched += 1
    return touched


class CodebookManager:
    """Connects a quantizer, its reset policy, the monitor and the process group.

    Args:
        quantizer: the (unwrapped, not DDP) quantizer module.
        policy: the reset policy built from the recipe's ``reset:`` block.
        reset_cfg: that block (:class:`vqkit.recipe.ResetRef`: ``every``, ``start_step``,
            ``stop_step``); ``None`` means never reset.
        monitor: the usage monitor (fed with the assignments of all ranks).
        dist: the process group context; ``None`` means single process.
    """

    def __init__(
        self,
        quantizer: Quantizer,
        policy: CodebookResetPolicy,
        reset_cfg: ResetRef | None,
        monitor: CodebookMonitor,
        dist: DistContext | None = None,
    ):
        self.quantizer = quantizer
        self.policy = policy
        self.reset_cfg = reset_cfg
        self.monitor = monitor
        self.dist = dist
        #: the plan applied after the most recent due step (``None`` if none)
        self.last_plan: ResetPlan | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def _distributed(self) -> bool:
        return self.dist is not None and self.dist.enabled

    @property
    def _is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def due(self, step: int) -> bool:
        """Whether a reset is planned after ``step``."""
        cfg = self.reset_cfg
        if cfg is None:
            return False
        return reset_due(step, cfg.every, cfg.start_step, cfg.stop_step)

    def _gather(self, z: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = z.shape[1]
        flat_z = self.quantizer.to_code_space(z.detach().movedim(1, -1).reshape(-1, d)).float()
        flat_i = indices.detach().reshape(-1).long()
        if flat_z.shape[0] != flat_i.shape[0]:
            raise ValueError(
                f"z {tuple(z.shape)} and indices {tuple(indices.shape)} do not describe the "
                "same positions (expected z (B, D, h, w) and indices (B, h, w))"
            )
        if self._distributed:
            flat_z = self.dist.all_gather_cat(flat_z)
            flat_i = self.dist.all_gather_cat(flat_i)
        return flat_z, flat_i

    def _share_plan(self, plan: ResetPlan | None, codebook: torch.Tensor) -> ResetPlan | None:
        """Rank 0's plan on every rank: size first, then indices and vectors."""
        if not self._distributed:
            return plan
        n = torch.tensor([len(plan) if plan is not None else -1], dtype=torch.int64)
        n = int(self.dist.broadcast(n, src=0).item())
        if n < 0:
            return None
        d = codebook.shape[1]
        if plan is None:  # not rank 0: receive into buffers of the agreed shape
            idx = torch.zeros(n, dtype=torch.int64, device=codebook.device)
            vec = torch.zeros(n, d, dtype=codebook.dtype, device=codebook.device)
        else:
            idx = plan.indices.to(codebook.device)
            vec = plan.vectors.to(device=codebook.device, dtype=codebook.dtype)
        idx = self.dist.broadcast(idx, src=0)
        vec = self.dist.broadcast(vec, src=0)
        return ResetPlan(idx, vec)

    # ------------------------------------------------------------------ the step
    def after_step(
        self,
        step: int,
        z: torch.Tensor,
        indices: torch.Tensor,
        optimizers: list[torch.optim.Optimizer],
    ) -> int:
        """Observe this step and reset codes if due. ``z``: detached encoder outputs
        float ``(B, D, h, w)`` of this rank; ``indices``: int64 ``(B, h, w)``.
        Returns the number of codes reset after this step (the same on every rank)."""
        flat_z, flat_i = self._gather(z, indices)
        self.policy.observe(flat_z, flat_i)
        self.monitor.update(flat_i)
        self.monitor.record_stats(self.policy.stats())
        if not self.due(step):
            return 0
        codebook = self.quantizer.codebook().detach()
        plan = None
        if self._is_main:
            plan = self.policy.plan(codebook.clone(), step)
            if plan is not None and len(plan) == 0:
                plan = None
            if plan is not None:
                plan = ResetPlan(
                    plan.indices.to(device=codebook.device, dtype=torch.int64),
                    plan.vectors.to(device=codebook.device, dtype=codebook.dtype),
                )
                check_plan(plan, codebook, who=f"reset policy {type(self.policy).__name__}")
            self.monitor.record_stats(self.policy.stats())
        plan = self._share_plan(plan, codebook)
        self.last_plan = plan
        if plan is None:
            return 0
        self.apply(plan, step, optimizers)
        return len(plan)

    def apply(self, plan: ResetPlan, step: int, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Replace the codes of ``plan`` and reset everything that depends on them."""
        with torch.no_grad():
            self.quantizer.replace_codes(plan.indices, plan.vectors)
        reset_optimizer_rows(self.quantizer.code_parameters(), optimizers, plan.indices)
        self.monitor.record_reset(step, len(plan))

    # ------------------------------------------------------------------ state
    def _policy_id(self) -> str:
        cls = type(self.policy)
        return f"{cls.__module__}.{cls.__qualname__}"

    def state_dict(self) -> dict[str, Any]:
        """Policy and monitor state: tensors and plain Python only (safe for
        ``torch.load(weights_only=True)``)."""
        return {
            "policy_class": self._policy_id(),
            "policy": self.policy.state_dict(),
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the monitor and the policy. If the checkpoint was written with another
        reset policy (or with params its state does not fit, e.g. another
        ``buffer_size``), the policy starts fresh and a warning says so."""
        self.monitor.load_state_dict(state["monitor"])
        saved = state.get("policy_class")
        if saved is not None and saved != self._policy_id():
            warnings.warn(
                f"the checkpoint's reset policy was {saved}, the recipe's is {self._policy_id()}: "
                "the new policy starts with fresh statistics",
                RecipeWarning,
                stacklevel=2,
            )
            return
        fresh = self.policy.state_dict()
        try:
            self.policy.load_state_dict(state["policy"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            self.policy.load_state_dict(fresh)  # undo a partial load
            warnings.warn(
                f"the reset policy's state in the checkpoint does not fit the recipe's reset "
                f"params ({exc}); the policy starts with fresh statistics",
                RecipeWarning,
                stacklevel=2,
            )


# --------------------------------------------------------------------------- several code-books
class _StageView:
    """Code-book ``stage`` of a multi-code-book quantizer, seen as the single code-book a
    :class:`CodebookManager` and a reset policy work with."""

    def __init__(self, quantizer: Quantizer, stage: int):
        self.quantizer = quantizer
        self.stage = int(stage)
        self.codebook_size = int(quantizer.codebook_size)

    def codebook(self) -> torch.Tensor:
        return self.quantizer.codebook(self.stage)

    def replace_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        self.quantizer.replace_codes(idx, vectors, self.stage)

    def code_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.quantizer.code_parameters(self.stage))

    def to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        return z  # stage_inputs are in the stage's code space by contract


class _JointView:
    """All code-books of a multi-code-book quantizer seen as one code-book of ``S * K``
    codes (code ``k`` of stage ``s`` is ``s * K + k``), for one shared reset policy."""

    def __init__(self, quantizer: Quantizer):
        self.quantizer = quantizer
        self.k = int(quantizer.codebook_size)
        self.n = int(quantizer.num_codebooks)
        self.codebook_size = self.k * self.n

    def codebook(self) -> torch.Tensor:
        return torch.cat([self.quantizer.codebook(s) for s in range(self.n)])

    def split(self, idx: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(stage, mask of idx)`` for each stage some of ``idx`` fall in."""
        return [(s, idx // self.k == s) for s in range(self.n) if bool((idx // self.k == s).any())]

    def replace_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        for s, mask in self.split(idx):
            self.quantizer.replace_codes(idx[mask] % self.k, vectors[mask], s)

    def to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        return z


class _SplitMonitor:
    """Feeds the assignments of the joint code-book to each stage's monitor."""

    def __init__(self, monitors: list[CodebookMonitor], k: int):
        self.monitors, self.k = monitors, k
        self.sink: Any = None  # the StagedMonitor that logs the shared policy's stats

    def record_stats(self, stats: Mapping[str, float]) -> None:
        if self.sink is not None:
            self.sink.record_stats(stats)

    def update(self, indices: torch.Tensor) -> None:
        for s, m in enumerate(self.monitors):
            m.update(indices[indices // self.k == s] - s * self.k)

    def state_dict(self) -> dict[str, Any]:
        return {"stages": [m.state_dict() for m in self.monitors]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for m, sub in zip(self.monitors, state["stages"]):
            m.load_state_dict(sub)


class _JointManager(CodebookManager):
    """A :class:`CodebookManager` over a :class:`_JointView`: one policy, its plan applied
    stage by stage (codes, optimizer rows and the stage's monitor)."""

    def apply(self, plan: ResetPlan, step: int, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        view: _JointView = self.quantizer
        monitors = self.monitor.monitors
        with torch.no_grad():
            view.replace_codes(plan.indices, plan.vectors)
        for s, mask in view.split(plan.indices):
            reset_optimizer_rows(view.quantizer.code_parameters(s), optimizers, plan.indices[mask] % view.k)
            monitors[s].record_reset(step, int(mask.sum()))


class StagedCodebookManager:
    """One :class:`CodebookManager` per code-book of a multi-code-book quantizer
    (``multi_codebook = True``, see :class:`~vqkit.interfaces.Quantizer`), or, when the
    quantizer sets ``shared_reset``, one manager and policy over all its code-books.

    After each step the indices ``(B, S, h, w)`` are split by code-book; code-book ``s``
    is observed with the vectors its stage quantized (``quantizer.stage_inputs``, only
    computed when some policy can reset), reset by its own policy through
    ``replace_codes(idx, vectors, s)``, and monitored by its own
    :class:`~vqkit.telemetry.CodebookMonitor`; :attr:`monitor` combines them.
    """

    def __init__(
        self,
        quantizer: Quantizer,
        policies: list[CodebookResetPolicy],
        reset_cfg: ResetRef | None,
        dist: DistContext | None = None,
    ):
        from vqkit.telemetry import StagedMonitor

        n = int(quantizer.num_codebooks)
        self.shared = bool(getattr(quantizer, "shared_reset", False))
        want = 1 if self.shared else n
        if len(policies) != want:
            raise ValueError(f"{n} code-books need {want} reset polic{'y' if want == 1 else 'ies'}"
                             f"{' (shared_reset)' if self.shared else ''}, got {len(policies)}")
        self.quantizer = quantizer
        self.num_codebooks = n
        if self.shared:
            monitors = [CodebookMonitor(quantizer.codebook_size) for _ in range(n)]
            self.joint = _JointManager(_JointView(quantizer), policies[0], reset_cfg,
                                       _SplitMonitor(monitors, int(quantizer.codebook_size)), dist)
            self.managers = []
        else:
            self.managers = [
                CodebookManager(_StageView(quantizer, s), policies[s], reset_cfg,
                                CodebookMonitor(quantizer.codebook_size), dist)
                for s in range(n)
            ]
            monitors = [m.monitor for m in self.managers]
        self.monitor = StagedMonitor(monitors)
        if self.shared:
            self.joint.monitor.sink = self.monitor
        self._observe = any(not getattr(p, "never_resets", False) for p in policies)

    @property
    def last_plan(self) -> list[ResetPlan | None] | ResetPlan | None:
        """Per code-book plans; with ``shared_reset`` the one plan over all code-books."""
        return self.joint.last_plan if self.shared else [m.last_plan for m in self.managers]

    def after_step(
        self, step: int, z: torch.Tensor, indices: torch.Tensor, optimizers: list[torch.optim.Optimizer]
    ) -> int:
        """As :meth:`CodebookManager.after_step`, for indices ``(B, S, h, w)``; returns the
        number of codes reset over all code-books."""
        n = self.num_codebooks
        if indices.dim() != 4 or indices.shape[1] != n:
            raise ValueError(
                f"a quantizer with {n} code-books must return indices (B, {n}, h, w), got {tuple(indices.shape)}"
            )
        if self._observe:
            with torch.no_grad():
                inputs = list(self.quantizer.stage_inputs(z.detach(), indices.detach()))
            if len(inputs) != n:
                raise ValueError(f"stage_inputs returned {len(inputs)} tensors for {n} code-books")
        else:  # policies that never reset ignore the vectors: skip computing them
            inputs = [z] * n
        if self.shared:  # the stages stacked along the batch: code k of stage s is s * K + k
            k = int(self.quantizer.codebook_size)
            joint_z = torch.cat([inputs[s] for s in range(n)])
            joint_i = torch.cat([indices[:, s].long() + s * k for s in range(n)])
            return self.joint.after_step(step, joint_z, joint_i, optimizers)
        return sum(m.after_step(step, inputs[s], indices[:, s], optimizers) for s, m in enumerate(self.managers))

    def state_dict(self) -> dict[str, Any]:
        if self.shared:
            return {"shared": self.joint.state_dict()}
        return {"stages": [m.state_dict() for m in self.managers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.shared or "shared" in state:
            if not (self.shared and "shared" in state):
                have, want = ("one reset policy per code-book", "one shared") if self.shared else (
                    "one shared reset policy", "one per code-book")
                raise ValueError(f"the checkpoint's code-book state has {have}, the quantizer wants {want} "
                                 "(its shared_reset differs)")
            self.joint.load_state_dict(state["shared"])
            return
        stages = state.get("stages")
        if stages is None or len(stages) != len(self.managers):
            have = "one code-book" if stages is None else f"{len(stages)} code-books"
            raise ValueError(f"the checkpoint's code-book state has {have}, the quantizer {len(self.managers)}")
        for manager, sub in zip(self.managers, stages):
            manager.load_state_dict(sub)


def codebook_manager(
    quantizer: Quantizer,
    policies: list[CodebookResetPolicy],
    reset_cfg: ResetRef | None,
    dist: DistContext | None = None,
) -> CodebookManager | StagedCodebookManager:
    """The manager for ``quantizer``: a :class:`StagedCodebookManager` when it declares
    ``multi_codebook``, else a :class:`CodebookManager` with a fresh monitor. Both have
    ``after_step``, ``monitor``, ``state_dict`` and ``load_state_dict``."""
    if getattr(type(quantizer), "multi_codebook", False):
        return StagedCodebookManager(quantizer, policies, reset_cfg, dist)
    return CodebookManager(quantizer, policies[0], reset_cfg, CodebookMonitor(quantizer.codebook_size), dist)
