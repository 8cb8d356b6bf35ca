"""Check `vqkit sweep --launcher submitit` against a real Slurm cluster (sbatch, scancel).

Made for the one-node cluster of scripts/slurm-local.sh (works on any cluster whose nodes share
this machine's file system and Python):

    scripts/slurm-local.sh up && export SLURM_CONF=/tmp/vqkit-slurm/slurm.conf
    .venv/bin/python scripts/slurm_sweep_check.py [--partition debug] [--keep]
    scripts/slurm-local.sh down

In a fresh folder (under /tmp), with the tiny test recipe (vqkit.testing.sweeps) and the default
sqlite store (./mlflow.db, which every job reaches on the shared file system):

1. a 2x2 grid, 4 children as 4 sbatch jobs (1 CPU each), all in flight (--jobs 4): the check
   reads 4 FINISHED children under one parent from the store, and that Slurm ran them (job ids
   from sbatch, at most as many at once as the node has CPUs);
2. an interrupted sweep: a 1-child sweep of 400 steps is sent SIGTERM (what Ctrl-C or a
   scheduler does) once the child has a checkpoint: the launcher scancels the job, the child
   checkpoints, the sweep exits 130 and no job is left in the queue; the same command again
   resumes the child from its checkpoint (a new Slurm job) and finishes it.

Prints what it measured (wall times, overlap, job ids); exit 0 when every check holds, 1 when
one fails, 2 when Slurm is not reachable.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def vqkit(*argv: str) -> list[str]:
    return [sys.executable, "-m", "vqkit.cli", *argv]


def check(cond: bool, what: str) -> None:
    print(("ok    " if cond else "FAIL  ") + what, flush=True)
    if not cond:
        raise SystemExit(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if shutil.which("sbatch") is None:
        print("slurm_sweep_check: no sbatch on PATH (apt-get install slurm-wlm; scripts/slurm-local.sh up)",
              file=sys.stderr)
        return 2
    try:
        info = sh("sinfo", "-h", "-o", "%N %c %T")
    except subprocess.CalledProcessError as exc:
        print(f"slurm_sweep_check: Slurm is not reachable (sinfo: {exc.stderr.strip()}); "
              "scripts/slurm-local.sh up, export SLURM_CONF=...", file=sys.stderr)
        return 2
    cpus = sum(int(line.split()[1]) for line in info.splitlines() if line.split())
    print(f"Slurm: {info.strip()} ({cpus} CPUs)", flush=True)

    from vqkit.testing.sweeps import sqlite_store, write_recipe

    work = Path(tempfile.mkdtemp(prefix="vqkit-slurm-check-"))
    os.chdir(work)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    uri = sqlite_store(work)
    launcher = ["--launcher", "submitit", "--set", "sweep.launcher.params.cluster=slurm",
                "--set", "sweep.launcher.params.cpus_per_task=1", "--set", "sweep.launcher.params.timeout_min=20",
                "--set", "sweep.launcher.params.poll_s=1"]
    if args.partition:
        launcher += ["--set", f"sweep.launcher.params.slurm_partition={args.partition}"]

    # 1. four children as four Slurm jobs
    recipe = write_recipe(work)
    argv = vqkit("sweep", str(recipe), "--grid", "quantizer.params.codebook_size=8,16", "--grid",
                 "reset.name=none,random", "--jobs", "4", *launcher)
    print("$ vqkit " + " ".join(argv[3:]), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    check(proc.returncode == 0, f"4-child sweep through sbatch: exit {proc.returncode} in {wall:.0f} s"
          + ("" if proc.returncode == 0 else f"\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"))
    (parent,), children = _runs(uri, "sw")
    check(len(children) == 4 and all(r.info.status == "FINISHED" for r in children),
          f"4 FINISHED children under parent {parent.info.run_id[:8]}: "
          + ", ".join(f"{r.info.run_name} {r.data.metrics.get('eval/psnr', float('nan')):.2f} dB" for r in children))
    ids = [line.split("submitted as job ")[1].split()[0] for line in proc.stdout.splitlines()
           if "submitted as job" in line]
    check(len(ids) == 4 and all(i.isdigit() for i in ids) and proc.stdout.count("(slurm)") == 4,
          f"each child was a Slurm job: job ids {ids}")
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    per_child = sorted((e - s) / 1000 for s, e in spans)
    check(1 <= overlap <= cpus, f"at most {cpus} children at once (the node's CPUs): {overlap}; "
          f"children {per_child[0]:.0f}-{per_child[-1]:.0f} s each (MLflow start to end)")
    check(parent.info.status == "FINISHED" and parent.data.tags["vqkit.sweep.launcher"] == "submitit",
          "the parent run is FINISHED, launcher submitit")

    # 2. interrupted, then resumed
    long = write_recipe(work, "long.yaml", train={"steps": 400, "batch_size": 16, "log_every": 50, "eval_every": 400,
                                                  "image_every": 400, "checkpoint_every": 5, "keep_checkpoints": 1,
                                                  "device": "cpu"}, tracking={"experiment": "sw-long"})
    argv = vqkit("sweep", str(long), "--grid", "quantizer.params.codebook_size=8", *launcher)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 900
    while not list(work.glob("runs/*/checkpoints/step_*.pt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            check(False, f"the long child made a checkpoint:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    stop_s = time.monotonic() - t0
    check(proc.returncode == 130, f"SIGTERM to the sweep: exit {proc.returncode} after {stop_s:.1f} s"
          + ("" if proc.returncode == 130 else f"\n{out[-3000:]}"))
    deadline = time.monotonic() + 60  # a cancelled job may show as completing (CG) a few seconds
    while "vqkit-child" in (queue := sh("squeue", "-h", "-o", "%i %j %T").strip()) and time.monotonic() < deadline:
        time.sleep(1)
    check("vqkit-child" not in queue, f"no vqkit job left in the queue ({queue or 'empty'})")
    _, (child,) = _runs(uri, "sw-long")
    steps = sorted(int(p.stem.split("_")[1]) for p in (work / "runs" / child.info.run_id / "checkpoints")
                   .glob("step_*.pt"))
    check(child.info.status in ("KILLED", "RUNNING") and steps and steps[-1] < 400,
          f"the child stopped with a checkpoint at step {steps[-1] if steps else None} "
          f"(run {child.info.status})")
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    check(proc.returncode == 0 and f"resuming run {child.info.run_id[:8]}" in proc.stderr,
          f"the same command again resumed the child ({wall:.0f} s)"
          + ("" if proc.returncode == 0 else f"\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"))
    _, (child2,) = _runs(uri, "sw-long")
    check(child2.info.run_id == child.info.run_id and child2.info.status == "FINISHED"
          and int(child2.data.tags["vqkit.resumed_from_step"]) == steps[-1],
          f"one child run, FINISHED, resumed from step {child2.data.tags.get('vqkit.resumed_from_step')}")
    print(f"all checks passed; work folder {work}" + ("" if args.keep else " (removed)"), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _runs(uri: str, experiment: str):
    from vqkit.testing.sweeps import sweep_runs

    return sweep_runs(uri, experiment)


if __name__ == "__main__":
    sys.exit(main())
