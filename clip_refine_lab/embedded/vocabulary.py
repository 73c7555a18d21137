"""The words and values of the embedded world: shapes, colours, sizes, positions, backgrounds, relations.

Public so that tests and analyses can parse captions back into claims about a scene. The first word of
each synonym tuple is the canonical one (the class name where a task asks about that attribute).
"""

from __future__ import annotations

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

#: Each relation word's opposite ("to the left of" -> "to the right of"), for
#: :func:`~clip_refine_lab.embedded.captions.relation_swapped`.
OPPOSITE_RELATION_WORDS: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "over": "under",
    "below": "above", "under": "over", "beneath": "above",
}

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
#: Openings of the caption of a sketch-style web image.
SKETCH_PREFIXES: tuple[str, ...] = ("a sketch of", "a drawing of", "a line drawing of", "an outline drawing of")


#: The relations on the other axis, in the order a cross-axis negative tries them ("left of" -> "above", else
#: "below").
CROSS_AXIS_RELATIONS: dict[str, tuple[str, str]] = {
    "left": ("above", "below"), "right": ("below", "above"), "above": ("left", "right"), "below": ("right", "left"),
}

#: Image styles: the normal rendering and the domain shifts of the test sets (and of some web images).
STYLES: tuple[str, ...] = ("normal", "sketch", "noise", "palette")

def relation_holds(relation: str, a: dict, b: dict) -> bool:
    """Whether ``a <relation> b`` holds for two objects of a scene (grid cells (row, col))."""
    (ra, ca), (rb, cb) = a["cell"], b["cell"]
    return {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[relation]
