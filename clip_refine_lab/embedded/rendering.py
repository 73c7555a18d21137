"""Rendering scenes of the embedded world to RGB images with PIL and numpy.

Objects are drawn as masks at :data:`SUPERSAMPLE` times the size and box-filtered down (anti-aliasing),
then coloured over a grey texture. The styles (``sketch``, ``noise``, ``palette``) are the test sets'
domain shifts; a scene's ``tint``/``contrast`` are the web's washed-out photos.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .vocabulary import BACKGROUNDS, COLOURS, SHAPES, STYLES

SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down (anti-aliasing)


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
    """The ``palette`` shift: hue rotated, saturation and contrast lowered, brightness moved, a tint mixed in."""
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
