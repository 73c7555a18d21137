"""Evaluation at real size: image decoding in DataLoader workers, and evaluating a starting model plus a run.

Generates a fixture of ``--num-images`` JPEGs of COCO-like size (default 10,000 at 640x480: smooth
gradients with a few random blocks, about 20 KB each) and a caption manifest over them, then measures
with a tiny model (random weights, 48 px), so that decoding and resizing dominate as they do for
real data sets with a small model or a fast GPU:

1. ``decode+encode``: images/s of :func:`clip_refine_lab.features.encode_images` over the files, with
   each worker count of ``--workers`` (default 0 and 2), interleaved over ``--rounds`` (medians, and
   the ratio to the fewest workers within each round); the CPU time of the process and its workers
   is reported too (images per CPU-s: the work done, whatever share of the cores the process got);
2. ``eval base + run``: the time :func:`clip_refine_lab.evaluation.evaluate.measure` takes for the
   starting model and a refined one (a perturbed copy), the two models ``evaluate_run`` measures, on a
   suite of the fixture (retrieval and geometry), from an empty feature cache: with 0 workers (decoded
   once per model, in this process), with the largest worker count, and with that plus the
   decoded-image cache (decoded once for both models); then a second run of the same starting model,
   whose base features come from the feature cache.

Usage::

    python benchmarks/bench_eval_workers.py                       # 10,000 images, workers 0 and 2
    python benchmarks/bench_eval_workers.py --num-images 2000 --workers 0 2 4 --rounds 2
    python benchmarks/bench_eval_workers.py --quick               # smoke test: 96 small images
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
REPO_ROOT = str(Path(__file__).resolve().parents[1])
for _p in (REPO_ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _one_image(args) -> None:
    """Write image ``i``: a gradient whose colours depend on i, with a few random blocks (seeded by i)."""
    import numpy as np
    from PIL import Image

    path, i, width, height = args
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, size=(2, 3)).astype(np.float32)
    img = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    for _ in range(4):
        h, w = int(rng.integers(20, height // 2)), int(rng.integers(20, width // 2))
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        img[top:top + h, left:left + w] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=85)


def make_fixture(root: Path, n: int, width: int, height: int) -> Path:
    """``n`` JPEGs and a caption manifest (jsonl) over them in ``root``; returns the manifest path.
    Kept between invocations: an existing fixture of the same size is reused."""
    from multiprocessing import Pool

    manifest = root / "fixture.yaml"
    stamp = root / "fixture.json"
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == [n, width, height]:
        return manifest
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    jobs = [(str(images / f"{i:06d}.jpg"), i, width, height) for i in range(n)]
    t0 = time.perf_counter()
    with Pool(os.cpu_count() or 1) as pool:
        pool.map(_one_image, jobs, chunksize=64)
    with open(root / "records.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{i:06d}", "image": f"{i:06d}.jpg",
                                "captions": [f"a gradient picture with blocks, number {i}"]}) + "\n")
    manifest.write_text("name: jpeg-fixture\nkind: captions\nformat: jsonl\nroot: images\nrecords: records.jsonl\n")
    stamp.write_text(json.dumps([n, width, height]))
    size = sum(p.stat().st_size for p in images.iterdir()) / n / 1024
    print(f"  fixture: {n} JPEGs of {width}x{height} ({size:.0f} KB each) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return manifest


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers are joined per loader)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - w0, cpu_seconds() - c0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=10_000, help="JPEGs in the fixture (default 10,000)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to compare (default 0 2)")
    p.add_argument("--model", default="tiny-vit-48", help="architecture, random weights (default tiny-vit-48)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the throughput part")
    p.add_argument("--fixture-dir", default=None, help="where the fixture lives (default: a temporary folder, removed)")
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE for the features (default: a temporary one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="smoke test: 96 images of 160x120, tiny model")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.width, args.height, args.batch_size = 96, 160, 120, 32

    scratch = Path(tempfile.mkdtemp(prefix="bench-eval-workers-"))
    cache = Path(args.cache) if args.cache else scratch / "cache"
    from bench_refine import describe_machine, format_table, machine_info, setup_environment

    setup_environment(str(cache), args.threads)
    import torch

    from clip_refine_lab.data.datasets import Images
    from clip_refine_lab.data.manifest import load_manifest
    from clip_refine_lab.evaluation.evaluate import measure
    from clip_refine_lab.evaluation.suites import Suite
    from clip_refine_lab.features import encode_images
    from clip_refine_lab.models.loading import load_model

    info = machine_info("cpu")
    print(f"# bench_eval_workers: {describe_machine(info)}", flush=True)
    fixture_root = Path(args.fixture_dir) if args.fixture_dir else scratch / "fixture"
    manifest_path = make_fixture(fixture_root, args.num_images, args.width, args.height)
    manifest = load_manifest(manifest_path)
    records = manifest.records()
    torch.manual_seed(0)
    base = load_model(args.model)
    refined = load_model(args.model)
    with torch.no_grad():  # a "run": the starting model moved a little
        for pb, pr in zip(base.model.parameters(), refined.model.parameters()):
            pr.copy_(pb + 1e-3 * torch.randn_like(pb))
    second = load_model(args.model)
    with torch.no_grad():
        for pb, pr in zip(base.model.parameters(), second.model.parameters()):
            pr.copy_(pb - 1e-3 * torch.randn_like(pb))

    # 1. decode + encode throughput
    throughput = {w: [] for w in args.workers}
    dataset = Images(records, base.preprocess)
    encode_images(base.model, Images(records[:args.batch_size], base.preprocess), batch_size=args.batch_size,
                  progress=False)  # warm-up
    for _ in range(args.rounds):
        for w in args.workers:
            wall, cpu = timed(lambda: encode_images(base.model, dataset, batch_size=args.batch_size, num_workers=w,
                                                    progress=False))
            throughput[w].append((wall, cpu))
            print(f"  decode+encode, {w} workers: {len(records) / wall:.0f} images/s "
                  f"({len(records) / cpu:.0f} per CPU-s)", flush=True)
    rows = []
    ref = min(args.workers)
    for w in args.workers:
        walls, cpus = [t for t, _ in throughput[w]], [c for _, c in throughput[w]]
        ratios = [r / t for (r, _), t in zip(throughput[ref], walls)]  # within each round: same machine load
        rows.append({"workers": w, "images": len(records), "images_per_s": len(records) / statistics.median(walls),
                     "images_per_cpu_s": len(records) / statistics.median(cpus),
                     "speedup": statistics.median(ratios), "round_ratios": ", ".join(f"{r:.2f}" for r in ratios)})

    # 2. evaluation of the starting model and a run, as evaluate_run measures them
    suite = Suite(retrieval=[manifest_path], geometry=[manifest_path])
    most = max(args.workers)

    def forget() -> None:
        for sub in ("features", "images"):
            shutil.rmtree(cache / sub, ignore_errors=True)

    def evaluate(models, workers: int, image_cache: bool) -> None:
        for m in models:
            measure(m, suite, num_workers=workers, batch_size=args.batch_size, image_cache=image_cache)

    cases = [("base + run, 0 workers (each model decodes)", 0, False),
             (f"base + run, {most} workers", most, False),
             (f"base + run, {most} workers + image cache", most, True)]
    evals = []
    for label, workers, image_cache in cases:
        forget()
        wall, cpu = timed(lambda: evaluate((base, refined), workers, image_cache))
        evals.append({"case": label, "seconds": wall, "cpu_seconds": cpu})
        print(f"  {label}: {wall:.1f} s", flush=True)
    # the features of the case before are in the cache: a second run of the same base encodes only itself
    wall, cpu = timed(lambda: evaluate((base, second), most, True))
    evals.append({"case": f"second run of the same base, {most} workers + image cache", "seconds": wall,
                  "cpu_seconds": cpu})
    print(f"  {evals[-1]['case']}: {wall:.1f} s", flush=True)
    before = evals[0]["seconds"]
    for e in evals:
        e["vs_0_workers"] = before / e["seconds"]

    print()
    print(format_table(rows, [("workers", "workers"), ("images", "images"), ("images_per_s", "images/s"),
                              ("images_per_cpu_s", "images per CPU-s"), ("speedup", f"vs {ref} workers (median)"),
                              ("round_ratios", "per round")]))
    print()
    print(format_table(evals, [("case", "evaluation (fixture: retrieval + geometry)"), ("seconds", "seconds"),
                               ("cpu_seconds", "CPU-s"), ("vs_0_workers", "speed vs first row")]))
    result = {"machine": info, "model": args.model, "fixture": {"images": len(records), "width": args.width,
                                                                "height": args.height},
              "throughput": rows, "evaluation": evals}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    shutil.rmtree(scratch, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
