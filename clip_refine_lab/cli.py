"""Command line: ``clip-refine-lab {refine,pretrain,regime,world,eval,compare,sweep,data} ...``.

Every option of ``refine`` is a field of :class:`~clip_refine_lab.config.RunConfig` (``--help``
lists them all); ``--config run.yaml`` loads a YAML file first and flags override it. Errors a user
can fix (a bad option, manifest or checkpoint, a run in use, a full disk, a non-finite loss) are one
line, ``clip-refine-lab: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
import warnings
from pathlib import Path

from .config import FIELD_HELP, ConfigError, ConfigWarning, RunConfig


def _field_parser(tp) -> tuple[dict, str]:
    """argparse kwargs for a RunConfig field type."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp]
    base = args[0]
    if base is bool:
        return {"type": _parse_bool, "metavar": "{true,false}"}, "bool"
    if typing.get_origin(base) is list:
        return {"type": float, "nargs": "+"}, "list"
    if typing.get_origin(base) is dict:
        return {"type": str}, "dict"
    return {"type": base}, base.__name__


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_extra(text: str) -> tuple[str, typing.Any]:
    """``KEY=VALUE`` of ``--extra``: VALUE as JSON when it parses (3, true, [1, 2]), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def add_run_options(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(RunConfig)
    group = parser.add_argument_group("run options (RunConfig fields)")
    for f in dataclasses.fields(RunConfig):
        if f.name == "extra":
            group.add_argument("--extra", dest="extra", action="append", type=_parse_extra, default=argparse.SUPPRESS,
                               metavar="KEY=VALUE", help=f"{FIELD_HELP['extra']}; one note per flag, repeatable")
            continue
        kwargs, _ = _field_parser(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           help=f"{FIELD_HELP[f.name]} (default: {default})", **kwargs)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = RunConfig.from_yaml(args.config).to_dict() if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(RunConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    if "extra" in flags:  # notes from flags add to those of the YAML file
        flags["extra"] = {**values.get("extra", {}), **dict(flags["extra"])}
    values.update(flags)
    return RunConfig.from_dict(values, where="command line")


# ------------------------------------------------------------------------------------- commands
def cmd_refine(args) -> int:
    if args.dry_run:
        return dry_run(config_from_args(args))
    from .distributed import init_distributed_from_env
    from .training.loop import refine

    init_distributed_from_env()
    cfg = config_from_args(args)
    run_dir = refine(cfg, progress=not args.quiet, resume=args.resume, restart=args.restart)
    print(run_dir)
    return 0


def dry_run(cfg: RunConfig) -> int:
    """``refine --dry-run``: the run's memory estimate against the device's memory; nothing is loaded or written."""
    import os

    from .distributed import resolve_device
    from .models.memory import dry_run_report

    cfg = cfg.resolved()
    print(dry_run_report(cfg, resolve_device(cfg.device), world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    return 0


def cmd_pretrain(args) -> int:
    import json

    from .embedded.base import base_is_built, ensure_base
    from .embedded.pretrain import format_summary

    cached = base_is_built(args.model, world_preset=args.preset, base=args.base)
    path = ensure_base(args.model, world_preset=args.preset, base=args.base, progress=not args.quiet)
    if cached or args.quiet:  # a base trained just now has printed its summary already
        print(format_summary(json.loads(path.with_suffix(".json").read_text())))
    print(path)
    return 0


def cmd_regime(args) -> int:
    """Regime statistics of one model (or a run's starting and refined models) on a caption set."""
    from .distributed import resolve_device
    from .embedded.base import ensure_world, resolve_pretrained
    from .evaluation.suites import resolve_manifest
    from .models.loading import is_embedded, load_model
    from .regime import format_regime, model_regime

    if (args.run_dir is None) == (args.model is None):
        raise ConfigError("regime: give a run directory or --model ARCH (with --pretrained TAG|FILE), "
                          f"{'not both' if args.run_dir else 'got neither'}")
    device = str(resolve_device(args.device))
    data, preset = args.data, args.preset
    if args.run_dir:
        from .evaluation.evaluate import load_run_models
        from .rundir import find_run, run_config

        run = find_run(args.run_dir)
        cfg = run_config(run)
        preset = preset or cfg.preset
        if data is None and Path(str(cfg.data)).suffix:  # a real caption set: the one the run was trained on
            data = str(cfg.data)
        base, refined = load_run_models(run, device=device)
        columns = {"starting model": base, "refined": refined}
    data = data or "synthetic-retrieval"
    if not Path(data).suffix or (not args.run_dir and is_embedded(args.pretrained)):  # a world split, or its base
        ensure_world(preset, progress=not args.quiet)
    manifest = resolve_manifest(data, preset)
    if not args.run_dir:
        pretrained = resolve_pretrained(args.model, args.pretrained, preset)
        weights = Path(args.pretrained).name if Path(str(args.pretrained)).suffix else args.pretrained
        columns = {f"{args.model} ({weights})": load_model(args.model, pretrained, device=device)}
    stats = {name: model_regime(loaded, manifest, device=device, data_root=args.data_root)
             for name, loaded in columns.items()}
    print(f"regime statistics on {manifest} (each image with its first caption):")
    print(format_regime(stats))
    return 0


def cmd_world(args) -> int:
    from .embedded.base import ensure_world

    world = ensure_world(args.preset, progress=not args.quiet)
    print(world.root)
    for name in ["synthetic-web", "synthetic-coco", "synthetic-retrieval", *world.tasks, *world.validation_tasks]:
        print(f"  {name:<28} {world.manifest(name)}")
    return 0


def cmd_eval(args) -> int:
    from .evaluation.compare import format_tables
    from .evaluation.evaluate import evaluate_pretrained, evaluate_run

    if (args.run_dir is None) == (args.model is None):
        raise ConfigError("eval takes a run directory (eval RUN_DIR) or a model alone (eval --model ARCH "
                          f"--pretrained TAG|FILE), {'not both' if args.run_dir else 'got neither'}")
    if args.run_dir is None:
        result = evaluate_pretrained(args.model, args.pretrained, suite=args.suite, output_dir=args.output_dir or "runs",
                                     name=args.name, preset=args.preset, device=args.device, data_root=args.data_root,
                                     progress=not args.quiet, num_workers=args.num_workers, batch_size=args.batch_size)
        print(format_tables(result))
        print(f"metrics written to {result['run']}")
        return 0
    for flag in ("pretrained", "output_dir", "name", "preset"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"eval --{flag.replace('_', '-')} goes with --model (a model alone); a run "
                              "directory brings its own model, preset and folder")
    result = evaluate_run(args.run_dir, suite=args.suite, device=args.device, progress=not args.quiet,
                          data_root=args.data_root, allow_incomplete=args.allow_incomplete,
                          num_workers=args.num_workers, batch_size=args.batch_size)
    print(format_tables(result))
    return 0


def cmd_compare(args) -> int:
    from .evaluation.compare import compare, format_tables

    print(format_tables(compare(args.run_dirs, allow_incomplete=args.allow_incomplete)))
    return 0


def cmd_sweep(args) -> int:
    from .sweep.cli import cmd_sweep as run_sweep_command

    return run_sweep_command(args)


def cmd_data_check(args) -> int:
    from .data.check import run_data_check

    return run_data_check(args.manifest, data_root=args.data_root)


def cmd_data_leakage(args) -> int:
    from .data.leakage import leakage_report

    report = leakage_report(args.train, args.eval, data_root=args.data_root, hash_images=not args.no_hash)
    print(report.format())
    return 0


def cmd_data_filter(args) -> int:
    from .data.filtering import clip_score_filter

    out = clip_score_filter(args.manifest, args.out, model=args.model, pretrained=args.pretrained,
                            keep_fraction=args.keep_fraction, threshold=args.threshold, batch_size=args.batch_size,
                            device=args.device, data_root=args.data_root, progress=not args.quiet)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-refine-lab", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("refine", help="post-pre-train a CLIP model (CLIP-Refine or a baseline)")
    p.add_argument("--config", help="YAML file of run options; flags override it")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted run with the same run directory (default: on)")
    p.add_argument("--restart", action="store_true",
                   help="start the run over: remove what an earlier run wrote into its directory (checkpoints, "
                        "log, weights, config.yaml), whatever its configuration")
    p.add_argument("--dry-run", action="store_true",
                   help="print the run's memory estimate and the device's memory, then exit without training")
    add_run_options(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("pretrain", help="build the embedded world and pre-train (or load) the base model")
    p.add_argument("--model", default=None, help="tiny architecture (default: the preset's)")
    p.add_argument("--preset", default=None, help="default or micro (default: $CLIP_REFINE_LAB_PRESET or default)")
    p.add_argument("--base", default=None, help="base recipe: converged (the default preset's) or high-temperature "
                                                "(the scale left near 1/0.07); a run starts from it with "
                                                "--pretrained embedded:NAME (docs/embedded-world.md)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("regime", help="regime statistics (logit scale, gap, alignment, uniformity, raw norms) of a "
                                      "model or a run on a caption set, beside real CLIP ViT-B/32's")
    p.add_argument("run_dir", nargs="?", default=None, help="a run: its starting and refined models (or use --model)")
    p.add_argument("--model", default=None, help="an architecture, one of our tiny ones, or one of our checkpoints")
    p.add_argument("--pretrained", default="embedded", help="with --model: a tag (openai), a checkpoint file, "
                                                           "'embedded' or 'embedded:NAME' (default: embedded)")
    p.add_argument("--data", default=None, help="a caption manifest or a split of the embedded world "
                                                "(default: synthetic-retrieval)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_regime)

    p = sub.add_parser("world", help="build (or find) the embedded synthetic world and list its manifests")
    p.add_argument("--preset", default=None)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("eval", help="evaluate a run and its starting model, or a model alone (--model); writes "
                                    "metrics.json and metrics.csv")
    p.add_argument("run_dir", nargs="?", default=None, help="run directory to evaluate (or use --model)")
    p.add_argument("--model", default=None, help="evaluate a model alone: an open_clip architecture (ViT-B-32), one "
                                                 "of our tiny ones, or one of our checkpoint files")
    p.add_argument("--pretrained", default=None, help="with --model: a pretrained tag (openai), a checkpoint file "
                                                      "(.pt, .bin, .safetensors) or 'embedded' (our tiny bases)")
    p.add_argument("--output-dir", default=None, help="with --model: where its folder pretrained-<arch>-<weights>/ "
                                                      "goes (default: runs)")
    p.add_argument("--name", default=None, help="with --model: the folder name instead of pretrained-<arch>-<weights>")
    p.add_argument("--preset", default=None, help="with --model: the preset of the default suite and of "
                                                  "'embedded' (default: $CLIP_REFINE_LAB_PRESET or default)")
    p.add_argument("--suite", default=None, help="task suite YAML (default: the embedded world's tasks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None, help="data root of the suite's manifests (a run: default its own)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="evaluate a run that has not finished (no summary.json) as it is; its metrics are marked")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes decoding images (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, help="images encoded per batch (default: 256)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="paper-layout tables of several evaluated runs and models")
    p.add_argument("run_dirs", nargs="+", help="run directories or folders of models evaluated alone (paths, or "
                                               "names under runs/)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="include runs that have not finished (no summary.json); their rows are marked [incomplete]")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="run a grid of runs from a spec (sweeps/*.yaml), evaluate them and write the "
                                     "paper's tables (mean ± std over seeds) and figures")
    from .sweep.cli import add_sweep_arguments

    add_sweep_arguments(p)
    p.set_defaults(func=cmd_sweep)

    data = sub.add_parser("data", help="check, compare and filter data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="find missing/corrupt images, empty captions, bad labels, duplicates")
    p.add_argument("manifest")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser("leakage", help="image overlap between a training set and evaluation sets")
    p.add_argument("train")
    p.add_argument("eval", nargs="+")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-hash", action="store_true", help="compare image ids only, not file contents")
    p.set_defaults(func=cmd_data_leakage)
    p = data.add_parser("filter", help="keep the pairs with the highest CLIP score (DataComp-style)")
    p.add_argument("manifest")
    p.add_argument("out")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--keep-fraction", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=cmd_data_filter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.manifest import ManifestError
    from .models.loading import ModelNotAvailableError
    from .training.state import NonFiniteLossError
    from .utils import DiskFullError

    with warnings.catch_warnings():
        python_show = warnings.showwarning

        def show(message, category, *rest, **kw):  # a config warning is one line, in the CLI's voice
            if issubclass(category, ConfigWarning):
                print(f"clip-refine-lab: warning: {message}", file=sys.stderr)
            else:
                python_show(message, category, *rest, **kw)

        warnings.showwarning = show
        warnings.simplefilter("once", ConfigWarning)
        try:
            return int(args.func(args) or 0)
        # ConfigError covers its subclasses: RunInUseError, UnreadableCheckpointError, ParameterError
        except (ConfigError, ManifestError, ModelNotAvailableError, NonFiniteLossError, DiskFullError,
                FileNotFoundError) as e:
            print(f"clip-refine-lab: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
