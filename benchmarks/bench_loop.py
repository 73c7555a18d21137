"""Whole-loop throughput of ``refine()``: data loading, caches, teacher, loss, optimiser, logging.

``bench_refine.py`` times the optimiser step alone on pre-loaded batches; this script runs the
trainer exactly as a user does (``clip_refine_lab.training.loop.refine`` with a ``RunConfig``) and reports the
median pairs/s of its own log (``log.jsonl``, one line per step, synchronised on GPU) after the
first ``--skip`` steps, and the time spent before the first step (model, caches, step-0 validation).

Usage::

    python benchmarks/bench_loop.py                                   # CPU, the default preset's run
    python benchmarks/bench_loop.py --device cuda --model ViT-B-32 --batch-size 512 --precision bf16 \\
        --steps 40 --num-workers 8 --peak-tflops 989.4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench_refine import describe_machine, format_table, machine_info, setup_environment  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="architecture (default: the preset's); random weights unless --pretrained")
    p.add_argument("--pretrained", default=None, help="default: 'embedded' for our tiny models, none otherwise")
    p.add_argument("--method", default="clip-refine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="optimiser steps to run")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the median (warm-up)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--variants", default="caches,no-caches",
                   help="comma list of: caches (teacher_cache + image_cache), no-caches")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="adds MFU from bench_refine's FLOP count per pair")
    p.add_argument("--gflop-per-pair", type=float, default=None,
                   help="model GFLOP per pair and step (bench_refine.py prints GFLOP/step; divide by the batch)")
    p.add_argument("--cache", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    setup_environment(args.cache, args.threads)

    from clip_refine_lab.config import RunConfig
    from clip_refine_lab.models.loading import tiny_architectures
    from clip_refine_lab.rundir import read_log
    from clip_refine_lab.training.loop import refine

    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    precision = args.precision or ("bf16" if kind == "cuda" else "fp32")
    print(f"# bench_loop on {args.device} ({precision}): {describe_machine(machine_info(args.device))}", flush=True)
    pretrained = args.pretrained
    if pretrained is None or pretrained.lower() == "none":
        pretrained = "embedded" if args.pretrained is None and (args.model is None or args.model in tiny_architectures()) else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as out:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            caches = variant == "caches"
            cfg = RunConfig(method=args.method, model=args.model, data="synthetic-coco", device=args.device,
                            precision=precision, batch_size=args.batch_size, max_steps=args.steps, epochs=100,
                            val_fraction=0.0, teacher_cache=caches, image_cache=caches, num_workers=args.num_workers,
                            attention=args.attention, compile=args.compile, output_dir=out, run_name=variant,
                            pretrained=pretrained).resolved()
            t0 = time.perf_counter()
            run_dir = refine(cfg, progress=False, resume=False)
            total = time.perf_counter() - t0
            log = read_log(run_dir)
            rates = [r["pairs_per_s"] for r in log if r["step"] > args.skip]
            steps_time = sum(cfg.batch_size / r["pairs_per_s"] for r in log)  # type: ignore[operator]
            row = {"variant": variant, "model": cfg.model, "batch": cfg.batch_size, "precision": precision,
                   "workers": args.num_workers, "steps": len(log), "pairs_per_s": statistics.median(rates),
                   "setup_s": total - steps_time}
            if args.peak_tflops and args.gflop_per_pair:
                row["mfu"] = row["pairs_per_s"] * args.gflop_per_pair / 1e3 / args.peak_tflops
            rows.append(row)
            print(f"  {variant}: {row['pairs_per_s']:.1f} pairs/s (median of steps > {args.skip}), "
                  f"set-up {row['setup_s']:.0f} s", flush=True)
    columns = [("variant", "variant"), ("model", "model"), ("batch", "batch"), ("precision", "precision"),
               ("workers", "loader workers"), ("steps", "steps"), ("pairs_per_s", "pairs/s (median)"),
               ("setup_s", "set-up s (caches, model)")]
    if any("mfu" in r for r in rows):
        columns.append(("mfu", f"MFU (peak {args.peak_tflops:g})"))
    print()
    print(format_table(rows, columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(args.device), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
