"""The trainer's step with captions encoded up to the batch's longest against the full context.

``Refiner.compute_loss`` encodes captions through :func:`clip_refine_lab.models.speed.encode_text_trimmed`
(the text tower runs on the columns up to the batch's longest caption: exact under the causal mask
with end-of-text pooling). This script times the trainer's optimiser step both ways, interleaved round
by round in one process on the same synthetic batch (random images, captions of COCO length: 12 to 20
tokens with start and end, so the batch's longest is 20 of ViT-B-32's 77):

- ``full``: ``compute_loss`` with the text tower over the whole context (``encode_text``);
- ``trimmed``: ``compute_loss`` as the trainer runs it.

Two measurements per form and round: the whole step (``zero_grad``, ``compute_loss(train=True)`` with
the frozen teacher's forward or its cached features, the AdamW step) and the student's text tower
alone (forward and backward of ``encode_text``). The table gives median times and the medians of the
per-round ratios full / trimmed.

Usage::

    python benchmarks/bench_trimmed_text.py                     # ViT-B-32, batch 32, 4 rounds (~8 min, 2 cores)
    python benchmarks/bench_trimmed_text.py --quick             # smoke test: micro-vit-32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench_memory import coco_length_tokens  # noqa: E402
from bench_refine import describe_machine, format_table, machine_info, setup_environment  # noqa: E402

FORMS = ("full", "trimmed")


@contextlib.contextmanager
def text_path(form: str):
    """The trainer's text encode as it is (``trimmed``) or over the whole context (``full``)."""
    from clip_refine_lab.training import loop

    trimmed = loop.encode_text_trimmed
    if form == "full":
        loop.encode_text_trimmed = lambda model, text: model.encode_text(text)
    try:
        yield
    finally:
        loop.encode_text_trimmed = trimmed


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher", default="forward", choices=("forward", "cache"),
                   help="forward: the teacher runs in the step (its text is trimmed too); cache: features given")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="timed steps per form and round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="micro-vit-32, batch 8, 1 round of 1 step")
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE to use (the micro world is built there)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.rounds, args.steps = "micro-vit-32", 8, 1, 1
    setup_environment(args.cache, args.threads)

    import torch

    from clip_refine_lab.config import RunConfig
    from clip_refine_lab.embedded.base import ensure_world
    from clip_refine_lab.training.loop import Refiner

    ensure_world("micro", progress=False)  # the Refiner opens the micro world's synthetic-coco (batches are synthetic)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-trimmed-") as workdir:
        cfg = RunConfig(method="clip-refine", model=args.model, pretrained=None, preset="micro", batch_size=8,
                        epochs=1, device=args.device, val_fraction=0.0, output_dir=workdir, run_name="trimmed",
                        seed=0).resolved()
        refiner = Refiner(cfg, progress=False)
    model = refiner.model
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, refiner.base.image_size, refiner.base.image_size, device=device)
    tokens = coco_length_tokens(args.batch_size, model.context_length).to(device)
    used = int((tokens != 0).any(0).nonzero()[-1]) + 1
    mean_length = float((tokens != 0).sum(1).float().mean())
    teacher = None
    if args.teacher == "cache":
        with torch.no_grad():
            teacher = refiner.teacher.encode_image(images).float(), refiner.teacher.encode_text(tokens).float()
    model.train()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        sync()
        t0 = time.perf_counter()
        refiner.optimizer.zero_grad(set_to_none=True)
        refiner.compute_loss(images, tokens, 0, train=True, teacher=teacher)
        refiner.optimizer_step()
        sync()
        return time.perf_counter() - t0

    from clip_refine_lab.training import loop

    def text_tower() -> float:  # the student's text encode as compute_loss calls it (patched by text_path)
        sync()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loop.encode_text_trimmed(model, tokens).square().sum().backward()
        sync()
        return time.perf_counter() - t0

    for form in FORMS:  # warm-up: one step each (allocations, oneDNN kernels)
        with text_path(form):
            step()
    times: dict = {(f, what): [] for f in FORMS for what in ("step", "text")}
    ratios: dict = {"step": [], "text": []}
    for r in range(args.rounds):
        medians = {}
        for form in FORMS if r % 2 == 0 else FORMS[::-1]:
            with text_path(form):
                for what, fn in (("step", step), ("text", text_tower)):
                    runs = [fn() for _ in range(args.steps)]
                    times[(form, what)] += runs
                    medians[(form, what)] = statistics.median(runs)
        for what in ratios:
            ratios[what].append(medians[("full", what)] / medians[("trimmed", what)])
        print(f"round {r + 1}: step {medians[('full', 'step')]:.2f} s full, {medians[('trimmed', 'step')]:.2f} s "
              f"trimmed ({ratios['step'][-1]:.2f}x); text tower {medians[('full', 'text')]:.2f} s, "
              f"{medians[('trimmed', 'text')]:.2f} s ({ratios['text'][-1]:.2f}x)", flush=True)
    rows = []
    for form in FORMS:
        rows.append({"form": form, "model": args.model, "batch": args.batch_size, "teacher": args.teacher,
                     "text_columns": model.context_length if form == "full" else used,
                     "step_ms": 1000 * statistics.median(times[(form, "step")]),
                     "text_ms": 1000 * statistics.median(times[(form, "text")]),
                     "step_speedup": 1.0 if form == "full" else statistics.median(ratios["step"]),
                     "text_speedup": 1.0 if form == "full" else statistics.median(ratios["text"]),
                     "per_round_step": [round(x, 3) for x in ratios["step"]] if form == "trimmed" else None})
    info = machine_info(args.device)
    print(f"\n{describe_machine(info)}")
    print(f"captions: mean {mean_length:.1f} tokens, longest {used} of {model.context_length}\n")
    print(format_table(rows, [("form", "form"), ("model", "model"), ("batch", "batch"), ("teacher", "teacher"),
                              ("text_columns", "text columns"), ("step_ms", "step (ms, median)"),
                              ("step_speedup", "full / this, step"), ("text_ms", "text tower fwd+bwd (ms)"),
                              ("text_speedup", "full / this, text tower"), ("per_round_step", "per-round step ratios")]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "mean_caption_tokens": mean_length, "rows": rows},
                                              indent=2))
    return rows


if __name__ == "__main__":
    main()
