"""Captions of embedded-world scenes, and the hard negatives made from them.

Captions are built from templates and the synonyms of :mod:`.vocabulary`: every caption is true of its
scene. :func:`describe` gives web alt-text (``full`` or ``partial``), :func:`caption_set` COCO-style
sets of five, :func:`sketch_caption` the colourless alt-text of a line drawing. The ``relation_*``
functions turn a caption that names a relation into one that is false of the scene (pre-training's
hard negatives).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from .scenes import choose
from .vocabulary import (BACKGROUND_WORDS, CAPTION_PREFIXES, COLOUR_WORDS, COUNT_WORDS, CROSS_AXIS_RELATIONS,
                         GENERIC_NOUNS, OPPOSITE_RELATION_WORDS, POSITION_WORDS, RELATION_WORDS, SHAPE_WORDS,
                         SIZE_WORDS, SKETCH_PREFIXES, relation_holds)

MAX_CAPTION_WORDS = 20

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
    return f"{choose(rng, ('in the', 'at the'))} {word}"


def _background_phrase(rng: np.random.Generator, scene: dict) -> str:
    return f"{choose(rng, ('on a', 'on a', 'against a'))} {_pick(rng, BACKGROUND_WORDS[scene['background']])}"


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
        text = f"{choose(rng, CAPTION_PREFIXES)} {text}"
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
    # total count first (10 %), background first (10 %).
    style = rng.random()
    m = len(units)

    if m >= 2 and len(singular) >= 2 and style < 0.35:
        # relation between two single objects: "a red circle left of a blue star[, and a green box]"
        a, b = singular[0], singular[1]
        rel = choose(rng, _valid_relations(a["obj"], b["obj"]))
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

    Two attributes, not one: in a batch of 256 a one-attribute caption ("a star", "blue", "something in
    the centre") is true of about 50 other images, and as their negative it pushes every one of them away
    from what it says. Two attributes leave a handful of such false negatives, as terse web alt-text does
    in a web-scale batch, and each attribute still narrows the match.
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
        forms.append(lambda: f"{_article(shape_word(a))} {_pick(rng, RELATION_WORDS[choose(rng, _valid_relations(a, b))])} "
                             f"{_article(shape_word(b))}")                                # "a star above a ring"
        forms.append(lambda: f"{_article(colour_word(a))} {shape_word(a)} and "
                             f"{_article(colour_word(b))} {shape_word(b)}")               # "a red star and a blue ring"
    text = forms[int(rng.integers(len(forms)))]()
    return _finish(rng, text, allow_prefix=text.startswith(("a ", "an ")))


def sketch_caption(scene: dict, rng: np.random.Generator, prefixes: Sequence[str] = SKETCH_PREFIXES) -> str:
    """The alt-text of ``scene`` drawn as a sketch: every object's shape, counts and often positions, no colour,
    size or background (a line drawing shows none of them reliably).

    "a sketch of two circles and a star in the top left", "a drawing of three shapes: a ring, a cross and a
    star". Groups objects by shape, so a count ("two circles") is exact. With ``prefixes=()`` it is the
    alt-text of a recoloured web image, whose colours no longer match their names: no style words, and the
    openings of ordinary captions ("a photo of") as often as theirs: with style words ("a filtered photo
    of") the base matches recoloured images by those words and puts every shape-palette image in one class.
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
        text = (_finish(rng, f"{choose(rng, prefixes)} {text}", allow_prefix=False) if prefixes
                else _finish(rng, text))
        if len(text.split()) <= MAX_CAPTION_WORDS:
            return text
        p_pos *= 0.5
    return f"{choose(rng, prefixes)} {_total_phrase(rng, len(objs))}" if prefixes else _total_phrase(rng, len(objs))


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
#: Web captions name positions often (0.9): at 0.6 the base model's position accuracy stays at chance.
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


def untinted_words_removed(caption: str) -> str:
    """A caption of a scene on a tinted plain background: it is no longer grey (the same words otherwise, so
    the caption rng is drawn as for any other caption)."""
    return caption.replace("plain grey background", "plain background").replace("grey background", "plain background")


# ---------------------------------------------------------------------------------- hard negatives
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
    axis) this contrasts the two axes, which the base model's image features do not separate linearly
    (``benchmarks/base_diagnostics.py``).
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
