"""The command line of a sweep: ``clip-refine-lab sweep SPEC.yaml`` and ``python -m clip_refine_lab.sweep``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, preset_name
from .plan import default_sweep_dir, format_plan, plan
from .runner import run_sweep
from .spec import load_spec


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The ``sweep`` subcommand's arguments (shared by the CLI and ``python -m clip_refine_lab.sweep``)."""
    p.add_argument("spec", help="sweep spec YAML (sweeps/paper.yaml, sweeps/quick.yaml; format: sweeps/README.md)")
    p.add_argument("--output-dir", default=None,
                   help="sweep directory (default: the spec's output_dir, else runs/sweeps/<name>-<preset>)")
    p.add_argument("--only", nargs="+", default=None, metavar="BLOCK", help="run only these blocks")
    p.add_argument("--max-runs", type=int, default=None, help="only the first N runs of the plan")
    p.add_argument("--dry-run", action="store_true", help="list the blocks, runs done and estimated cost; run nothing")
    p.add_argument("--no-eval", action="store_true", help="train only (evaluate later with another invocation)")
    p.add_argument("--reevaluate", action="store_true", help="evaluate finished runs again (e.g. a new suite)")
    p.add_argument("--png", action="store_true", help="also write the figures as PNG (kaleido + Chromium)")


def cmd_sweep(args: argparse.Namespace) -> int:
    return run_sweep_cli(args.spec, args.output_dir, progress=not getattr(args, "quiet", False), only=args.only,
                         max_runs=args.max_runs, dry_run=args.dry_run, evaluate=False if args.no_eval else None,
                         reevaluate=args.reevaluate, png=args.png)


def run_sweep_cli(spec_path: str | os.PathLike, output_dir: str | os.PathLike | None = None, progress: bool = True, *,
                  only: Sequence[str] | None = None, max_runs: int | None = None, dry_run: bool = False,
                  evaluate: bool | None = None, reevaluate: bool = False, png: bool = False) -> int:
    """Run a spec (or, with ``dry_run``, print its plan): 0 when every run succeeded, 1 when some failed."""
    spec = load_spec(spec_path)
    sweep_dir = Path(output_dir) if output_dir is not None else default_sweep_dir(spec)
    if dry_run:
        df = plan(spec, sweep_dir, only=only)
        if max_runs is not None:
            df = df.head(max_runs)
        print(format_plan(df, preset_name(spec.preset)))
        print(f"sweep directory: {sweep_dir}")
        return 0
    report = run_sweep(spec, sweep_dir, progress=progress, only=only, max_runs=max_runs, evaluate=evaluate,
                       reevaluate=reevaluate, png=png)
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clip_refine_lab.sweep SPEC.yaml``: the same as ``clip-refine-lab sweep``."""
    p = argparse.ArgumentParser(prog="python -m clip_refine_lab.sweep", description="Run a sweep spec.")
    add_sweep_arguments(p)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        return cmd_sweep(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"clip-refine-lab sweep: error: {e}", file=sys.stderr)
        return 2

