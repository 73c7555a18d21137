"""Refine-step throughput (pairs/s) of every post-pre-training method, on CPU or GPU.

For each model (default: our embedded ``tiny-vit-48`` at 48 px and open_clip's ``ViT-B-32`` at 224 px,
both with random weights: throughput does not depend on the weights) and each method of
``clip_refine_lab.methods.METHODS`` it builds the trainer's own :class:`clip_refine_lab.training.loop.Refiner`
and times its optimiser step exactly as ``Refiner.run`` takes it: ``zero_grad``,
``Refiner.compute_loss(..., train=True)`` (student forward, loss, backward; the teacher forward too
when the teacher is not cached), the optimiser step (fused AdamW) and the logit-scale clamp.

* Batches are loaded (``MapSource.batch_indices`` / ``Refiner.load_batch``) before timing: this
  measures the step, not data loading (``bench_vs_peers.py`` times whole training loops, data
  included).
* ``--teacher cache`` (default) hands the step the teacher features of its batch, computed before
  timing: exactly what ``RunConfig(teacher_cache=True)`` reads from the feature cache. ``--teacher
  forward`` runs the frozen teacher on every step (``teacher_cache=False``); ``both`` times both.
* The first step (warm-up: allocations, optimiser state) runs under
  ``torch.utils.flop_counter.FlopCounterMode`` and gives the model FLOPs of one step (matmuls,
  convolutions and attention, forward and backward, teacher forward included when it runs; CPU
  flash-attention kernels are counted with torch's own SDPA formula). ``--warmup`` more steps
  follow, then ``--steps`` timed ones (synchronised on GPU); the table gives the median step.
* MFU = achieved model FLOP/s / peak FLOP/s, printed when ``--peak-tflops`` gives the device's peak
  for the precision used (e.g. H100 SXM dense bf16: 989.4; see README.md).

Usage::

    python benchmarks/bench_refine.py                          # CPU: tiny (all methods) + ViT-B-32 (clip-refine)
    python benchmarks/bench_refine.py --device cuda --peak-tflops 989.4   # GPU, bf16, MFU column
    python benchmarks/bench_refine.py --models ViT-B-32 --methods all --steps 3 --batch-size 64
    python benchmarks/bench_refine.py --models tiny-vit-48 --methods clip-refine --teacher both --profile 15
    python benchmarks/bench_refine.py --quick                  # smoke test: micro world, tiny model, 1 step

This file also holds the small helpers the other benchmark scripts share (machine description,
table printing, environment set-up).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Defaults per device and model: (batch size, timed steps, warm-up steps after the counted one, methods).
# CPU sizes keep the default run near 10 minutes on 2 busy shared cores (one ViT-B-32 step at batch 64
# takes about 40 s there, so only clip-refine by default; with a cached teacher every method does the
# same model work, which the tiny rows show).
DEFAULTS = {
    "cpu": {"tiny-vit-48": (256, 3, 1, "all"), "ViT-B-32": (64, 2, 0, "clip-refine")},
    "cuda": {"tiny-vit-48": (1024, 20, 3, "all"), "ViT-B-32": (256, 20, 3, "all")},
}


# ------------------------------------------------------------------------------ shared helpers
def setup_environment(cache: str | None = None, threads: int | None = None) -> None:
    """Offline hub, an optional private toolkit cache, passive OpenMP waiting, and the torch thread count.

    OMP_WAIT_POLICY=PASSIVE (unless already set; it must be set before torch is imported): on a
    machine shared with other busy processes, OpenMP threads that spin while waiting for a core make
    a 2-thread step about 3x slower than a 1-thread one (measured, tiny-vit-48 batch 256); passive
    waiting removes that collapse. Child processes inherit it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cache:
        os.environ["CLIP_REFINE_LAB_CACHE"] = str(cache)
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """What the figures were measured on: CPU model, cores, threads, torch/open_clip versions, GPU."""
    import open_clip
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "python": platform.python_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["load_average"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def describe_machine(info: dict) -> str:
    text = (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), torch {info['torch']}, "
            f"open_clip {info['open_clip']}, Python {info['python']}")
    if "gpu" in info:
        text += f", GPU {info['gpu']}"
    if "load_average" in info:
        text += f"; 1-min load average at start {info['load_average']:.1f}"
    return text


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` = [(key, header)]; floats get sensible precision."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v == 0 or math.isnan(v):
                return f"{v:g}"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    table = [[h for _, h in columns]] + [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ FLOPs
def flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention kernels (torch has no formula for them)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        op = getattr(aten, name, None)
        if op is not None and op.default not in fc.flop_registry and op not in fc.flop_registry:
            mapping[op.default] = formula
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


# -------------------------------------------------------------------------------- one bench
def bench_method(arch: str, method: str, *, device: str, precision: str, batch_size: int, steps: int, warmup: int,
                 teacher_mode: str, world: str, workdir: str, profile: int = 0, attention: str = "sdpa",
                 compile: bool = False, channels_last: bool | None = None) -> dict:
    """Time the Refiner's optimiser step for one (model, method, teacher mode)."""
    import torch

    from clip_refine_lab.config import RunConfig
    from clip_refine_lab.methods import get_method
    from clip_refine_lab.embedded.base import ensure_world
    from clip_refine_lab.training.loop import Refiner

    ensure_world(world, progress=False)  # the Refiner reads the built world's synthetic-coco split
    needs_teacher = get_method(method).needs_teacher
    cfg = RunConfig(method=method, model=arch, pretrained=None, preset=world, data="synthetic-coco",
                    batch_size=batch_size, epochs=1, device=device, precision=precision, val_fraction=0.0,
                    teacher_cache=False, image_cache=False, output_dir=workdir, attention=attention,
                    compile=compile, channels_last=channels_last,
                    run_name=f"bench-{arch}-{method}-{teacher_mode}", seed=0).resolved()
    refiner = Refiner(cfg, progress=False)
    model, optimizer = refiner.model, refiner.optimizer
    n_distinct = max(1, min(steps + warmup + 1, 4, refiner.steps_per_epoch))
    batches = []
    for k in range(n_distinct):
        images, tokens = refiner.load_batch(refiner.source.train_set, refiner.source.batch_indices(0, k))
        teacher = None
        if needs_teacher and teacher_mode == "cache":
            with torch.no_grad():  # fp32, as the feature cache computes them
                teacher = (refiner.teacher.encode_image(images).float(), refiner.teacher.encode_text(tokens).float())
        batches.append((images, tokens, teacher))
    model.train()

    def one_step(k: int) -> None:  # the body of Refiner.run's loop, without data loading and logging
        images, tokens, teacher = batches[k % n_distinct]
        optimizer.zero_grad(set_to_none=True)
        refiner.compute_loss(images, tokens, k, train=True, teacher=teacher)
        if refiner.scaler is not None:
            refiner.scaler.unscale_(optimizer)
            refiner.scaler.step(optimizer)
            refiner.scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    counter = flop_counter()
    # FLOPs are those of the eager step (compilation changes kernels, not the model's arithmetic);
    # the compiled graphs are built in the warm-up steps that follow.
    no_dynamo = torch._dynamo.config.patch(disable=True) if compile else contextlib.nullcontext()
    with counter, no_dynamo:
        one_step(0)
    flops = float(counter.get_total_flops())
    for k in range(warmup):
        one_step(1 + k)
    sync(device)
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        one_step(1 + warmup + k)
        sync(device)
        times.append(time.perf_counter() - t0)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        cuda = torch.device(device).type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            one_step(1 + warmup + steps)
            sync(device)
        averages = prof.key_averages()
        key = "self_cpu_time_total"
        if cuda:  # named self_device_time_total in recent torch, self_cuda_time_total before
            key = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
        table = averages.table(sort_by=key, row_limit=profile)
    step_s = statistics.median(times)
    return {"model": arch, "px": None, "method": method, "teacher": teacher_mode if needs_teacher else "none",
            "attention": attention, "compile": compile, "channels_last": channels_last,
            "batch": batch_size, "precision": precision, "steps": steps, "step_ms": 1e3 * step_s,
            "pairs_per_s": batch_size / step_s, "gflop_per_step": flops / 1e9,
            "tflops": flops / step_s / 1e12, "times_s": times, "profile": table}


def image_size(arch: str) -> int | None:
    import open_clip

    from clip_refine_lab.models.loading import register_tiny_architectures

    register_tiny_architectures()
    cfg = open_clip.get_model_config(arch) or {}
    size = cfg.get("vision_cfg", {}).get("image_size")
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="architectures (default: tiny-vit-48 ViT-B-32)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods, or 'all' (default per model: see DEFAULTS in this file)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="default: fp32 on CPU (the only choice there), bf16 on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="override the per-model default batch size")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default per model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the FLOP-counted first one")
    p.add_argument("--teacher", default="cache", choices=("cache", "forward", "both"),
                   help="teacher features from the cache (default), a teacher forward every step, or both")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s of the device for this precision, in TFLOP/s: adds the MFU column")
    p.add_argument("--world", default="default", choices=("default", "micro"),
                   help="embedded world whose synthetic-coco split feeds the batches")
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE to use (default: the usual one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one more step of each row (torch.profiler) and print its top N ops")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: micro world, tiny-vit-48 only, batch 16, 1 timed step")
    p.add_argument("--attention", default="sdpa", help="RunConfig.attention: sdpa, native, or both (one row each)")
    p.add_argument("--compile", action="store_true", help="RunConfig.compile: torch.compile the towers")
    p.add_argument("--channels-last", default=None, choices=("on", "off"),
                   help="RunConfig.channels_last for conv towers (default: the trainer's: on for GPU, off for CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    setup_environment(args.cache, args.threads)
    import torch

    from clip_refine_lab.methods import METHODS

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    precision = args.precision or ("bf16" if kind == "cuda" else "fp32")
    if kind == "cpu" and precision != "fp32":
        p.error("on CPU only fp32 is measured (bf16/fp16 autocast is a GPU feature of the trainer)")
    models = args.models or (["tiny-vit-48"] if args.quick else ["tiny-vit-48", "ViT-B-32"])
    world = "micro" if args.quick else args.world
    if args.quick:
        args.batch_size = args.batch_size or 16
        args.steps = args.steps or 1
        args.warmup = 0 if args.warmup is None else args.warmup
    info = machine_info(device)
    print(f"# bench_refine on {device} ({precision}): {describe_machine(info)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-refine-") as workdir:
        for arch in models:
            batch, steps, warmup, methods = DEFAULTS[kind].get(arch, DEFAULTS[kind]["ViT-B-32"])
            batch, steps = args.batch_size or batch, args.steps or steps
            warmup = warmup if args.warmup is None else args.warmup
            chosen = args.methods or methods
            names = list(METHODS) if chosen == "all" else [m.strip() for m in chosen.split(",") if m.strip()]
            px = image_size(arch)
            for method in names:
                modes = ["cache", "forward"] if args.teacher == "both" else [args.teacher]
                if not METHODS[method].needs_teacher:
                    modes = ["none"]
                attentions = ["sdpa", "native"] if args.attention == "both" else [args.attention]
                for mode, attention in [(m, a) for m in modes for a in attentions]:
                    row = bench_method(arch, method, device=device, precision=precision, batch_size=batch,
                                       steps=steps, warmup=warmup, teacher_mode=mode, world=world, workdir=workdir,
                                       profile=args.profile, attention=attention, compile=args.compile,
                                       channels_last=None if args.channels_last is None else args.channels_last == "on")
                    row["px"] = px
                    gc.collect()  # the Refiner of this row is gone: free its memory before the next one
                    if kind == "cuda":
                        torch.cuda.empty_cache()
                    if args.peak_tflops:
                        row["mfu"] = row["tflops"] / args.peak_tflops
                    rows.append(row)
                    print(f"  {arch} {method} teacher={row['teacher']} attention={attention}: {row['pairs_per_s']:.1f} pairs/s "
                          f"({row['step_ms']:.0f} ms/step, {row['tflops']:.3g} TFLOP/s)", flush=True)
    columns = [("model", "model"), ("px", "px"), ("method", "method"), ("teacher", "teacher"), ("batch", "batch"),
               ("precision", "precision"), ("attention", "attention"), ("compile", "compile"),
               ("step_ms", "ms/step (median)"), ("pairs_per_s", "pairs/s"),
               ("gflop_per_step", "GFLOP/step"), ("tflops", "TFLOP/s")]
    if args.peak_tflops:
        columns.append(("mfu", f"MFU (peak {args.peak_tflops:g} TFLOP/s)"))
    for row in rows:
        if row.get("profile"):
            print(f"\n## profile of one step: {row['model']} {row['method']} teacher={row['teacher']} "
                  f"batch {row['batch']} ({precision})\n{row['profile']}")
    print()
    print(format_table(rows, columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "device": device, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
