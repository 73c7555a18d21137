"""The zero-shot classification tasks of the embedded world (the ImageNet analogues) and their shifts.

Each :class:`Task` samples scenes of a given class; its class names and prompt templates go into the
task's manifest. :data:`TASK_NAMES` adds the domain-shifted variants (:data:`SHIFTED`), and
:data:`VALIDATION_TASKS` the validation splits (other images) for choosing hyper-parameters.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .scenes import choose, generate_scene, make_scene
from .vocabulary import BACKGROUND_NAMES, BACKGROUNDS, CELLS, COLOUR_NAMES, POSITION_NAMES, SHAPES, SIZES


@dataclass(frozen=True)
class Task:
    """A zero-shot classification task: ``sample(rng, image_size, label)`` makes a scene of class ``label``.

    ``probe``: a compositional probe, not a classification task (its manifests say ``probe: true``): evaluated
    and reported everywhere, left out of the zero-shot average (:func:`clip_refine_lab.metrics.zero_shot_average`).
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    sample: Callable[[np.random.Generator, int, int], dict]
    description: str
    probe: bool = False


_SHAPE_PAIRS = list(itertools.combinations(SHAPES, 2))
_COLOUR_PAIRS = list(itertools.combinations(COLOUR_NAMES, 2))
_RELATIONS = ("left", "right", "above", "below")


def _sample_relation(rng: np.random.Generator, image_size: int, label: int) -> dict:
    rel = _RELATIONS[label]
    line, i, j = int(rng.integers(3)), *sorted(int(v) for v in rng.choice(3, 2, replace=False))
    # red is the first object; place it so "red <rel> blue" is the one relation that holds
    if rel in ("left", "right"):
        red, blue = ((line, i), (line, j)) if rel == "left" else ((line, j), (line, i))
    else:
        red, blue = ((i, line), (j, line)) if rel == "above" else ((j, line), (i, line))
    return make_scene(rng, image_size, [{"colour": "red", "cell": red}, {"colour": "blue", "cell": blue}])


def _sample_biggest(rng: np.random.Generator, image_size: int, label: int) -> dict:
    other = choose(rng, [c for c in COLOUR_NAMES if c != COLOUR_NAMES[label]])
    objs = [{"colour": COLOUR_NAMES[label], "size": "large"}, {"colour": other, "size": "small"}]
    return make_scene(rng, image_size, [objs[int(i)] for i in rng.permutation(2)])


def _sample_pair(key: str, pairs: list) -> Callable:
    def sample(rng: np.random.Generator, image_size: int, label: int) -> dict:
        a, b = pairs[label]
        if rng.random() < 0.5:
            a, b = b, a
        return make_scene(rng, image_size, [{key: a}, {key: b}])
    return sample


_OBJ_TEMPLATES = ("a photo of a {c}.", "a rendering of a {c}.", "a {c} on a background.", "a drawing of a {c}.", "a {c}.")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("shape", SHAPES, _OBJ_TEMPLATES,
         lambda rng, size, y: make_scene(rng, size, [{"shape": SHAPES[y]}]),
         "the shape of the single object"),
    Task("colour", COLOUR_NAMES,
         ("a photo of a {c} object.", "a {c} shape.", "a rendering of a {c} thing.", "something {c} on a background."),
         lambda rng, size, y: make_scene(rng, size, [{"colour": COLOUR_NAMES[y]}]),
         "the colour of the single object"),
    Task("size", SIZES,
         ("a photo of a {c} object.", "a {c} shape.", "a rendering of a {c} thing.", "a {c} shape on a background."),
         lambda rng, size, y: make_scene(rng, size, [{"size": SIZES[y]}]),
         "the size (small or large) of the single object"),
    Task("position", POSITION_NAMES,
         ("a photo of a shape in the {c}.", "an object in the {c}.", "a rendering of a thing at the {c}.", "something in the {c}."),
         lambda rng, size, y: make_scene(rng, size, [{"cell": CELLS[y]}]),
         "the grid cell of the single object"),
    Task("count", ("one object", "two objects", "three objects"),
         ("a photo of {c}.", "a rendering of {c}.", "{c} on a background.", "an image of {c}."),
         lambda rng, size, y: make_scene(rng, size, [{} for _ in range(y + 1)]),
         "the number of objects (1-3)"),
    Task("background", tuple(BACKGROUND_NAMES[b] for b in BACKGROUNDS),
         ("a photo of something on a {c} background.", "a {c} background.", "shapes on a {c} background.",
          "a rendering of an object against a {c} background."),
         lambda rng, size, y: generate_scene(rng, size, background=BACKGROUNDS[y]),
         "the background texture (1-3 objects)"),
    Task("shape-colour", tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES), _OBJ_TEMPLATES,
         lambda rng, size, y: make_scene(rng, size, [{"colour": COLOUR_NAMES[y // len(SHAPES)], "shape": SHAPES[y % len(SHAPES)]}]),
         "fine-grained: colour and shape of the single object"),
    Task("relation", tuple(f"red shape {w} a blue shape" for w in ("left of", "right of", "above", "below")),
         ("a photo of a {c}.", "a rendering of a {c}.", "a {c}.", "a {c} on a background."),
         _sample_relation,
         # Word order decides the class ("red ... left of ... blue" vs "blue ... left of ... red"): a
         # compositional probe, the analogue of ARO's VG-Relation, where web CLIPs (and our base) sit near chance
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
