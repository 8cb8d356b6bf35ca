"""``vqkit sample``: draw images from a trained prior (decoded by its autoencoder)."""
from __future__ import annotations

import json

from vqkit.errors import Problem, VqkitError
from vqkit.runtime import cpu_friendly_threads


def configure_sample(p) -> None:
    p.add_argument("target", metavar="RUN_ID_OR_CHECKPOINT",
                   help="a prior: MLflow run id (or unique id prefix, or run name), run dir or checkpoint file of `vqkit prior train`")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0; default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest codes only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass P")
    p.add_argument("--class", dest="label", default=None, metavar="C",
                   help="class label (class-conditional priors): an integer, or `all` for one row per "
                   "class; default: the classes in turn")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed: same samples)")
    p.add_argument("--columns", type=int, default=None, help="images per row of the grid (default: square)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("-o", "--output", default=None, metavar="PNG", help="write the sample grid to this PNG")
    p.add_argument("--codes", default=None, metavar="NPY", help="write the codes int64 (n, *grid) to this .npy")


def run_sample(args) -> int:
    cpu_friendly_threads()
    if args.n < 1:
        raise VqkitError(Problem(f"--n must be >= 1, got {args.n}"))
    if args.temperature <= 0:
        raise VqkitError(Problem(f"--temperature must be > 0, got {args.temperature}"))
    if args.top_k is not None and args.top_k < 1:
        raise VqkitError(Problem(f"--top-k must be >= 1, got {args.top_k}"))
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise VqkitError(Problem(f"--top-p must be in (0, 1], got {args.top_p}"))
    if not args.output and not args.codes:
        raise VqkitError(Problem("vqkit sample: give -o PNG and/or --codes NPY"))
    import math

    import numpy as np
    import torch

    from vqkit.commands.train import resolve_checkpoint
    from vqkit.prior.images import save_grid
    from vqkit.prior.sampling import draw, load_prior
    from vqkit.train.distributed import resolve_device

    path = resolve_checkpoint(args.target)
    trained = load_prior(path, resolve_device(args.device))
    k = trained.num_classes
    columns = args.columns
    labels = None
    if k > 0:
        if args.label is None:
            labels = torch.arange(args.n) % k
        elif args.label == "all":
            per = math.ceil(args.n / k)
            labels = torch.arange(k).repeat_interleave(per)[: per * k]
            columns = columns or per
        else:
            try:
                c = int(args.label)
            except ValueError:
                raise VqkitError(Problem(f"--class must be an integer or `all`, got {args.label!r}")) from None
            if not 0 <= c < k:
                raise VqkitError(Problem(f"--class must be in [0, {k}) for this prior, got {c}"))
            labels = torch.full((args.n,), c, dtype=torch.int64)
    elif args.label is not None:
        raise VqkitError(Problem("--class: this prior is not class-conditional"))
    n = labels.shape[0] if labels is not None else args.n
    codes, images = draw(trained, n, labels, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed)
    out = {"checkpoint": str(path), "n": n}
    if args.output:
        out["png"] = str(save_grid(images, columns or max(1, math.ceil(math.sqrt(n))), args.output))
    if args.codes:
        np.save(args.codes, codes.numpy())
        out["codes"] = args.codes
    print(json.dumps(out))
    return 0
