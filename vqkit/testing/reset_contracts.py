"""Contract suite for code-book reset policies (:class:`~vqkit.interfaces.CodebookResetPolicy`).

Every registered reset policy must pass it; plugin authors run it on their own policy,
either check by check::

    from vqkit.testing.reset_contracts import reset_contract_checks
    for check in reset_contract_checks():
        check(MyPolicy)                      # or check(MyPolicy, params=MyPolicy.Params(...))

or by subclassing the pytest base class::

    from vqkit.testing.reset_contracts import ResetPolicyContract

    class TestMyPolicy(ResetPolicyContract):
        policy_cls = MyPolicy

The checks (each raises ``AssertionError`` with a precise message):

``replaces_only_dead``
    codes that receive many assignments in every batch are never in a plan; a policy
    that resets at all resets some of the codes that never receive any;
``distinct_vectors``
    even when the encoder outputs hold only a few distinct vectors (a flat image
    background), no two codes of one plan get the same vector, and indices are unique;
``dependent_state``
    the policy's own statistics of replaced codes are reset (an immediate second plan does
    not name them again), and through :class:`~vqkit.train.codebook.CodebookManager` the
    Adam moments of the replaced rows are zeroed;
``shapes_dtypes_device``
    indices int64 ``(n,)``, vectors ``(n, D)`` in the code-book's dtype (float32 and
    float64) and on its device, and ``plan`` does not modify the code-book it is given;
``deterministic``
    two policies built with the same seed make identical plans from identical data;
``checkpoint_roundtrip``
    ``state_dict`` -> ``torch.save`` -> ``torch.load(weights_only=True)`` ->
    ``load_state_dict`` into a policy built with *another* seed gives identical
    subsequent plans (so generator state, buffers and counters are all in the state).

A policy that never resets (like ``none``) declares ``never_resets = True`` as a class
attribute; the suite then checks that it indeed always returns ``None``.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.interfaces import CodebookResetPolicy, Params, Quantizer, QuantizerOutput, ResetPlan

__all__ = [
    "ResetPolicyContract",
    "ToyQuantizer",
    "registered_reset_cases",
    "reset_contract_checks",
]

#: Sizes of the scenario: K codes of dimension D, the first LIVE of them used.
K, D, LIVE = 32, 8, 16
BATCH = 256
WARMUP = 8  # batches observed before the first plan
MAX_STEPS = 64  # manager steps allowed before a resetting policy must have reset

Check = Callable[..., None]


# =========================================================================== scenario
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scenario_codebook(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """A code-book ``(K, D)`` of well-separated random codes."""
    return (torch.randn(K, D, generator=_generator(100)) * 3.0).to(device=device, dtype=dtype)


def scenario_batch(
    i: int, live: int = LIVE, distinct: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``i``: ``BATCH`` encoder outputs around the first ``live`` codes, each live
    code assigned ``BATCH / live`` times; with ``distinct`` the outputs take only that many
    distinct values. Returns z float32 ``(BATCH, D)`` and indices int64 ``(BATCH,)``."""
    gen = _generator(1000 + i)
    codebook = scenario_codebook()
    indices = torch.arange(BATCH) % live
    indices = indices[torch.randperm(BATCH, generator=gen)]
    z = codebook[indices] + 0.3 * torch.randn(BATCH, D, generator=gen)
    if distinct is not None:
        pool = z[:distinct].clone()
        pick = torch.arange(BATCH) % distinct
        z = pool[pick]
        indices = indices[:distinct][pick]
    return z, indices


def _make(cls: type, params: Params | None, seed: int = 0, codebook_size: int = K) -> CodebookResetPolicy:
    params = params if params is not None else cls.Params()
    return cls(params, codebook_size=codebook_size, dim=D, seed=seed)


def _feed(policy: CodebookResetPolicy, start: int, n: int, **kw: Any) -> None:
    for i in range(start, start + n):
        policy.observe(*scenario_batch(i, **kw))


def _plans(policy: CodebookResetPolicy, start: int, rounds: int = 3) -> Iterator[ResetPlan | None]:
    """Observe WARMUP batches then plan, ``rounds`` times."""
    codebook = scenario_codebook()
    for r in range(rounds):
        _feed(policy, start + r * WARMUP, WARMUP)
        yield policy.plan(codebook.clone(), (r + 1) * WARMUP - 1)


def _expects_resets(cls: type) -> bool:
    return not getattr(cls, "never_resets", False)


def _name(cls: type) -> str:
    return getattr(cls, "__name__", repr(cls))


def _first_plan(cls: type, params: Params | None, **kw: Any) -> tuple[CodebookResetPolicy, ResetPlan | None]:
    policy = _make(cls, params)
    codebook = scenario_codebook()
    _feed(policy, 0, WARMUP, **kw)
    return policy, policy.plan(codebook.clone(), WARMUP - 1)


def _assert_none(cls: type, plan: ResetPlan | None, where: str) -> None:
    assert plan is None or len(plan) == 0, f"{_name(cls)} declares never_resets but planned resets {where}"


def _assert_equal_plans(a: ResetPlan | None, b: ResetPlan | None, what: str) -> None:
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one plan is None and the other is not"
        return
    assert torch.equal(a.indices, b.indices), f"{what}: different indices {a.indices.tolist()} vs {b.indices.tolist()}"
    assert torch.equal(a.vectors, b.vectors), f"{what}: different vectors"


# =========================================================================== checks
def check_replaces_only_dead(cls: type, params: Params | None = None) -> None:
    """Heavily used codes are never reset; never-used codes are (for resetting policies)."""
    policy = _make(cls, params)
    for r, plan in enumerate(_plans(policy, 0)):
        if not _expects_resets(cls):
            _assert_none(cls, plan, f"in round {r}")
            continue
        if r == 0:
            assert plan is not None and len(plan) > 0, (
                f"{_name(cls)}: codes {LIVE}..{K - 1} received no assignment in {WARMUP} "
                f"batches but the policy reset none of them"
            )
        if plan is not None:
            live = plan.indices[plan.indices < LIVE]
            assert live.numel() == 0, f"{_name(cls)}: reset live codes {live.tolist()} (each used {BATCH // LIVE} times per batch)"


def check_distinct_vectors(cls: type, params: Params | None = None) -> None:
    """No two codes of a plan get the same vector, even from highly repetitive data."""
    for distinct in (1, 5, LIVE):
        policy, plan = _first_plan(cls, params, live=min(distinct, LIVE), distinct=distinct)
        if not _expects_resets(cls):
            _assert_none(cls, plan, f"with {distinct} distinct encoder outputs")
            continue
        if plan is None:
            continue
        assert torch.unique(plan.indices).numel() == len(plan), f"{_name(cls)}: duplicate indices {plan.indices.tolist()}"
        unique = torch.unique(plan.vectors, dim=0).shape[0]
        assert unique == len(plan), (
            f"{_name(cls)}: {len(plan)} codes reset with only {unique} different vectors "
            f"(encoder outputs had {distinct} distinct values)"
        )


def check_dependent_state(cls: type, params: Params | None = None) -> None:
    """Own statistics of replaced codes reset; through the manager, quantizer counters and
    Adam moments of replaced rows zeroed."""
    from vqkit.recipe import ResetRef
    from vqkit.telemetry import CodebookMonitor
    from vqkit.train.codebook import CodebookManager

    policy, plan = _first_plan(cls, params)
    if not _expects_resets(cls):
        _assert_none(cls, plan, "in the first plan")
        _assert_none(cls, policy.plan(scenario_codebook(), WARMUP), "in the second plan")
    elif plan is not None:
        again = policy.plan(scenario_codebook(), WARMUP)
        if again is not None:
            repeated = sorted(set(again.indices.tolist()) & set(plan.indices.tolist()))
            assert not repeated, (
                f"{_name(cls)}: codes {repeated} were reset and named again by the very next plan "
                "(the policy's usage statistics of replaced codes were not reset)"
            )

    # the manager: a toy quantizer trained with Adam, every code used at step 0 only
    torch.manual_seed(0)
    quantizer = ToyQuantizer(K, D, init=scenario_codebook())
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-2)
    manager = CodebookManager(
        quantizer,
        _make(cls, params),
        ResetRef(name="contract", every=4),
        CodebookMonitor(K, window=4 * BATCH),
        None,
    )
    for step in range(MAX_STEPS):
        z, _ = scenario_batch(step, live=K if step == 0 else LIVE)
        z4 = z.T.reshape(1, D, 16, BATCH // 16)
        out = quantizer(z4)
        loss = sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = optimizer.state[quantizer.weight]
        before_avg, before_sq = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        before_codes = quantizer.codebook().clone()
        n = manager.after_step(step, z4, out.indices, [optimizer])
        if n == 0:
            continue
        assert _expects_resets(cls), f"{_name(cls)} declares never_resets but reset {n} codes"
        idx = manager.last_plan.indices
        keep = torch.ones(K, dtype=torch.bool)
        keep[idx] = False
        assert bool((before_avg[idx] != 0).any()), "contract scenario broken: replaced rows had no Adam state"
        assert torch.all(state["exp_avg"][idx] == 0) and torch.all(state["exp_avg_sq"][idx] == 0), (
            f"{_name(cls)}: Adam moments of replaced codes not reset"
        )
        assert torch.equal(state["exp_avg"][keep], before_avg[keep]) and torch.equal(
            state["exp_avg_sq"][keep], before_sq[keep]
        ), f"{_name(cls)}: Adam moments of codes that were not replaced changed"
        assert torch.equal(quantizer.codebook()[keep], before_codes[keep]), f"{_name(cls)}: codes outside the plan changed"
        assert torch.equal(quantizer.codebook()[idx], manager.last_plan.vectors), f"{_name(cls)}: codes not set to the plan's vectors"
        assert manager.monitor.reset_events == [(step, n)], "reset not recorded by the monitor"
        return
    assert not _expects_resets(cls), f"{_name(cls)}: no reset in {MAX_STEPS} steps although codes {LIVE}..{K - 1} were unused after step 0"


def check_shapes_dtypes_device(cls: type, params: Params | None = None) -> None:
    """Plans match the code-book's dtype and device; the code-book is not modified."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.float64):
            policy = _make(cls, params)
            _feed(policy, 0, WARMUP)
            codebook = scenario_codebook(dtype, device)
            given = codebook.clone()
            plan = policy.plan(given, WARMUP - 1)
            assert torch.equal(given, codebook), f"{_name(cls)}: plan() modified the code-book it was given"
            if not _expects_resets(cls):
                _assert_none(cls, plan, f"for a {dtype} code-book on {device}")
                continue
            assert isinstance(plan, ResetPlan), f"{_name(cls)}: plan() returned {type(plan).__name__}, expected ResetPlan"
            assert plan.indices.dtype == torch.int64 and plan.indices.dim() == 1, (
                f"{_name(cls)}: indices {plan.indices.dtype} {tuple(plan.indices.shape)}, expected int64 (n,)"
            )
            assert plan.vectors.shape == (len(plan), D), f"{_name(cls)}: vectors {tuple(plan.vectors.shape)}, expected ({len(plan)}, {D})"
            assert plan.vectors.dtype == dtype, f"{_name(cls)}: vectors are {plan.vectors.dtype} for a {dtype} code-book"
            assert plan.indices.device.type == plan.vectors.device.type == torch.device(device).type, (
                f"{_name(cls)}: plan on {plan.indices.device}/{plan.vectors.device}, code-book on {device}"
            )
            assert bool(torch.isfinite(plan.vectors).all()), f"{_name(cls)}: non-finite vectors"
            assert int(plan.indices.min()) >= 0 and int(plan.indices.max()) < K, f"{_name(cls)}: indices out of range"


def check_deterministic(cls: type, params: Params | None = None) -> None:
    """Same seed, same data -> same plans."""
    a, b = _make(cls, params, seed=7), _make(cls, params, seed=7)
    for r, (pa, pb) in enumerate(zip(_plans(a, 0), _plans(b, 0))):
        _assert_equal_plans(pa, pb, f"{_name(cls)}: same seed, round {r}")


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_checkpoint_roundtrip(cls: type, params: Params | None = None) -> None:
    """A restored policy (built with another seed) plans exactly as the original."""
    original = _make(cls, params, seed=3)
    _feed(original, 0, WARMUP + 3)
    original.plan(scenario_codebook(), WARMUP)  # consume some randomness and reset counters
    _feed(original, 50, 3)
    try:
        state = _roundtrip(original.state_dict())
    except Exception as exc:  # pickling of non-tensor objects is refused by weights_only
        raise AssertionError(f"{_name(cls)}: state_dict() does not load with torch.load(weights_only=True): {exc}") from exc
    restored = _make(cls, params, seed=4)
    restored.load_state_dict(state)
    for r, (pa, pb) in enumerate(zip(_plans(original, 100), _plans(restored, 100))):
        _assert_equal_plans(pa, pb, f"{_name(cls)}: after a checkpoint round trip, round {r}")


def check_stats(cls: type, params: Params | None = None) -> None:
    """The declared stats (``policy.stats()``) after observing and after planning: valid
    names, finite plain floats (they are logged as ``reset/<stat>``)."""
    from vqkit.testing.contracts import assert_stats, declares_stats

    declares_stats(cls)
    policy = _make(cls, params)
    _feed(policy, 0, WARMUP)
    assert_stats(_name(cls), policy.stats(), "reset")
    policy.plan(scenario_codebook(), WARMUP - 1)
    assert_stats(_name(cls), policy.stats(), "reset")


CHECKS: list[Check] = [
    check_replaces_only_dead,
    check_distinct_vectors,
    check_dependent_state,
    check_shapes_dtypes_device,
    check_deterministic,
    check_checkpoint_roundtrip,
    check_stats,
]


def reset_contract_checks() -> list[Check]:
    """Every check; each is called as ``check(policy_cls, params=None)``."""
    return list(CHECKS)


def registered_reset_cases() -> list[tuple[str, Check]]:
    """``(policy name, check)`` for every registered reset policy and every check."""
    from vqkit.plugins import get_registry

    return [(name, check) for name in get_registry().names("reset_policies") for check in CHECKS]


class ResetPolicyContract:
    """pytest base class: set ``policy_cls`` (and optionally ``params``) in a subclass."""

    policy_cls: type
    params: Params | None = None

    def test_replaces_only_dead(self) -> None:
        check_replaces_only_dead(self.policy_cls, self.params)

    def test_distinct_vectors(self) -> None:
        check_distinct_vectors(self.policy_cls, self.params)

    def test_dependent_state(self) -> None:
        check_dependent_state(self.policy_cls, self.params)

    def test_shapes_dtypes_device(self) -> None:
        check_shapes_dtypes_device(self.policy_cls, self.params)

    def test_deterministic(self) -> None:
        check_deterministic(self.policy_cls, self.params)

    def test_checkpoint_roundtrip(self) -> None:
        check_checkpoint_roundtrip(self.policy_cls, self.params)


# =========================================================================== toy quantizer
class ToyQuantizer(Quantizer):
    """Minimal l2 nearest-code quantizer for tests of reset machinery (not registered).

    ``forward(z)``: ``z`` float ``(B, D, h, w)``; straight-through output, losses
    ``codebook`` ``||sg[z] - e||^2`` and ``commitment`` ``||z - sg[e]||^2``.
    """

    def __init__(self, codebook_size: int, dim: int, init: torch.Tensor | None = None):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        weight = init.clone().float() if init is not None else torch.randn(codebook_size, dim)
        self.weight = nn.Parameter(weight)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        flat = z.movedim(1, -1).reshape(-1, self.dim)
        indices = torch.cdist(flat.detach().float(), self.weight.detach().float()).argmin(dim=1)
        q = self.weight[indices]
        losses = {"codebook": F.mse_loss(q, flat.detach()), "commitment": F.mse_loss(flat, q.detach())}
        q = flat + (q - flat).detach()
        b, _, h, w = z.shape
        return QuantizerOutput(
            q.reshape(b, h, w, self.dim).movedim(-1, 1), indices.reshape(b, h, w), losses
        )

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.weight.detach()[indices].movedim(-1, 1)

    def codebook(self) -> torch.Tensor:
        return self.weight.detach()

    def replace_codes(self, idx: torch.Tensor, vectors: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight[idx] = vectors.to(self.weight.dtype)

    def code_parameters(self) -> list[nn.Parameter]:
        return [self.weight]
