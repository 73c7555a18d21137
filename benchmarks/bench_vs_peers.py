"""Our trainer vs a plain reference loop vs open_clip's own trainer: training throughput side by side.

Contenders, all on the same data (the embedded world's ``synthetic-coco`` split), the same model and
the same starting weights (one random initialisation saved to a file that all three load), the same
batch size, fp32 on CPU:

``ours``
    ``clip_refine_lab.training.loop.Refiner(cfg).run()`` with ``teacher_cache=True`` and ``image_cache=True``.
    Both caches are built before any timing, as a sweep would have them (the first run of a sweep
    builds them; every later run, and every later epoch, reads them).
``reference``
    ``benchmarks/reference_loop.py``: the released code's loop as it is described (PIL
    decode + preprocess every step in a DataLoader, a teacher forward every step, per-parameter AdamW).
    Same loss functions as ours: identical work per step apart from what the caches remove.
``open_clip_train``
    open_clip's trainer (``open_clip_train.main``) with ``--distill-model``/``--distill-pretrained``
    (teacher = the same weights file), fed the same pairs as a CSV (one seeded random caption per
    image). Its distillation loss is its own (``DistillClipLoss``: CLIP contrastive + KD on the
    teacher's softmax), not HyCD + RaFA; the model work per step is the same (one student forward +
    backward, one teacher forward), so it is the closest peer doing "the same work". It uses its own
    training augmentation (RandomResizedCrop) and weight-decay grouping.

Each contender runs in its own process, ``--rounds`` times, the order rotated every round (so slow
and fast periods of a shared machine hit all of them alike). A process times its optimiser steps with
a post-step hook on the optimiser (``Optimizer.register_step_post_hook``): the first ``--warmup`` steps
are not timed (DataLoader start-up, allocations, optimiser state), then ``--steps`` steps are; set-up
(model creation, cache loading) is never timed. The table reports the median pairs/s of each
contender over the rounds and the median over rounds of the ratio ours / other, each ratio taken
within one round.

Usage::

    python benchmarks/bench_vs_peers.py                           # tiny-vit-48, batch 256, 3 rounds
    python benchmarks/bench_vs_peers.py --rounds 5 --steps 10 --workers 1 --threads 1
    python benchmarks/bench_vs_peers.py --quick                   # smoke test (micro world, batch 16)

open_clip_train needs ``webdataset`` (and so ``braceexpand``) importable: ``pip install
'open_clip_torch[training]'`` installs them (``pip install 'webdataset>=0.2.5,<=0.2.86'`` is enough);
without them that contender is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
HERE = str(Path(__file__).resolve().parent)
for _p in (REPO_ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CONTENDERS = ("ours", "reference", "open_clip_train")
# Opt-in contender (--contenders ...,ours-native): our trainer with open_clip's own nn.MultiheadAttention
# (RunConfig.attention="native") instead of the default SDPA path: shows what that change is worth.
EXTRA_CONTENDERS = ("ours-native",)


class _Done(Exception):
    """Raised by the step hook once the timed steps are done: ends any training loop at once."""


def cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process (all threads) and its live child processes.

    The children are the DataLoader workers of the reference loop and of open_clip_train: their
    decoding is work of the trainer. Read from /proc (Linux); children that are not visible there
    count as 0.
    """
    t = os.times()
    total = t.user + t.system
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return total
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ..., utime (11), stime (12)
        if fields[1] == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _clock(spec: dict):
    """An optimiser post-step hook recording wall and CPU time per step; stops the run after warm-up + timed steps."""
    import torch

    stamps: list[tuple[float, float]] = []
    device = spec["device"]
    total = spec["warmup"] + spec["steps"]

    def hook(optimizer, args, kwargs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), cpu_seconds()))
        if len(stamps) >= total:
            raise _Done

    return stamps, hook


def open_clip_train_available() -> str | None:
    """None when open_clip_train can be imported, else why not."""
    try:
        import open_clip_train.main  # noqa: F401
    except Exception as e:  # ImportError, or a missing extra dependency
        return f"{type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------------------ workers
def _ours_config(spec: dict, attention: str = "sdpa"):
    from clip_refine_lab.config import RunConfig

    return RunConfig(method="clip-refine", model=spec["model"], pretrained=spec["weights"], preset=spec["world"],
                     data=spec["manifest"], batch_size=spec["batch"], epochs=1,
                     max_steps=spec["warmup"] + spec["steps"] + 1, lr=1e-6, device=spec["device"],
                     teacher_cache=True, image_cache=True, output_dir=spec["workdir"],
                     run_name=f"ours-{spec['tag']}", val_every=10**9, checkpoint_every=10**9, seed=0,
                     attention=attention).resolved()


def _run_ours(spec: dict, attention: str = "sdpa") -> list[float]:
    from clip_refine_lab.training.loop import Refiner

    refiner = Refiner(_ours_config(spec, attention), progress=False)  # loads both caches (built by the parent)
    refiner.run_dir.mkdir(parents=True, exist_ok=True)
    stamps, hook = _clock(spec)
    refiner.optimizer.register_step_post_hook(hook)
    try:
        refiner.run()
    except _Done:
        pass
    return stamps


def _run_reference(spec: dict) -> list[float]:
    import reference_loop

    setup = reference_loop.build(spec["model"], spec["weights"], spec["manifest"], batch_size=spec["batch"],
                                 num_workers=spec["workers"], device=spec["device"])
    stamps, hook = _clock(spec)
    setup.optimizer.register_step_post_hook(hook)
    try:
        reference_loop.train(setup, spec["warmup"] + spec["steps"] + 1)
    except _Done:
        pass
    return stamps


def _run_open_clip_train(spec: dict) -> list[float]:
    import logging

    import open_clip_train.main as octm

    from clip_refine_lab.models.loading import register_tiny_architectures

    register_tiny_architectures()  # open_clip.add_model_config(clip_refine_lab/model_configs)
    stamps, hook = _clock(spec)
    original = octm.train_one_epoch

    def timed_epoch(model, data, loss, epoch, optimizer, *args, **kwargs):
        optimizer.register_step_post_hook(hook)
        return original(model, data, loss, epoch, optimizer, *args, **kwargs)

    octm.train_one_epoch = timed_epoch
    made = octm.create_loss

    def create_loss(args):  # record which loss open_clip_train built (DistillClipLoss with a teacher)
        loss = made(args)
        spec["_loss"] = f"{type(loss).__name__} (teacher: {'yes' if args.distill else 'no'}, precision {args.precision})"
        return loss

    octm.create_loss = create_loss
    argv = ["--train-data", spec["csv"], "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--model", spec["model"], "--pretrained", spec["weights"],
            "--distill-model", spec["model"], "--distill-pretrained", spec["weights"],
            "--batch-size", str(spec["batch"]), "--epochs", "1", "--lr", "1e-6", "--wd", "0.1", "--warmup", "0",
            "--lr-scheduler", "const", "--precision", "fp32", "--device", spec["device"],
            "--workers", str(spec["workers"]), "--seed", "0", "--save-frequency", "0", "--zeroshot-frequency", "0",
            "--log-every-n-steps", "1000", "--logs", spec["workdir"], "--name", f"oct-{spec['tag']}"]
    try:
        octm.main(argv)
    except _Done:
        pass
    logging.shutdown()
    return stamps


def worker(name: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from bench_refine import setup_environment

    setup_environment(spec["cache"], spec["threads"])
    run = {"ours": _run_ours, "ours-native": lambda spec: _run_ours(spec, "native"), "reference": _run_reference,
           "open_clip_train": _run_open_clip_train}[name]
    stamps = run(spec)
    w, s = spec["warmup"], spec["steps"]
    if len(stamps) < w + s:
        raise RuntimeError(f"{name}: only {len(stamps)} steps ran, {w + s} needed")
    wall = stamps[w + s - 1][0] - stamps[w - 1][0]
    cpu = stamps[w + s - 1][1] - stamps[w - 1][1]
    Path(out_path).write_text(json.dumps({
        "name": name, "stamps": stamps, "pairs_per_s": spec["batch"] * s / wall, "loss": spec.get("_loss"),
        "pairs_per_cpu_s": spec["batch"] * s / cpu if cpu > 0 else float("nan"),
        "step_s": [b[0] - a[0] for a, b in zip(stamps[w - 1:], stamps[w:])],
        "step_cpu_s": [b[1] - a[1] for a, b in zip(stamps[w - 1:], stamps[w:])]}))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (DataLoader workers of a loop stopped mid-epoch)


# ------------------------------------------------------------------------------------- set-up
def prepare(args, workdir: Path) -> dict:
    """World, shared starting weights, the CSV for open_clip_train, and our two caches: all before timing."""
    import numpy as np

    from clip_refine_lab.data.manifest import CaptionRecord, load_manifest
    from clip_refine_lab.models.checkpoints import save_checkpoint
    from clip_refine_lab.models.loading import load_model
    from clip_refine_lab.embedded.world import WorldConfig, build_world

    manifest = build_world(WorldConfig.preset(args.world), progress=False).manifest("synthetic-coco")
    import torch

    torch.manual_seed(0)
    loaded = load_model(args.model)  # random initialisation: throughput does not depend on the weights
    weights = workdir / f"{args.model}-random.safetensors"
    save_checkpoint(loaded.model, weights, loaded.spec)
    records = [r for r in load_manifest(manifest).records() if isinstance(r, CaptionRecord)]
    rng = np.random.default_rng(0)
    import pandas as pd

    csv = workdir / "pairs.csv"
    pd.DataFrame({"filepath": [r.image for r in records],
                  "title": [r.captions[int(rng.integers(len(r.captions)))] for r in records]}).to_csv(csv, index=False)
    spec = {"model": args.model, "weights": str(weights), "manifest": str(manifest), "csv": str(csv),
            "world": args.world, "batch": args.batch_size, "warmup": args.warmup, "steps": args.steps,
            "workers": args.workers, "threads": args.threads, "device": "cpu",
            "cache": os.environ.get("CLIP_REFINE_LAB_CACHE"), "workdir": str(workdir), "tag": "prepare"}
    from clip_refine_lab.training.loop import Refiner

    t0 = time.perf_counter()
    Refiner(_ours_config(spec), progress=False)  # builds the decoded-image and teacher-feature caches
    spec["cache_build_s"] = time.perf_counter() - t0
    return spec


def run_contender(name: str, spec: dict, workdir: Path, tag: str, timeout: float) -> dict:
    spec = {**spec, "tag": tag}
    spec_path, out_path = workdir / f"spec-{tag}.json", workdir / f"out-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"log-{tag}.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--_worker", name, "--_spec", str(spec_path),
                               "--_out", str(out_path)], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); last output:\n{tail}")
    return json.loads(out_path.read_text())


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """Median rates per contender and the medians of the per-round ratios ours / contender."""
    rows = []
    for name, runs in results.items():
        rates = [x["pairs_per_s"] for x in runs]
        row = {"contender": name, "pairs_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
               "pairs_per_cpu_s": statistics.median(x["pairs_per_cpu_s"] for x in runs), "rounds": len(rates)}
        if name != "ours" and "ours" in results:  # (for ours-native: > 1 means SDPA is a speed-up)
            for key, out in (("pairs_per_s", ""), ("pairs_per_cpu_s", "cpu_")):
                ratios = [o[key] / x[key] for o, x in zip(results["ours"], runs)]
                row[f"{out}ratio"] = statistics.median(ratios)
                row[f"{out}ratios"] = ", ".join(f"{q:.2f}" for q in ratios)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-vit-48")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per step (the default preset's batch)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--rounds", type=int, default=3, help="runs of every contender, interleaved")
    p.add_argument("--workers", type=int, default=1,
                   help="DataLoader workers of the reference loop and of open_clip_train (ours needs none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: all cores)")
    p.add_argument("--world", default="default", choices=("default", "micro"))
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated subset of " + ", ".join(CONTENDERS + EXTRA_CONTENDERS)
                        + " (ours-native: ours with open_clip's nn.MultiheadAttention, attention='native')")
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE to use (default: the usual one)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one contender run")
    p.add_argument("--quick", action="store_true", help="smoke test: micro world, batch 16, 1 warm-up + 1 timed step, 1 round")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args._worker, args._spec, args._out)
        return {}
    if args.quick:
        args.world, args.batch_size, args.steps, args.warmup, args.rounds = "micro", 16, 1, 1, 1
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step of every trainer pays one-off costs)")

    from bench_refine import describe_machine, format_table, machine_info, setup_environment

    setup_environment(args.cache, args.threads)
    import torch

    args.threads = args.threads or torch.get_num_threads()
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS + EXTRA_CONTENDERS]
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS + EXTRA_CONTENDERS)}")
    skipped = {}
    if "open_clip_train" in contenders:
        why = open_clip_train_available()
        if why:
            skipped["open_clip_train"] = why
            contenders.remove("open_clip_train")
            print(f"# open_clip_train skipped: {why} (pip install 'open_clip_torch[training]')", flush=True)
    info = machine_info("cpu")
    print(f"# bench_vs_peers: {describe_machine(info)}", flush=True)
    print(f"# {args.model}, batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.rounds} rounds, fp32 CPU, {args.threads} torch threads/process, "
          f"{args.workers} DataLoader workers for reference/open_clip_train", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        workdir = Path(tmp)
        spec = prepare(args, workdir)
        print(f"# caches ready ({spec['cache_build_s']:.0f} s to build or load, not timed)", flush=True)
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for name in order:
                res = run_contender(name, spec, workdir, f"{name}-r{r}", args.timeout)
                results[name].append(res)
                print(f"  round {r + 1}/{args.rounds} {name}: {res['pairs_per_s']:.1f} pairs/s, "
                      f"{res['pairs_per_cpu_s']:.1f} pairs per CPU-second"
                      + (f"; loss {res['loss']}" if res.get("loss") else ""), flush=True)
    rows = summarise(results)
    print()
    print(format_table(rows, [("contender", "contender"), ("pairs_per_s", "pairs/s (median)"), ("min", "min"),
                              ("max", "max"), ("ratio", "ours / this"), ("ratios", "per-round ratios"),
                              ("pairs_per_cpu_s", "pairs per CPU-s (median)"), ("cpu_ratio", "ours / this, CPU"),
                              ("cpu_ratios", "per-round CPU ratios")]))
    print("\n(wall: pairs/s of elapsed time; CPU: pairs per CPU-second of the process and its DataLoader workers. "
          "Ratios are medians over rounds of the ratio within a round.)")
    out = {"machine": info, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
           "rows": rows, "runs": results, "skipped": skipped}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
