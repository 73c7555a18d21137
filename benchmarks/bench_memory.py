"""Peak memory of one training step with and without gradient checkpointing, against the estimate.

Every configuration (model, batch, teacher mode, checkpointing) runs in a fresh process: the trainer's
own ``Refiner`` (student, teacher copy, fused AdamW) takes two optimiser steps of ``compute_loss`` on one
synthetic batch (random images, captions of COCO length: 12 to 20 tokens with start and end); the
peak is measured during the second step, when the AdamW states exist, as in every later step.

How the peak is measured:

- **CUDA**: ``torch.cuda.max_memory_allocated`` over the second step (``reset_peak_memory_stats``
  after the first); everything the process allocated on the device counts (weights, teacher, AdamW,
  gradients, activations).
- **CPU**: torch has no statistics for its CPU allocator (and ``tracemalloc`` does not see its
  allocations), so the figure is the process's peak resident set size (``VmHWM`` in
  ``/proc/self/status``, reset through ``/proc/self/clear_refs`` after the first step) minus its
  resident size before the model was built. glibc's mmap threshold is fixed at 128 KiB in the child
  (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set instead of staying in the
  heap. This counts what torch touched plus oneDNN's scratch buffers and the data source's few
  megabytes: expect the figures within a few percent, noisier for small models.

``teacher``: ``forward`` keeps the frozen teacher copy in memory and runs it in the step; ``cache``
gives the step its batch's teacher features and keeps no teacher copy, as ``teacher_cache: true`` does
(the features are computed once by the teacher before it is dropped; the feature cache is not built).

The estimate is :func:`clip_refine_lab.models.memory.estimate_memory` with the caption length of the
synthetic batch (the trainer encodes up to the batch's longest caption).

Usage::

    python benchmarks/bench_memory.py                          # CPU: ViT-B-32 batch 8 and 32, ViT-L-14 batch 8
    python benchmarks/bench_memory.py --device cuda             # ViT-L-14, ViT-H-14, ViT-bigG-14 at 512, bf16
    python benchmarks/bench_memory.py --quick                   # smoke test: micro-vit-32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench_refine import describe_machine, format_table, machine_info, setup_environment  # noqa: E402

GIB = 2**30
# At batch 8 ViT-B-32's gradients (0.56 GiB) outweigh its activations, so the peak is the end of backward and
# checkpointing cannot lower it; at 32 the activations dominate. ViT-L-14 at 8 needs about 8.4 GiB.
CPU_DEFAULTS = [("ViT-B-32", 8, "forward"), ("ViT-B-32", 32, "forward"), ("ViT-L-14", 8, "cache")]
CUDA_MODELS = ["ViT-L-14", "ViT-H-14", "ViT-bigG-14"]


def proc_status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def coco_length_tokens(batch: int, context: int, seed: int = 0):
    """Token rows of COCO-caption length: start token, 10 to 18 random words, end token, zero padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 21, (batch,), generator=g)
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        n = min(n, context)
        tokens[row, 0] = 49406
        tokens[row, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
        tokens[row, n - 1] = 49407  # the highest id: argmax pooling finds it
    return tokens


# ------------------------------------------------------------------------- one configuration
def measure(spec: dict) -> dict:
    """Run in a fresh process: two steps of the trainer, the peak of the second, and the estimate."""
    import gc

    import torch

    from clip_refine_lab.config import RunConfig
    from clip_refine_lab.models.memory import architecture, estimate_memory
    from clip_refine_lab.training.loop import Refiner

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    row = {k: spec[k] for k in ("model", "device", "precision", "batch", "teacher", "checkpointing")}
    tokens = coco_length_tokens(spec["batch"], architecture(spec["model"]).text.tokens).to(device)
    text_tokens = int((tokens != 0).any(0).nonzero()[-1]) + 1
    estimate = estimate_memory(spec["model"], batch_size=spec["batch"], precision=spec["precision"],
                               grad_checkpointing=spec["checkpointing"], teacher=spec["teacher"] == "forward",
                               text_tokens=text_tokens)
    row.update(text_tokens=text_tokens, estimate_gib=estimate.peak / GIB,
               estimate_steady_gib=(estimate.static + estimate.gradients) / GIB)
    cfg = RunConfig(method="clip-refine", model=spec["model"], pretrained=None, preset="micro", data="synthetic-coco",
                    batch_size=8, epochs=1, device=spec["device"], precision=spec["precision"], val_fraction=0.0,
                    grad_checkpointing=spec["checkpointing"], output_dir=spec["workdir"], run_name="memory",
                    seed=0).resolved()
    base_rss = proc_status("VmRSS")  # everything imported; nothing of the model built yet
    if cuda and estimate.peak > 1.5 * torch.cuda.mem_get_info(device)[1]:  # would only run out of memory
        return {**row, "measured_gib": None, "note": "not run: the estimate is over 1.5x the device's memory"}
    try:
        refiner = Refiner(cfg, progress=False)
        size = refiner.base.image_size
        images = torch.randn(spec["batch"], 3, size, size, device=device)
        teacher = None
        if spec["teacher"] == "cache":  # the step reads teacher features; no teacher copy stays in memory
            with torch.no_grad(), refiner.autocast():
                teacher = (refiner.teacher.encode_image(images).float(), refiner.teacher.encode_text(tokens).float())
            refiner.teacher = None
            gc.collect()
        refiner.model.train()

        def step() -> None:
            refiner.optimizer.zero_grad(set_to_none=True)
            refiner.compute_loss(images, tokens, 0, train=True, teacher=teacher)
            refiner.optimizer_step()

        step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
        step()
        if cuda:
            torch.cuda.synchronize(device)
            peak, steady = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        else:
            peak, steady = proc_status("VmHWM") - base_rss, proc_status("VmRSS") - base_rss
        row.update(measured_gib=peak / GIB, steady_gib=steady / GIB, ratio=estimate.peak / peak)
    except torch.OutOfMemoryError:
        row.update(measured_gib=None, note="out of memory")
    return row


def run_child(spec: dict, threads: int | None) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "PYTHONPATH": REPO_ROOT}
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {**{k: spec[k] for k in ("model", "device", "precision", "batch", "teacher", "checkpointing")},
                "note": f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def add_derived(rows: list[dict]) -> None:
    """What checkpointing saved (rows come in pairs: off, on) and the part of each peak above the state
    after the step (weights, teacher, AdamW, gradients), measured and estimated: the activations' share."""
    for plain, ckpt in zip(rows[::2], rows[1::2]):
        if plain.get("measured_gib") and ckpt.get("measured_gib"):
            ckpt["saving"] = plain["measured_gib"] - ckpt["measured_gib"]
    for row in rows:
        if row.get("measured_gib"):
            row["above_steady_gib"] = row["measured_gib"] - row["steady_gib"]
            row["estimate_above_steady_gib"] = row["estimate_gib"] - row["estimate_steady_gib"]


# ----------------------------------------------------------------------------------- main
COLUMNS = [("model", "model"), ("device", "device"), ("precision", "precision"), ("batch", "batch"),
           ("teacher", "teacher"), ("checkpointing", "grad ckpt"), ("measured_gib", "measured peak (GiB)"),
           ("estimate_gib", "estimate (GiB)"), ("ratio", "estimate / measured"),
           ("steady_gib", "after step (GiB)"), ("estimate_steady_gib", "estimate after step (GiB)"),
           ("above_steady_gib", "peak above it (GiB)"), ("estimate_above_steady_gib", "estimate above it (GiB)"),
           ("saving", "ckpt saves (GiB)"), ("note", "note")]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=None, help="default: see the module docstring")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: 8 and 32 (ViT-B-32), 8 (ViT-L-14) on CPU, 512 on CUDA")
    p.add_argument("--precision", default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--teacher", default=None, choices=("cache", "forward", "both"))
    p.add_argument("--quick", action="store_true", help="micro-vit-32, batch 8, teacher forward")
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE to use (the micro world is built there)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    setup_environment(args.cache, args.threads)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return []

    from clip_refine_lab.embedded.base import ensure_world

    ensure_world("micro", progress=False)  # the Refiner opens the micro world's synthetic-coco (batches are synthetic)
    cuda = args.device.startswith("cuda")
    precision = args.precision or ("bf16" if cuda else "fp32")
    teachers = ["cache", "forward"] if args.teacher == "both" or (cuda and args.teacher is None) else None
    if args.quick:
        plan = [("micro-vit-32", 8, "forward")]
    elif args.models or cuda:
        plan = [(m, args.batch_size or (512 if cuda else 8), t) for m in (args.models or CUDA_MODELS)
                for t in (teachers or [args.teacher or "cache"])]
    else:
        plan = [(m, args.batch_size or b, args.teacher or t) for m, b, t in CPU_DEFAULTS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as workdir:
        for (model, batch, teacher), checkpointing in itertools.product(plan, (False, True)):
            spec = dict(model=model, batch=batch, teacher=teacher, checkpointing=checkpointing, device=args.device,
                        precision=precision, workdir=workdir)
            row = run_child(spec, args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    add_derived(rows)
    info = machine_info(args.device)
    print(f"\n{describe_machine(info)}\n")
    print(format_table(rows, COLUMNS))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
