"""Procedural drawing: glyphs, shapes, colours and backgrounds behind the pretraining corpus and the offline stream.

Two consumers share these primitives so their vocabularies agree word for word, while their *images* differ:

- `igsp.pretrain.corpus` (the image-caption corpus a small CLIP is pretrained on) draws glyphs in Aileron, the
  scalable font Pillow ships (`ImageFont.load_default(size=...)`, Pillow >= 10.1 with FreeType), shapes as clean
  polygons, on procedural backgrounds (plain, gradient, stripes, checkers, dots, smooth noise).
- `igsp.data.offline_mtil` (the continual stream) draws glyphs in Pillow's *other* built-in font (the 6x11 bitmap
  font of `ImageFont.load_default_imagefont()`, a different typeface, upscaled to a pixel look), shapes with
  hand-drawn jitter, on crops of real photographs (the two bundled with scikit-learn), and uses real handwriting
  (scikit-learn's digits).

No system font is used anywhere: CI machines may have none, and a corpus that depends on what is installed would
not be reproducible. Everything is drawn from explicit seeds (`random.Random` for discrete and geometric choices,
`numpy.random.Generator` (PCG64) for pixel noise), so an image is a pure function of its seed. Pillow's rasterizer
(FreeType for Aileron) may differ by a grey level at some edge pixels between Pillow/FreeType versions; the corpus
version (`igsp.pretrain.corpus.CORPUS_VERSION`) is tied to this code, not to the exact pixels.

Conventions: masks are numpy float32 `(S, S)` in [0, 1]; images numpy float32 `(3, S, S)` in [0, 1] (RGB) before the
CLIP normalisation, which the datasets apply last to whole stacks (`normalise`, torch). numpy, not torch, for the
per-image work: at 32x32 an op costs ~1 us in numpy and ~8 us in torch, which made drawing 3x slower (0.9 ms vs
0.3 ms an image, measured on this project's 2-core machine) and pretraining reads ~1,000 images a second.
"""

from __future__ import annotations

import colorsys
import functools
import math
import random
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DIGITS",
    "LETTERS",
    "SHAPES",
    "aileron_glyph",
    "background",
    "composite",
    "glyph_mask",
    "jitter_colour",
    "luminance",
    "normalise",
    "photo_background",
    "pixel_glyph",
    "shape_mask",
    "shape_polygon",
]

# Ten colour names with well separated hues (and white, brown for value/saturation); RGB in [0, 1]. A text tower
# learns these words from the corpus; the stream's `colours` task asks for them.
COLOURS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (0.86, 0.12, 0.12)),
    ("orange", (0.96, 0.51, 0.08)),
    ("yellow", (0.94, 0.86, 0.12)),
    ("green", (0.16, 0.67, 0.20)),
    ("cyan", (0.12, 0.78, 0.82)),
    ("blue", (0.12, 0.27, 0.86)),
    ("purple", (0.55, 0.20, 0.78)),
    ("pink", (0.96, 0.47, 0.71)),
    ("white", (0.94, 0.94, 0.94)),
    ("brown", (0.50, 0.30, 0.12)),
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart", "arrow",
                           "moon")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
LETTERS: tuple[str, ...] = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checkers", "dots", "noise")

# Glyphs are rasterised once at this pixel height and then resampled per image (an affine transform of a cached
# bitmap costs ~30 us; rasterising the glyph again at every size and stroke would cost ~5x that).
_GLYPH_HEIGHT = 96


def luminance(rgb: Sequence[float]) -> float:
    """Rec. 601 luma of an RGB triple in [0, 1]."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def jitter_colour(rgb: Sequence[float], rng: random.Random, amount: float = 0.05) -> tuple[float, float, float]:
    """A per-image variant of a palette colour: brightness x U(0.85, 1.05) and per-channel N(0, amount).

    0.05 keeps every variant nearer its own palette entry than any other (the closest pair, orange and yellow,
    differ by 0.35 in green), so a colour name stays a well-defined label.
    """
    b = rng.uniform(0.85, 1.05)
    return tuple(min(1.0, max(0.0, b * c + rng.gauss(0.0, amount))) for c in rgb)  # type: ignore[return-value]


def background_colours(subject: Sequence[float], rng: random.Random) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Two background colours that contrast with `subject`: desaturated (saturation <= 0.35, so no background
    reads as a colour name) with a luma at least 0.3 away from the subject's (dark behind bright subjects, light
    behind dark ones, either where both fit). The second colour is the first shifted by a little luma (textures
    stay low-contrast so the subject stays the salient thing)."""
    ls = luminance(subject)
    options = []
    if ls >= 0.4:
        options.append((0.0, ls - 0.35))
    if ls <= 0.6:
        options.append((ls + 0.35, 1.0))
    lo, hi = rng.choice(options)
    hi = max(lo, min(hi, 0.95))
    value = rng.uniform(lo, hi)
    hue, sat = rng.random(), rng.uniform(0.0, 0.35)

    def make(v: float) -> tuple[float, ...]:
        r, g, b = colorsys.hsv_to_rgb(hue, sat, 1.0)
        scale = v / max(luminance((r, g, b)), 1e-6)
        return tuple(min(1.0, c * scale) for c in (r, g, b))

    delta = rng.uniform(0.08, 0.18) * (1 if value < 0.5 else -1)
    return make(value), make(min(1.0, max(0.0, value + delta)))


# ------------------------------------------------------------------------------------------------ shapes
def shape_polygon(name: str, rotation: float = 0.0) -> list[tuple[float, float]]:
    """The outline of shape `name` as polygon vertices in unit coordinates (the shape fits the circle of radius 1
    around (0, 0); y points down), rotated by `rotation` degrees."""
    pts: list[tuple[float, float]]
    if name == "circle":
        pts = [(math.cos(2 * math.pi * i / 48), math.sin(2 * math.pi * i / 48)) for i in range(48)]
    elif name == "square":
        pts = [(0.72 * sx, 0.72 * sy) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    elif name == "triangle":
        pts = [(math.cos(math.radians(-90 + 120 * i)), 0.12 + math.sin(math.radians(-90 + 120 * i)))
               for i in range(3)]
    elif name == "star":
        pts = [((1.0 if i % 2 == 0 else 0.42) * math.cos(math.radians(-90 + 36 * i)),
                (1.0 if i % 2 == 0 else 0.42) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)]
    elif name == "cross":
        a, w = 0.95, 0.3
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w),
               (-w, -w)]
    elif name == "diamond":
        # Narrower than a square turned 45 degrees (0.6 : 1), so the two stay distinct under small rotations.
        pts = [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    elif name == "hexagon":
        pts = [(math.cos(math.radians(60 * i)), math.sin(math.radians(60 * i))) for i in range(6)]
    elif name == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -(y + 2.5) / 17.0))
    elif name == "arrow":
        pts = [(-1.0, -0.22), (0.15, -0.22), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6), (0.15, 0.22), (-1.0, 0.22)]
    elif name == "moon":
        # Crescent: the unit circle minus a circle of radius 0.85 centred at (0.45, 0).
        r2, d = 0.85, 0.45
        x = (1.0 - r2 * r2 + d * d) / (2 * d)
        y = math.sqrt(max(0.0, 1.0 - x * x))
        t1 = math.atan2(y, x)
        p1 = math.atan2(y, x - d)
        outer = [t1 + (2 * math.pi - 2 * t1) * i / 32 for i in range(33)]
        inner = [-p1 - (2 * math.pi - 2 * p1) * i / 32 for i in range(33)]
        pts = [(math.cos(t), math.sin(t)) for t in outer] + [(d + r2 * math.cos(p), r2 * math.sin(p)) for p in inner]
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {name!r}")
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(c * x - s * y, s * x + c * y) for x, y in pts]


def _jittered(points: list[tuple[float, float]], rng: random.Random, amount: float) -> list[tuple[float, float]]:
    """A hand-drawn version of a closed polygon: every edge split into pieces, each vertex moved by N(0, amount)."""
    out = []
    n = len(points)
    for i in range(n):
        (x0, y0), (x1, y1) = points[i], points[(i + 1) % n]
        pieces = max(1, int(math.hypot(x1 - x0, y1 - y0) / 0.25))
        for k in range(pieces):
            f = k / pieces
            out.append((x0 + f * (x1 - x0) + rng.gauss(0, amount), y0 + f * (y1 - y0) + rng.gauss(0, amount)))
    return out


def shape_mask(name: str, size: int, *, cx: float, cy: float, radius: float, rotation: float = 0.0,
               outline: float = 0.0, jitter: float = 0.0, rng: random.Random | None = None) -> np.ndarray:
    """Coverage mask `(size, size)` in [0, 1] of one shape.

    Args:
        name: one of SHAPES.
        size: output side S.
        cx, cy: centre in units of the image side (0..1).
        radius: circumradius in units of the image side.
        rotation: degrees.
        outline: 0 = filled; > 0 = an outline of this width (units of the image side).
        jitter: hand-drawn vertex noise (units of the radius; needs `rng`).
    Drawn at 4x and box-filtered down, so edges are anti-aliased like the glyphs.
    """
    from PIL import Image, ImageDraw

    up = 4 * size
    pts = shape_polygon(name, rotation)
    if jitter > 0:
        if rng is None:
            raise ValueError("shape_mask: jitter > 0 needs rng")
        pts = _jittered(pts, rng, jitter)
    xy = [(up * (cx + radius * x), up * (cy + radius * y)) for x, y in pts]
    img = Image.new("L", (up, up), 0)
    draw = ImageDraw.Draw(img)
    if outline > 0:
        draw.line([*xy, xy[0], xy[1]], fill=255, width=max(1, round(outline * up)), joint="curve")
    else:
        draw.polygon(xy, fill=255)
    return _to_mask(img.resize((size, size), Image.BOX))


def _to_mask(img: object) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


# ------------------------------------------------------------------------------------------------ glyphs
@functools.lru_cache(maxsize=256)
def aileron_glyph(char: str, stroke: int = 0) -> tuple[int, int, bytes]:
    """`char` rasterised in Aileron (Pillow's scalable default font) at ~96 px, cropped to its ink:
    (width, height, 8-bit coverage bytes). `stroke` > 0 thickens it (Pillow's stroke, in pixels at 96 px)."""
    from PIL import Image, ImageDraw, ImageFont, features

    if not features.check("freetype2"):  # pragma: no cover - every Pillow wheel ships FreeType
        raise RuntimeError("the corpus glyphs need Pillow with FreeType (ImageFont.load_default(size=...))")
    font = ImageFont.load_default(size=_GLYPH_HEIGHT)
    box = font.getbbox(char, stroke_width=stroke)
    w, h = box[2] - box[0] + 2, box[3] - box[1] + 2
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).text((1 - box[0], 1 - box[1]), char, font=font, fill=255, stroke_width=stroke,
                             stroke_fill=255)
    return w, h, img.tobytes()


@functools.lru_cache(maxsize=256)
def pixel_glyph(char: str) -> tuple[int, int, bytes]:
    """`char` in Pillow's built-in bitmap font (`load_default_imagefont()`, ~5x7 px glyphs in a 6x11 cell),
    cropped to its ink: (width, height, 8-bit bytes). A different typeface from Aileron, with square pixels."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont()
    box = font.getbbox(char)
    img = Image.new("L", (box[2] + 2, box[3] + 2), 0)
    ImageDraw.Draw(img).text((1, 1), char, font=font, fill=255)
    bbox = img.getbbox()
    if bbox is None:  # pragma: no cover - every digit and capital has ink
        raise ValueError(f"pixel_glyph: {char!r} has no ink in the bitmap font")
    img = img.crop(bbox)
    return img.width, img.height, img.tobytes()


def glyph_mask(glyph: tuple[int, int, bytes], size: int, *, cx: float, cy: float, height: float,
               rotation: float = 0.0, shear: float = 0.0, aspect: float = 1.0, smooth: bool = True) -> np.ndarray:
    """Coverage mask `(size, size)` of a cropped glyph bitmap placed by an affine map.

    Args:
        glyph: (width, height, bytes) from `aileron_glyph` or `pixel_glyph`.
        size: output side S.
        cx, cy: where the glyph's centre lands (units of the image side).
        height: the glyph's height (units of the image side); width follows its own aspect times `aspect`.
        rotation: degrees; shear: horizontal shear factor (italic-like slant, x += shear * y).
        smooth: bilinear resampling (False: nearest, which keeps a bitmap font's square pixels).
    Rendered at 2x and box-filtered down (anti-aliasing).
    """
    from PIL import Image

    gw, gh, data = glyph
    src = Image.frombytes("L", (gw, gh), data)
    up = 2 * size
    k = height * up / gh  # glyph pixels -> output pixels
    sx, sy = k * aspect, k
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    # Forward map (glyph-centred coords u, v) -> output: [x; y] = R @ Shear @ Scale @ [u; v] + t.
    a11, a12 = sx, shear * sy
    a21, a22 = 0.0, sy
    m11, m12 = c * a11 - s * a21, c * a12 - s * a22
    m21, m22 = s * a11 + c * a21, s * a12 + c * a22
    det = m11 * m22 - m12 * m21
    i11, i12, i21, i22 = m22 / det, -m12 / det, -m21 / det, m11 / det
    tx, ty = cx * up, cy * up
    # PIL wants the inverse: output (x, y) -> source (u + gw/2, v + gh/2).
    coeffs = (i11, i12, -(i11 * tx + i12 * ty) + gw / 2, i21, i22, -(i21 * tx + i22 * ty) + gh / 2)
    resample = Image.BILINEAR if smooth else Image.NEAREST
    img = src.transform((up, up), Image.AFFINE, coeffs, resample=resample, fillcolor=0)
    return _to_mask(img.resize((size, size), Image.BOX))


def low_resolution(mask: np.ndarray, side: int = 8, levels: int = 16) -> np.ndarray:
    """The mask as an 8x8, 16-grey-level scan would show it, blown back up (bilinear): the look of
    scikit-learn's digits, so a glyph seen at that resolution is not out of distribution for the corpus model."""
    from PIL import Image

    s = mask.shape[-1]
    small = np.asarray(Image.fromarray(mask, mode="F").resize((side, side), Image.BOX))
    small = np.round(small * (levels - 1)) / (levels - 1)
    big = np.asarray(Image.fromarray(small.astype(np.float32), mode="F").resize((s, s), Image.BILINEAR))
    return np.clip(big, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------- backgrounds
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return yy, xx


def background(kind: str, size: int, c1: Sequence[float], c2: Sequence[float], rng: random.Random) -> np.ndarray:
    """A procedural background `(3, size, size)` in [0, 1] mixing colours `c1` and `c2`.

    kind: "plain" (c1), "gradient" (c1 -> c2 along a random direction), "stripes" (random angle, period 3-8 px),
    "checkers" (cells of 3-8 px, random offset), "dots" (a grid of c2 dots on c1), "noise" (smooth random field,
    a 3x3 to 6x6 grid of U(0, 1) upsampled bicubically).
    """
    from PIL import Image

    a = np.asarray(c1, dtype=np.float32).reshape(3, 1, 1)
    b = np.asarray(c2, dtype=np.float32).reshape(3, 1, 1)
    if kind == "plain":
        return np.broadcast_to(a, (3, size, size)).copy()
    yy, xx = _grid(size)
    if kind == "gradient":
        th = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(th) + yy * math.sin(th)
        t = (t - t.min()) / (t.max() - t.min())
    elif kind == "stripes":
        th, period, phase = rng.uniform(0, math.pi), rng.uniform(3.0, 8.0), rng.uniform(0, 2 * math.pi)
        t = (np.sin(2 * math.pi * (xx * math.cos(th) + yy * math.sin(th)) / period + phase) > 0).astype(np.float32)
    elif kind == "checkers":
        cell, ox, oy = rng.randint(3, 8), rng.randint(0, 7), rng.randint(0, 7)
        t = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(np.float32)
    elif kind == "dots":
        step, radius = rng.uniform(4.0, 8.0), rng.uniform(0.9, 1.8)
        ox, oy = rng.uniform(0, step), rng.uniform(0, step)
        dx = np.remainder(xx + ox, step) - step / 2
        dy = np.remainder(yy + oy, step) - step / 2
        t = (dx * dx + dy * dy <= radius * radius).astype(np.float32)
    elif kind == "noise":
        grid = rng.randint(3, 6)
        field = np.asarray([rng.random() for _ in range(grid * grid)], dtype=np.float32).reshape(grid, grid)
        t = np.clip(np.asarray(Image.fromarray(field, mode="F").resize((size, size), Image.BICUBIC)), 0.0, 1.0)
    else:
        raise ValueError(f"background kind must be one of {BACKGROUNDS}, got {kind!r}")
    return (a + (b - a) * t[None]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _sample_photos() -> tuple[object, ...]:
    """scikit-learn's two bundled photographs (china.jpg, flower.jpg, 640x427) as PIL RGB images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(np.ascontiguousarray(im)) for im in load_sample_images().images)


def photo_background(size: int, subject: Sequence[float], rng: random.Random) -> np.ndarray:
    """A random crop (48-160 px square) of one of scikit-learn's two bundled photographs, resized to `size`,
    desaturated to 40% and pushed to a luma range that contrasts with `subject` (as `background_colours`): a
    real-image background no corpus image has."""
    from PIL import Image

    photos = _sample_photos()
    photo = photos[rng.randrange(len(photos))]
    w, h = photo.size
    side = rng.randint(48, 160)
    y, x = rng.randint(0, h - side), rng.randint(0, w - side)
    crop = photo.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))
    crop = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    grey = (0.299 * crop[0] + 0.587 * crop[1] + 0.114 * crop[2])[None]
    crop = grey + 0.4 * (crop - grey)
    lo, hi = (0.0, 0.3) if luminance(subject) >= 0.55 else (0.7, 1.0)
    g_lo, g_hi = float(grey.min()), float(grey.max())
    crop = lo + (crop - g_lo) * (hi - lo) / max(g_hi - g_lo, 1e-3)
    return np.clip(crop, 0.0, 1.0).astype(np.float32)


def composite(mask: np.ndarray, colour: Sequence[float], back: np.ndarray) -> np.ndarray:
    """`back * (1 - mask) + colour * mask`: a subject of one colour over a background, `(3, S, S)`."""
    c = np.asarray(colour, dtype=np.float32).reshape(3, 1, 1)
    m = mask[None]
    return (back * (1.0 - m) + c * m).astype(np.float32)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`(images - mean) / std` per channel; images `(..., 3, H, W)` in [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (images - m) / s
