"""Base pre-training step, PRETRAIN_VERSION 2 against 3, 4 and 5: what the SDPA path and the trimmed text tower buy.

One step of :func:`clip_refine_lab.embedded.pretrain.pretrain_base`'s loop (text forward of the batch's web captions
and their object-order hard negatives, image forward, the hard-negative contrastive loss, backward, fused
AdamW) in five forms, interleaved round by round on the same batches:

- ``v2``: open_clip's ``nn.MultiheadAttention`` and ``encode_text`` over the full context (version 2);
- ``sdpa``: the SDPA attention path only;
- ``v3``: SDPA and :func:`clip_refine_lab.models.speed.encode_text_trimmed` (the text tower up to the batch's
  longest caption), version 3;
- ``v4``: as ``v3``, with the text rows sorted by length and encoded in ``pretrain.TEXT_BUCKETS`` chunks, each
  trimmed to its own longest caption, and each chunk looking up its own token embeddings (version 4);
- ``v5``: as ``v4`` with one token-embedding lookup for all chunks, as ``pretrain_base`` trains now (the
  lookup's backward writes a dense vocabulary-sized gradient, once instead of once per chunk).

All five start from the same random weights (speed does not depend on them). The table gives the median
step time per form and the median of the per-round ratios against ``v2``.

Usage::

    python benchmarks/bench_pretrain.py                 # tiny-vit-48, batch 256, 5 rounds (~1 min on 2 cores)
    python benchmarks/bench_pretrain.py --quick         # smoke test: micro world and model, 1 round
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench_refine import describe_machine, format_table, machine_info, setup_environment  # noqa: E402

FORMS = ("v2", "sdpa", "v3", "v4", "v5")


def encode_text_chunked_v4(model, text, buckets: int):
    """Version 4's bucketed text path: each length-sorted chunk through ``encode_text_trimmed`` on its own, so
    each chunk does its own token-embedding lookup (and its own dense embedding gradient)."""
    import torch

    from clip_refine_lab.models.speed import encode_text_trimmed

    lengths = (text != 0).cumsum(1).argmax(1)
    order = lengths.argsort(stable=True)
    return torch.cat([encode_text_trimmed(model, text[rows]) for rows in order.chunk(buckets)])[order.argsort()]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="default", choices=("default", "micro"))
    p.add_argument("--arch", default=None, help="tiny architecture (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's recipe")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per form and round")
    p.add_argument("--quick", action="store_true", help="micro world, 1 round of 1 step")
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE to use (default: the usual one)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.world, args.rounds, args.steps = "micro", 1, 1
    setup_environment(args.cache, args.threads)

    import torch

    from clip_refine_lab.config import PRESETS
    from clip_refine_lab.data.manifest import load_manifest
    from clip_refine_lab.features import decode_images, normalize_uint8
    from clip_refine_lab.losses import hard_negative_contrastive_loss
    from clip_refine_lab.models.loading import load_model
    from clip_refine_lab.optim import build_adamw
    from clip_refine_lab.models.speed import encode_text_trimmed, use_sdpa_attention
    from clip_refine_lab.embedded.pretrain import TEXT_BUCKETS, base_recipe
    from clip_refine_lab.embedded.captions import relation_objects_swapped
    from clip_refine_lab.embedded.world import WorldConfig, build_world

    preset = PRESETS[args.world]
    arch = args.arch or preset.model
    batch = args.batch_size or base_recipe(None, preset.name)[1].batch_size
    print(f"# bench_pretrain on cpu: {describe_machine(machine_info('cpu'))}", flush=True)
    world = build_world(WorldConfig.preset(preset.world), progress=False)
    records = load_manifest(world.manifest("synthetic-web")).records()
    torch.manual_seed(0)
    loaded = load_model(arch, None)
    n = min(len(records), batch * (args.steps + 1))
    images = decode_images(records[:n], loaded.image_size, progress=False)
    mean, std = loaded.spec.preprocess["mean"], loaded.spec.preprocess["std"]
    captions = [r.captions[0] for r in records[:n]]
    negatives = [relation_objects_swapped(c) for c in captions]
    batches = []  # (images, caption + negative tokens), the same for every form
    for b in range(n // batch):
        sl = slice(b * batch, (b + 1) * batch)
        texts = captions[sl] + [x for x in negatives[sl] if x]
        batches.append((normalize_uint8(images[sl], mean, std), loaded.tokenizer(texts)))

    models = {}
    for form in FORMS:
        model = copy.deepcopy(loaded.model).train()
        if form != "v2":
            use_sdpa_attention(model)
        opt = build_adamw(model.named_parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                          exclude_gains=True, device=torch.device("cpu"))  # pretrain_base's optimiser
        encode = (type(model).encode_text if form in ("v2", "sdpa") else encode_text_trimmed if form == "v3"
                  else functools.partial(encode_text_chunked_v4, buckets=TEXT_BUCKETS) if form == "v4"
                  else functools.partial(encode_text_trimmed, buckets=TEXT_BUCKETS))
        models[form] = (model, opt, encode)

    def step(form, x, tokens):
        model, opt, encode = models[form]
        text = encode(model, tokens)
        loss = hard_negative_contrastive_loss(model.encode_image(x), text[:len(x)], text[len(x):], model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for form in FORMS:  # warm-up: one untimed step each
        step(form, *batches[0])
    times = {f: [] for f in FORMS}
    for _ in range(args.rounds):
        for form in FORMS:
            t0 = time.perf_counter()
            for x, tokens in itertools.islice(itertools.cycle(batches), args.steps):
                step(form, x, tokens)
            times[form].append((time.perf_counter() - t0) / args.steps)
    lengths = [int((t != 0).any(0).nonzero()[-1]) + 1 for _, t in batches]
    rows = [{"form": f, "step_ms": 1000 * statistics.median(times[f]),
             "speedup": statistics.median(a / b for a, b in zip(times["v2"], times[f])),
             "per_round": ", ".join(f"{a / b:.2f}" for a, b in zip(times["v2"], times[f]))} for f in FORMS]
    print(f"\n{arch}, batch {batch} (+ hard negatives), text columns used {min(lengths)}-{max(lengths)} of "
          f"{loaded.model.context_length}, {args.rounds} rounds x {args.steps} steps:")
    print(format_table(rows, [("form", "form"), ("step_ms", "step (ms, median)"), ("speedup", "v2 / this (median)"),
                              ("per_round", "per-round ratios")]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
