"""Evaluation suites: which data sets a model is measured on, and in which section.

A *suite* file says what to measure::

    zero_shot: [shape, colour, ...]         # classification manifests (paths or world task names)
    retrieval: [synthetic-retrieval]        # caption manifests: recall@k both directions
    geometry: [synthetic-retrieval]         # caption manifests: gap, alignment, uniformity
    linear_probe:                           # optional: logistic regression on frozen image features
      - {train: imagenet1k_train.yaml, test: imagenet1k.yaml}   # (the paper's Table 7)

Names that are not files are splits of the embedded world of the run's preset, which must be built
(:func:`clip_refine_lab.embedded.base.ensure_world`): resolving a suite never builds it. The default
suite is the embedded world's (every zero-shot task incl. the shifted variants; synthetic-retrieval
for retrieval and geometry). ``data_manifests/suites/paper.yaml`` is the paper's (12 zero-shot sets,
COCO val2017 and Flickr30K test).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import PRESETS, preset_name
from ..embedded.base import world_manifest

SUITE_FIELDS = ("zero_shot", "retrieval", "geometry", "linear_probe")


@dataclass
class Suite:
    zero_shot: list[Path] = field(default_factory=list)
    retrieval: list[Path] = field(default_factory=list)
    geometry: list[Path] = field(default_factory=list)
    linear_probe: list[tuple[Path, Path]] = field(default_factory=list)  # (train, test) classification manifests

    def manifests(self) -> list[Path]:
        """Every manifest the suite measures, one entry per feature set it computes."""
        return ([p for pair in self.linear_probe for p in pair] + self.zero_shot + self.retrieval + self.geometry)


def resolve_manifest(name: str | os.PathLike, preset: str | None = None, base: Path | None = None) -> Path:
    """A manifest path from a path (relative to ``base``) or a split name of the built embedded world."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        p = p if p.is_absolute() or base is None else base / p
        if not p.is_file():
            raise FileNotFoundError(f"manifest not found: {p}")
        return p
    return world_manifest(str(name), preset)


def default_suite(preset: str | None = None) -> Suite:
    """The embedded world's suite: every zero-shot task, and synthetic-retrieval for retrieval and geometry."""
    from ..embedded.world import World, WorldConfig, world_root

    ret = world_manifest("synthetic-retrieval", preset)  # says how to build the world when it is missing
    world = World.load(world_root(WorldConfig.preset(PRESETS[preset_name(preset)].world)))
    return Suite([world.manifest(t) for t in world.tasks], [ret], [ret])


def load_suite(path: str | os.PathLike | None, preset: str | None = None) -> Suite:
    """The suite of a suite file (names resolved in the embedded world of ``preset``); None: the default."""
    if path is None:
        return default_suite(preset)
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - set(SUITE_FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown suite fields {sorted(unknown)}; use zero_shot, retrieval, geometry, linear_probe")
    suite = Suite(*[[resolve_manifest(n, preset, path.parent) for n in spec.get(k) or []]
                    for k in ("zero_shot", "retrieval", "geometry")])
    for i, pair in enumerate(spec.get("linear_probe") or []):
        if not isinstance(pair, dict) or set(pair) != {"train", "test"}:
            raise ValueError(f"{path}: linear_probe item {i} must be a mapping with 'train' and 'test'")
        suite.linear_probe.append((resolve_manifest(pair["train"], preset, path.parent),
                                   resolve_manifest(pair["test"], preset, path.parent)))
    return suite


def check_labels(suite: Suite, data_root: str | None = None) -> None:
    """Every classification set of ``suite`` (zero-shot and linear probe) has its labels in 0..classes-1.

    Checked before any model is loaded or image encoded: an out-of-range label would otherwise surface
    as an IndexError in the middle of an evaluation. Raises ManifestError naming the manifest, the
    record (file and line) and the valid range."""
    from ..data.formats import is_streaming
    from ..data.manifest import ManifestError, load_manifest

    seen: set[Path] = set()
    for path in [*suite.zero_shot, *(p for pair in suite.linear_probe for p in pair)]:
        if path in seen:
            continue
        seen.add(path)
        manifest = load_manifest(path, data_root=data_root)
        if manifest.kind != "classification" or is_streaming(manifest):
            continue
        n = manifest.num_classes
        for rec in manifest.records():
            if not 0 <= rec.label < n:
                where = f"record {rec.source} (id {rec.id})" if rec.source else f"record id {rec.id}"
                raise ManifestError(
                    f"{manifest.path}: {where} has label {rec.label}, outside the valid range 0..{n - 1} of its "
                    f"{n} classnames; fix the record or the classnames (`clip-refine-lab data check {manifest.path}` "
                    "lists every problem)")


def suite_leakage(train, suite: Suite, data_root: str | None = None):
    """Image-id overlap between a training manifest and every evaluation set of ``suite`` (no hashing), or
    None for a streamed (WebDataset) training manifest: listing web-scale shards means reading all of them,
    so those are checked offline with ``clip-refine-lab data leakage``. Used by evaluation and the trainer."""
    from ..data.formats import is_streaming
    from ..data.leakage import leakage_report

    if is_streaming(train):
        return None
    evals = sorted({str(p) for p in [*suite.zero_shot, *suite.retrieval, *suite.geometry]})
    return leakage_report(train, evals, data_root=data_root, hash_images=False)
