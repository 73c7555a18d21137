"""Where does the embedded base model's learning stall? Five diagnostics of a base model on the world.

1. **Linear probe** of the image features: 4-fold logistic regression on the zero-shot tasks' images
   (shape, position, size, count, relation). Near chance means the image tower does not encode it.
2. **Text similarity**: mean pairwise cosine of prompts that differ in one attribute only (positions,
   shapes, colours). Near 1 means the text tower does not tell those words apart.
3. **Supervised learnability** (``--supervised-steps N``): the same architecture's image tower,
   trained from scratch *supervised* on the single-object ``synthetic-web`` scenes (shape and grid-cell
   heads, AdamW, the base recipe's lr and batch), scored on the held-out shape and position tasks. High
   accuracy here and chance in (1) means the tower *can* learn the attribute in that budget and the
   contrastive captions do not make it.
4. **Relation binding**: the relation task again, with prompts that name each image's two actual shapes
   ("a red square left of a blue cross") instead of "shape", and on the model's own *training* captions:
   how often a clean web caption naming a relation scores above its object-swapped, cross-axis and
   relation-word-swapped versions (all false of the scene). Near chance (25 %; 50 %) on both means the
   text tower does not fit the relation words, not that the zero-shot prompts are unfamiliar.
5. **Palette shift, part by part**: the shape task's scenes re-rendered with one part of the ``-palette``
   tasks' shift at a time (a background tint of 20 or 40 %, 55 to 85 % contrast, both) and with the whole
   shift, then zero-shot classified. Which part costs the most says what the web data lacks (a base whose
   web images all sit on grey backgrounds loses most to the tint).

With ``--supervised-steps 700`` the default architecture's image tower learns position (99.7 % supervised):
where the base's zero-shot position accuracy is far below that, the captions hold it back, not the tower.

Usage::

    python benchmarks/base_diagnostics.py                        # the default base model, probes + text
    python benchmarks/base_diagnostics.py --supervised-steps 700 # + the learnability check (~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench_refine import describe_machine, format_table, machine_info, setup_environment  # noqa: E402

PROBE_TASKS = ("shape", "position", "size", "count", "relation", "count-sketch", "position-sketch")
PROMPT_GROUPS = {
    "positions": ["a shape in the top left", "a shape in the bottom right", "a shape in the centre", "a shape in the top right"],
    "shapes": ["a star", "a circle", "a square", "a heart"],
    "colours": ["a red object", "a blue object", "a green object", "a yellow object"],
    "relations": ["a red shape left of a blue shape", "a red shape right of a blue shape",
                  "a red shape above a blue shape", "a red shape below a blue shape"],
}


def linear_probe(loaded, world, task: str, device: str) -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_score

    from clip_refine_lab.features import dataset_features

    fs = dataset_features(loaded, world.manifest(task), device=device, progress=False)
    x = fs.image.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = fs.labels.numpy()
    folds = KFold(4, shuffle=True, random_state=0)
    acc = cross_val_score(LogisticRegression(max_iter=2000, C=10.0), x, y, cv=folds).mean()
    return {"task": task, "probe_top1": 100 * float(acc), "chance": 100.0 / fs.text.shape[0]}


def text_similarity(loaded, device: str) -> list[dict]:
    import torch

    rows = []
    for group, prompts in PROMPT_GROUPS.items():
        with torch.no_grad():
            e = loaded.model.encode_text(loaded.tokenizer(prompts).to(device)).float()
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        off = sim[~torch.eye(len(prompts), dtype=torch.bool, device=sim.device)]
        rows.append({"group": group, "mean_cosine": float(off.mean()), "min_cosine": float(off.min())})
    return rows


def relation_binding(loaded, world, device: str, max_captions: int = 1500) -> dict:
    import torch
    import torch.nn.functional as F

    from clip_refine_lab.data.manifest import load_manifest
    from clip_refine_lab.embedded.captions import relation_axis_swapped, relation_objects_swapped, relation_swapped
    from clip_refine_lab.embedded.vocabulary import RELATION_WORDS
    from clip_refine_lab.features import dataset_features, decode_images, encode_texts, normalize_uint8

    model, tok = loaded.model, loaded.tokenizer
    relations = [words[0] for words in RELATION_WORDS.values()]  # left, right, above, below: the task's label order
    fs = dataset_features(loaded, world.manifest("relation"), device=device, progress=False)
    images = F.normalize(fs.image.float(), dim=-1)
    prompts = []
    for record in load_manifest(world.manifest("relation")).records():
        objects = {o["colour"]: o["shape"] for o in record.meta["meta"]["objects"]}
        prompts += [f"a red {objects['red']} {r} a blue {objects['blue']}" for r in relations]
    text = F.normalize(encode_texts(model, tok, prompts, device=device, progress=False).float(), dim=-1)
    predicted = torch.einsum("nd,nkd->nk", images, text.view(len(images), len(relations), -1)).argmax(1)
    named = {"top1": 100 * float((predicted == fs.labels).float().mean()),
             "predicted": {r: int((predicted == i).sum()) for i, r in enumerate(relations)}}

    web = load_manifest(world.manifest("synthetic-web")).records()
    rows = []  # (record, caption, object-swapped, axis-swapped, relation-swapped), clean captions only
    for record in web:
        scene, caption = record.meta.get("meta", {}), record.captions[0]
        if scene.get("noise") == "mismatched":
            continue
        variants = (relation_objects_swapped(caption), relation_axis_swapped(caption, scene.get("objects", [])),
                    relation_swapped(caption))
        if all(variants):
            rows.append((record, caption, *variants))
        if len(rows) == max_captions:
            break
    training = {"captions": len(rows)}
    if rows:
        pixels = decode_images([r[0] for r in rows], loaded.image_size, progress=False)
        mean, std = loaded.spec.preprocess["mean"], loaded.spec.preprocess["std"]
        with torch.no_grad():
            x = F.normalize(model.encode_image(normalize_uint8(pixels, mean, std).to(device)).float(), dim=-1)
        scores = [(x * F.normalize(encode_texts(model, tok, [r[k] for r in rows], device=device, progress=False)
                                   .float(), dim=-1)).sum(-1) for k in (1, 2, 3, 4)]
        for k, name in ((1, "objects_swapped"), (2, "axis_swapped"), (3, "relation_swapped")):
            training[name] = 100 * float((scores[0] > scores[k]).float().mean())
    return {"named_shapes": named, "training_captions": training}


PALETTE_PARTS = ("unshifted", "background tint 20 %", "background tint 40 %", "contrast 0.55-0.85",
                 "tint 20 % + contrast", "the whole palette shift")


def palette_parts(loaded, world, device: str, task: str = "shape") -> list[dict]:
    """Zero-shot top-1 on ``task``'s scenes re-rendered with each part of the palette shift (its own seeds)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from clip_refine_lab.data.manifest import load_manifest
    from clip_refine_lab.embedded.rendering import render_scene
    from clip_refine_lab.features import dataset_features, encode_images
    from clip_refine_lab.metrics import class_embeddings, zero_shot_logits

    manifest = load_manifest(world.manifest(task))
    fs = dataset_features(loaded, manifest, device=device, progress=False)
    classes = class_embeddings(fs.text.float())
    records = manifest.records()
    size = loaded.image_size
    rows = []
    for part in PALETTE_PARTS:
        images = []
        for i, record in enumerate(records):
            scene = {k: v for k, v in record.meta["meta"].items() if k != "style"}
            part_rng = np.random.default_rng([7, i])  # tint colour and contrast: the same draws for every part
            colour, contrast = [float(c) for c in part_rng.uniform(0, 255, 3)], float(part_rng.uniform(0.55, 0.85))
            if "tint" in part:
                scene["tint"] = colour + [0.4 if "40" in part else 0.2]
            if "contrast" in part:
                scene["contrast"] = contrast
            style = "palette" if part == "the whole palette shift" else "normal"
            images.append((loaded.preprocess(render_scene(scene, size, style, np.random.default_rng([8, i]))), i))
        x = encode_images(loaded.model, images, device=device, progress=False)
        predicted = zero_shot_logits(F.normalize(x, dim=-1), classes).argmax(1)
        rows.append({"part": part, "top1": 100 * float((predicted == fs.labels).float().mean()),
                     "largest_class_share": 100 * float(torch.bincount(predicted).max()) / len(records)})
    return rows


def supervised_learnability(arch: str, world, steps: int, recipe, device: str) -> dict:
    """Train ``arch``'s image tower from scratch on shape + cell labels of single-object web scenes, with the
    optimiser, lr schedule, batch and seed of the base-model ``recipe`` (a PretrainRecipe)."""
    import torch

    from clip_refine_lab.data.manifest import load_manifest
    from clip_refine_lab.features import decode_images, normalize_uint8
    from clip_refine_lab.embedded.vocabulary import CELLS, SHAPES
    from clip_refine_lab.models.loading import load_model
    from clip_refine_lab.optim import set_lr

    torch.manual_seed(recipe.seed)
    records = [r for r in load_manifest(world.manifest("synthetic-web")).records()
               if len(r.meta["meta"]["objects"]) == 1]
    fresh = load_model(arch, None, device=device)
    tower = fresh.model.visual
    size = fresh.image_size
    mean, std = fresh.spec.preprocess["mean"], fresh.spec.preprocess["std"]
    images = decode_images(records, size, progress=False)
    shape_y = torch.tensor([SHAPES.index(r.meta["meta"]["objects"][0]["shape"]) for r in records])
    cell_y = torch.tensor([CELLS.index(tuple(r.meta["meta"]["objects"][0]["cell"])) for r in records])
    head = torch.nn.Linear(fresh.embed_dim, len(SHAPES) + len(CELLS)).to(device)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=recipe.lr,
                            betas=(0.9, 0.98), eps=1e-6, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    tower.train()
    for step in range(steps):
        idx = torch.randint(len(records), (min(recipe.batch_size, len(records)),), generator=gen)
        set_lr(opt, recipe.lr_at(step, steps))  # pretrain_base's schedule
        out = head(tower(normalize_uint8(images[idx], mean, std).to(device)))
        loss = (torch.nn.functional.cross_entropy(out[:, :len(SHAPES)], shape_y[idx].to(device))
                + torch.nn.functional.cross_entropy(out[:, len(SHAPES):], cell_y[idx].to(device)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tower.eval()
    result = {"arch": arch, "steps": steps, "train_images": len(records), "final_loss": float(loss.item()) if steps else None}
    for task, sl in (("shape", slice(0, len(SHAPES))), ("position", slice(len(SHAPES), None))):
        test = load_manifest(world.manifest(task)).records()
        x = normalize_uint8(decode_images(test, size, progress=False), mean, std).to(device)
        with torch.no_grad():
            pred = head(tower(x))[:, sl].argmax(1).cpu()
        result[f"{task}_top1"] = 100 * float((pred == torch.tensor([r.label for r in test])).float().mean())
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="default", choices=("default", "micro"))
    p.add_argument("--arch", default=None, help="tiny architecture (default: the preset's)")
    p.add_argument("--pretrained", default="embedded",
                   help="the base model: 'embedded' (the cached default) or a checkpoint file of --arch")
    p.add_argument("--supervised-steps", type=int, default=0, help="also run the learnability check for N steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE to use (default: the usual one)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    setup_environment(args.cache, args.threads)

    from clip_refine_lab.config import PRESETS
    from clip_refine_lab.embedded.base import ensure_base, ensure_world
    from clip_refine_lab.embedded.pretrain import base_recipe
    from clip_refine_lab.models.loading import load_model

    preset = PRESETS[args.world]
    arch = args.arch or preset.model
    print(f"# base_diagnostics on {args.device}: {describe_machine(machine_info(args.device))}", flush=True)
    world = ensure_world(args.world, progress=False)
    pretrained = str(ensure_base(arch, world_preset=args.world)) if args.pretrained == "embedded" else args.pretrained
    loaded = load_model(arch, pretrained, device=args.device)
    loaded.model.eval()
    probes = [linear_probe(loaded, world, t, args.device) for t in PROBE_TASKS]
    print(f"\nlinear probe on {arch}'s image features (4-fold, %):")
    print(format_table(probes, [("task", "task"), ("probe_top1", "probe top-1"), ("chance", "chance")]))
    texts = text_similarity(loaded, args.device)
    print("\ntext tower: cosine between prompts that differ in one attribute (1 = not told apart):")
    print(format_table(texts, [("group", "prompts"), ("mean_cosine", "mean cosine"), ("min_cosine", "min cosine")]))
    binding = relation_binding(loaded, world, args.device)
    named, training = binding["named_shapes"], binding["training_captions"]
    print(f"\nrelation with each image's own shapes named: top-1 {named['top1']:.1f} % (chance 25), predicted "
          + ", ".join(f"{r} {n}" for r, n in named["predicted"].items()))
    if training["captions"]:
        print(f"training captions naming a relation ({training['captions']} clean ones): the caption beats its "
              f"object-swapped version {training['objects_swapped']:.1f} %, cross-axis {training['axis_swapped']:.1f} %, "
              f"relation-word-swapped {training['relation_swapped']:.1f} % of the time (chance 50)")
    parts = palette_parts(loaded, world, args.device)
    print(f"\nshape task re-rendered with each part of the palette shift (chance {100 / 8:.1f} %):")
    print(format_table(parts, [("part", "part"), ("top1", "top-1"), ("largest_class_share", "largest class %")]))
    result = {"arch": arch, "world": args.world, "pretrained": args.pretrained, "probes": probes, "text": texts,
              "relation_binding": binding, "palette_parts": parts}
    if args.supervised_steps:
        sup = supervised_learnability(arch, world, args.supervised_steps, base_recipe(None, preset.name)[1], args.device)
        print(f"\nsupervised learnability of {arch}'s image tower ({sup['steps']} steps, {sup['train_images']} "
              f"single-object web images): shape {sup['shape_top1']:.1f} %, position {sup['position_top1']:.1f} %")
        result["supervised"] = sup
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
