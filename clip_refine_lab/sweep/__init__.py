"""Sweeps: grids of post-pre-training runs, their evaluation, and the paper's tables as mean ± std.

A *sweep spec* (YAML, format in ``sweeps/README.md``) names a preset, the RunConfig fields shared by
every run (``base:``), the seeds, and named ``blocks``; each block expands a ``grid:`` (field -> list
of values, cartesian) and/or an explicit ``runs:`` list into runs, and says which table it feeds
(``table:``: main, prior, alpha, batch, epochs, weights, data, backbone, or none)::

    preset: default
    seeds: [0, 1, 2]
    base: {teacher_cache: true, image_cache: true}
    blocks:
      main:
        table: main
        grid: {method: [contrastive, m2-mix, self-kd, hycd, hycd+l2, clip-refine]}
      alpha:
        table: alpha
        base: {max_steps: 20}
        grid: {alpha: [0.0, 0.25, 0.5, 0.75, 1.0]}

Run directories are ``<sweep dir>/runs/<block>/<name>-s<seed>``, the name made from the block's
varied values (``clip-refine``, ``alpha0.25``, ``contrastive-bs1024-acc4``), so a second invocation
finds its runs again (:mod:`.runner`: finished runs are skipped, interrupted ones resumed). Every
finished run is evaluated once (``metrics.json``) with the evaluation suite (the spec's or the block's
``suite:``: a suite YAML or an inline mapping; default: the embedded world's). Runs with the same
configuration and suite in several blocks (the default point of every sweep) are run once and shared.

Derived data sets (Table 5 analogue) are written into ``<sweep dir>/data/`` on first use: a ``data``
value may be a mapping ``{split: synthetic-web, size: 5000}`` (the first ``size`` pairs: the world's
pairs are drawn independently, so a prefix is a random sample, and the sizes nest) and/or
``keep_fraction: 0.3`` (the pairs with the highest CLIP score under the run's starting model,
:func:`~clip_refine_lab.data.filtering.clip_score_filter`) and/or ``where: {colour: [red, green]}`` (only
the scenes whose every object has one of the listed values of a scene attribute, read from the records'
scene metadata: ``shape``, ``colour``, ``size``, ``position`` (a grid cell's class name, "top left") per
object, ``background`` per scene; names are checked against the world's vocabulary; a narrower
post-pre-training set, as COCO is narrower than the paper's zero-shot sets).

The modules, in dependency order: :mod:`.spec` (reading and checking a spec, run names),
:mod:`.plan` (the runs in order, shared runs, steps and cost), :mod:`.tables` (mean ± std tables),
:mod:`.figures`, :mod:`.runner` (running a sweep) and :mod:`.cli` (the command line).
The names below are the public API.
"""

from .cli import run_sweep_cli
from .figures import figures
from .plan import PlannedRun, default_sweep_dir, expand, format_plan, plan, planned_steps
from .runner import SweepReport, config_mismatch, prepare_data, read_sweep_log, run_sweep
from .spec import SweepError, SweepSpec, load_spec, parse_spec
from .tables import NoResultsError, Tables, aggregate, write_outputs

__all__ = ["NoResultsError", "PlannedRun", "SweepError", "SweepReport", "SweepSpec", "Tables", "aggregate",
           "config_mismatch", "default_sweep_dir", "expand", "figures", "format_plan", "load_spec", "parse_spec",
           "plan", "planned_steps", "prepare_data", "read_sweep_log", "run_sweep", "run_sweep_cli", "write_outputs"]
