"""Reset policies (random, jukebox, kmeans) and the CodebookManager that applies them."""
from __future__ import annotations

import io

import pytest
import torch
from pydantic import ValidationError

from vqkit.components.resets import JukeboxReset, KMeansReset, NoReset, RandomReset
from vqkit.interfaces import ResetPlan
from vqkit.plugins import get_registry
from vqkit.recipe import ResetRef
from vqkit.telemetry import CodebookMonitor
from vqkit.testing.reset_contracts import ToyQuantizer
from vqkit.train.codebook import CodebookManager, check_plan, reset_due, reset_optimizer_rows

K, D = 16, 4


def _batch(seed: int, n: int = 64, codes: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen), torch.arange(n) % codes


def _rows_of(vectors: torch.Tensor, pool: torch.Tensor) -> bool:
    """Every row of ``vectors`` is exactly a row of ``pool``."""
    return bool((vectors[:, None, :] == pool[None, :, :]).all(-1).any(1).all())


# --------------------------------------------------------------------------- registry, params
def test_registered_with_described_params():
    reg = get_registry()
    assert reg.get("reset_policies", "random").cls is RandomReset
    assert reg.get("reset_policies", "jukebox").cls is JukeboxReset
    assert reg.get("reset_policies", "kmeans").cls is KMeansReset
    assert reg.get("reset_policies", "none").cls is NoReset
    for cls in (RandomReset, JukeboxReset, KMeansReset):
        for name, field in cls.Params.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


@pytest.mark.parametrize(
    "cls,bad",
    [(RandomReset, {"treshold": 1}), (JukeboxReset, {"decay": 1.0}), (JukeboxReset, {"buffer_size": 0}),
     (KMeansReset, {"iters": -1}), (RandomReset, {"noise": -0.1})],
)
def test_bad_params_rejected(cls, bad):
    with pytest.raises(ValidationError):
        cls.Params(**bad)


# --------------------------------------------------------------------------- random
def test_random_draws_distinct_rows_of_the_latest_batch_only():
    p = RandomReset(RandomReset.Params(noise=0.0), codebook_size=K, dim=D, seed=0)
    old_z, old_i = _batch(1)
    p.observe(old_z, old_i)
    z, i = _batch(2)
    p.observe(z, i)
    plan = p.plan(torch.zeros(K, D), 1)
    assert plan.indices.tolist() == list(range(8, 16))
    assert _rows_of(plan.vectors, z) and not _rows_of(plan.vectors[:1], old_z)
    assert torch.unique(plan.vectors, dim=0).shape[0] == 8


def test_random_noise_is_small_and_relative_to_batch_spread():
    p = RandomReset(RandomReset.Params(noise=0.01), codebook_size=K, dim=D, seed=0)
    z, i = _batch(3)
    z = z * 100.0
    p.observe(z, i)
    plan = p.plan(torch.zeros(K, D), 0)
    nearest = torch.cdist(plan.vectors, z).min(dim=1).values
    assert bool((nearest > 0).all()) and float(nearest.max()) < 0.1 * 100.0 * 2  # ~0.01 * std * sqrt(D)


def test_random_threshold_and_counters_since_last_plan():
    p = RandomReset(RandomReset.Params(threshold=3), codebook_size=K, dim=D, seed=0)
    z, _ = _batch(4, n=20)
    idx = torch.tensor([0] * 5 + [1] * 3 + [2] * 2 + [3] * 10)  # code 2 below threshold 3
    p.observe(z, idx)
    plan = p.plan(torch.zeros(K, D), 0)
    assert 2 in plan.indices.tolist() and not {0, 1, 3} & set(plan.indices.tolist())
    assert p.plan(torch.zeros(K, D), 1) is None  # nothing observed since: no evidence
    p.observe(z, torch.full((20,), 2))  # now only code 2 is used
    assert 0 in p.plan(torch.zeros(K, D), 2).indices.tolist()  # counts restarted at the plan


def test_more_dead_codes_than_candidates_resets_only_that_many():
    p = RandomReset(RandomReset.Params(noise=0.0), codebook_size=K, dim=D, seed=0)
    z = torch.tensor([[1.0, 0, 0, 0]] * 10 + [[0, 1.0, 0, 0]] * 10)  # 2 distinct outputs
    p.observe(z, torch.zeros(20, dtype=torch.int64))
    plan = p.plan(torch.zeros(K, D), 0)
    assert len(plan) == 2 and torch.unique(plan.vectors, dim=0).shape[0] == 2
    assert 0 not in plan.indices.tolist()


# --------------------------------------------------------------------------- jukebox
def test_jukebox_usage_is_bias_corrected_ema():
    p = JukeboxReset(JukeboxReset.Params(decay=0.5), codebook_size=K, dim=D, seed=0)
    z, _ = _batch(5, n=4)
    p.observe(z, torch.tensor([0, 0, 0, 1]))
    assert p.usage[:2].tolist() == [3.0, 1.0]  # first batch: exactly its counts
    p.observe(z, torch.tensor([1, 1, 1, 1]))
    # weights 1 and 2 (decay 0.5) normalised: (1*3 + 2*0)/3 = 1, (1*1 + 2*4)/3 = 3
    assert p.usage[0].item() == pytest.approx(1.0) and p.usage[1].item() == pytest.approx(3.0)


def test_jukebox_replaces_from_buffer_of_recent_batches_and_refreshes_usage():
    p = JukeboxReset(JukeboxReset.Params(buffer_size=128), codebook_size=K, dim=D, seed=0)
    batches = [_batch(10 + s) for s in range(4)]  # 4 x 64 rows, buffer keeps the last 2 batches
    for z, i in batches:
        p.observe(z, i)
    plan = p.plan(torch.zeros(K, D), 3)
    recent = torch.cat([batches[2][0], batches[3][0]])
    assert plan.indices.tolist() == list(range(8, 16))
    assert _rows_of(plan.vectors, recent)
    assert not _rows_of(plan.vectors[:1], torch.cat([batches[0][0], batches[1][0]]))
    assert p.usage[plan.indices].tolist() == [1.0] * 8  # fresh codes start at the threshold
    assert p.plan(torch.zeros(K, D), 4) is None


def test_jukebox_large_batch_subsampled_into_buffer():
    p = JukeboxReset(JukeboxReset.Params(buffer_size=10), codebook_size=K, dim=D, seed=0)
    z, i = _batch(6, n=64)
    p.observe(z, i)
    assert p.buffer.filled == 10 and _rows_of(p.buffer.rows(), z)
    assert torch.unique(p.buffer.rows(), dim=0).shape[0] == 10


# --------------------------------------------------------------------------- kmeans
def _blobs(seed: int, centres: torch.Tensor, per: int = 200) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([c + 0.05 * torch.randn(per, centres.shape[1], generator=gen) for c in centres])


def test_kmeans_places_dead_codes_on_uncovered_clusters():
    centres = torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, -5.0, 0, 0]])
    codebook = torch.zeros(K, D)
    codebook[0], codebook[1] = centres[0], centres[1]  # live codes cover two blobs
    p = KMeansReset(KMeansReset.Params(iters=5), codebook_size=K, dim=D, seed=0)
    x = _blobs(0, centres)
    idx = torch.cdist(x, codebook[:2]).argmin(1)  # the encoder only ever picks codes 0, 1
    p.observe(x, idx)
    plan = p.plan(codebook, 0)
    assert set(plan.indices.tolist()) == set(range(2, K))
    # every uncovered blob now has a replaced code within its spread
    for c in centres[2:]:
        assert float(torch.cdist(c[None], plan.vectors).min()) < 0.5, f"no new code near blob {c.tolist()}"
    assert torch.unique(plan.vectors, dim=0).shape[0] == len(plan)


def test_kmeans_once_fits_a_single_time():
    p = KMeansReset(KMeansReset.Params(once=True, iters=2), codebook_size=K, dim=D, seed=0)
    z, i = _batch(7)
    p.observe(z, i)
    assert p.plan(torch.zeros(K, D), 0) is not None
    p.observe(z, i)
    assert p.plan(torch.zeros(K, D), 1) is None


# --------------------------------------------------------------------------- manager
def test_reset_due_schedule():
    assert [s for s in range(12) if reset_due(s, every=4)] == [3, 7, 11]
    assert [s for s in range(20) if reset_due(s, every=4, start_step=5, stop_step=15)] == [7, 11, 15]


@pytest.mark.parametrize(
    "indices,vectors,message",
    [
        (torch.tensor([1, 1]), torch.randn(2, D), "duplicates"),
        (torch.tensor([1, K]), torch.randn(2, D), "must lie in"),
        (torch.tensor([1, 2]), torch.ones(2, D), "same vector"),
        (torch.tensor([1, 2]), torch.tensor([[float("nan")] * D, [0.0] * D]), "NaN"),
        (torch.tensor([1, 2]), torch.randn(2, D + 1), "vectors must be"),
        (torch.tensor([1.0, 2.0]), torch.randn(2, D), "int64"),
    ],
)
def test_check_plan_rejects_broken_plans(indices, vectors, message):
    with pytest.raises(RuntimeError, match=message):
        check_plan(ResetPlan(indices, vectors), torch.zeros(K, D))


def test_reset_optimizer_rows_all_optimizers_and_adamw_amsgrad():
    q = ToyQuantizer(K, D)
    other = torch.nn.Parameter(torch.randn(K, D))
    opts = [torch.optim.AdamW([q.weight, other], amsgrad=True), torch.optim.Adam([q.weight])]
    for opt in opts:
        (q.weight.square().sum() + other.square().sum()).backward()
        opt.step()
        opt.zero_grad()
    idx = torch.tensor([2, 5])
    touched = reset_optimizer_rows(q.code_parameters(), opts, idx)
    assert touched == 5  # exp_avg, exp_avg_sq, max_exp_avg_sq + exp_avg, exp_avg_sq
    for opt in opts:
        st = opt.state[q.weight]
        for key, value in st.items():
            if key != "step":
                assert torch.all(value[idx] == 0) and bool((value[[0, 1]] != 0).all()), key
        assert float(st["step"]) == 1.0
    assert bool((opts[0].state[other]["exp_avg"][idx] != 0).all())  # not a code parameter


def _train(policy_name: str, steps: int = 300, params: dict | None = None, every: int = 10):
    """A linear encoder + toy quantizer whose code-book starts collapsed near 0."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(D, D)
    q = ToyQuantizer(64, D, init=torch.randn(64, D) * 1e-3)
    opt = torch.optim.Adam([*enc.parameters(), *q.parameters()], lr=3e-3)
    cls = get_registry().get("reset_policies", policy_name).cls
    policy = cls(cls.Params(**(params or {})), codebook_size=64, dim=D, seed=0)
    # no resets in the last 30 steps, so the final usage window sees the settled code-book
    cfg = ResetRef(name=policy_name, every=every, stop_step=max(0, steps - 30))
    manager = CodebookManager(q, policy, cfg, CodebookMonitor(64, 2048))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(256, D, generator=gen)
        z = enc(x).T.reshape(1, D, 16, 16)
        out = q(z)
        loss = out.losses["codebook"] + 0.25 * out.losses["commitment"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        manager.after_step(step, z.detach(), out.indices, [opt])
    return manager


def test_resets_revive_a_collapsed_codebook():
    none = _train("none").monitor.metrics(0)
    assert none["codebook/usage"] < 0.3
    for name in ("random", "jukebox", "kmeans"):
        m = _train(name).monitor
        usage = m.metrics(0)["codebook/usage"]
        assert usage >= 0.9, f"{name}: usage {usage:.2f}"
        assert m.reset_events and m.reset_events[0][0] == 9


def test_manager_state_roundtrip_continues_identically():
    a = _train("jukebox", steps=40)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = CodebookManager(
        a.quantizer, JukeboxReset(JukeboxReset.Params(), codebook_size=64, dim=D, seed=99),
        a.reset_cfg, CodebookMonitor(64, 2048),
    )
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.monitor.metrics(1) == a.monitor.metrics(1)
    z = torch.randn(1, D, 8, 8)
    idx = torch.zeros(1, 8, 8, dtype=torch.int64)
    a.policy.observe(z.movedim(1, -1).reshape(-1, D), idx.reshape(-1))
    b.policy.observe(z.movedim(1, -1).reshape(-1, D), idx.reshape(-1))
    pa, pb = a.policy.plan(a.quantizer.codebook(), 50), b.policy.plan(a.quantizer.codebook(), 50)
    assert torch.equal(pa.indices, pb.indices) and torch.equal(pa.vectors, pb.vectors)


def test_manager_rejects_mismatched_z_and_indices():
    q = ToyQuantizer(K, D)
    m = CodebookManager(q, NoReset(), ResetRef(name="none"), CodebookMonitor(K))
    with pytest.raises(ValueError, match="same positions"):
        m.after_step(0, torch.randn(2, D, 4, 4), torch.zeros(2, 4, 5, dtype=torch.int64), [])


def test_no_reset_outside_schedule():
    m = _train("jukebox", steps=30, every=100)
    assert m.monitor.reset_events == []


@pytest.mark.parametrize("ema", [False, True])
def test_manager_with_the_vq_quantizer_resets_its_state(ema):
    """The built-in quantizer: replaced codes get the plan's vectors, their usage counts
    and EMA statistics restart, their Adam rows are zeroed; other codes are untouched."""
    cls = get_registry().get("quantizers", "vq").cls
    torch.manual_seed(0)
    q = cls(cls.Params(codebook_size=K, ema=ema), dim=D).train()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2) if not ema else None
    opts = [opt] if opt is not None else []
    if opt is not None:  # give every row Adam moments
        q.embed.square().sum().backward()
        opt.step()
        assert q.code_parameters() == [q.embed]
    policy = RandomReset(RandomReset.Params(noise=0.0), codebook_size=K, dim=D, seed=0)
    manager = CodebookManager(q, policy, ResetRef(name="random", every=2), CodebookMonitor(K))
    z0 = torch.randn(2, D, 4, 4)
    for step in range(2):
        out = q(z0)
        if opt is not None:
            opt.zero_grad()
            sum(out.losses.values()).backward()
            opt.step()
        before = q.codebook().clone()
        n = manager.after_step(step, z0, out.indices, opts)
    assert n > 0
    plan = manager.last_plan
    keep = torch.ones(K, dtype=torch.bool)
    keep[plan.indices] = False
    after = q.codebook()
    assert torch.equal(after[plan.indices], plan.vectors)
    assert torch.equal(after[keep], before[keep])
    if ema:
        assert torch.all(q.ema_cluster_size[plan.indices] == 1.0)
        assert torch.equal(q.ema_embed_sum[plan.indices], plan.vectors)
    else:
        state = opt.state[q.embed]
        assert torch.all(state["exp_avg"][plan.indices] == 0) and torch.all(state["exp_avg_sq"][plan.indices] == 0)
        assert bool((state["exp_avg_sq"][keep] != 0).all())  # the other rows keep theirs


def test_manager_resume_with_another_policy_or_buffer_starts_it_fresh():
    trained = _train("jukebox", steps=12, every=100)
    state = trained.state_dict()
    q = ToyQuantizer(64, D)
    other = CodebookManager(q, KMeansReset(KMeansReset.Params(), codebook_size=64, dim=D, seed=0),
                            trained.reset_cfg, CodebookMonitor(64, 2048))
    with pytest.warns(UserWarning, match="fresh statistics"):
        other.load_state_dict(state)
    assert other.policy.observed == 0 and other.monitor.history == trained.monitor.history
    small = JukeboxReset(JukeboxReset.Params(buffer_size=8), codebook_size=64, dim=D, seed=0)
    before = small.state_dict()
    resized = CodebookManager(q, small, trained.reset_cfg, CodebookMonitor(64, 2048))
    with pytest.warns(UserWarning, match="buffer_size"):
        resized.load_state_dict(state)
    assert small.steps == 0 and torch.equal(small.generator.get_state(), before["generator"])


def test_kmeans_reset_in_cosine_mode_fits_unit_latents():
    """Cosine codes are unit vectors and the search compares unit latents: the k-means
    reset must fit in that space. Raw latents of norm 10 against unit live codes put new
    codes on directions the live codes already cover and leave dead directions uncovered."""
    dim, k = 8, 8
    cls = get_registry().get("quantizers", "vq").cls
    q = cls(cls.Params(codebook_size=k, cosine=True), dim=dim).train()
    eye = torch.eye(dim)
    dead = -torch.ones(4, dim) + 0.1 * torch.randn(4, dim, generator=torch.Generator().manual_seed(0))
    q.replace_codes(torch.arange(k), torch.cat([eye[:4], dead]))  # live codes cover e0..e3 only
    gen = torch.Generator().manual_seed(1)
    directions = eye.repeat_interleave(16, 0)  # 16 latents along each of e0..e7
    z = 10.0 * (directions + 0.05 * torch.randn(directions.shape, generator=gen))
    z = z.T.reshape(1, dim, 8, 16)
    policy = KMeansReset(KMeansReset.Params(iters=10), codebook_size=k, dim=dim, seed=0)
    manager = CodebookManager(q, policy, ResetRef(name="kmeans", every=1), CodebookMonitor(k))
    out = q(z)
    assert set(out.indices.unique().tolist()) <= {0, 1, 2, 3}  # codes 4..7 are dead
    assert manager.after_step(0, z, out.indices, []) == 4
    cos = eye @ q.codebook().T  # unit directions . unit codes
    covered = cos.max(1).values > 0.95
    assert bool(covered.all()), f"directions without a code: {(~covered).nonzero().flatten().tolist()}"
