"""Feature-encoding throughput (images/s, texts/s) through clip_refine_lab.features.

Times :func:`clip_refine_lab.features.encode_images` (PIL decode + the model's eval preprocessing in
a DataLoader, then ``encode_image``) and :func:`clip_refine_lab.features.encode_texts` (tokenise +
``encode_text``) on the embedded world's ``synthetic-coco`` images and captions, for ``tiny-vit-48``
(48 px) and ``ViT-B-32`` (224 px), both with random weights (throughput does not depend on them).
These are the calls behind every evaluation and behind the teacher-feature cache.

Each measurement is preceded by one untimed batch (warm-up); ``--repeats`` measurements per model
alternate images and texts, and the table gives the medians.

Usage::

    python benchmarks/bench_encode.py                      # CPU, default sizes (a few minutes on 2 cores)
    python benchmarks/bench_encode.py --device cuda --precision bf16 --images 4096 --texts 16384
    python benchmarks/bench_encode.py --quick              # smoke test: micro world, tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
REPO_ROOT = str(Path(__file__).resolve().parents[1])
for _p in (REPO_ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# per device and model: (images, texts, image batch, text batch, repeats)
DEFAULTS = {
    "cpu": {"tiny-vit-48": (2048, 8192, 256, 512, 3), "ViT-B-32": (128, 256, 64, 128, 1)},
    "cuda": {"tiny-vit-48": (5000, 20000, 1024, 2048, 3), "ViT-B-32": (5000, 20000, 512, 1024, 3)},
}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="architectures (default: tiny-vit-48 ViT-B-32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on GPU only")
    p.add_argument("--images", type=int, default=None, help="images to encode (default per model)")
    p.add_argument("--texts", type=int, default=None, help="captions to encode (default per model)")
    p.add_argument("--batch-size", type=int, default=None, help="image batch (texts use twice this)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for image decoding")
    p.add_argument("--world", default="default", choices=("default", "micro"))
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE to use (default: the usual one)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="smoke test: micro world, tiny-vit-48, 64 images, 128 texts")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from bench_refine import describe_machine, format_table, machine_info, setup_environment

    setup_environment(args.cache, args.threads)
    import torch

    from clip_refine_lab.data.datasets import Images
    from clip_refine_lab.data.manifest import CaptionRecord, flatten_captions, load_manifest
    from clip_refine_lab.features import encode_images, encode_texts
    from clip_refine_lab.models.loading import load_model
    from clip_refine_lab.embedded.world import WorldConfig, build_world

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if kind == "cpu" and args.precision != "fp32":
        p.error("on CPU only fp32 is measured")
    if args.quick:
        args.world, args.images, args.texts, args.repeats = "micro", args.images or 64, args.texts or 128, 1
    models = args.models or (["tiny-vit-48"] if args.quick else ["tiny-vit-48", "ViT-B-32"])
    manifest = build_world(WorldConfig.preset(args.world), progress=False).manifest("synthetic-coco")
    records = [r for r in load_manifest(manifest).records() if isinstance(r, CaptionRecord)]
    all_texts, _ = flatten_captions(records)
    info = machine_info(device)
    print(f"# bench_encode on {device} ({args.precision}): {describe_machine(info)}", flush=True)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)) \
        if args.precision != "fp32" else contextlib.nullcontext

    def timed(fn) -> float:
        if kind == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast():
            fn()
        if kind == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    rows = []
    for arch in models:
        n_img, n_txt, bs, tbs, repeats = DEFAULTS[kind].get(arch, DEFAULTS[kind]["ViT-B-32"])
        n_img, n_txt = args.images or n_img, args.texts or n_txt
        if args.batch_size:
            bs, tbs = args.batch_size, 2 * args.batch_size
        repeats = args.repeats or repeats
        n_img, n_txt = min(n_img, len(records)), min(n_txt, len(all_texts))
        bs, tbs = min(bs, n_img), min(tbs, n_txt)
        loaded = load_model(arch, device=device)
        images = Images(records[:n_img], loaded.preprocess)
        texts = all_texts[:n_txt]
        enc_i = lambda ds: encode_images(loaded.model, ds, batch_size=bs, device=device,  # noqa: E731
                                         num_workers=args.workers, progress=False)
        enc_t = lambda tx: encode_texts(loaded.model, loaded.tokenizer, tx, batch_size=tbs, device=device,  # noqa: E731
                                        progress=False)
        timed(lambda: enc_i(Images(records[:bs], loaded.preprocess)))  # warm-up
        timed(lambda: enc_t(texts[:tbs]))
        t_img, t_txt = [], []
        for _ in range(repeats):
            t_img.append(timed(lambda: enc_i(images)))
            t_txt.append(timed(lambda: enc_t(texts)))
        row = {"model": arch, "device": device, "precision": args.precision, "images": n_img, "image_batch": bs,
               "images_per_s": n_img / statistics.median(t_img), "texts": n_txt, "text_batch": tbs,
               "texts_per_s": n_txt / statistics.median(t_txt), "repeats": repeats}
        rows.append(row)
        print(f"  {arch}: {row['images_per_s']:.1f} images/s, {row['texts_per_s']:.1f} texts/s", flush=True)
    print()
    print(format_table(rows, [("model", "model"), ("device", "device"), ("precision", "precision"),
                              ("images", "images"), ("image_batch", "batch"), ("images_per_s", "images/s"),
                              ("texts", "texts"), ("text_batch", "batch"), ("texts_per_s", "texts/s"),
                              ("repeats", "repeats (median)")]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
