"""Compare base-model pre-training recipes on the embedded world: zero-shot per task, gap, time.

Each recipe is ``ARCH:epochs:batch:lr[:field=value...]`` (fields of
:class:`clip_refine_lab.embedded.pretrain.PretrainRecipe`, e.g. ``warmup_steps=200``, ``logit_scale_init=50``,
``relation_hard_negatives=true``, ``relation_axis_hard_negatives=true``, ``logit_scale_lr_factor=50``; fields not named
keep the dataclass defaults, so the converged default recipe is
``tiny-vit-48:6:256:3e-4:object_order_hard_negatives=true:logit_scale_init=100`` and the high-temperature one the same
without ``logit_scale_init``) and goes through the library's own
:func:`clip_refine_lab.embedded.pretrain.pretrain_base` (cached by world + architecture + recipe, so a second
call of the same recipe only reads its summary). This is how the base recipes were chosen
(docs/embedded-world.md, "Two regimes"); the table is printed in Markdown.

Usage::

    python benchmarks/pretrain_recipes.py tiny-vit-48:6:256:1e-3 tiny-rn-48:6:256:1e-3
    python benchmarks/pretrain_recipes.py --device cuda --cache /tmp/probe tiny-vit-48:12:128:1e-3:warmup_steps=200

On a GPU the numbers differ from a CPU run of the same recipe in the last digits (other kernels),
but the ranking of recipes carries over; confirm the chosen one on the CPU it is meant for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench_refine import describe_machine, format_table, machine_info, setup_environment  # noqa: E402


def parse_recipe(text: str):
    from clip_refine_lab.embedded.pretrain import PretrainRecipe

    parts = text.split(":")
    if len(parts) < 4:
        raise SystemExit(f"recipe '{text}': expected ARCH:epochs:batch:lr[:field=value...]")
    arch, epochs, batch, lr = parts[0], int(parts[1]), int(parts[2]), float(parts[3])
    kwargs = {}
    types = {f.name: f.type for f in dataclasses.fields(PretrainRecipe)}
    for extra in parts[4:]:
        name, _, value = extra.partition("=")
        if name not in types:
            raise SystemExit(f"recipe '{text}': unknown field '{name}'; PretrainRecipe has {', '.join(types)}")
        if "bool" in str(types[name]):
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"recipe '{text}': {name} takes true or false, got '{value}'")
            kwargs[name] = value.lower() in ("true", "1")
        else:
            kwargs[name] = int(value) if "int" in str(types[name]) else float(value)
    return arch, PretrainRecipe(epochs=epochs, batch_size=batch, lr=lr, **kwargs)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", help="ARCH:epochs:batch:lr[:field=value...]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default=None, help="CLIP_REFINE_LAB_CACHE to use (default: the usual one)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--world", default="default", choices=("default", "micro"))
    p.add_argument("--json", default=None, help="also write the summaries here")
    args = p.parse_args(argv)
    setup_environment(args.cache, args.threads)
    import torch

    from clip_refine_lab.config import PRESETS
    from clip_refine_lab.metrics import zero_shot_average
    from clip_refine_lab.embedded.pretrain import pretrain_base
    from clip_refine_lab.embedded.world import WorldConfig, build_world

    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as on CPU
    print(f"# pretrain_recipes on {args.device}: {describe_machine(machine_info(args.device))}", flush=True)
    t0 = time.time()
    build_world(WorldConfig.preset(PRESETS[args.world].world), progress=False, workers=os.cpu_count() or 2)
    print(f"world ready in {time.time() - t0:.0f} s", flush=True)
    rows, summaries = [], []
    for text in args.recipes:
        arch, recipe = parse_recipe(text)
        t0 = time.time()
        path = pretrain_base(arch, world_preset=args.world, recipe=recipe, progress=False, device=args.device)
        summary = json.loads(path.with_suffix(".json").read_text())
        summaries.append(summary)
        row = {"recipe": text, "train_s": summary["train_seconds"], "wall_s": round(time.time() - t0, 1),
               "scale": summary["logit_scale"], "gap": summary["gap"]["gap_l2"]}
        for task, r in summary["zero_shot"].items():
            row[task] = 100 * r["top1"]
        # the classification tasks' mean, as everywhere: the relation probe is a column, not in the mean
        row["mean"] = 100 * zero_shot_average({t: r for t, r in summary["zero_shot"].items() if not t.startswith("val/")})
        rows.append(row)
        print(f"{text}: mean {row['mean']:.1f}  " + "  ".join(f"{k}={v:.1f}" for k, v in row.items()
                                                                if k not in ("recipe", "mean") and isinstance(v, float)),
              flush=True)
    tasks = [k for k in summaries[0]["zero_shot"] if not k.startswith("val/")] if summaries else []
    chance = {t: 100 * summaries[0]["zero_shot"][t]["chance"] for t in tasks}
    columns = [("recipe", "recipe"), ("train_s", "train s"), ("scale", "logit scale"), ("gap", "gap"),
               ("mean", "mean top-1")] + [(t, f"{t} ({chance[t]:.0f})") for t in tasks]
    print()
    print(format_table(rows, columns))
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return rows


if __name__ == "__main__":
    main()
