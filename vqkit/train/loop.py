"""The training loop shared by model families: one recipe in, one MLflow run and a folder
of checkpoints out.

A model family (the autoencoder, :mod:`vqkit.train.autoencoder`; the prior over its codes,
:mod:`vqkit.prior.family`) supplies a :class:`Family`: how to build its model and data, one
optimizer step, an evaluation, the images it logs, its MLflow tags and inputs and its part
of the checkpoint. :class:`TrainLoop` does everything else, the same way for every family:

* device and process group (torchrun / DDP, :mod:`vqkit.train.distributed`, for families
  that declare ``distributed``; only rank 0 logs, evaluates and writes), seeding, mixed
  precision (:meth:`TrainLoop.autocast`, :meth:`TrainLoop.grad_scaler`);
* the MLflow run and the local run dir (params: the flattened normalized recipe; tags
  ``vqkit.version``, ``vqkit.family``, ``vqkit.recipe_sha256``, ``vqkit.run_dir``,
  ``vqkit.world_size``, the family's own, MLflow's source/entry-point tags, the recipe's
  description, extra tags such as a sweep child's ``mlflow.parentRunId`` and its trial's;
  artifact ``recipe.yaml``); the run is named ``tracking.run_name`` or the recipe's name;
  a resumed leg reopens its run and supersedes what an earlier leg logged after the
  checkpoint's step (the tracker's journal: nothing is logged twice after a kill -9);
* the step loop with a progress bar (or progress lines when stdout is not a terminal),
  metrics averaged over ``train.log_every`` steps plus the family's monitor metrics
  (code-book telemetry), ``train/lr``, ``time/step_s``, ``time/data_s``,
  ``time/data_share`` and ``train/epoch``; evaluation every ``train.eval_every`` steps
  (reported to a sweep's search, which may prune the run), images every
  ``train.image_every`` steps; the family's end-of-run work (plots, final metrics);
* checkpoints (:mod:`vqkit.train.checkpoint`: atomic files, ``latest.json``, pruning,
  ``checkpoints/last.pt`` / ``final.pt`` artifacts, the ``vqkit.last_checkpoint`` tag)
  holding the family's state, the step, the RNG states, the normalized recipe and the run;
  ``resume`` continues bit for bit (the data order is a function of the step);
* a NaN/inf loss (or weights) stops the run, on every rank together, with one ``vqkit:
  error:`` line naming the last good checkpoint; SIGTERM / Ctrl-C checkpoints and ends the
  run as KILLED; a file-system error (full disk, read-only) is one ``vqkit: error:`` line
  naming the file, with the run marked FAILED.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np
import torch
from torch import nn

from vqkit import __version__
from vqkit.errors import Problem, VqkitError
from vqkit.recipe import Recipe
from vqkit.runtime import sigterm_as_interrupt
from vqkit.train import checkpoint as ckpt
from vqkit.train.distributed import DistContext, init_distributed
from vqkit.train.trial import PRUNED_TAG, StopTrial

__all__ = ["Family", "TrainLoop", "NonFiniteLoss", "TrainResult", "seed_everything"]


# =========================================================================== helpers
def check_output_dir(recipe) -> None:
    """``tracking.output_dir`` can hold run dirs: not a file, nor under one (a located
    error at that key, before any MLflow run is created)."""
    folder = Path(recipe.model.tracking.output_dir).expanduser()
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise VqkitError(Problem(f"{part} is a file, not a folder for run dirs",
                                         path="tracking.output_dir", **recipe.locate("tracking.output_dir")))
            return


class NonFiniteLoss(Exception):
    """The loss (or a gradient norm) became NaN or infinite; ``advice`` (when the cause is
    known, e.g. a regulariser's weight) replaces the generic advice of the error line."""

    def __init__(self, message: str, advice: str | None = None):
        super().__init__(message)
        self.advice = advice


@dataclasses.dataclass
class TrainResult:
    """What a finished (or stopped) training call produced."""

    run_id: str | None
    run_dir: Path | None
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None
    tracking_uri: str | None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from the recipe seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _make_optimizer(params: list[nn.Parameter], train_cfg, lr: float) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if train_cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay)


def _finite_params(*modules: nn.Module | None) -> bool:
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                return False
    return True


class _Window:
    """The training terms since the last logged step: the next logged value of each is their
    mean over the steps that computed it. Checkpointed (``window``), so a run interrupted or
    killed between two logged steps logs, once resumed, the same values a straight run does."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # steps that computed each term (R1 every N, a late start)
        self.n = 0
        self.data_s = self.step_s = 0.0

    def add(self, terms: dict[str, torch.Tensor], data_s: float, step_s: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.n += 1
        self.data_s += data_s
        self.step_s += step_s

    def state_dict(self) -> dict[str, Any] | None:
        if not self.n:
            return None
        return {"sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()}, "counts": dict(self.counts),
                "n": self.n, "data_s": self.data_s, "step_s": self.step_s}

    @classmethod
    def restored(cls, state: dict[str, Any] | None, device: torch.device) -> "_Window":
        window = cls()
        if state:
            window.sums = {k: v.to(device) for k, v in state["sums"].items()}
            window.counts = {k: int(v) for k, v in state["counts"].items()}
            window.n, window.data_s, window.step_s = int(state["n"]), float(state["data_s"]), float(state["step_s"])
        return window


class _StopTogether(KeyboardInterrupt):
    """An interrupt every rank of a data-parallel run agreed on, at the same step."""


class _HeldSignals:
    """SIGINT and SIGTERM held while a training step updates the weights and logs its
    metrics, then raised as KeyboardInterrupt: a checkpoint written on interrupt holds whole
    steps. A second signal while held interrupts at once (a step that hangs stays
    interruptible), and ``forced`` tells the loop that the weights may hold part of a step.
    Under torchrun a second signal within ``same_s`` of the first counts as the same one: a
    Ctrl-C reaches a rank started by ``torchrun`` from the terminal and again from torchrun."""

    def __init__(self) -> None:
        self.held: list[int] = []
        self.previous: dict[int, Any] | None = None
        self.forced = False
        self._first = 0.0
        self.same_s = 1.0 if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0.0

    def _handler(self, signum, frame):
        if self.held:
            if time.monotonic() - self._first < self.same_s:
                return
            self.forced = True
            raise KeyboardInterrupt
        self._first = time.monotonic()
        self.held.append(signum)

    def hold(self) -> None:
        import threading

        if self.previous is None and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        if self.previous is not None:
            for s, h in self.previous.items():
                signal.signal(s, h)
            self.previous = None

    def release(self) -> None:
        self.restore()
        if self.held:
            self.held.clear()
            raise KeyboardInterrupt

    def agree(self, dist: Any) -> None:
        """Several ranks: stop together. Every rank says whether a signal came (a collective
        at the same step on every rank); if one did, all raise KeyboardInterrupt here, at the
        same step. The signals stay held until then (through evaluation, images and
        checkpoints too), so no rank leaves while another waits in a collective."""
        if dist.any_flag(bool(self.held)):
            self.held.clear()
            self.restore()
            raise _StopTogether


@contextlib.contextmanager
def _signals_held_while_writing() -> Iterator[list[int]]:
    """SIGINT and SIGTERM held while a checkpoint is written: a signal that comes then waits
    until the file is complete and renamed (tearing ``torch.save`` would leave no checkpoint
    and a traceback). Yields the list of the signals that came; the caller acts on them."""
    import threading

    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def handler(signum, frame):
        came.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _retarget(sched: torch.optim.lr_scheduler.LambdaLR, lr: float, total_steps: int) -> None:
    """Make a restored scheduler follow the recipe's peak LR and length (a resumed run may
    change ``train.lr`` or ``train.steps``); a no-op when they are unchanged."""
    for fn in sched.lr_lambdas:
        fn.total_steps = total_steps
    sched.base_lrs = [float(lr) for _ in sched.base_lrs]
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes (hard link, else copy), atomically."""
    import shutil

    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


# =========================================================================== the loop
class Family(abc.ABC):
    """One model family's part of training, called by :class:`TrainLoop`.

    Methods are called in this order: :meth:`setup` (once, after seeding), then
    :meth:`load_state_dict` when resuming (the RNG states are restored right after it),
    :meth:`prepare`, :meth:`tags` and :meth:`log_inputs` (rank 0, with the run started),
    :meth:`train_mode`, then :meth:`batches` and :meth:`train_step` for every step, with
    :meth:`monitor_metrics` (rank 0) at each logged window and :meth:`evaluate` /
    :meth:`log_images` (rank 0) at their intervals, :meth:`after_loop` (every rank) when the
    steps of this call are done and :meth:`finish` (rank 0) after the last step of
    ``train.steps``.

    Work that rank 0 does alone (evaluation, images) reports non-finite values through
    :meth:`TrainLoop.main_only_failure`, never by raising, so every rank stops together.
    """

    #: checkpoint key ``family`` and tag ``vqkit.family``
    name: str = ""
    #: metrics shown in the progress bar / lines and the summary: (key, label, format)
    shown: tuple[tuple[str, str, str], ...] = ()
    #: runs under torchrun, one process per rank (``vqkit train --nproc``)
    distributed: bool = False

    @abc.abstractmethod
    def setup(self, loop: "TrainLoop") -> None:
        """Build models, optimizers and data on ``loop.device`` (``loop.resume`` holds the
        checkpoint being resumed, if any; ``loop.dist`` the process group)."""

    def prepare(self) -> None:  # noqa: B027
        """After the checkpoint's state and RNG states are restored: wrap models for DDP,
        set up the data order, read fixed images."""

    @abc.abstractmethod
    def batches(self, start: int, stop: int) -> Iterator[Any]:
        """The batches of steps ``start .. stop-1`` (a pure function of the step)."""

    def train_mode(self) -> None:  # noqa: B027
        """Put the models in training mode (before the first step of a call)."""

    @abc.abstractmethod
    def train_step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
        """One optimizer update; detached 0-dim metric tensors. Raises
        :class:`NonFiniteLoss` when the loss is NaN/inf."""

    def monitor_metrics(self, step: int, regular: bool) -> dict[str, float]:
        """Metrics merged into each logged window on rank 0 (e.g. code-book telemetry).
        ``regular`` is false for the window that ends an early stop (``stop_after``): a
        monitor must not add to its history then, so a resumed run ends in the state of an
        uninterrupted one."""
        return {}

    @abc.abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Metrics on the test split (rank 0)."""

    def log_images(self, step: int, run_dir: Path, tracker: Any) -> None:  # noqa: B027
        """Write and log the family's images at ``step`` (rank 0)."""

    def after_loop(self) -> None:  # noqa: B027
        """Every rank, when the steps of this call are done."""

    def finish(self, run_dir: Path, tracker: Any) -> dict[str, float]:
        """Work after the last step (rank 0: e.g. final metrics, plots); returns metrics to log."""
        return {}

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The family's part of a checkpoint (models, optimizers, schedulers, ...)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Restore :meth:`state_dict` output (``where`` names the file, for errors)."""

    @abc.abstractmethod
    def modules(self) -> list[nn.Module | None]:
        """Modules whose weights must stay finite (never checkpointed otherwise)."""

    @abc.abstractmethod
    def lr(self) -> float:
        """The current learning rate."""

    def epoch_of(self, step: int) -> int:
        return 0

    def tags(self) -> dict[str, Any]:
        """Extra MLflow tags of the run (e.g. components, links to other runs)."""
        return {}

    def log_inputs(self, tracker: Any) -> None:  # noqa: B027
        """Log the run's inputs (e.g. MLflow datasets) when a new run starts."""

    def not_implemented(self, exc: NotImplementedError) -> BaseException:
        """The error to raise when a component does not implement what the recipe asks."""
        return exc

    # ---------------------------------------------------------------- what is printed
    def postfix(self, m: dict[str, float]) -> dict[str, str]:
        """The progress bar's postfix."""
        return {label: fmt.format(m[key]) for key, label, fmt in self.shown if key in m}

    def progress(self, m: dict[str, float]) -> list[str]:
        """The parts of a progress line after ``step N/M``."""
        return [f"{key}={fmt.format(m[key])}" for key, _, fmt in self.shown if key in m]

    def summary(self, m: dict[str, float]) -> list[str]:
        """The parts of the final ``vqkit: step N:`` line."""
        return self.progress(m)


class TrainLoop:
    """Trains one family on one recipe; see the module docstring.

    Args:
        recipe: the validated recipe.
        family: the model family's step.
        resume: a loaded checkpoint to continue from, ``resume_path`` its file.
        quiet: no progress bar or lines (the summary still prints).
        stop_after: stop (with a checkpoint) after this many total steps; the LR schedule
            still follows ``train.steps``.
        stdout / stderr: where to print (default: the process's).
        tags: extra MLflow tags of the run, e.g. ``{"mlflow.parentRunId": ID}`` for a child
            of a sweep (a sweep's trial adds its own, from the environment).
        entry_point: the command recorded as the run's ``mlflow.project.entryPoint`` and
            shown in the resume hint.
    """

    #: resuming a FINISHED run from a checkpoint *file* logs a new run instead, so the
    #: finished run keeps its status (``vqkit train --resume FILE`` sets this False)
    continue_finished_runs: bool = True

    def __init__(self, recipe: Recipe, family: Family, *, resume: dict[str, Any] | None = None,
                 resume_path: Path | None = None, quiet: bool = False, stop_after: int | None = None,
                 stdout: TextIO | None = None, stderr: TextIO | None = None,
                 tags: dict[str, str] | None = None, entry_point: str = "vqkit train"):
        from vqkit.train.trial import channel_from_env

        self.recipe = recipe
        self.cfg = recipe.model
        self.family = family
        self.resume = resume
        self.resume_path = resume_path
        self.quiet = quiet
        self.stop_after = stop_after
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.extra_tags = dict(tags or {})
        # a sweep's child: its trial's tags, and the search it reports evaluations to (pruning)
        self.trial = channel_from_env()
        if self.trial is not None:
            self.extra_tags.update(self.trial.tags)
        self.entry_point = entry_point
        self.dist: DistContext | None = None
        self.device = torch.device("cpu")
        self.tracker: Any = None
        self.system_metrics: Any = None
        self.run_dir: Path | None = None
        self.ckpt_dir: Path | None = None
        self.step = 0
        self.last_good: Path | None = None
        self.last_eval: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self._main_failure: str | None = None

    def say(self, text: str) -> None:
        """A note on stderr (rank 0 only)."""
        if self.dist is None or self.dist.is_main:
            print(text, file=self.err, flush=True)

    # ------------------------------------------------------------------ setup
    def _match_threads(self) -> None:
        """A resume on CPU continues with the run's CPU thread count (the checkpoint's
        ``threads``): another count sums convolutions and matrix products in another order,
        so the run would not continue bit for bit. Kept when the user chose a count
        (``OMP_NUM_THREADS``) or the run's is more than this machine has, with a warning."""
        saved = (self.resume or {}).get("threads")
        now = torch.get_num_threads()
        if not saved or saved == now or self.device.type != "cpu":
            return
        from vqkit.train.data import usable_cpus

        def threads(n: int) -> str:
            return f"{n} CPU thread{'s' if n != 1 else ''}"

        chosen = os.environ.get("OMP_NUM_THREADS")
        if chosen or saved > usable_cpus():
            why = f"OMP_NUM_THREADS={chosen}" if chosen else f"this machine has {usable_cpus()} CPUs"
            self.say(f"vqkit: warning: the run trained with {threads(saved)}, this process uses {now} ({why}): "
                     "the resumed run is not bit-identical to an uninterrupted one")
            return
        torch.set_num_threads(int(saved))
        if not self.quiet:
            self.say(f"vqkit: note: resuming with the run's {threads(saved)} (this process had {now}), so that "
                     "it continues bit for bit; set OMP_NUM_THREADS to choose another count")

    def _setup(self) -> None:
        fam = self.family
        if not fam.distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise VqkitError(f"{fam.name} training runs in one process (no --nproc / torchrun)")
        self.dist = dist = init_distributed(self.cfg.train.device)
        self.device = dist.device
        self._match_threads()
        seed_everything(self.cfg.seed)
        fam.setup(self)
        if self.resume is not None:
            found = self.resume.get("family") or "autoencoder"  # autoencoder checkpoints before 0.x had none
            if found != fam.name:
                raise VqkitError(
                    f"{self.resume_path} is a checkpoint of a {found} run, not of a {fam.name}"
                )
            fam.load_state_dict(self.resume, str(self.resume_path or "checkpoint"))
            ckpt.restore_rng(self.resume["rng"])
        self.step = int(self.resume["step"]) if self.resume is not None else 0
        # an interrupt during this step's evaluation or images: the resumed leg does them first
        pending = (self.resume or {}).get("pending") or {}
        self._catch_up = pending if pending.get("step") == self.step else None
        # the steps since the checkpoint's last logged one: the resumed leg's first window
        self._window = _Window.restored((self.resume or {}).get("window"), self.device)
        fam.prepare()

    def _setup_tracking(self) -> None:
        from vqkit.tracking import DESCRIPTION_TAG, Tracker, context_tags, read_run_info, resolve_tracking_uri

        tcfg = self.cfg.tracking
        dist = self.dist
        if self.resume_path is None:  # before the MLflow run exists: no FAILED run for a bad folder
            check_output_dir(self.recipe)
        prev_run = (self.resume or {}).get("run") or {}
        uri = tcfg.uri or None
        if uri is None and not os.environ.get("MLFLOW_TRACKING_URI") and prev_run.get("tracking_uri"):
            uri = prev_run["tracking_uri"]  # continue the run in the store that holds it
        uri = resolve_tracking_uri(uri)
        run_name = tcfg.run_name or self.cfg.name
        self.tracker = tracker = Tracker(uri, tcfg.experiment, run_name, enabled=dist.is_main, stderr=self.err)

        # the run dir: the resumed checkpoint's run dir, else <output_dir>/<run id>
        run_dir: Path | None = None
        if self.resume_path is not None:
            parent = Path(self.resume_path).resolve().parent
            for cand in (parent.parent, parent):
                if read_run_info(cand):
                    run_dir = cand
                    break
            if run_dir is None and prev_run.get("run_dir") and read_run_info(prev_run["run_dir"]):
                run_dir = Path(prev_run["run_dir"])
        resume_id = prev_run.get("run_id")
        if run_dir is not None:
            info = read_run_info(run_dir)
            resume_id = info.get("run_id") or resume_id
            tracker.local_id = info.get("local_id") or tracker.local_id
        if resume_id and prev_run.get("tracking_uri") and prev_run["tracking_uri"] != uri:
            self.say(
                f"vqkit: note: the resumed run was tracked at {prev_run['tracking_uri']}; "
                f"logging to a new run at {uri}"
            )
            resume_id = None
        forked_from = None
        if resume_id and not self.continue_finished_runs and dist.is_main:
            from vqkit.tracking import run_status

            if run_status(uri, resume_id) == "FINISHED":
                import uuid

                self.say(f"vqkit: note: MLflow run {resume_id} is FINISHED; training resumed from "
                         f"{self.resume_path} is logged as a new run (tag vqkit.resumed_from)")
                forked_from, resume_id, run_dir = resume_id, None, None
                tracker.local_id = uuid.uuid4().hex[:12]
        # a resumed leg supersedes what an earlier leg logged after the checkpoint's step
        # (the tracker's journal: a leg killed with kill -9 logs nothing twice)
        run_id = tracker.start(resume_run_id=resume_id, after_step=self.step if self.resume is not None else None)
        if run_dir is None:
            run_dir = Path(tcfg.output_dir).resolve() / (run_id or f"local-{tracker.local_id}")
        self.run_dir = run_dir
        if not dist.is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        from vqkit.runtime import RUN_LOCK, hold_run_lock

        self._run_lock = hold_run_lock(run_dir)  # `--resume` tells a live run from a dead one by it
        if self._run_lock is None and os.access(run_dir, os.W_OK):
            raise VqkitError(
                f"{run_dir} is being trained by another process right now (it holds {run_dir / RUN_LOCK}); "
                "wait for it to end or stop it, then resume"
            )
        tracker.attach(run_dir)
        if forked_from is not None:
            tracker.set_tags({"vqkit.resumed_from": json.dumps(
                {"run_id": forked_from, "checkpoint": str(self.resume_path), "step": self.step})})
        self.ckpt_dir = run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.ckpt_dir, run_dir / "grids"):  # a killed process's temp files
            ckpt.remove_temp_files(folder)

        tracker.log_params(self.recipe.flat_params())
        tags = {
            "vqkit.version": __version__,
            "vqkit.family": self.family.name,
            "vqkit.recipe_sha256": self.recipe.sha256(),
            "vqkit.run_dir": str(run_dir),
            "vqkit.world_size": dist.world_size,
            **self.family.tags(),
        }
        if self.resume is not None:
            tags["vqkit.resumed_from_step"] = self.step
        tags.update(context_tags(self.recipe.source, self.entry_point))
        if tcfg.description:
            tags[DESCRIPTION_TAG] = tcfg.description
        tags.update(self.extra_tags)
        tracker.set_tags(tags)
        recipe_path = run_dir / "recipe.yaml"
        recipe_path.write_text(self.recipe.to_yaml(), encoding="utf-8")
        tracker.log_artifact(recipe_path)
        if self.resume is None:
            self.family.log_inputs(tracker)
        if tcfg.system_metrics:
            from vqkit.tracking import SystemMetrics

            self.system_metrics = SystemMetrics(uri, tracker.run_id)

    # ------------------------------------------------------------------ mixed precision
    def autocast(self):
        """The forward passes' autocast context when ``train.amp`` (bf16 on CPU, fp16 on
        CUDA, with :meth:`grad_scaler`), else a no-op."""
        if not self.cfg.train.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type,
                              dtype=torch.float16 if self.device.type == "cuda" else torch.bfloat16)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for one optimizer: enabled for ``train.amp`` on CUDA (fp16)."""
        return torch.amp.GradScaler("cuda", enabled=bool(self.cfg.train.amp) and self.device.type == "cuda")

    # ------------------------------------------------------------------ non-finite values
    def nonfinite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` holds NaN/inf on any rank (collective under DDP)."""
        bad = not bool(torch.isfinite(value).all())
        return self.dist.any_flag(bad) if self.dist.enabled else bad

    def _check_weights(self) -> None:
        """Stop (every rank together: the check is collective) if any rank's weights hold
        NaN or inf; called on every rank before work that rank 0 does alone."""
        if self.dist.any_flag(not _finite_params(*self.family.modules())):
            raise NonFiniteLoss(f"model weights are NaN or infinite after step {self.step}")

    def main_only_failure(self, message: str) -> None:
        """Rank 0's own work (evaluation, images) met non-finite values: stop now when alone,
        else at :meth:`_share_main_failure`, where every rank stops together."""
        if not self.dist.enabled:
            raise NonFiniteLoss(message)
        self._main_failure = message

    def _share_main_failure(self) -> None:
        """Collective (every rank calls it after rank 0's evaluation/images)."""
        failure = self._main_failure
        if self.dist.enabled and self.dist.any_flag(failure is not None):
            raise NonFiniteLoss(failure or "rank 0 met non-finite values in its evaluation or images")

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "vqkit_version": __version__,
            "family": self.family.name,
            "step": self.step,
            # the work of this step not done when it was interrupted ({"step", "eval", "images"})
            "pending": dict(self._pending) if getattr(self, "_pending", None) else None,
            # the terms summed since the last logged step (continued by a resume)
            "window": self._window.state_dict() if getattr(self, "_window", None) is not None else None,
            "recipe": self.recipe.to_dict(),
            **self.family.state_dict(),
            "rng": ckpt.capture_rng(),
            "threads": torch.get_num_threads(),  # a CPU resume matches it (_match_threads)
            "run": {
                "run_id": getattr(self.tracker, "run_id", None),
                "local_id": getattr(self.tracker, "local_id", None),
                "tracking_uri": getattr(self.tracker, "uri", None),
                "experiment": self.cfg.tracking.experiment,
                "run_dir": str(self.run_dir) if self.run_dir else None,
            },
        }

    def save(self, final: bool = False, collective: bool = True) -> Path | None:
        """Write a checkpoint of the current state (rank 0); never one with non-finite
        weights. Called on every rank (the weight check is collective) unless
        ``collective`` is false (rank 0 alone, after an interrupt). SIGINT/SIGTERM wait
        while the file is written and logged; one that came then interrupts once the checkpoint is
        complete (not after ``final.pt``, nor in a save on the way out, ``collective``
        false: the run ends anyway)."""
        if collective:
            self._check_weights()
        if not self.dist.is_main:
            return None
        if not _finite_params(*self.family.modules()):
            raise NonFiniteLoss(f"model weights are NaN or infinite after step {self.step}")
        path = self.ckpt_dir / "final.pt" if final else ckpt.step_file(self.ckpt_dir, self.step)
        came: list = []
        try:
            with _signals_held_while_writing() as came:
                ckpt.save_checkpoint(path, self.state())
                ckpt.write_latest(self.ckpt_dir, path, self.step)
                if not final:
                    ckpt.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_checkpoints)
                self.last_good = path
                self._saved_step = self.step
                # logged before a held signal stops the run: the way-out save skips a step
                # already saved, so a checkpoint not logged now would never be in MLflow
                self._log_checkpoint(path, final)
        finally:
            if came and collective and not final:  # after final.pt the run is complete: it ends FINISHED
                signals = getattr(self, "_signals", None)
                if self.dist.enabled and signals is not None:
                    signals.held.extend(came)  # the ranks stop together, at the next step's agreement
                else:
                    raise KeyboardInterrupt
        return path

    def _log_checkpoint(self, path: Path, final: bool) -> None:
        """The checkpoint just written, in MLflow (an artifact and the run's tag)."""
        if final:
            self.tracker.log_artifact(path, "checkpoints")
        else:  # one periodic checkpoint in MLflow, replaced at each save
            link = self.ckpt_dir / "last.pt"
            _link_or_copy(path, link)
            self.tracker.log_artifact(link, "checkpoints")
        artifact = "final.pt" if final else "last.pt"
        self.tracker.set_tags(
            {"vqkit.last_checkpoint": json.dumps({"artifact": f"checkpoints/{artifact}", "step": self.step})}
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        try:
            self._setup()
            self._setup_tracking()
        except BaseException as exc:
            if self.dist is not None:
                self.dist.close()
            if isinstance(exc, OSError):  # e.g. an unwritable run folder
                self._fail_os(exc, end_run=True)
            if isinstance(exc, NotImplementedError):
                self._raise_not_implemented(exc)
            raise
        tc = self.cfg.train
        dist = self.dist
        stop = tc.steps if self.stop_after is None else min(tc.steps, self.stop_after)
        start = self.step
        if start >= stop:
            self.say(f"vqkit: nothing to do: the checkpoint is at step {start} and train.steps is {tc.steps}")
        self.say(f"vqkit: {self.tracker.describe()}")
        self.say(f"vqkit: run dir {self.run_dir}")
        status = "FAILED"
        together = False
        previous_term = sigterm_as_interrupt()
        try:
            self._loop(start, stop)
            status = "FINISHED" if self.step >= tc.steps else "RUNNING"
        except NonFiniteLoss as exc:
            self._fail_nonfinite(exc)
        except NotImplementedError as exc:  # a component cannot do what the recipe asks
            self._raise_not_implemented(exc)
        except OSError as exc:  # full disk, read-only file system, permissions: FAILED below
            self._fail_os(exc)
        except StopTrial as exc:  # the sweep's search pruned this child: resumable, KILLED, exit 0
            status = "KILLED"
            path = self.save(collective=False)
            self.tracker.set_tags({PRUNED_TAG: str(exc.step)})
            self.say(f"vqkit: stopped at step {exc.step}: pruned by the sweep's search; checkpoint {path}")
        except KeyboardInterrupt as exc:
            status = "KILLED"
            together = isinstance(exc, _StopTogether)
            if getattr(getattr(self, "_signals", None), "forced", False):  # a second signal inside a step
                self.say(f"vqkit: interrupted inside step {self.step + 1} (a second signal): its update may "
                         f"be partial, so no checkpoint is written; continue from the newest one with "
                         f"`{self.entry_point} --resume {self.run_dir}`")
            elif (self.step > start and getattr(self, "_saved_step", None) == self.step
                  and self.last_good is not None):  # a signal during this step's checkpoint write
                self.say(f"vqkit: interrupted at step {self.step}; checkpoint {self.last_good}; continue with "
                         f"`{self.entry_point} --resume {self.run_dir}`")
            elif self.step > start and dist.is_main and _finite_params(*self.family.modules()):
                try:
                    path = self.save(collective=False)
                except OSError as exc:  # e.g. the disk filled up: the newest checkpoint stays
                    self.say(f"vqkit: warning: interrupted at step {self.step}; no checkpoint written "
                             f"({exc.filename}: {exc.strerror or exc})")
                else:
                    self.say(f"vqkit: interrupted at step {self.step}; checkpoint {path}; continue with "
                             f"`{self.entry_point} --resume {self.run_dir}`")
            raise
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            if self.system_metrics is not None:
                self.system_metrics.finish()
            if dist.is_main and status == "FAILED":
                self._tag_failure(sys.exc_info()[1])
            if dist.is_main and status != "RUNNING":
                self.tracker.finish(status)
            elif dist.is_main:
                self.tracker.flush()
            # ranks that stopped together wait for rank 0's interrupt checkpoint and run end
            dist.close(barrier=status in ("FINISHED", "RUNNING") or together)
            if getattr(self, "_run_lock", None) is not None:
                self._run_lock.release()
        result = TrainResult(
            run_id=self.tracker.run_id, run_dir=self.run_dir, step=self.step,
            metrics={**self.last_metrics, **self.last_eval}, checkpoint=self.last_good,
            tracking_uri=self.tracker.uri,
        )
        if dist.is_main:
            self._summary(result)
        return result

    def _tag_failure(self, exc: BaseException | None) -> None:
        """Tag a run that ends FAILED with ``vqkit.failure`` (what stopped it), unless the
        handler of a file-system error or a non-finite loss already did."""
        if exc is None or isinstance(exc.__context__, (NonFiniteLoss, OSError)):
            return
        text = str(exc) if isinstance(exc, VqkitError) else f"{type(exc).__name__}: {exc}"
        try:
            self.tracker.set_tags({"vqkit.failure": text[:5000]})
        except Exception:  # pragma: no cover - the original error matters more
            pass

    def _raise_not_implemented(self, exc: NotImplementedError) -> None:
        error = self.family.not_implemented(exc)
        if error is exc:
            raise exc
        raise error from None

    def _fail_os(self, exc: OSError, end_run: bool = False) -> None:
        """Raise the one-line user error for a file-system error (the path and the cause),
        after tagging the MLflow run ``vqkit.failure`` (and ending it FAILED when
        ``end_run``; the loop's ``finally`` does it otherwise)."""
        import errno as errno_names

        name = errno_names.errorcode.get(exc.errno or 0, "")
        cause = (exc.strerror or str(exc)) + (f" ({name})" if name else "")
        reason = f"{exc.filename}: {cause}" if exc.filename else cause
        tracker = self.tracker
        # a resumed leg that fails before it trains leaves the run as it found it
        before = getattr(tracker, "reopened_from", None) if end_run else None
        keep_status = before in ("FINISHED", "FAILED", "KILLED")
        if tracker is not None and getattr(tracker, "enabled", False):
            try:
                if not keep_status:
                    tracker.set_tags({"vqkit.failure": f"file system error: {reason}"[:5000]})
                if end_run:
                    tracker.finish(before if keep_status else "FAILED")
            except OSError:  # pragma: no cover - the tracker keeps what it cannot write
                pass
        ckpt_dir = self.ckpt_dir
        newest = ckpt.latest_checkpoint(ckpt_dir) if ckpt_dir is not None and ckpt_dir.is_dir() else None
        keep = f"; the newest checkpoint, {newest}, is intact" if newest is not None else ""
        ended = ""
        if tracker is not None and getattr(tracker, "run_id", None):
            ended = f"; the MLflow run keeps its status {before}" if keep_status else "; the MLflow run is marked FAILED"
        raise VqkitError(f"{reason}{ended}{keep}") from None

    def _fail_nonfinite(self, exc: NonFiniteLoss) -> None:
        if self.dist.is_main:
            self.tracker.set_tags({"vqkit.failure": f"non-finite loss: {exc}"[:5000]})
        good = self.last_good or (self.resume_path if self.resume is not None else None)
        keep = f"the last good checkpoint is {good}" if good else "no checkpoint was written before it"
        then = "then resume from the last good checkpoint" if good else "then train again"
        raise VqkitError(
            f"training stopped: the loss became NaN/inf ({exc}); {keep}. "
            f"{exc.advice or 'Lower train.lr, set train.grad_clip, or disable train.amp'}, {then}"
        ) from None

    def _loop(self, start: int, stop: int) -> None:
        tc = self.cfg.train
        dist = self.dist
        fam = self.family
        show_bar = (not self.quiet) and dist.is_main and self.out.isatty()
        lines = (not self.quiet) and dist.is_main and not show_bar
        bar = None
        self._last_line = time.monotonic()
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True, file=self.out,
                       desc=self.cfg.name)
        fam.train_mode()
        window = self._window
        batches = fam.batches(start, stop)
        signals = self._signals = _HeldSignals()
        try:
            if getattr(self, "_catch_up", None):
                self._do_pending(self._catch_up)
            for step in range(start, stop):
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                signals.hold()
                terms = fam.train_step(batch, step)
                if self.device.type == "cuda" and (step + 1) % tc.log_every == 0:
                    torch.cuda.synchronize(self.device)
                window.add(terms, t1 - t0, time.perf_counter() - t0)
                self.step = step + 1
                last = self.step == stop
                periodic = last or any(self.step % every == 0 for every in (tc.eval_every, tc.image_every))
                if bar is not None:
                    bar.update(1)
                if periodic:
                    self._check_weights()  # before rank 0 evaluates or draws alone
                if self.step % tc.log_every == 0 or last:
                    metrics = {k: float(v) / window.counts[k] for k, v in window.sums.items()}
                    if dist.is_main:
                        regular = self.step % tc.log_every == 0 or self.step == tc.steps
                        metrics.update(fam.monitor_metrics(self.step, regular))
                    metrics["train/lr"] = fam.lr()
                    metrics["time/data_s"] = window.data_s / window.n
                    metrics["time/step_s"] = window.step_s / window.n
                    metrics["time/data_share"] = window.data_s / window.step_s if window.step_s > 0 else 0.0
                    metrics["train/epoch"] = float(fam.epoch_of(step))
                    self.last_metrics = metrics
                    self.tracker.log_metrics(metrics, self.step)
                    window = self._window = _Window()
                    evaluates = self.step % tc.eval_every == 0 or (last and self.step == tc.steps)
                    if lines and not evaluates and self._progress_due():  # no TTY: a line now and then
                        self._progress_line(with_eval=False)
                    if bar is not None:
                        bar.set_postfix(fam.postfix(metrics), refresh=False)
                evaluates = dist.is_main and (self.step % tc.eval_every == 0 or (last and self.step == tc.steps))
                draws = dist.is_main and (self.step % tc.image_every == 0 or last)
                self._pending = {"step": self.step, "eval": evaluates, "images": draws}
                if dist.enabled:  # several ranks: they stop at the same step, here
                    signals.agree(dist)
                else:
                    signals.release()  # a signal held during the step interrupts here
                if evaluates:
                    self.last_eval = fam.evaluate()
                    self.tracker.log_metrics(self.last_eval, self.step)
                    self._pending["eval"] = False
                    if (self.trial is not None and self.step < tc.steps
                            and self.trial.report(self.step, self.last_eval)):
                        self._pruned_at = self.step  # data-parallel: every rank stops below, together
                        if dist.world_size == 1:
                            raise StopTrial(self.step)
                    if bar is not None:
                        bar.set_postfix(fam.postfix({**self.last_metrics, **self.last_eval}), refresh=False)
                    if lines:
                        self._progress_line()
                if draws:
                    fam.log_images(self.step, self.run_dir, self.tracker)
                    self._pending["images"] = False
                self._pending = None
                if periodic:
                    self._share_main_failure()
                    if self.trial is not None and dist.any_flag(getattr(self, "_pruned_at", None) is not None):
                        raise StopTrial(self.step)  # rank 0's search said stop: all ranks stop at this step
                if self.step % tc.checkpoint_every == 0 and not (last and self.step == tc.steps):
                    self.save()
                elif last and self.step < tc.steps:
                    self.save()  # stopped early (stop_after): keep a resumable checkpoint
        finally:
            signals.restore()
            if bar is not None:
                bar.close()
        fam.after_loop()
        if self.step >= tc.steps:
            if dist.is_main:
                final = fam.finish(self.run_dir, self.tracker)
                if final:
                    self.tracker.log_metrics(final, self.step)
                    self.last_eval.update(final)
            self.save(final=True)

    def _do_pending(self, pending: dict[str, Any]) -> None:
        """The evaluation and images of the checkpoint's step that an interrupt cut short."""
        self._check_weights()
        if self.dist.is_main and pending.get("eval"):
            self.last_eval = self.family.evaluate()
            self.tracker.log_metrics(self.last_eval, self.step)
        if self.dist.is_main and pending.get("images"):
            self.family.log_images(self.step, self.run_dir, self.tracker)
        self._share_main_failure()
        self._catch_up = None

    #: without a TTY (and without --quiet) a progress line is printed at the first
    #: ``train.log_every`` step after this many seconds since the last line, and at every
    #: evaluation
    progress_every_s: float = 30.0
    _last_line: float | None = None

    def _progress_due(self) -> bool:
        now = time.monotonic()
        if self._last_line is None:
            self._last_line = now
        return now - self._last_line >= self.progress_every_s

    def _progress_line(self, with_eval: bool = True) -> None:
        m = {**self.last_metrics, **self.last_eval} if with_eval else dict(self.last_metrics)
        parts = [f"step {self.step}/{self.cfg.train.steps}", *self.family.progress(m)]
        print("vqkit: " + " ".join(parts), file=self.out, flush=True)
        self._last_line = time.monotonic()

    def _summary(self, result: TrainResult) -> None:
        bits = self.family.summary(result.metrics)
        print(f"vqkit: step {result.step}: " + (" ".join(bits) if bits else "done"), file=self.out)
        if result.run_id:
            print(f"vqkit: MLflow run {result.run_id} (experiment {self.cfg.tracking.experiment!r}) "
                  f"in {result.tracking_uri}", file=self.out)
        print(f"vqkit: run dir {result.run_dir}" + (f"; checkpoint {result.checkpoint}" if result.checkpoint else ""),
              file=self.out, flush=True)
        if result.run_id and result.tracking_uri:
            from vqkit.tracking import ui_command

            print(f"vqkit: see it in MLflow's UI: {ui_command(result.tracking_uri)}", file=self.out, flush=True)
