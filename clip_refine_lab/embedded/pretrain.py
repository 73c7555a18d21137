"""Pre-training the embedded base model: a tiny open_clip CLIP trained from scratch on synthetic-web.

This plays the part of "OpenAI CLIP pre-trained on noisy web alt-text": CLIP's own contrastive loss
(open_clip's ``ClipLoss``, learnable logit scale) on ``synthetic-web``, whose captions are short,
often partial and 20% mismatched.

Hard negatives in NegCLIP's manner (:func:`~clip_refine_lab.losses.hard_negative_contrastive_loss`): a
caption that names a relation also enters the batch, changed so that it is false of its image, as an
extra negative for the images. Each form is a switch of :class:`PretrainRecipe`:

* ``object_order_hard_negatives``: the two objects swapped ("a blue star left of a red circle"). It lifts
  position and the position and count sketches off chance, and is part of every recipe of :data:`BASE_RECIPES`.
* ``relation_hard_negatives``: the relation words swapped ("right of"). It leaves the ``relation`` probe
  at chance (``python benchmarks/pretrain_recipes.py tiny-vit-48:6:256:3e-4:relation_hard_negatives=true``).
* ``relation_axis_hard_negatives``: a second negative, the relation moved to the other axis
  (:func:`~clip_refine_lab.embedded.captions.relation_axis_swapped`); it reads the scene metadata of the
  web records, so mismatched captions get none.

The dataclass defaults are off, so a recipe built field by field (``benchmarks/pretrain_recipes.py``) is
plain CLIP unless it asks for them; a switch enters the cache key only when on. The result is cached
under ``<cache dir>/base/<arch>-<key>.safetensors`` (key = world + architecture + recipe), written
atomically with a JSON summary beside it; a second call loads instead of retraining.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import PRESETS, ConfigError, preset_name
from ..metrics import zero_shot_average
from ..optim import build_adamw, clamp_logit_scale, lr_at, set_lr
from ..progress import progress_bar, stage
from ..utils import atomic_write_json, cache_dir, seed_everything, stable_hash
from .captions import relation_axis_swapped, relation_objects_swapped, relation_swapped
from .world import WORLD_VERSION, WorldConfig, build_world

PRETRAIN_VERSION = 6  # bump when the trained bytes change (it enters the base cache key)

#: Chunks the batch's text rows are sorted into by caption length and encoded apart
#: (:func:`~clip_refine_lab.models.speed.encode_text_trimmed`); 4 measured fastest of 1, 3, 4, 6 and 8 on 2 cores.
TEXT_BUCKETS = 4

#: About how long pre-training a preset's base takes on 2 CPU cores (training and the summary evaluation).
PRETRAIN_MINUTES = {"default": 8.0, "micro": 0.5}


@dataclass(frozen=True)
class PretrainRecipe:
    """How a base is pre-trained: epochs, batch, AdamW and its schedule, seed and the hard-negative switches."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    warmup_steps: int = 100
    seed: int = 0
    logit_scale_init: float | None = None  # initial exp(logit_scale); None = open_clip's 1/0.07
    logit_scale_lr_factor: float | None = None  # the logit scale's lr over the others' (own group, no decay)
    relation_hard_negatives: bool = False  # add each relation caption, relation words swapped, as a negative
    object_order_hard_negatives: bool = False  # ... or with its two objects swapped (takes precedence)
    relation_axis_hard_negatives: bool = False  # also its relation moved to the other axis, where the scene allows

    def lr_at(self, step: int, total: int) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total`` steps."""
        return lr_at(step, total, lr=self.lr, warmup_steps=self.warmup_steps, schedule="cosine")


#: The base recipes, by name: ``pretrained="embedded:NAME"`` (``clip-refine-lab pretrain --base NAME``) starts
#: from that base; plain ``"embedded"`` from the preset's own (:data:`DEFAULT_BASES`). docs/embedded-world.md,
#: "Two regimes", says how the converged recipe was chosen and what the two do to the feature space.
BASE_RECIPES = {
    # The logit scale starts at the cap of 100, where every released CLIP ends: 702 steps cannot move it there
    # from 1/0.07, not even with its own learning rate 50x the others' (docs/embedded-world.md, "Two regimes").
    "converged": PretrainRecipe(epochs=6, batch_size=256, lr=3e-4, warmup_steps=100, object_order_hard_negatives=True,
                                logit_scale_init=100.0),
    # open_clip's initial scale 1/0.07, which 702 steps at lr 3e-4 cannot move far: ~14.4 at the end. Object-order
    # hard negatives lift position and the position and count sketches off chance (docs/embedded-world.md).
    "high-temperature": PretrainRecipe(epochs=6, batch_size=256, lr=3e-4, warmup_steps=100,
                                       object_order_hard_negatives=True),
    # The micro preset's (tests and CI): seconds, not a regime anybody studies.
    "micro": PretrainRecipe(epochs=6, batch_size=64, lr=2e-3, warmup_steps=10, object_order_hard_negatives=True),
}

#: The base each preset starts from when ``pretrained`` is plain ``"embedded"``.
DEFAULT_BASES = {"default": "converged", "micro": "micro"}


def base_recipe(base: str | None = None, world_preset: str | None = None) -> tuple[str, PretrainRecipe]:
    """(name, recipe) of base ``base``, or of the preset's default base when ``base`` is None."""
    name = base or DEFAULT_BASES[preset_name(world_preset)]
    if name not in BASE_RECIPES:
        raise ConfigError(f"unknown embedded base '{name}': known bases are {', '.join(BASE_RECIPES)} "
                          "(pretrained: embedded:NAME)")
    return name, BASE_RECIPES[name]


def base_checkpoint_path(arch: str | None = None, *, world_preset: str | None = None,
                         recipe: PretrainRecipe | None = None, base: str | None = None) -> Path:
    preset = PRESETS[preset_name(world_preset)]
    arch = arch or preset.model
    refuse_sigmoid_family(arch)
    recipe = recipe or base_recipe(base, preset.name)[1]
    world_cfg = WorldConfig.preset(preset.world)
    # Unset optional fields (None, or an off switch) stay out of the key, so adding one does not invalidate
    # cached bases.
    recipe_key = {k: v for k, v in asdict(recipe).items() if v is not None and v is not False}
    key = stable_hash([PRETRAIN_VERSION, WORLD_VERSION, world_cfg.key_dict(), arch, recipe_key])
    return cache_dir() / "base" / f"{arch}-{key}.safetensors"


def refuse_sigmoid_family(arch: str) -> None:
    """The embedded pre-training trains CLIP's softmax objective; a sigmoid-loss (SigLIP-shaped)
    architecture would come out with an untrained logit bias, so it is refused with the remedy."""
    import open_clip

    from ..models.families import config_family
    from ..models.loading import register_tiny_architectures

    register_tiny_architectures()
    if config_family(open_clip.get_model_config(arch)) == "siglip":
        raise ConfigError(f"'{arch}' is a sigmoid-loss (SigLIP-shaped) architecture, and the embedded base is "
                          "pre-trained with CLIP's softmax loss only: start from a checkpoint file instead "
                          f"(--model {arch} --pretrained FILE)")


def pretrain_base(arch: str | None = None, *, world_preset: str | None = None, recipe: PretrainRecipe | None = None,
                  base: str | None = None, progress: bool = True, device: str = "cpu") -> Path:
    """Return the path of the cached base checkpoint, training it first if it is not there yet.

    ``recipe``, else the recipe of base ``base`` (a name of :data:`BASE_RECIPES`), else the preset's default."""
    path = base_checkpoint_path(arch, world_preset=world_preset, recipe=recipe, base=base)
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    from ..data.manifest import load_manifest
    from ..features import decode_images, normalize_uint8
    from ..losses import hard_negative_contrastive_loss
    from ..models.checkpoints import ModelSpec, save_checkpoint
    from ..models.loading import load_model, no_random_init_warning
    from ..models.speed import encode_text_trimmed, use_sdpa_attention

    preset = PRESETS[preset_name(world_preset)]
    arch = arch or preset.model
    refuse_sigmoid_family(arch)
    recipe = recipe or base_recipe(base, preset.name)[1]
    world = build_world(WorldConfig.preset(preset.world), progress=progress)
    stage(f"Pre-training the embedded base {arch} on synthetic-web",
          f"{PRETRAIN_MINUTES.get(preset.name, PRETRAIN_MINUTES['default']):g} min on 2 CPU cores; cached afterwards",
          enabled=progress)
    seed_everything(recipe.seed)
    with no_random_init_warning():  # random weights are the point here, not a failed load
        loaded = load_model(arch, None, device=device)
    model = loaded.model
    use_sdpa_attention(model)  # the trainer's attention path: same parameters and checkpoint keys, faster
    if recipe.logit_scale_init is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(recipe.logit_scale_init))
    records = load_manifest(world.manifest("synthetic-web")).records()
    images = decode_images(records, loaded.image_size, progress=progress)
    captions = [r.captions[0] for r in records]
    tokens = loaded.tokenizer(captions)
    make_negative = (relation_objects_swapped if recipe.object_order_hard_negatives
                     else relation_swapped if recipe.relation_hard_negatives else None)

    def hard_negatives(record) -> list[str]:
        caption, scene = record.captions[0], record.meta.get("meta", {})
        negatives = [make_negative(caption)] if make_negative else []
        # the axis negative needs the scene, which a mismatched web caption does not describe
        if recipe.relation_axis_hard_negatives and scene.get("noise") != "mismatched":
            negatives.append(relation_axis_swapped(caption, scene.get("objects", [])))
        return [n for n in negatives if n is not None]

    negatives = [hard_negatives(r) for r in records]
    # caption i's negatives are rows negative_start[i]:negative_start[i + 1] of negative_tokens
    negative_start = list(itertools.accumulate(map(len, negatives), initial=0))
    flat = [n for negs in negatives for n in negs]
    negative_tokens = loaded.tokenizer(flat) if flat else tokens[:0]
    mean, std = loaded.spec.preprocess["mean"], loaded.spec.preprocess["std"]

    # requires_grad only: the fixed sin-cos position table is not trained
    opt = build_adamw(model.named_parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98),
                      eps=1e-6, exclude_gains=True, device=torch.device(device),
                      logit_scale_lr_factor=recipe.logit_scale_lr_factor)
    steps_per_epoch = len(records) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    start = time.time()
    bar = progress_bar(total=total, desc=f"pre-train {arch} on synthetic-web", enabled=progress, unit="step")
    step = 0
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(records), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * recipe.batch_size:(b + 1) * recipe.batch_size]
            set_lr(opt, recipe.lr_at(step, total))
            x = normalize_uint8(images[idx], mean, std).to(device)
            rows = torch.tensor([j for i in idx.tolist() for j in range(negative_start[i], negative_start[i + 1])],
                                dtype=torch.long)
            # one text forward for the batch's captions and their hard negatives
            text = encode_text_trimmed(model, torch.cat([tokens[idx], negative_tokens[rows]]).to(device), TEXT_BUCKETS)
            image = model.encode_image(x)
            loss = hard_negative_contrastive_loss(image, text[:len(idx)], text[len(idx):], model.logit_scale.exp())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pre-training loss became {loss.item()} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_logit_scale(model)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    train_seconds = round(time.time() - start, 1)
    model.eval()
    spec = ModelSpec(arch, "embedded", False, loaded.spec.preprocess)
    summary = summarize_base(loaded, world, device=device, progress=progress)
    summary.update(arch=arch, world=str(world.root), recipe=asdict(recipe), train_seconds=train_seconds,
                   evaluate_seconds=round(time.time() - start - train_seconds, 1),
                   hard_negative_fraction=round(sum(map(bool, negatives)) / len(captions), 4), hard_negatives=len(flat),
                   final_loss=float(loss.item()), logit_scale=float(model.logit_scale.exp().item()))
    save_checkpoint(model, path, spec, summary=json.dumps(summary))
    atomic_write_json(path.with_suffix(".json"), summary)
    if progress:
        print(format_summary(summary))
    return path


def summarize_base(loaded, world, *, device: str = "cpu", progress: bool = True) -> dict:
    """Zero-shot top-1 on every task, the modality gap and the regime statistics on synthetic-retrieval.

    Through the feature cache: these are the final weights, so the first evaluation of a run starting from
    this base model reuses the features instead of encoding the world again."""
    from ..data.manifest import load_manifest
    from ..features import dataset_features, first_caption_pairs
    from ..metrics import class_embeddings, classification_metrics, modality_gap, regime_statistics, zero_shot_logits
    from ..regime import logit_scale_of

    zero_shot = {}
    for task in world.tasks:
        manifest = load_manifest(world.manifest(task))
        fs = dataset_features(loaded, manifest, device=device, progress=False)
        logits = zero_shot_logits(fs.image, class_embeddings(fs.text))
        zero_shot[task] = {"top1": classification_metrics(logits, fs.labels)["top1"],
                           "chance": 1.0 / fs.text.shape[0], **({"probe": True} if manifest.is_probe else {})}
    fs = dataset_features(loaded, world.manifest("synthetic-retrieval"), device=device, progress=False)
    return {"zero_shot": zero_shot, "gap": modality_gap(fs.image, fs.text),
            "regime": regime_statistics(*first_caption_pairs(fs), logit_scale_of(loaded.model))}


def format_summary(summary: dict) -> str:
    from ..regime import format_regime

    evaluated = f" (+ {summary['evaluate_seconds']} s for this summary)" if "evaluate_seconds" in summary else ""
    lines = [f"base model {summary.get('arch')}: trained in {summary.get('train_seconds')} s{evaluated}, "
             f"logit scale {summary.get('logit_scale', float('nan')):.1f}",
             "regime statistics on synthetic-retrieval (image, first caption):",
             format_regime({"this base": summary["regime"]}), "",
             f"{'task':<28}{'top-1':>8}{'chance':>8}"]
    row = lambda task, r: f"{task:<28}{100 * r['top1']:>7.1f}%{100 * r['chance']:>7.1f}%"  # noqa: E731
    results = summary["zero_shot"]
    lines += [row(task, r) for task, r in results.items() if not r.get("probe")]
    average = zero_shot_average(results)
    if average is not None:
        lines.append(f"{'average':<28}{100 * average:>7.1f}%")
    probes = {task: r for task, r in results.items() if r.get("probe")}
    if probes:
        lines.append("compositional probes (not in the average; web CLIPs are near chance on ARO-style relations):")
        lines += [row(task, r) for task, r in probes.items()]
    return "\n".join(lines)
