"""The embedded default data: a procedurally generated image-caption world.

No model weights or data sets can be downloaded, so the toolkit ships its own small "world":
scenes of 1-3 coloured shapes on a 3x3 grid over textured grey backgrounds, rendered with
PIL/numpy, with captions built from templates and synonyms. It plays the roles the paper gives to
real data:

=====================  =====================================================================
split                  analogue
=====================  =====================================================================
synthetic-web          the noisy web pre-training set (one short alt-text per image; about 20%
                       mismatched and 30% partial captions; ``meta.noise`` says which; 5% of the
                       images are line drawings and 5% noisy, ``meta.style`` says which; 30% of
                       the others washed out with a colour cast, ``meta.tint``/``meta.contrast``)
synthetic-coco         COCO Captions (post-pre-training: 5 correct, detailed captions per image)
synthetic-retrieval    a held-out retrieval test set (5 captions per image)
<task>                 zero-shot classification test sets (ImageNet and friends)
<task>-sketch/-noise/  domain-shifted test sets (ImageNet-Sketch / -C / -R analogues)
-palette
val/<task>             small validation splits (different images) for choosing hyper-parameters
=====================  =====================================================================

Everything is deterministic: each split draws from its own stream and each image from its own
``numpy.random.default_rng([seed, split code, index])``, so adding a split never changes another and
rendering with a process pool gives the same bytes as rendering serially. The world is written to
``cache_dir()/world/<hash>/`` (hash of :data:`WORLD_VERSION` and the config) in a staging folder that
is renamed into place once complete; ``world.json`` (written last) marks a complete world, which is
reused and never rebuilt. Manifests use :mod:`clip_refine_lab.data`'s format with relative roots, so
the folder can be moved.

The vocabulary tables (:data:`SHAPE_WORDS`, :data:`COLOUR_WORDS`, ...) are public so that tests and
analyses can parse captions back into claims about a scene.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..data.manifest import write_manifest
from ..utils import atomic_write_json, cache_dir, stable_hash

# 5: the relation task's manifests say ``probe: true`` (a compositional probe, not in the zero-shot average),
# and the ``web_palette`` (off) and ``web_tint`` options. Each enters the world hash only when on, so a config
# without them keeps its hash and bytes; ``web_tint`` is on by default since 2026-11-24 (30 % of the web images
# washed out with a colour cast), which gave the default world a new hash and changed those web images only
WORLD_VERSION = 5
MAX_CAPTION_WORDS = 20
SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down (anti-aliasing)

# ------------------------------------------------------------------------------------- vocabulary
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")

#: (singular, plural) noun phrases for each shape; the first is the canonical name.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round disc", "round discs")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("wedge", "wedges")),
    "star": (("star", "stars"), ("five-pointed star", "five-pointed stars")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "heart": (("heart", "hearts"), ("love heart", "love hearts")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "ring": (("ring", "rings"), ("hoop", "hoops"), ("donut", "donuts")),
}

#: Saturated, well-separated colours; the background is always grey in [80, 180] so that neither
#: white nor black (nor any hue) can be confused with it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 175, 50),
    "blue": (40, 80, 235),
    "yellow": (245, 225, 30),
    "purple": (145, 45, 200),
    "orange": (250, 135, 15),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "white": ("white",),
    "black": ("black",),
}

SIZES: tuple[str, ...] = ("small", "large")
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big", "huge"),
}
#: Object extent (fraction of the cell side) for each size.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.46, 0.56), "large": (0.80, 0.92)}

#: Count phrases; "a single"/"one" claim an exact count, like "two" and "three".
COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("one", "a single", "a lone"),
    2: ("two", "a pair of"),
    3: ("three", "a trio of"),
}
#: Generic nouns (singular, plural): with a count and no attribute they state the total number of
#: objects ("three shapes"); with attributes they are an object without a shape ("a red thing").
GENERIC_NOUNS: tuple[tuple[str, str], ...] = (
    ("object", "objects"), ("shape", "shapes"), ("thing", "things"), ("item", "items"), ("something", ""),
)

#: Grid cells (row, col) -> position phrases; the first is the canonical (class) name.
POSITION_WORDS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("top left", "upper left"),
    (0, 1): ("top centre", "top middle", "upper middle"),
    (0, 2): ("top right", "upper right"),
    (1, 0): ("middle left", "centre left"),
    (1, 1): ("centre", "middle"),
    (1, 2): ("middle right", "centre right"),
    (2, 0): ("bottom left", "lower left"),
    (2, 1): ("bottom centre", "bottom middle", "lower middle"),
    (2, 2): ("bottom right", "lower right"),
}
CELLS: tuple[tuple[int, int], ...] = tuple(POSITION_WORDS)
POSITION_NAMES: tuple[str, ...] = tuple(w[0] for w in POSITION_WORDS.values())

#: Relations between two objects A and B ("A left of B"): left: col(A) < col(B); right: col(A) >
#: col(B); above: row(A) < row(B); below: row(A) > row(B).
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

#: Each relation word's opposite, for :func:`relation_swapped` ("to the left of" -> "to the right of").
OPPOSITE_RELATION_WORDS: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "over": "under",
    "below": "above", "under": "over", "beneath": "above",
}
_RELATION_WORD_RE = re.compile(r"\b(" + "|".join(sorted(OPPOSITE_RELATION_WORDS, key=len, reverse=True)) + r")\b")


def relation_swapped(caption: str) -> str | None:
    """``caption`` with every relation word replaced by its opposite, or None if it names no relation.

    "a red circle left of a blue star" -> "a red circle right of a blue star": false of the scene the
    caption describes (a relation in a caption holds, and its opposite then does not), except where the
    caption cannot tell its two objects apart ("a star under a star"), so pre-training can use it as a hard
    negative (:func:`clip_refine_lab.losses.hard_negative_contrastive_loss`).
    Position phrases ("in the top left") are left alone: only "left of"/"right of" are relation words.
    """
    swapped, n = _RELATION_WORD_RE.subn(lambda m: OPPOSITE_RELATION_WORDS[m.group(1)], caption)
    return swapped if n else None


BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "gradient", "noisy")
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain grey background", "plain background", "grey background"),
    "striped": ("striped background", "stripy background"),
    "dotted": ("dotted background", "polka dot background", "spotty background"),
    "checkered": ("checkered background", "checkerboard background", "chequered background"),
    "gradient": ("gradient background", "shaded background"),
    "noisy": ("noisy background", "grainy background", "speckled background"),
}
BACKGROUND_NAMES: dict[str, str] = {
    "plain": "plain grey", "striped": "striped", "dotted": "dotted", "checkered": "checkered",
    "gradient": "gradient", "noisy": "noisy",
}

#: Optional caption openings (words outside the attribute vocabulary; they carry no claim).
CAPTION_PREFIXES: tuple[str, ...] = ("a photo of", "an image of", "a rendering of", "a picture of", "a drawing of")

_RELATION_OF_WORD: dict[str, str] = {w: r for r, ws in RELATION_WORDS.items() for w in ws}
_OBJECTS_RELATION_RE = re.compile(
    r"^(?P<pre>(?:" + "|".join(CAPTION_PREFIXES) + r") )?(?P<a>an? .+?) (?P<rel>"
    + "|".join(sorted(_RELATION_OF_WORD, key=len, reverse=True))
    + r") (?P<b>an? .+?)(?P<rest>(?: on an? [a-z ]+ background)?(?:, and .*)?\.?)$")


def relation_objects_swapped(caption: str) -> str | None:
    """``caption`` with the two objects of its relation swapped, or None if it does not start with one.

    "a violet ring left of an orange disc on a gradient background" -> "an orange disc left of a violet ring
    on a gradient background": false of the scene whenever the original is true (the relations are strict),
    except where the caption cannot tell its two objects apart. Unlike :func:`relation_swapped` the words
    stay the same and only their order changes, so a text tower must bind each object to its side of the
    relation word to tell the two apart.
    """
    m = _OBJECTS_RELATION_RE.match(caption)
    if m is None:
        return None
    return f"{m['pre'] or ''}{m['b']} {m['rel']} {m['a']}{m['rest']}"


#: The relations on the other axis, in the order a cross-axis negative tries them ("left of" -> "above", else
#: "below").
CROSS_AXIS_RELATIONS: dict[str, tuple[str, str]] = {
    "left": ("above", "below"), "right": ("below", "above"), "above": ("left", "right"), "below": ("right", "left"),
}
# For each attribute, one regex per value matching its words: a phrase naming another value's word cannot
# describe an object of this value. No word belongs to two values ("round disc" and "disc" are both circles).
_ATTRIBUTE_WORD_RES: dict[str, dict[str, re.Pattern]] = {
    attr: {value: re.compile(r"\b(?:" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b")
           for value, words in table.items()}
    for attr, table in (("colour", COLOUR_WORDS), ("size", SIZE_WORDS),
                        ("shape", {s: tuple(w for pair in ws for w in pair) for s, ws in SHAPE_WORDS.items()}))
}


def _phrase_may_name(phrase: str, obj: dict) -> bool:
    """Whether the object phrase ``phrase`` ("a small red disc") can describe ``obj`` (scene metadata): it names
    no colour, size or shape other than the object's. An attribute missing from ``obj`` contradicts nothing."""
    return not any(value != obj.get(attr) and obj.get(attr) is not None and regex.search(phrase)
                   for attr, table in _ATTRIBUTE_WORD_RES.items() for value, regex in table.items())


def relation_axis_swapped(caption: str, objects: list[dict]) -> str | None:
    """``caption`` with its relation moved to the other axis, where the scene makes that false; else None.

    "a violet ring left of an orange disc" -> "a violet ring above an orange disc" when the ring is level with
    or below the disc, "... below ..." when it is above it (``objects``: the scene metadata's objects with their
    attributes and grid cells). The negative must be false for every pair of objects the two phrases could
    name: with two stars, "a star above a ring" gets no "left of" negative if either star is left of the ring.
    A scene the phrases do not fit (a mismatched caption) gets None. Unlike :func:`relation_swapped` (within an
    axis) this contrasts the two axes, which the image features do not separate linearly (README, "The
    embedded world and base model", diagnostics).
    """
    m = _OBJECTS_RELATION_RE.match(caption)
    if m is None or len(objects) < 2:
        return None
    pairs = [(a, b) for a in objects if _phrase_may_name(m["a"], a)
             for b in objects if b is not a and _phrase_may_name(m["b"], b)]
    if not pairs:
        return None
    for relation in CROSS_AXIS_RELATIONS[_RELATION_OF_WORD[m["rel"]]]:
        if not any(relation_holds(relation, a, b) for a, b in pairs):
            return f"{m['pre'] or ''}{m['a']} {RELATION_WORDS[relation][0]} {m['b']}{m['rest']}"
    return None


STYLES: tuple[str, ...] = ("normal", "sketch", "noise", "palette")
#: Scenes of 1, 2 and 3 objects. Version 3 raised single-object scenes from 40 to 60 %: where a caption names
#: where *the* object is, the position words can be learned without first binding them to one of several
#: objects (README, "The embedded world and base model", third round).
N_OBJECTS_PROBS: tuple[float, float, float] = (0.6, 0.25, 0.15)


def relation_holds(relation: str, a: dict, b: dict) -> bool:
    """Whether ``a <relation> b`` holds for two objects of a scene (grid cells (row, col))."""
    (ra, ca), (rb, cb) = a["cell"], b["cell"]
    return {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


# ----------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class WorldConfig:
    """What to build. The defaults are the full ``"default"`` preset."""

    seed: int = 0
    image_size: int = 48
    web_size: int = 30000
    coco_size: int = 5000
    retrieval_size: int = 1000
    task_size: int = 1000
    val_size: int = 300
    web_mismatch: float = 0.2
    web_partial: float = 0.3
    # Web images drawn as outline sketches (with a caption that names no colour) and with heavy pixel
    # noise. The web has drawings and poor photos too, which is why real CLIPs are far above chance on
    # ImageNet-Sketch; with none, the base model was at chance on the sketch tasks (WORLD_VERSION 4).
    web_sketch: float = 0.05
    web_noise: float = 0.05
    # Web images with the test sets' ``palette`` shift (hue rotated, washed out, tinted) and a caption that names
    # no colour: recoloured photos. Off: tried at 0.05 for shape-palette (14.8 %, chance 12.5), it made the base
    # worse, shape-palette included (README, "The embedded world and base model", sixth round).
    web_palette: float = 0.0
    # Web images that are washed-out photos with a colour cast: the background tinted with a random colour (blended
    # in at 10 to 30 %) and the whole image at 55 to 85 % contrast; sketches have none. The objects keep their
    # hues and a tinted plain background is not called grey, so every caption stays true. The web's photos are
    # not all crisp and on grey: without any, a 20 % tint alone took the base's shape accuracy from 33 to 21 % (the
    # test sets' ``palette`` shift tints and washes out the whole image; README, eighth round).
    web_tint: float = 0.3

    def __post_init__(self):
        clean = 1.0 - self.web_mismatch - self.web_partial
        for name in ("web_mismatch", "web_partial", "web_sketch", "web_noise", "web_palette", "web_tint"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if clean < 0:
            raise ValueError(f"WorldConfig: web_mismatch + web_partial must be at most 1, got {1 - clean:g}")
        redrawn = self.web_sketch + self.web_palette
        if redrawn > clean:  # sketches and recoloured images are drawn from the clean pairs (complete captions)
            raise ValueError(f"WorldConfig: web_sketch + web_palette ({redrawn:g}) cannot exceed the clean share "
                             f"of synthetic-web, 1 - web_mismatch - web_partial = {clean:g}")
        if self.web_noise > 1.0 - self.web_mismatch or (
                clean > 0 and redrawn / clean + self.web_noise / (1.0 - self.web_mismatch) > 1.0 + 1e-12):
            # a clean pair takes at most one style: its share drawn as a sketch or recoloured, and its share
            # made noisy, must fit side by side
            raise ValueError("WorldConfig: (web_sketch + web_palette) / (1 - web_mismatch - web_partial) + "
                             "web_noise / (1 - web_mismatch) cannot exceed 1: a clean pair takes one style at "
                             "most, and mismatched pairs keep the normal style")

    @classmethod
    def preset(cls, name: str) -> "WorldConfig":
        """``"default"`` (the full world, about 60K images) or ``"micro"`` (a few seconds, for tests)."""
        if name == "default":
            return cls()
        if name == "micro":
            return cls(image_size=32, web_size=600, coco_size=200, retrieval_size=100, task_size=100, val_size=50)
        raise KeyError(f"unknown world preset '{name}'; known presets: default, micro")

    def to_dict(self) -> dict:
        return asdict(self)

    def key_dict(self) -> dict:
        """The config as it enters cache keys: the web styles are left out while they are off (0), so a world
        without them keeps the key it had before the fields existed."""
        return {k: v for k, v in self.to_dict().items()
                if not (k in ("web_sketch", "web_noise", "web_palette", "web_tint") and v == 0)}

    def world_hash(self) -> str:
        return stable_hash({"version": WORLD_VERSION, "config": self.key_dict()})


# ------------------------------------------------------------------------------------------ scenes
def _choice(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _geometry(rng: np.random.Generator, size: str, cell: tuple[int, int], image_size: int) -> dict:
    side = image_size / 3.0
    lo, hi = SIZE_RANGES[size]
    d = side * float(rng.uniform(lo, hi))
    margin = max(0.5, 0.05 * side)
    jmax = max(0.0, (side - d) / 2 - margin)
    row, col = cell
    cx = (col + 0.5) * side + float(rng.uniform(-jmax, jmax))
    cy = (row + 0.5) * side + float(rng.uniform(-jmax, jmax))
    half = round(d / 2, 2)
    cx, cy = round(cx, 2), round(cy, 2)
    return {"centre": [cx, cy], "bbox": [round(cx - half, 2), round(cy - half, 2), round(cx + half, 2), round(cy + half, 2)]}


def make_scene(rng: np.random.Generator, config: WorldConfig, objects: Sequence[dict],
               background: str | None = None) -> dict:
    """A scene with the given (partial) objects: missing shape/colour/size/cell are drawn at random.

    Cells given by the caller are kept; the others are drawn from the free cells (one object per
    cell, so objects never overlap).
    """
    if len(objects) > len(CELLS):
        raise ValueError("at most 9 objects fit on the 3x3 grid")
    bg = background if background is not None else _choice(rng, BACKGROUNDS)
    taken = {tuple(o["cell"]) for o in objects if o.get("cell") is not None}
    free = [c for c in CELLS if c not in taken]
    order = rng.permutation(len(free))
    k = 0
    out = []
    for spec in objects:
        shape = spec.get("shape") or _choice(rng, SHAPES)
        colour = spec.get("colour") or _choice(rng, COLOUR_NAMES)
        size = spec.get("size") or _choice(rng, SIZES)
        if spec.get("cell") is not None:
            cell = tuple(int(v) for v in spec["cell"])
        else:
            cell = free[int(order[k])]
            k += 1
        obj = {"shape": shape, "colour": colour, "size": size, "cell": [int(cell[0]), int(cell[1])]}
        obj.update(_geometry(rng, size, cell, config.image_size))
        out.append(obj)
    return {"background": bg, "objects": out}


def generate_scene(rng: np.random.Generator, config: WorldConfig, *, n_objects: int | None = None,
                   background: str | None = None) -> dict:
    """A random scene (JSON-serialisable): ``{"background", "objects": [{shape, colour, size, cell:
    [row, col], centre: [x, y], bbox: [x0, y0, x1, y1]}]}`` in pixel coordinates of
    ``config.image_size``. 1-3 objects (40/35/25%) unless ``n_objects`` is given."""
    n = n_objects if n_objects is not None else int(rng.choice(3, p=N_OBJECTS_PROBS)) + 1
    return make_scene(rng, config, [{} for _ in range(n)], background)


# --------------------------------------------------------------------------------------- rendering
def _unit_polygon(shape: str) -> list[tuple[float, float]] | None:
    """Outline of ``shape`` in unit coordinates (x right, y down, within [-1, 1]); None for round shapes."""
    if shape == "square":
        s = 0.8
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(0.0, -0.95), (0.95, 0.8), (-0.95, 0.8)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.45
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((r * np.cos(a), r * np.sin(a) + 0.08))
        return pts
    if shape == "cross":
        w, e = 0.3, 0.95
        return [(-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w), (w, e), (-w, e), (-w, w), (-e, w), (-e, -w), (-w, -w)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return [(float(a) / 16 * 0.95, -(float(b) + 2.5) / 14.5 * 0.95) for a, b in zip(x, y)]
    return None


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}
RING_INNER = 0.5  # inner radius of a ring (fraction of its outer radius)
ROUND_RADIUS = 0.95


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, scale: float, outline_width: int | None) -> None:
    """Draw one object's mask (255 inside) at ``scale`` (supersampling factor)."""
    x0, y0, x1, y1 = obj["bbox"]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = (x1 - x0) / 2

    def box(radius: float):
        return [(cx - radius) * scale, (cy - radius) * scale, (cx + radius) * scale, (cy + radius) * scale]

    shape = obj["shape"]
    poly = _POLYGONS[shape]
    if poly is None:  # circle, ring
        if outline_width is None:
            draw.ellipse(box(ROUND_RADIUS * r), fill=255)
            if shape == "ring":
                draw.ellipse(box(RING_INNER * r), fill=0)
        else:
            draw.ellipse(box(ROUND_RADIUS * r), outline=255, width=outline_width)
            if shape == "ring":
                draw.ellipse(box(RING_INNER * r), outline=255, width=outline_width)
        return
    pts = [((cx + px * r) * scale, (cy + py * r) * scale) for px, py in poly]
    if outline_width is None:
        draw.polygon(pts, fill=255)
    else:
        draw.polygon(pts, outline=255, width=outline_width)


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey texture (H, W) float32 with values in [80, 180]."""
    s = size / 48.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if name == "plain":
        return np.full((size, size), float(rng.uniform(118, 142)), np.float32)
    if name == "striped":
        period = max(3.0, float(rng.uniform(4.0, 6.0)) * s)
        direction = int(rng.integers(3))
        coord = yy if direction == 0 else xx if direction == 1 else (xx + yy) / np.sqrt(2)
        phase = float(rng.uniform(0, period))
        on = ((coord + phase) % period) < period / 2
        return np.where(on, 100.0, 160.0).astype(np.float32)
    if name == "dotted":
        spacing = max(3.0, float(rng.uniform(5.0, 6.5)) * s)
        radius = max(0.7, 1.5 * s)
        ox, oy = float(rng.uniform(0, spacing)), float(rng.uniform(0, spacing))
        dx = (xx + 0.5 + ox) % spacing - spacing / 2
        dy = (yy + 0.5 + oy) % spacing - spacing / 2
        dots = (dx * dx + dy * dy) <= radius * radius
        return np.where(dots, 90.0, 150.0).astype(np.float32)
    if name == "checkered":
        sq = max(2.0, float(rng.uniform(4.0, 6.0)) * s)
        ox, oy = float(rng.uniform(0, sq)), float(rng.uniform(0, sq))
        on = (np.floor((xx + ox) / sq) + np.floor((yy + oy) / sq)) % 2 == 0
        return np.where(on, 105.0, 160.0).astype(np.float32)
    if name == "gradient":
        a = float(rng.uniform(0, 2 * np.pi))
        proj = (xx - size / 2) * np.cos(a) + (yy - size / 2) * np.sin(a)
        proj = proj / (np.abs(proj).max() + 1e-6)
        return (130.0 + 48.0 * proj).astype(np.float32)
    if name == "noisy":
        return np.clip(130.0 + rng.normal(0, 22, (size, size)), 80, 180).astype(np.float32)
    raise ValueError(f"unknown background '{name}'; known: {', '.join(BACKGROUNDS)}")


def render_scene(scene: dict, image_size: int, style: str = "normal",
                 rng: np.random.Generator | None = None) -> Image.Image:
    """Render a scene to an RGB image of ``image_size`` pixels.

    Styles: ``normal``; ``sketch`` (black outlines on white, no colour or texture); ``noise`` (heavy
    Gaussian pixel noise); ``palette`` (hues rotated, contrast and saturation changed, a tint: shapes,
    sizes and layout stay recognisable, colours do not). A scene's optional ``tint`` ((r, g, b, strength):
    a colour blended into the background) and ``contrast`` (a factor towards mid-grey) are the web's
    washed-out photos (``WorldConfig.web_tint``). ``rng`` drives the textures and the shifts; the same rng
    state gives the same bytes.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style '{style}'; known: {', '.join(STYLES)}")
    rng = rng if rng is not None else np.random.default_rng(0)
    S, F = image_size, SUPERSAMPLE
    big = Image.new("L", (S * F, S * F), 0)
    draw = ImageDraw.Draw(big)
    outline = max(2, round(F * S / 40)) if style == "sketch" else None
    for obj in scene["objects"]:
        _draw_object(draw, obj, F, outline)
    alpha = np.asarray(big.resize((S, S), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0

    if style == "sketch":
        bg = np.full((S, S, 3), 255.0, np.float32)
        fg = np.zeros((S, S, 3), np.float32)
    else:
        bg = np.repeat(_background(scene["background"], S, rng)[..., None], 3, axis=2)
        if scene.get("tint"):  # (r, g, b, strength): a colour blended into the background only
            *colour, strength = scene["tint"]
            bg = bg * (1.0 - strength) + np.asarray(colour, np.float32) * strength
        fg = np.zeros((S, S, 3), np.float32)
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            fg[max(0, int(np.floor(y0))):int(np.ceil(y1)), max(0, int(np.floor(x0))):int(np.ceil(x1))] = COLOURS[obj["colour"]]
    img = bg * (1.0 - alpha) + fg * alpha

    if scene.get("contrast"):  # a washed-out photo: every value pulled towards mid-grey
        img = 128.0 + (img - 128.0) * float(scene["contrast"])
    if style == "noise":
        img = img + rng.normal(0.0, 40.0, img.shape)
    elif style == "palette":
        img = _palette_shift(np.clip(img, 0, 255), rng)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def _palette_shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = np.asarray(Image.fromarray(np.rint(img).astype(np.uint8)).convert("HSV"), dtype=np.float32)
    shift = float(rng.uniform(64, 192))  # 90-270 degrees of hue rotation
    hsv[..., 0] = (hsv[..., 0] + shift) % 256
    hsv[..., 1] = hsv[..., 1] * float(rng.uniform(0.55, 0.9))
    hsv8 = np.clip(np.rint(hsv), 0, 255).astype(np.uint8)
    rgb = np.asarray(Image.frombytes("HSV", hsv8.shape[1::-1], hsv8.tobytes()).convert("RGB"), dtype=np.float32)
    contrast = float(rng.uniform(0.55, 0.85))
    rgb = 128.0 + (rgb - 128.0) * contrast + float(rng.uniform(-15, 15))
    tint = rng.uniform(0, 255, 3).astype(np.float32)
    return rgb * 0.8 + tint * 0.2


# ----------------------------------------------------------------------------------------- captions
def _pick(rng: np.random.Generator, options: Sequence, p_first: float = 0.6):
    """The canonical (first) option with probability ``p_first``, else one of the others."""
    if len(options) == 1 or rng.random() < p_first:
        return options[0]
    return options[1 + int(rng.integers(len(options) - 1))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _matches(obj: dict, size: str | None, colour: str | None, shape: str | None) -> bool:
    return ((size is None or obj["size"] == size) and (colour is None or obj["colour"] == colour)
            and (shape is None or obj["shape"] == shape))


def _unit(rng: np.random.Generator, scene: dict, objs: list[dict], p_size: float) -> dict:
    """A noun phrase naming ``objs`` (all of one colour and shape): text, count, attributes."""
    k = len(objs)
    colour, shape = objs[0]["colour"], objs[0]["shape"]
    sizes = {o["size"] for o in objs}
    size = objs[0]["size"] if len(sizes) == 1 and rng.random() < p_size else None
    words = []
    if size:
        words.append(_pick(rng, SIZE_WORDS[size]))
    words.append(_pick(rng, COLOUR_WORDS[colour], 0.8))
    sing, plur = _pick(rng, SHAPE_WORDS[shape])
    words.append(sing if k == 1 else plur)
    text = " ".join(words)
    n_match = sum(_matches(o, size, colour, shape) for o in scene["objects"])
    if k > 1:
        text = f"{_pick(rng, COUNT_WORDS[k], 0.7)} {text}"
    elif n_match == 1 and rng.random() < 0.08:  # "a single ..." claims exactly one such object
        text = f"{_pick(rng, COUNT_WORDS[1][1:], 0.7)} {text}"
    else:
        text = _article(text)
    return {"text": text, "k": k, "obj": objs[0] if k == 1 else None}


def _position_phrase(rng: np.random.Generator, obj: dict) -> str:
    cell = tuple(obj["cell"])
    word = _pick(rng, POSITION_WORDS[cell], 0.7)
    if cell != (1, 1) and cell[0] != 1 and cell[1] != 1 and rng.random() < 0.5:
        return f"in the {word} corner"
    return f"{_choice(rng, ('in the', 'at the'))} {word}"


def _background_phrase(rng: np.random.Generator, scene: dict) -> str:
    return f"{_choice(rng, ('on a', 'on a', 'against a'))} {_pick(rng, BACKGROUND_WORDS[scene['background']])}"


def _total_phrase(rng: np.random.Generator, n: int) -> str:
    count = _pick(rng, COUNT_WORDS[n], 0.7)
    sing, plur = _pick(rng, GENERIC_NOUNS[:4], 0.4)
    return f"{count} {sing if n == 1 else plur}"


def _valid_relations(a: dict, b: dict) -> list[str]:
    return [r for r in RELATION_WORDS if relation_holds(r, a, b)]


def _join(units: list[str]) -> str:
    if len(units) == 1:
        return units[0]
    return ", ".join(units[:-1]) + " and " + units[-1]


def _finish(rng: np.random.Generator, text: str, allow_prefix: bool = True) -> str:
    if allow_prefix and rng.random() < 0.25:
        text = f"{_choice(rng, CAPTION_PREFIXES)} {text}"
    if rng.random() < 0.5:
        text += "."
    return text


def _full_caption(scene: dict, rng: np.random.Generator, p_size: float, p_pos: float, p_bg: float) -> str:
    objs = scene["objects"]
    n = len(objs)
    order = [objs[int(i)] for i in rng.permutation(n)]
    groups: list[list[dict]] = []
    if n > 1 and rng.random() < 0.5:  # "two red circles": group objects of one colour and shape
        for o in order:
            for g in groups:
                if g[0]["colour"] == o["colour"] and g[0]["shape"] == o["shape"]:
                    g.append(o)
                    break
            else:
                groups.append([o])
    else:
        groups = [[o] for o in order]
    units = [_unit(rng, scene, g, p_size) for g in groups]
    singular = [u for u in units if u["k"] == 1]
    bg = _background_phrase(rng, scene) if rng.random() < p_bg else None
    # Caption forms: a relation (35 %, when two single objects are named), positions (the rest up to 80 %),
    # total count first (10 %), background first (10 %). Version 3 moved 20 points to the positions form.
    style = rng.random()
    m = len(units)

    if m >= 2 and len(singular) >= 2 and style < 0.35:
        # relation between two single objects: "a red circle left of a blue star[, and a green box]"
        a, b = singular[0], singular[1]
        rel = _choice(rng, _valid_relations(a["obj"], b["obj"]))
        text = f"{a['text']} {_pick(rng, RELATION_WORDS[rel])} {b['text']}"
        rest = [u for u in units if u is not a and u is not b]
        if rest:
            u = rest[0]
            extra = u["text"]
            if u["k"] == 1 and rng.random() < p_pos:
                extra += " " + _position_phrase(rng, u["obj"])
            text += f", and {extra}"
    elif style < 0.8:
        # positions: "a red circle in the top left and a blue star at the centre"
        parts = []
        for u in units:
            part = u["text"]
            if u["k"] == 1 and rng.random() < (p_pos if m == 1 else p_pos + 0.2):
                part += " " + _position_phrase(rng, u["obj"])
            parts.append(part)
        text = _join(parts)
    elif style < 0.9:
        # total count first: "three shapes: two red circles and a blue star"
        text = f"{_total_phrase(rng, n)}: {_join([u['text'] for u in units])}"
    else:
        # background first: "a striped background with a red circle and a blue star"
        if bg is None:
            bg_words = _pick(rng, BACKGROUND_WORDS[scene["background"]])
            text = f"{_article(bg_words)} with {_join([u['text'] for u in units])}"
            return _finish(rng, text, allow_prefix=False)
        text = _join([u["text"] for u in units])
    if bg is not None:
        text += " " + bg
    return _finish(rng, text)


def _partial_caption(scene: dict, rng: np.random.Generator) -> str:
    """A short caption naming two attributes of one object (or a shape relation, or two of the objects).

    Two attributes, not one (WORLD_VERSION 2): in a batch of 256 a one-attribute caption ("a star",
    "blue", "something in the centre") is true of about 50 other images, and as their negative it
    pushes every one of them away from what it says. Two attributes leave a handful of such false
    negatives, as terse web alt-text does in a web-scale batch, and each attribute still narrows the
    match. (Measured: no difference to the base model's zero-shot accuracy on its own; README, "The
    embedded world and base model".)
    """
    objs = scene["objects"]
    n = len(objs)
    o = objs[int(rng.integers(n))]
    shape_word = lambda ob: _pick(rng, SHAPE_WORDS[ob["shape"]])[0]  # noqa: E731
    colour_word = lambda ob: _pick(rng, COLOUR_WORDS[ob["colour"]], 0.8)  # noqa: E731
    size_word = lambda ob: _pick(rng, SIZE_WORDS[ob["size"]])  # noqa: E731
    generic = lambda: _pick(rng, ("object", "shape", "thing", "item"), 0.4)  # noqa: E731
    forms: list[Callable[[], str]] = [
        lambda: f"{_article(colour_word(o))} {shape_word(o)}",                            # "a red star"
        lambda: f"{_article(size_word(o))} {shape_word(o)}",                              # "a big star"
        lambda: f"{_article(shape_word(o))} {_position_phrase(rng, o)}",                  # "a star in the top left"
        lambda: f"{_article(colour_word(o))} {generic()} {_position_phrase(rng, o)}",     # "a red thing in the centre"
        lambda: f"{_article(shape_word(o))} {_background_phrase(rng, scene)}",            # "a star on a dotted background"
        lambda: f"{_article(colour_word(o))} {generic()} {_background_phrase(rng, scene)}",  # "a red thing on a ..."
        lambda: f"{_total_phrase(rng, n)} {_background_phrase(rng, scene)}",              # "three shapes on a ..."
    ]
    if n > 1:
        a, b = (objs[int(i)] for i in rng.permutation(n)[:2])
        forms.append(lambda: f"{_article(shape_word(a))} {_pick(rng, RELATION_WORDS[_choice(rng, _valid_relations(a, b))])} "
                             f"{_article(shape_word(b))}")                                # "a star above a ring"
        forms.append(lambda: f"{_article(colour_word(a))} {shape_word(a)} and "
                             f"{_article(colour_word(b))} {shape_word(b)}")               # "a red star and a blue ring"
    text = forms[int(rng.integers(len(forms)))]()
    return _finish(rng, text, allow_prefix=text.startswith(("a ", "an ")))


#: Openings of the caption of a sketch-style web image.
SKETCH_PREFIXES: tuple[str, ...] = ("a sketch of", "a drawing of", "a line drawing of", "an outline drawing of")


def sketch_caption(scene: dict, rng: np.random.Generator, prefixes: Sequence[str] = SKETCH_PREFIXES) -> str:
    """The alt-text of ``scene`` drawn as a sketch: every object's shape, counts and often positions, no colour,
    size or background (a line drawing shows none of them reliably).

    "a sketch of two circles and a star in the top left", "a drawing of three shapes: a ring, a cross and a
    star". Groups objects by shape, so a count ("two circles") is exact. With ``prefixes=()`` it is the
    alt-text of a recoloured web image, whose colours no longer match their names: no style words, and the
    openings of ordinary captions ("a photo of") as often as theirs. (Style words such as "a filtered photo
    of" were tried first: the base then matched recoloured images by those words and put every shape-palette
    image in one class; README, sixth round.)
    """
    objs = [scene["objects"][int(i)] for i in rng.permutation(len(scene["objects"]))]
    groups: dict[str, list[dict]] = {}
    for o in objs:
        groups.setdefault(o["shape"], []).append(o)
    p_pos = 0.7
    for _ in range(20):
        units = []
        for shape, group in groups.items():
            sing, plur = _pick(rng, SHAPE_WORDS[shape])
            if len(group) == 1:
                unit = _article(sing)
                if rng.random() < p_pos:
                    unit += " " + _position_phrase(rng, group[0])
            else:
                unit = f"{_pick(rng, COUNT_WORDS[len(group)], 0.7)} {plur}"
            units.append(unit)
        text = _join(units)
        if len(objs) > 1 and rng.random() < 0.3:
            text = f"{_total_phrase(rng, len(objs))}: {text}"
        text = (_finish(rng, f"{_choice(rng, prefixes)} {text}", allow_prefix=False) if prefixes
                else _finish(rng, text))
        if len(text.split()) <= MAX_CAPTION_WORDS:
            return text
        p_pos *= 0.5
    return f"{_choice(rng, prefixes)} {_total_phrase(rng, len(objs))}" if prefixes else _total_phrase(rng, len(objs))


def describe(scene: dict, rng: np.random.Generator, detail: str = "full") -> str:
    """One caption of ``scene`` (at most :data:`MAX_CAPTION_WORDS` words, lower case).

    ``full`` names every object's colour and shape and often its size, position or a relation, the
    number of objects and the background; ``partial`` mentions two attributes of one object, a shape
    relation or two of the objects ("a red star", "a star in the top left", "three shapes on a striped
    background", "a star above a ring"). Every caption is true of the scene.
    """
    if detail == "partial":
        return _partial_caption(scene, rng)
    if detail != "full":
        raise ValueError(f"detail must be 'full' or 'partial', got {detail!r}")
    return _describe_full(scene, rng, WEB_DETAIL)


#: Probabilities that a full caption mentions an object's size, an object's position (or a
#: relation is used instead) and the background: web alt-text is terser than COCO-style captions.
#: Version 3 raised the position from 0.6 to 0.9 (and made the positions form of a full caption the
#: commonest, 45 % instead of 25 % of multi-object captions): with fewer position phrases the base model's
#: position accuracy stayed at chance (README, third round).
WEB_DETAIL = (0.6, 0.9, 0.35)
COCO_DETAIL = (0.8, 0.75, 0.5)


def _describe_full(scene: dict, rng: np.random.Generator, detail: tuple[float, float, float]) -> str:
    p_size, p_pos, p_bg = detail
    for _ in range(50):
        text = _full_caption(scene, rng, p_size, p_pos, p_bg)
        if len(text.split()) <= MAX_CAPTION_WORDS:
            return text
        p_size, p_pos, p_bg = p_size * 0.6, p_pos * 0.6, p_bg * 0.5
    parts = [_article(f"{o['colour']} {o['shape']}") for o in scene["objects"]]
    return _join(parts)


def caption_set(scene: dict, rng: np.random.Generator, k: int = 5) -> list[str]:
    """``k`` full captions of ``scene``, distinct where possible (the COCO-style caption set)."""
    caps: list[str] = []
    for _ in range(20 * k):
        c = _describe_full(scene, rng, COCO_DETAIL)
        if c not in caps:
            caps.append(c)
        if len(caps) == k:
            return caps
    while len(caps) < k:
        caps.append(_describe_full(scene, rng, COCO_DETAIL))
    return caps


# -------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A zero-shot classification task: ``sample(rng, config, label)`` makes a scene of class ``label``.

    ``probe``: a compositional probe, not a classification task (its manifests say ``probe: true``): evaluated
    and reported everywhere, left out of the zero-shot average (:func:`clip_refine_lab.metrics.zero_shot_average`).
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    sample: Callable[[np.random.Generator, WorldConfig, int], dict]
    description: str
    probe: bool = False


_SHAPE_PAIRS = list(itertools.combinations(SHAPES, 2))
_COLOUR_PAIRS = list(itertools.combinations(COLOUR_NAMES, 2))
_RELATIONS = ("left", "right", "above", "below")


def _sample_relation(rng: np.random.Generator, config: WorldConfig, label: int) -> dict:
    rel = _RELATIONS[label]
    line, i, j = int(rng.integers(3)), *sorted(int(v) for v in rng.choice(3, 2, replace=False))
    # red is the first object; place it so "red <rel> blue" is the one relation that holds
    if rel in ("left", "right"):
        red, blue = ((line, i), (line, j)) if rel == "left" else ((line, j), (line, i))
    else:
        red, blue = ((i, line), (j, line)) if rel == "above" else ((j, line), (i, line))
    return make_scene(rng, config, [{"colour": "red", "cell": red}, {"colour": "blue", "cell": blue}])


def _sample_biggest(rng: np.random.Generator, config: WorldConfig, label: int) -> dict:
    other = _choice(rng, [c for c in COLOUR_NAMES if c != COLOUR_NAMES[label]])
    objs = [{"colour": COLOUR_NAMES[label], "size": "large"}, {"colour": other, "size": "small"}]
    return make_scene(rng, config, [objs[int(i)] for i in rng.permutation(2)])


def _sample_pair(key: str, pairs: list) -> Callable:
    def sample(rng: np.random.Generator, config: WorldConfig, label: int) -> dict:
        a, b = pairs[label]
        if rng.random() < 0.5:
            a, b = b, a
        return make_scene(rng, config, [{key: a}, {key: b}])
    return sample


_OBJ_TEMPLATES = ("a photo of a {c}.", "a rendering of a {c}.", "a {c} on a background.", "a drawing of a {c}.", "a {c}.")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("shape", SHAPES, _OBJ_TEMPLATES,
         lambda rng, cfg, y: make_scene(rng, cfg, [{"shape": SHAPES[y]}]),
         "the shape of the single object"),
    Task("colour", COLOUR_NAMES,
         ("a photo of a {c} object.", "a {c} shape.", "a rendering of a {c} thing.", "something {c} on a background."),
         lambda rng, cfg, y: make_scene(rng, cfg, [{"colour": COLOUR_NAMES[y]}]),
         "the colour of the single object"),
    Task("size", SIZES,
         ("a photo of a {c} object.", "a {c} shape.", "a rendering of a {c} thing.", "a {c} shape on a background."),
         lambda rng, cfg, y: make_scene(rng, cfg, [{"size": SIZES[y]}]),
         "the size (small or large) of the single object"),
    Task("position", POSITION_NAMES,
         ("a photo of a shape in the {c}.", "an object in the {c}.", "a rendering of a thing at the {c}.", "something in the {c}."),
         lambda rng, cfg, y: make_scene(rng, cfg, [{"cell": CELLS[y]}]),
         "the grid cell of the single object"),
    Task("count", ("one object", "two objects", "three objects"),
         ("a photo of {c}.", "a rendering of {c}.", "{c} on a background.", "an image of {c}."),
         lambda rng, cfg, y: make_scene(rng, cfg, [{} for _ in range(y + 1)]),
         "the number of objects (1-3)"),
    Task("background", tuple(BACKGROUND_NAMES[b] for b in BACKGROUNDS),
         ("a photo of something on a {c} background.", "a {c} background.", "shapes on a {c} background.",
          "a rendering of an object against a {c} background."),
         lambda rng, cfg, y: generate_scene(rng, cfg, background=BACKGROUNDS[y]),
         "the background texture (1-3 objects)"),
    Task("shape-colour", tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES), _OBJ_TEMPLATES,
         lambda rng, cfg, y: make_scene(rng, cfg, [{"colour": COLOUR_NAMES[y // len(SHAPES)], "shape": SHAPES[y % len(SHAPES)]}]),
         "fine-grained: colour and shape of the single object"),
    Task("relation", tuple(f"red shape {w} a blue shape" for w in ("left of", "right of", "above", "below")),
         ("a photo of a {c}.", "a rendering of a {c}.", "a {c}.", "a {c} on a background."),
         _sample_relation,
         # Word order decides the class ("red ... left of ... blue" vs "blue ... left of ... red"): a
         # compositional probe, the analogue of ARO's VG-Relation, where web CLIPs sit near chance; so is our
         # base model, after five pre-training changes aimed at it (README, "The embedded world and base model")
         "where the red object is relative to the blue one (two objects in one row or column)", probe=True),
    Task("biggest-colour", COLOUR_NAMES,
         ("a photo of a large {c} shape and a small shape.", "a big {c} object and a small object.",
          "a rendering of a large {c} thing and a little thing."),
         _sample_biggest,
         "the colour of the large object (one large and one small object of different colours)"),
    Task("shape-pair", tuple(f"a {a} and a {b}" for a, b in _SHAPE_PAIRS),
         ("a photo of {c}.", "{c} on a background.", "a rendering of {c}.", "an image of {c}."),
         _sample_pair("shape", _SHAPE_PAIRS),
         "the (unordered) pair of shapes of two objects of different shapes"),
    Task("colour-pair", tuple(f"{a} and {b}" for a, b in _COLOUR_PAIRS),
         ("a photo of {c} shapes.", "{c} objects on a background.", "a rendering of {c} things.", "an image of {c} shapes."),
         _sample_pair("colour", _COLOUR_PAIRS),
         "the (unordered) pair of colours of two objects of different colours"),
]}

#: Domain-shifted test variants: task -> styles (no palette shift for tasks that ask about colour).
SHIFTED: dict[str, tuple[str, ...]] = {
    "shape": ("sketch", "noise", "palette"),
    "count": ("sketch", "noise", "palette"),
    "position": ("sketch", "noise", "palette"),
    "colour": ("noise",),
    "shape-colour": ("noise",),
}
BASE_TASKS: tuple[str, ...] = tuple(TASKS)
TASK_NAMES: tuple[str, ...] = BASE_TASKS + tuple(f"{t}-{s}" for t, styles in SHIFTED.items() for s in styles)
VALIDATION_TASKS: tuple[str, ...] = tuple(f"val/{t}" for t in BASE_TASKS)
CAPTION_SPLITS: tuple[str, ...] = ("synthetic-web", "synthetic-coco", "synthetic-retrieval")


# ------------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class SplitSpec:
    name: str  # e.g. "synthetic-web", "shape-sketch", "val/shape"
    kind: str  # captions | classification
    size: int
    task: str | None = None
    style: str = "normal"

    @property
    def slug(self) -> str:
        return self.name.replace("/", "-")

    @property
    def code(self) -> int:
        return int(stable_hash(self.name, 12), 16)


def split_specs(config: WorldConfig) -> list[SplitSpec]:
    """Every split of the world, in build order."""
    specs = [
        SplitSpec("synthetic-web", "captions", config.web_size),
        SplitSpec("synthetic-coco", "captions", config.coco_size),
        SplitSpec("synthetic-retrieval", "captions", config.retrieval_size),
    ]
    for name in TASK_NAMES:
        base, style = name, "normal"
        for s in STYLES:
            if name.endswith("-" + s) and name[: -len(s) - 1] in TASKS:
                base, style = name[: -len(s) - 1], s
        specs.append(SplitSpec(name, "classification", config.task_size, base, style))
    specs += [SplitSpec(v, "classification", config.val_size, v[4:]) for v in VALIDATION_TASKS]
    return specs


def _rngs(config: WorldConfig, spec: SplitSpec, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(scene/caption rng, render rng) of one image: seeded from (world seed, split, index) only."""
    return (np.random.default_rng([config.seed, spec.code, index, 0]),
            np.random.default_rng([config.seed, spec.code, index, 1]))


def make_record(config: WorldConfig, spec: SplitSpec, index: int) -> tuple[dict, dict]:
    """The record of image ``index`` of a split (without rendering) and the scene to render."""
    rng, _ = _rngs(config, spec, index)
    rid = f"{spec.slug}-{index:06d}"
    record: dict[str, Any] = {"id": rid, "image": f"{index:06d}.png"}
    if spec.kind == "captions":
        scene = generate_scene(rng, config)
        meta = dict(scene)
        if spec.name == "synthetic-web":
            u = rng.random()
            if u < config.web_mismatch:
                noise = "mismatched"  # the alt-text of some other scene
                other = generate_scene(rng, config)
                caption = describe(other, rng, "full" if rng.random() < 0.6 else "partial")
            elif u < config.web_mismatch + config.web_partial:
                noise, caption = "partial", describe(scene, rng, "partial")
            else:
                noise, caption = "clean", describe(scene, rng, "full")
            meta["noise"] = noise
            # the style: sketches and recoloured images only among clean pairs (their caption is re-made,
            # colourless and complete), noise among clean and partial ones; mismatched pairs stay normal
            styles_on = config.web_sketch or config.web_noise or config.web_palette
            v = rng.random() if styles_on else 0.5  # no draw while styles are off
            clean_share = 1.0 - config.web_mismatch - config.web_partial
            if noise == "clean" and v < config.web_sketch / clean_share:
                meta["style"] = "sketch"
                caption = sketch_caption(scene, rng)
            elif noise == "clean" and v < (config.web_sketch + config.web_palette) / clean_share:
                meta["style"] = "palette"
                caption = sketch_caption(scene, rng, prefixes=())
            elif noise != "mismatched" and v >= 1.0 - config.web_noise / (1.0 - config.web_mismatch):
                meta["style"] = "noise"
            if config.web_tint and meta.get("style", "normal") != "sketch":  # a sketch has no background
                # its own rng, so that turning the tint on leaves every other image and caption as it was
                tint_rng = np.random.default_rng([config.seed, spec.code, index, 2])
                if tint_rng.random() < config.web_tint:
                    tint = [round(float(c), 1) for c in tint_rng.uniform(0, 255, 3)]
                    scene["tint"] = meta["tint"] = tint + [round(float(tint_rng.uniform(0.1, 0.3)), 3)]
                    scene["contrast"] = meta["contrast"] = round(float(tint_rng.uniform(0.55, 0.85)), 3)
                    if noise != "mismatched" and scene["background"] == "plain":
                        caption = _untinted_words_removed(caption)
            record["captions"] = [caption]
        else:
            record["captions"] = caption_set(scene, rng, 5)
    else:
        task = TASKS[spec.task]
        label = index % len(task.classnames)  # balanced classes, in any prefix of the split
        scene = task.sample(rng, config, label)
        meta = dict(scene)
        record["label"] = label
        if spec.style != "normal":
            meta["style"] = spec.style
    record["meta"] = meta
    return record, scene


def _untinted_words_removed(caption: str) -> str:
    """A caption of a scene on a tinted plain background: it is no longer grey (the same words otherwise, so
    the caption rng is drawn as for any other caption)."""
    return caption.replace("plain grey background", "plain background").replace("grey background", "plain background")


def _build_chunk(args: tuple) -> list[dict]:
    """Worker: make, render and save images [start, stop) of one split; return their records."""
    config_dict, spec, start, stop, folder = args
    config = WorldConfig(**config_dict)
    folder = Path(folder)
    records = []
    for index in range(start, stop):
        record, scene = make_record(config, spec, index)
        _, render_rng = _rngs(config, spec, index)
        img = render_scene(scene, config.image_size, record["meta"].get("style", spec.style), render_rng)
        img.save(folder / record["image"], format="PNG", compress_level=1)
        records.append(record)
    return records


# -------------------------------------------------------------------------------------------- world
@dataclass
class World:
    """A built world: its folder, config and the names of its manifests."""

    root: Path
    config: WorldConfig
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    validation_tasks: list[str] = field(default_factory=lambda: list(VALIDATION_TASKS))
    caption_splits: list[str] = field(default_factory=lambda: list(CAPTION_SPLITS))

    @property
    def names(self) -> list[str]:
        return self.caption_splits + self.tasks + self.validation_tasks

    def manifest(self, name: str) -> Path:
        """The manifest YAML of a split, e.g. ``"synthetic-coco"``, ``"shape-sketch"``, ``"val/shape"``."""
        if name not in self.names:
            raise KeyError(f"no split '{name}' in the synthetic world; known: {', '.join(self.names)}")
        return self.root / f"{name}.yaml"

    @classmethod
    def load(cls, root: str | os.PathLike) -> "World":
        """Open a complete world folder (one with ``world.json``), wherever it has been moved."""
        root = Path(root)
        info = json.loads((root / "world.json").read_text(encoding="utf-8"))
        return cls(root, WorldConfig(**info["config"]), list(info["tasks"]), list(info["validation_tasks"]),
                   list(info["caption_splits"]))


def world_root(config: WorldConfig) -> Path:
    return cache_dir() / "world" / config.world_hash()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(parent: Path, key: str) -> None:
    """Remove staging folders of this world left behind by processes that no longer run."""
    for p in parent.glob(f".{key}.partial-*"):
        with contextlib.suppress(ValueError, IndexError):
            pid = int(p.name.split(".partial-")[1].split("-")[0])
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def build_world(config: WorldConfig | None = None, *, progress: bool = True, workers: int = 2) -> World:
    """Build the world for ``config`` (default preset when None), or reuse a complete one.

    Images and manifests are written to a private staging folder that is renamed to
    ``cache_dir()/world/<hash>`` once ``world.json`` (the completion mark) is in it, so a crash
    never leaves a half world where a complete one is expected. ``workers > 1`` renders with a
    process pool (same bytes as serial). The pool uses the "spawn" start method (safe with torch
    threads in the parent), so a script that calls this with ``workers > 1`` needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    config = config or WorldConfig()
    final = world_root(config)
    if (final / "world.json").is_file():
        return World.load(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a folder without the completion mark: not ours to trust
        shutil.rmtree(final, ignore_errors=True)
    _clean_stale(parent, final.name)
    stage = parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    t0 = time.time()
    try:
        _build_into(stage, config, progress=progress, workers=workers)
        info = {
            "version": WORLD_VERSION, "hash": final.name, "config": config.to_dict(),
            "caption_splits": list(CAPTION_SPLITS), "tasks": list(TASK_NAMES),
            "validation_tasks": list(VALIDATION_TASKS),
            "splits": {s.name: {"kind": s.kind, "size": s.size, "task": s.task, "style": s.style,
                                "manifest": f"{s.name}.yaml"} for s in split_specs(config)},
            "build_seconds": round(time.time() - t0, 2),
        }
        atomic_write_json(stage / "world.json", info)
        os.sync()
        try:
            os.rename(stage, final)
        except OSError:  # another process finished the same world first
            if not (final / "world.json").is_file():
                raise
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return World.load(final)


def _build_into(stage: Path, config: WorldConfig, *, progress: bool, workers: int, chunk: int = 250) -> None:
    from tqdm.auto import tqdm

    specs = split_specs(config)
    jobs = []
    for spec in specs:
        folder = stage / "images" / spec.slug
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, spec.size, chunk):
            jobs.append((config.to_dict(), spec, start, min(spec.size, start + chunk), str(folder)))
    results: dict[str, list[dict]] = {s.name: [] for s in specs}
    bar = tqdm(total=sum(s.size for s in specs), desc="building synthetic world", unit="img", disable=not progress)
    try:
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for job, recs in zip(jobs, pool.imap(_build_chunk, jobs)):
                    results[job[1].name].extend(recs)
                    bar.update(len(recs))
        else:
            for job in jobs:
                recs = _build_chunk(job)
                results[job[1].name].extend(recs)
                bar.update(len(recs))
    finally:
        bar.close()
    for spec in specs:
        _write_split_manifest(stage, config, spec, results[spec.name])


def _write_split_manifest(stage: Path, config: WorldConfig, spec: SplitSpec, records: list[dict]) -> None:
    path = stage / f"{spec.name}.yaml"
    depth = spec.name.count("/")
    root = "../" * depth + f"images/{spec.slug}"
    source = f"clip_refine_lab.world (embedded synthetic world v{WORLD_VERSION}, seed {config.seed})"
    extra: dict[str, Any] = {"source": source, "layout": f"{root}/<index>.png; scene metadata in each record's 'meta'"}
    if spec.kind == "captions":
        roles = {"synthetic-web": ("pre-training (noisy web alt-text analogue: one caption per image, "
                                   f"~{config.web_mismatch:.0%} mismatched, ~{config.web_partial:.0%} partial)"),
                 "synthetic-coco": "post-pre-training (COCO Captions analogue: 5 correct captions per image)",
                 "synthetic-retrieval": "held-out image-text retrieval test (5 captions per image)"}
        write_manifest(path, name=spec.name, kind="captions", records=records, root=root,
                       description=roles[spec.name], **extra)
    else:
        task = TASKS[spec.task]
        role = "validation (hyper-parameter selection only)" if spec.name.startswith("val/") else "zero-shot test"
        write_manifest(path, name=spec.name, kind="classification", records=records, root=root,
                       classnames=list(task.classnames), templates=list(task.templates),
                       description=f"{task.description}; {role}", task=spec.task, style=spec.style,
                       **({"probe": True} if task.probe else {}), **extra)
