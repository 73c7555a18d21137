"""Scenes of the embedded world: 1-3 objects on a 3x3 grid, as JSON-serialisable metadata.

A scene says what an image shows (:mod:`.rendering` draws it, :mod:`.captions` describes it):
``{"background", "objects": [{shape, colour, size, cell: [row, col], centre: [x, y], bbox: [x0, y0, x1, y1]}]}``
in pixel coordinates of the image size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .vocabulary import BACKGROUNDS, CELLS, COLOUR_NAMES, SHAPES, SIZE_RANGES, SIZES

#: Scenes of 1, 2 and 3 objects: with most scenes holding one object, a caption that says where *the* object
#: is teaches the position words without first binding them to one of several objects.
N_OBJECTS_PROBS: tuple[float, float, float] = (0.6, 0.25, 0.15)


def choose(rng: np.random.Generator, seq: Sequence):
    """One element of ``seq``, uniformly (one integer draw from ``rng``)."""
    return seq[int(rng.integers(len(seq)))]


def _geometry(rng: np.random.Generator, size: str, cell: tuple[int, int], image_size: int) -> dict:
    """Centre and bounding box of an object of ``size`` in ``cell``, jittered within the cell."""
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


def make_scene(rng: np.random.Generator, image_size: int, objects: Sequence[dict],
               background: str | None = None) -> dict:
    """A scene of ``image_size`` pixels with the given (partial) objects: missing shape/colour/size/cell are
    drawn at random.

    Cells given by the caller are kept; the others are drawn from the free cells (one object per
    cell, so objects never overlap).
    """
    if len(objects) > len(CELLS):
        raise ValueError("at most 9 objects fit on the 3x3 grid")
    bg = background if background is not None else choose(rng, BACKGROUNDS)
    taken = {tuple(o["cell"]) for o in objects if o.get("cell") is not None}
    free = [c for c in CELLS if c not in taken]
    order = rng.permutation(len(free))
    k = 0
    out = []
    for spec in objects:
        shape = spec.get("shape") or choose(rng, SHAPES)
        colour = spec.get("colour") or choose(rng, COLOUR_NAMES)
        size = spec.get("size") or choose(rng, SIZES)
        if spec.get("cell") is not None:
            cell = tuple(int(v) for v in spec["cell"])
        else:
            cell = free[int(order[k])]
            k += 1
        obj = {"shape": shape, "colour": colour, "size": size, "cell": [int(cell[0]), int(cell[1])]}
        obj.update(_geometry(rng, size, cell, image_size))
        out.append(obj)
    return {"background": bg, "objects": out}


def generate_scene(rng: np.random.Generator, image_size: int, *, n_objects: int | None = None,
                   background: str | None = None) -> dict:
    """A random scene of ``image_size`` pixels: 1-3 objects (:data:`N_OBJECTS_PROBS`) unless ``n_objects``
    is given."""
    n = n_objects if n_objects is not None else int(rng.choice(3, p=N_OBJECTS_PROBS)) + 1
    return make_scene(rng, image_size, [{} for _ in range(n)], background)
