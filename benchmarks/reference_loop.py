"""A plain post-pre-training loop set up as the authors' released code is described: the baseline of speed.

Written from the paper's post-pre-training setting and the published description of the released
code only; that code is under an evaluation-only licence and is neither read nor copied here. What it
does each step, and what it deliberately does *not* do (each of which our trainer does):

* the images are opened with PIL, decoded and run through the model's eval preprocessing on every
  step, inside a ``torch.utils.data.DataLoader`` (shuffled, ``drop_last``); one random caption per
  image, drawn when the item is loaded, tokenised there too (no decoded-image cache);
* the teacher is a deep copy of the starting model, frozen, run under ``no_grad`` on every step
  (no teacher-feature cache);
* fp32 throughout, no autocast, no gradient accumulation, no DDP;
* ``torch.optim.AdamW(model.parameters(), lr, weight_decay=0.1)`` with default settings: weight decay
  on every parameter, and torch's per-parameter (single-tensor) implementation on CPU, since neither
  ``fused`` nor ``foreach`` is asked for (torch picks foreach by default only for CUDA tensors);
* constant lr, no warm-up, 1 % of the pairs held out for validation (run between epochs; a
  benchmark stopping inside the first epoch never reaches it);
* the loss is CLIP-Refine's, L_RaFA + L_HyCD (alpha 0.5, T 1, raw features), computed with the very
  functions of :mod:`clip_refine_lab.losses` that our trainer uses, so both do identical arithmetic;
  z ~ N(0, I) with one row per pair; the loss value is read back (``.item()``) every step, as a
  logger would.

Run it alone::

    python benchmarks/reference_loop.py --model tiny-vit-48 --batch-size 256 --steps 10

``benchmarks/bench_vs_peers.py`` imports :func:`build` and :func:`train` and times them against our
trainer and open_clip's own trainer.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from clip_refine_lab import losses  # noqa: E402


class CaptionImagePairs(torch.utils.data.Dataset):
    """(image tensor, caption tokens): decode + preprocess every time, one random caption per access."""

    def __init__(self, records, preprocess, tokenizer):
        self.records = list(records)
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        from PIL import Image

        rec = self.records[index]
        with Image.open(rec.image) as im:
            image = self.preprocess(im.convert("RGB"))
        caption = random.choice(rec.captions)  # DataLoader seeds `random` in every worker
        return image, self.tokenizer([caption])[0]


@dataclass
class ReferenceSetup:
    model: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    val_set: torch.utils.data.Dataset
    device: torch.device
    embed_dim: int


def build(model_name: str, pretrained: str | None, manifest_path: str | os.PathLike, *, batch_size: int,
          lr: float = 1e-6, weight_decay: float = 0.1, num_workers: int = 1, seed: int = 0,
          device: str = "cpu") -> ReferenceSetup:
    """Model, frozen teacher copy, per-parameter AdamW and the decoding DataLoader, as the released code sets them up."""
    import open_clip

    from clip_refine_lab.data.manifest import CaptionRecord, load_manifest
    from clip_refine_lab.models.loading import register_tiny_architectures

    register_tiny_architectures()  # our tiny configs become ordinary open_clip model names
    torch.manual_seed(seed)
    random.seed(seed)
    dev = torch.device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=dev)
    tokenizer = open_clip.get_tokenizer(model_name)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    records = [r for r in load_manifest(manifest_path).records() if isinstance(r, CaptionRecord)]
    pairs = CaptionImagePairs(records, preprocess, tokenizer)
    n_val = max(1, len(pairs) // 100)
    train_set, val_set = torch.utils.data.random_split(pairs, [len(pairs) - n_val, n_val],
                                                       generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers, persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    return ReferenceSetup(model, teacher, optimizer, loader, val_set, dev, int(model.text_projection.shape[1]))


def train_step(setup: ReferenceSetup, images: torch.Tensor, tokens: torch.Tensor, *, alpha: float = 0.5,
               temperature: float = 1.0) -> float:
    """One step of CLIP-Refine the plain way: teacher forward, student forward, loss, backward, AdamW."""
    images, tokens = images.to(setup.device), tokens.to(setup.device)
    with torch.no_grad():
        teacher_image = setup.teacher.encode_image(images)
        teacher_text = setup.teacher.encode_text(tokens)
    image = setup.model.encode_image(images)
    text = setup.model.encode_text(tokens)
    z = torch.randn(image.shape, device=setup.device)  # one prior sample per pair, shared by its image and text
    loss = (losses.random_feature_alignment(image, text, z)
            + losses.hybrid_contrastive_distillation(image, text, teacher_image, teacher_text,
                                                     alpha=alpha, temperature=temperature))
    setup.optimizer.zero_grad()
    loss.backward()
    setup.optimizer.step()
    return loss.item()


def train(setup: ReferenceSetup, steps: int, *, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Run ``steps`` optimiser steps (over as many epochs as needed); return the loss of each."""
    out: list[float] = []
    while len(out) < steps:
        for images, tokens in setup.loader:
            out.append(train_step(setup, images, tokens))
            if on_step is not None:
                on_step(len(out), out[-1])
            if len(out) >= steps:
                break
        # (between epochs the released code validates on the held-out 1 %; not reached in a benchmark)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-vit-48")
    p.add_argument("--pretrained", default=None, help="weights file or tag (default: random init)")
    p.add_argument("--data", default="synthetic-coco",
                   help="a manifest YAML, or a caption split of the embedded world")
    p.add_argument("--world", default="default", choices=("default", "micro"), help="embedded world preset")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    data = args.data
    if not data.endswith((".yaml", ".yml")):
        from clip_refine_lab.embedded.world import WorldConfig, build_world

        data = str(build_world(WorldConfig.preset(args.world), progress=False).manifest(data))
    setup = build(args.model, args.pretrained, data, batch_size=args.batch_size, num_workers=args.workers,
                  device=args.device)
    stamps: list[float] = []
    train(setup, args.steps, on_step=lambda i, loss: (stamps.append(time.perf_counter()),
                                                       print(f"step {i}: loss {loss:.4f}", flush=True)))
    if len(stamps) >= 2:
        rate = args.batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0])
        print(f"{rate:.1f} pairs/s over steps 2..{len(stamps)} (the first step is warm-up)")


if __name__ == "__main__":
    main()
