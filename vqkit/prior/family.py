"""The prior family of the shared training loop: a :class:`~vqkit.interfaces.Prior` over
the codes of a frozen, trained autoencoder.

Objective: the mean negative log-likelihood of the codes (cross-entropy of the prior's
logits, natural log), reported as **bits per dimension**, one dimension being one code of
the grid: ``bpd = nll / ln 2``. ``prior/train_bpd`` is averaged over the logged window,
``prior/test_bpd`` is computed on the first ``eval.num_samples`` test grids.

Sample grids (``grids/samples_<step>.png``, and MLflow's image log under key
``samples``) are drawn with a generator seeded by the recipe seed, so the grids of one
run differ only by training; they never touch the global RNG (resume stays exact).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vqkit.errors import Problem, VqkitError
from vqkit.train.loop import Family, NonFiniteLoss, TrainLoop
from vqkit.train.objective import optimizer_step

__all__ = ["PriorFamily", "CodeData", "resolve_autoencoder", "build_prior", "grid_labels"]

LN2 = math.log(2.0)


class CodeData:
    """Code grids (and labels) indexed like a data set: ``get_batch(idx)`` ->
    ``(codes int64 (B, *grid), labels int64 (B,) or None)``."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor | None):
        self.codes, self.labels = codes, labels

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.codes[idx], (self.labels[idx] if self.labels is not None else None)


def resolve_autoencoder(ref: Any, tracking_uri: str, output_dir: str = "runs") -> Path:
    """The autoencoder checkpoint named by a recipe's ``autoencoder`` block."""
    from vqkit.commands.train import resolve_checkpoint

    target = ref.run
    if target is None:
        from vqkit.tracking import fetch_runs

        try:
            runs = [r for r in fetch_runs(tracking_uri, experiment=ref.experiment) if r["status"] == "FINISHED"]
        except VqkitError as exc:
            raise VqkitError([Problem(f"{p.message}; train the autoencoder first, or set autoencoder.run",
                                      path="autoencoder.experiment") for p in exc.problems]) from None
        if not runs:
            raise VqkitError(Problem(
                f"no finished run in MLflow experiment {ref.experiment!r} at {tracking_uri}; train the "
                "autoencoder first, or set autoencoder.run to its run id, run dir or checkpoint",
                path="autoencoder.experiment"))
        target = runs[0]["run_id"]
    try:
        return resolve_checkpoint(target, tracking_uri=tracking_uri)
    except VqkitError as exc:
        raise VqkitError([Problem(f"autoencoder: {p.message}", path="autoencoder.run") for p in exc.problems]) from None


def build_prior(name: str, params: Any, codebook_size: int, grid: tuple[int, ...], num_classes: int) -> nn.Module:
    from vqkit.plugins import get_registry

    cls = get_registry().get("priors", name).cls
    return cls(params, codebook_size=codebook_size, grid=tuple(grid), num_classes=num_classes)


def grid_labels(num_classes: int, n: int) -> tuple[torch.Tensor | None, int]:
    """Labels of an ``n``-sample grid and its number of columns: one row per class (``n`` is
    rounded up to a multiple of the classes), or a square-ish grid without classes."""
    if num_classes <= 0:
        return None, max(1, math.ceil(math.sqrt(n)))
    per = max(1, math.ceil(n / num_classes))
    return torch.arange(num_classes).repeat_interleave(per), per


class PriorFamily(Family):
    """Trains a prior (see the module docstring)."""

    name = "prior"
    shown = (
        ("prior/train_bpd", "train_bpd", "{:.4f}"),
        ("prior/test_bpd", "test_bpd", "{:.4f}"),
        ("prior/fd_vgg16_relu5_3", "fd", "{:.2f}"),
        ("time/step_s", "step_s", "{:.3f}"),
    )

    # ------------------------------------------------------------------ setup
    def setup(self, loop: TrainLoop) -> None:
        from vqkit.prior.codes import file_sha256, load_or_compute_codes
        from vqkit.tracking import resolve_tracking_uri
        from vqkit.train.data import StepBatches
        from vqkit.train.loop import _make_optimizer
        from vqkit.train.schedule import make_scheduler

        self.loop = loop
        cfg = self.cfg = loop.cfg
        tc = cfg.train
        self.device = device = loop.device
        if loop.resume is not None:  # the autoencoder the prior was trained on, unchanged
            info = loop.resume.get("autoencoder") or {}
            ae_path = Path(info.get("checkpoint", ""))
            if not ae_path.is_file():
                raise VqkitError(f"cannot resume: the autoencoder checkpoint {ae_path} of this prior is gone")
            digest = file_sha256(ae_path)
            if digest != info.get("sha256"):
                raise VqkitError(f"cannot resume: the autoencoder checkpoint {ae_path} changed since this "
                                 "prior was trained (its SHA-256 differs); train a new prior")
        else:
            uri = resolve_tracking_uri(cfg.tracking.uri)
            ae_path = resolve_autoencoder(cfg.autoencoder, uri, cfg.tracking.output_dir)
            digest = file_sha256(ae_path)
        self.ae_path = ae_path.resolve()
        # building the autoencoder draws initial weights: keep the global RNG as seeded, so the
        # prior starts the same whether the codes came from the cache or not
        with torch.random.fork_rng(devices=[]):
            codes = load_or_compute_codes(ae_path, cfg.autoencoder.cache_dir, cfg.autoencoder.batch_size,
                                          device, say=loop.say, sha256=digest)
            from vqkit.model import VQModel

            self.ae, self.ae_recipe = VQModel.from_checkpoint(ae_path, map_location=device)
        self.codes = codes
        conditional = cfg.prior.class_conditional
        if conditional and codes.train_labels is None:
            raise VqkitError(Problem(
                "prior.class_conditional is true but the autoencoder's data set has no class labels "
                "(a data set exposes them as `labels`)", path="prior.class_conditional"))
        self.num_classes = codes.num_classes if conditional else 0
        self.prior = build_prior(cfg.prior.name, loop.recipe.params_of("prior"), codes.codebook_size,
                                 codes.grid, self.num_classes).to(device)
        params = [p for p in self.prior.parameters() if p.requires_grad]
        self.opt = _make_optimizer(params, tc, tc.lr)
        self.params = params
        self.sched = make_scheduler(self.opt, tc)
        self.scaler = loop.grad_scaler()  # mixed precision: the loop's autocast and scaler
        labels = codes.train_labels if conditional else None
        self.data = StepBatches(CodeData(codes.train, labels), tc.batch_size, cfg.seed)  # type: ignore[arg-type]
        self.test = CodeData(codes.test, codes.test_labels if conditional else None)
        # the frozen autoencoder decodes the sample grids
        for p in self.ae.parameters():
            p.requires_grad_(False)
        ae_state_run = torch.load(ae_path, map_location="cpu", weights_only=True).get("run") or {}
        self.ae_run = {k: ae_state_run.get(k) for k in ("run_id", "tracking_uri", "experiment", "run_dir")}

    def tags(self) -> dict[str, Any]:
        from vqkit.train.build import component_tags

        tags = {  # vqkit.plugins: the distributions of the prior and of the autoencoder's model
            **component_tags(self.loop.recipe, frozen={"autoencoder": self.ae_recipe}),
            "vqkit.autoencoder.checkpoint": str(self.ae_path),
            "vqkit.autoencoder.sha256": self.codes.sha256,
            "vqkit.prior.grid": "x".join(str(g) for g in self.codes.grid),
            "vqkit.prior.num_classes": self.num_classes,
        }
        run_id = self.ae_run.get("run_id")
        if run_id:
            tags["vqkit.autoencoder.run_id"] = run_id
            tags["vqkit.autoencoder.tracking_uri"] = self.ae_run.get("tracking_uri") or ""
            tags["mlflow.note.content"] = (
                f"Prior over the codes of autoencoder run `{run_id}` "
                f"(experiment `{self.ae_run.get('experiment')}`), checkpoint `{self.ae_path}`."
            )
            from vqkit.tracking import resolve_tracking_uri

            same_store = self.ae_run.get("tracking_uri") == resolve_tracking_uri(self.cfg.tracking.uri)
            if same_store and self.ae_run.get("experiment") == self.cfg.tracking.experiment:
                tags["mlflow.parentRunId"] = run_id  # nested under its autoencoder in the UI
        return tags

    # ------------------------------------------------------------------ steps
    def batches(self, start: int, stop: int) -> Iterator[Any]:
        return self.data.iterate(start, stop)

    def epoch_of(self, step: int) -> int:
        return self.data.epoch_of(step)

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Mean negative log-likelihood (nats per code) of grids ``(B, *grid)``."""
        flat = codes.reshape(codes.shape[0], -1).to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        with self.loop.autocast():
            logits = self.prior(flat, labels)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat.reshape(-1))

    def train_step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        codes, labels = batch
        self.prior.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.nll(codes, labels)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLoss(f"step {step + 1}: loss/total={float(loss.detach()):.4g}")
        self.scaler.scale(loss).backward()
        terms = {"loss/total": loss.detach(), "prior/train_bpd": loss.detach() / LN2}

        def check(norm: torch.Tensor) -> None:
            if not bool(torch.isfinite(norm)):
                raise NonFiniteLoss(f"gradient norm is {float(norm)} at step {step + 1}")

        norm = optimizer_step(self.opt, self.params, self.scaler, self.cfg.train.grad_clip, check_norm=check)
        if norm is not None:
            terms["train/grad_norm"] = norm
        self.sched.step()
        return terms

    def lr(self) -> float:
        return float(self.sched.get_last_lr()[0])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        ec = self.cfg.eval
        was = self.prior.training
        self.prior.eval()
        n = min(ec.num_samples, len(self.test))
        total = 0.0
        try:
            for start in range(0, n, ec.batch_size):
                idx = torch.arange(start, min(n, start + ec.batch_size))
                codes, labels = self.test.get_batch(idx)
                total += float(self.nll(codes, labels)) * len(idx)
        finally:
            self.prior.train(was)
        return {"prior/test_bpd": total / max(1, n) / LN2}

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def sample_images(self, n: int, seed: int) -> tuple[torch.Tensor, int]:
        """``n`` (rounded to whole rows) decoded samples ``(N, C, H, W)`` and the grid's columns."""
        ec = self.cfg.eval
        labels, columns = grid_labels(self.num_classes, n)
        count = n if labels is None else labels.shape[0]
        g = torch.Generator(device=self.device).manual_seed(seed)
        codes = self.prior.sample(count, labels.to(self.device) if labels is not None else None,
                                  temperature=ec.temperature, top_k=ec.top_k, top_p=ec.top_p, generator=g)
        return self.ae.decode_indices(codes).float(), columns

    def log_images(self, step: int, run_dir: Path, tracker: Any) -> None:
        from vqkit.prior.images import save_grid

        images, columns = self.sample_images(self.cfg.eval.grid_samples, self.cfg.seed)
        path = save_grid(images, columns, run_dir / "grids" / f"samples_{step:06d}.png")
        tracker.log_image_grid(path, "samples", step)  # grids/, and MLflow's image log (step slider)

    # ------------------------------------------------------------------ the end
    def finish(self, run_dir: Path, tracker: Any) -> dict[str, float]:
        n = self.cfg.eval.fd_samples
        if n <= 0:
            return {}
        from vqkit.prior.quality import sample_feature_distance

        self.loop.say(f"vqkit: feature distance of {n} samples against {n} test reconstructions")
        return sample_feature_distance(self, n)

    # ------------------------------------------------------------------ checkpoints
    def modules(self) -> list[nn.Module]:
        return [self.prior]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.prior.state_dict(),
            "optimizers": {"prior": self.opt.state_dict()},
            "schedulers": {"prior": self.sched.state_dict()},
            "scalers": {"prior": self.scaler.state_dict()},
            "prior": {
                "name": self.cfg.prior.name,
                "codebook_size": self.codes.codebook_size,
                "grid": list(self.codes.grid),
                "num_classes": self.num_classes,
            },
            "autoencoder": {"checkpoint": str(self.ae_path), "sha256": self.codes.sha256,
                            **{k: v for k, v in self.ae_run.items() if v is not None}},
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        from vqkit.train.loop import _retarget

        try:
            self.prior.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizers"]["prior"])
            self.sched.load_state_dict(state["schedulers"]["prior"])
            if (state.get("scalers") or {}).get("prior"):
                self.scaler.load_state_dict(state["scalers"]["prior"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise VqkitError(
                f"cannot resume from {where}: its state does not match the recipe's prior "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
            ) from None
        _retarget(self.sched, self.cfg.train.lr, self.cfg.train.steps)


def check_prior_build(recipe: Any) -> None:
    """What ``vqkit validate --build`` does for a prior recipe: find the autoencoder, load it,
    read one test image of its data set, and build the prior for its code grid (class labels
    checked when conditional). Raises :class:`VqkitError` on the first problem."""
    from vqkit.model import VQModel
    from vqkit.tracking import resolve_tracking_uri
    from vqkit.train.build import build_datasets
    from vqkit.train.data import read_batch

    cfg = recipe.model
    path = resolve_autoencoder(cfg.autoencoder, resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.output_dir)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        ae, ae_recipe = VQModel.from_checkpoint(path)
        _, test = build_datasets(ae_recipe)
        grid = tuple(ae.encode(read_batch(test, torch.arange(1))).indices.shape[1:])
        classes = 0
        if cfg.prior.class_conditional:
            labels = getattr(test, "labels", None)
            if labels is None:
                raise VqkitError(Problem(
                    "prior.class_conditional is true but the autoencoder's data set has no class labels "
                    "(a data set exposes them as `labels`)", path="prior.class_conditional"))
            classes = int(torch.as_tensor(labels).max()) + 1
        build_prior(cfg.prior.name, recipe.params_of("prior"), ae.codebook_size, grid, classes)
