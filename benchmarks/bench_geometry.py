"""Time and memory of the feature-geometry and retrieval metrics on random features.

For each N it generates seeded random float32 features for N images and N texts (d = --dim) and
measures, each in a fresh subprocess:

- modality_gap(images, texts)
- alignment(images, texts)
- pooled_uniformity(images, texts)        (2N pooled vectors, N(2N−1) distinct pairs)
- retrieval_metrics(images, texts, arange(N))   (one caption per image, both directions)

Peak memory: the child creates its inputs in place (no large temporaries), runs a tiny warm-up of
the metric (so one-off library initialisation is not counted), records ru_maxrss as the baseline,
runs the metric once and reports ru_maxrss − baseline: the extra resident memory the metric needed
at its peak (torch CPU tensors live in process memory, so they are counted). The inputs themselves
(2·N·d·4 bytes) are in the baseline and listed separately.

Usage:
    python benchmarks/bench_geometry.py                      # default sizes
    python benchmarks/bench_geometry.py --quick              # N = 2000 only, a smoke test
    python benchmarks/bench_geometry.py --sizes 10000 50000 100000 --dim 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("modality_gap", "alignment", "pooled_uniformity", "retrieval_metrics")
DEFAULT_SIZES = (10000, 50000, 100000)  # the sizes: ~6 min on 2 idle cores (N = 100000 alone ~4 min)
QUICK_SIZES = (2000,)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _make_features(n: int, dim: int, seed: int):
    """Seeded float32 image features and correlated, offset text features, built in place."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, dim, generator=gen)
    texts = torch.randn(n, dim, generator=gen)
    texts.mul_(5.0).add_(images)  # text k is a noisy copy of image k: retrieval is non-trivial
    texts[:, 0].add_(60.0)  # an offset between the modalities: a modality gap
    return images, texts


def _call(metric: str, images, texts):
    import torch

    from clip_refine_lab import metrics as M

    if metric == "modality_gap":
        return M.modality_gap(images, texts)
    if metric == "alignment":
        return {"alignment": M.alignment(images, texts)}
    if metric == "pooled_uniformity":
        return M.pooled_uniformity(images, texts)
    if metric == "retrieval_metrics":
        return M.retrieval_metrics(images, texts, torch.arange(images.shape[0]))
    raise ValueError(f"unknown metric {metric!r}")


def run_child(metric: str, n: int, dim: int, seed: int) -> None:
    """Measure one (metric, N) in this (fresh) process; print one JSON line."""
    import torch

    small_images, small_texts = _make_features(256, dim, seed + 1)
    _call(metric, small_images, small_texts)  # warm-up: thread pools, BLAS buffers
    del small_images, small_texts
    images, texts = _make_features(n, dim, seed)
    baseline = _max_rss_mib()
    start = time.perf_counter()
    result = _call(metric, images, texts)
    seconds = time.perf_counter() - start
    peak = _max_rss_mib()
    print(
        json.dumps(
            {
                "metric": metric,
                "n": n,
                "seconds": seconds,
                "extra_peak_mib": peak - baseline,
                "baseline_mib": baseline,
                "inputs_mib": (images.numel() + texts.numel()) * images.element_size() / 2**20,
                "threads": torch.get_num_threads(),
                "result": result,
            }
        )
    )


def _summary(result: dict) -> str:
    return ", ".join(f"{key}={value:.4g}" for key, value in result.items() if key in _SHOWN)


_SHOWN = ("gap_l2", "alignment", "uniformity_log", "uniformity_rbf", "t2i_R@1", "i2t_R@1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="values of N")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_SIZES[0]} only")
    parser.add_argument("--child", nargs=2, metavar=("METRIC", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    repo_root = str(Path(__file__).resolve().parent.parent)
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)

    if args.child:
        run_child(args.child[0], int(args.child[1]), args.dim, args.seed)
        return 0

    import torch

    sizes = list(QUICK_SIZES) if args.quick else args.sizes
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}"
    )
    print(f"d = {args.dim}, float32 inputs, seed = {args.seed}; each row is a fresh subprocess")
    print("extra peak = ru_maxrss after the call − ru_maxrss after creating the inputs\n")
    header = f"{'N':>8}  {'metric':<18} {'wall s':>8} {'extra peak MiB':>15} {'inputs MiB':>11}  result"
    print(header)
    print("-" * len(header))
    env = dict(os.environ)
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    failures = 0
    for n in sizes:
        for metric in args.metrics:
            command = [sys.executable, str(Path(__file__).resolve()), "--child", metric, str(n)]
            command += ["--dim", str(args.dim), "--seed", str(args.seed)]
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                failures += 1
                print(f"{n:>8}  {metric:<18} FAILED (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{n:>8}  {metric:<18} {row['seconds']:>8.2f} {row['extra_peak_mib']:>15.1f} "
                f"{row['inputs_mib']:>11.1f}  {_summary(row['result'])}",
                flush=True,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
