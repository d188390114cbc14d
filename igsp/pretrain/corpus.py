"""The pretraining corpus: procedurally drawn images with template captions, and which captions match which images.

Every item is a pure function of `(seed, index)`: its attributes (what is drawn, in which colour, size,
style and over which background) are drawn from `random.Random` seeded with both, the image is drawn from the
attributes (igsp.data.procedural: Aileron glyphs, clean polygons, procedural backgrounds) and the caption is
composed from a random subset of the attributes with varied wording, e.g.

    "a photo of the digit 7."                    "a small red letter K."
    "an image of a green star on a striped background."      "a drawing of an odd number."
    "something blue."                            "the outline of a large heart."

An item is `(image float32 (3, S, S), caption str, attrs int64 (7,), constraint int64 (7,))` over the attribute
axes `ATTRIBUTES`; `attrs` are the image's values (-1 where an axis does not apply, e.g. parity of a letter),
`constraint` what the caption states (-1 = not stated). Caption i *matches* image j when every stated value
equals the image's: `match_matrix`. Generic captions ("a red shape", "an even number") match many images of a
batch, which is why the pretraining loss uses this matrix as its target (igsp.pretrain.train) instead of the
identity of plain CLIP.

Vocabulary: the corpus teaches exactly the words the offline stream asks with (igsp.data.offline_mtil): the
class names (digits, capital letters, `SHAPES`, `COLOURS`, even / odd) and the template words ("a photo of",
"the digit", "the number", "the letter", "a capital", "shape", "something", "the outline of", "a drawing of").
tests/pretrain checks that every token of every stream prompt occurs in corpus captions.

Version: `CORPUS_VERSION` changes whenever a change here or in igsp.data.procedural changes what an index
draws; the pretrained manifest records it, so a checkpoint is tied to the corpus it saw.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from igsp.data.base import CLIP_MEAN, CLIP_STD
from igsp.data.procedural import (
    BACKGROUNDS,
    COLOURS,
    DIGITS,
    LETTERS,
    SHAPES,
    aileron_glyph,
    background,
    background_colours,
    composite,
    glyph_mask,
    jitter_colour,
    low_resolution,
    normalise,
    shape_mask,
)

__all__ = [
    "ATTRIBUTES",
    "CORPUS_VERSION",
    "EVAL_OFFSET",
    "SUBJECTS",
    "CorpusItem",
    "caption_phrases",
    "corpus_batch",
    "corpus_item",
    "match_matrix",
]

CORPUS_VERSION = 1
ATTRIBUTES: tuple[str, ...] = ("kind", "subject", "colour", "size", "background", "parity", "style")
KINDS = ("digit", "letter", "shape")
SUBJECTS: tuple[str, ...] = DIGITS + LETTERS + SHAPES  # subject id = index here
SIZES = ("small", "medium", "large")
STYLES = ("solid", "outline")
# Indices at or above this are the held-out evaluation items: training reads index = step * batch + b, far below
# (2**40 items at any batch size), so evaluation images are never trained on.
EVAL_OFFSET = 2**40

_K, _SUBJ, _COL, _SIZE, _BG, _PAR, _STYLE = range(len(ATTRIBUTES))
_WHITE = [n for n, _ in COLOURS].index("white")
_BG_WORDS = {"plain": "plain", "gradient": "gradient", "stripes": "striped", "checkers": "checkered",
             "dots": "dotted", "noise": "noisy"}
# Share of captions that are the bare subject name ("7.", "red star."). At initialisation a text tower pools a
# caption's tokens about evenly, so "a photo of the digit 7" and "... 1" embed almost alike (cosine 0.95 after
# 77k pairs without bare names) and identity is the last thing the two towers agree on; a bare name embeds
# mostly as its own token. With 25% bare names (and the initial logit scale of 50) held-out subject accuracy
# after 600 steps of 128 pairs was 18% against 9% (logit scale 14) and 14% (scale 50, no bare names).
_BARE_SHARE = 0.25
# Share of the other captions that name the subject (the rest state only its kind, colour, parity, ...).
_IDENTITY_SHARE = 0.7
_PREFIXES = ("", "a photo of ", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "a rendering of ")


@dataclass(frozen=True)
class CorpusItem:
    """One corpus item before rendering: its attribute values, caption and what the caption states."""

    attrs: tuple[int, ...]
    caption: str
    constraint: tuple[int, ...]
    geometry: dict


def _article(word: str) -> str:
    """'a' or 'an' by the sound of the next word (letters and digits read by their names: an A, an 8, an F)."""
    first = word[0].lower()
    if len(word) == 1 and word.isalpha():
        return "an" if first in "aefhilmnorsx" else "a"
    if word.isdigit():
        return "an" if first == "8" else "a"
    return "an" if first in "aeiou" else "a"


def _rng(seed: int, index: int) -> random.Random:
    # Distinct (seed, index) pairs map to distinct integers: index < 2**48 always (EVAL_OFFSET + a few million).
    return random.Random(seed * 2**48 + index)


def _sample_attributes(rng: random.Random) -> tuple[list[int], dict]:
    """The attribute vector and the drawing geometry of one item."""
    a = [-1] * len(ATTRIBUTES)
    kind = rng.choices(range(3), weights=(0.35, 0.3, 0.35))[0]
    a[_K] = kind
    if kind == 0:
        a[_SUBJ] = rng.randrange(10)
        a[_PAR] = a[_SUBJ] % 2
    elif kind == 1:
        a[_SUBJ] = 10 + rng.randrange(26)
    else:
        a[_SUBJ] = 36 + rng.randrange(len(SHAPES))
        a[_STYLE] = 1 if rng.random() < 0.3 else 0
    # Classic white-on-black glyphs (the look of scanned digits) a quarter of the time, else any colour.
    classic = kind < 2 and rng.random() < 0.25
    a[_COL] = _WHITE if classic else rng.randrange(len(COLOURS))
    # Subjects fill half of the image or more and sit near the centre, as in the stream (glyphs 0.5-0.8 of the
    # side, shapes 0.5-0.9, scanned digits the whole 8x8 frame). A first corpus that also drew them down to 0.35
    # of the side anywhere in the image (with "on the left" captions) taught identity slowly: 13% held-out
    # subject accuracy after 500 steps of 256, while colour was at 99%.
    scale = rng.uniform(0.5, 0.95)
    a[_SIZE] = 0 if scale < 0.62 else 2 if scale > 0.84 else 1
    margin = (1.0 - scale) / 2
    cx, cy = margin * rng.uniform(-0.6, 0.6), margin * rng.uniform(-0.6, 0.6)
    a[_BG] = 0 if classic else rng.randrange(len(BACKGROUNDS))
    geom = {"cx": 0.5 + cx, "cy": 0.5 + cy, "scale": scale, "classic": classic}
    if kind < 2:
        geom.update(rotation=max(-20.0, min(20.0, rng.gauss(0.0, 8.0))), shear=rng.uniform(-0.25, 0.25),
                    aspect=rng.uniform(0.8, 1.2), stroke=rng.choice((0, 0, 2, 4)), low_res=rng.random() < 0.2)
    else:
        name = SHAPES[a[_SUBJ] - 36]
        if name in ("square", "diamond"):
            rot = rng.uniform(-12.0, 12.0)  # beyond ~20 degrees a square turns into a diamond
        elif name == "arrow":
            rot = rng.choice((0.0, 90.0, 180.0, 270.0)) + rng.uniform(-15.0, 15.0)
        elif name == "moon":
            rot = rng.uniform(0.0, 360.0)
        else:
            rot = rng.uniform(-25.0, 25.0)
        geom.update(rotation=rot, outline=rng.uniform(0.04, 0.1) if a[_STYLE] == 1 else 0.0)
    geom["noise"] = rng.uniform(0.0, 0.04) if rng.random() < 0.5 else 0.0
    return a, geom


def _caption(a: list[int], rng: random.Random) -> tuple[str, list[int]]:
    """A caption stating a random subset of the attributes, and the constraint vector of what it states."""
    c = [-1] * len(ATTRIBUTES)
    kind = a[_K]
    colour = COLOURS[a[_COL]][0]
    adjs: list[str] = []  # before the head noun, in order
    post: list[str] = []  # trailing phrases, shuffled
    outline_of = False  # "the outline of a star" instead of "a star"

    def state(axis: int) -> None:
        c[axis] = a[axis]

    if rng.random() < _BARE_SHARE:  # the bare name, perhaps with the colour: "7.", "red star."
        state(_SUBJ)
        state(_K)
        words = [SUBJECTS[a[_SUBJ]]]
        if rng.random() < 0.3:
            state(_COL)
            words.insert(0, colour)
        return " ".join(words) + ".", c

    if a[_SIZE] != 1 and rng.random() < 0.3:
        state(_SIZE)
        adjs.append(rng.choice(("small", "tiny") if a[_SIZE] == 0 else ("large", "big")))
    colour_mode = rng.random()
    if colour_mode < 0.35:
        state(_COL)
        adjs.append(colour)
    elif colour_mode < 0.5:
        state(_COL)
        post.append(rng.choice((f"in {colour}", f"coloured {colour}")))

    identity = rng.random() < _IDENTITY_SHARE
    if identity:
        state(_SUBJ)
        state(_K)  # implied by the subject; stated so that it compares equal with generic captions of the kind
        name = SUBJECTS[a[_SUBJ]]
        if kind == 0:
            head = rng.choice((f"digit {name}", f"number {name}", name, f"numeral {name}"))
        elif kind == 1:
            head = rng.choice((f"letter {name}", f"capital {name}", name, f"uppercase {name}"))
        else:
            head = rng.choice((name, name, f"{name} shape"))
            if a[_STYLE] == 1 and rng.random() < 0.7:
                state(_STYLE)
                if rng.random() < 0.5:
                    outline_of = True
                else:
                    adjs.append("outlined")
            elif a[_STYLE] == 0 and rng.random() < 0.2:
                state(_STYLE)
                adjs.append(rng.choice(("solid", "filled")))
        if kind == 0 and rng.random() < 0.25:
            state(_PAR)
            word = "even" if a[_PAR] == 0 else "odd"
            post.append(rng.choice((f"an {word} number", f"which is {word}")))
    else:
        mode = rng.random()
        if kind == 0 and mode < 0.35:  # "an odd number", "a small even digit"
            state(_PAR)
            state(_K)
            adjs.append("even" if a[_PAR] == 0 else "odd")
            head = rng.choice(("number", "digit"))
        elif mode < 0.8 or c[_COL] < 0:  # the kind: "a red letter", "an outlined shape"
            state(_K)
            head = {0: rng.choice(("digit", "number", "numeral")), 1: rng.choice(("letter", "capital letter")),
                    2: rng.choice(("shape", "figure"))}[kind]
            if kind == 2 and a[_STYLE] == 1 and rng.random() < 0.5:
                state(_STYLE)
                adjs.append("outlined")
        else:  # the colour only: "a red thing", "something red"
            head = "thing"
            if adjs and adjs[-1] == colour and rng.random() < 0.5:
                adjs.pop()
                head = f"something {colour}"

    if rng.random() < 0.25:
        state(_BG)
        post.append(f"on a {_BG_WORDS[BACKGROUNDS[a[_BG]]]} background")

    words = " ".join([*adjs, head])
    if head.startswith("something"):
        phrase = words
    elif outline_of:
        phrase = f"the outline of {_article(words)} {words}"
    elif identity and not adjs and head != SUBJECTS[a[_SUBJ]] and rng.random() < 0.5:
        phrase = f"the {words}"  # "the digit 7", "the letter K", "the star shape"
    else:
        phrase = f"{_article(words)} {words}"
    rng.shuffle(post)
    text = rng.choice(_PREFIXES) + phrase
    for i, p in enumerate(post):
        text += ("," if p.startswith(("an ", "which")) or (i > 0 and rng.random() < 0.5) else "") + " " + p
    return text + ".", c


def caption_phrases() -> list[str]:
    """Every word the caption generator can emit, as phrases (the text tower's vocabulary is their tokens).

    Kept next to `_caption` and built from the same constants; tests/pretrain checks that the tokens of
    thousands of sampled captions all occur in the tokens of these phrases.
    """
    words = [*SUBJECTS, *(name for name, _ in COLOURS), *_BG_WORDS.values(), *(p for p in _PREFIXES if p)]
    words += ["a", "an", "the", "digit", "number", "numeral", "letter", "capital", "uppercase", "shape", "figure",
              "thing", "something", "outline of", "outlined", "solid", "filled", "small", "tiny", "large", "big",
              "in", "coloured", "even", "odd", "which is", "on a background", ".", ","]
    return words


def corpus_item(seed: int, index: int) -> CorpusItem:
    """Attributes, caption and geometry of item `index` of the corpus of `seed` (no pixels yet)."""
    rng = _rng(seed, index)
    attrs, geom = _sample_attributes(rng)
    text, constraint = _caption(attrs, rng)
    geom["rng_state"] = rng.getstate()
    return CorpusItem(tuple(attrs), text, tuple(constraint), geom)


def _render(item: CorpusItem, image_size: int, seed: int, index: int) -> np.ndarray:
    """The image of an item, numpy float32 `(3, S, S)` in [0, 1]."""
    a, g = item.attrs, item.geometry
    rng = random.Random()
    rng.setstate(g["rng_state"])
    colour = jitter_colour(COLOURS[a[_COL]][1], rng)
    if a[_K] < 2:
        glyph = aileron_glyph(SUBJECTS[a[_SUBJ]], g["stroke"])
        mask = glyph_mask(glyph, image_size, cx=g["cx"], cy=g["cy"], height=g["scale"], rotation=g["rotation"],
                          shear=g["shear"], aspect=g["aspect"])
        if g["low_res"]:
            mask = low_resolution(mask)
    else:
        mask = shape_mask(SHAPES[a[_SUBJ] - 36], image_size, cx=g["cx"], cy=g["cy"], radius=g["scale"] / 2,
                          rotation=g["rotation"], outline=g["outline"])
    if g["classic"]:
        back = np.zeros((3, image_size, image_size), dtype=np.float32)
    else:
        c1, c2 = background_colours(colour, rng)
        back = background(BACKGROUNDS[a[_BG]], image_size, c1, c2, rng)
    img = composite(mask, colour, back)
    if g["noise"] > 0:
        noise = np.random.default_rng([seed, index]).standard_normal(img.shape, dtype=np.float32)
        img = img + np.float32(g["noise"]) * noise
    return np.clip(img, 0.0, 1.0)


def corpus_batch(
    seed: int,
    indices: Sequence[int],
    image_size: int = 32,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """Items `indices` of the corpus of `seed`.

    Returns:
        images float32 `(B, 3, S, S)` normalised with mean/std; captions (B strings); attrs int64 `(B, 7)`;
        constraints int64 `(B, 7)` (axes `ATTRIBUTES`, -1 = not applicable / not stated).
    """
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if any(i < 0 for i in indices):
        raise ValueError(f"indices must be >= 0, got min {min(indices)}")
    items = [corpus_item(seed, i) for i in indices]
    images = torch.from_numpy(np.stack([_render(it, image_size, seed, i) for it, i in zip(items, indices)]))
    attrs = torch.tensor([it.attrs for it in items], dtype=torch.int64).view(-1, len(ATTRIBUTES))
    cons = torch.tensor([it.constraint for it in items], dtype=torch.int64).view(-1, len(ATTRIBUTES))
    return normalise(images, mean, std), [it.caption for it in items], attrs, cons


def match_matrix(constraints: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """bool `(Bc, Bi)`: caption i matches image j when every value caption i states equals image j's.

    Args:
        constraints: int64 `(Bc, A)`, -1 = not stated.
        attrs: int64 `(Bi, A)`.
    A caption always matches its own image (diagonal True when both come from the same items).
    """
    if constraints.dim() != 2 or attrs.dim() != 2 or constraints.shape[1] != attrs.shape[1]:
        raise ValueError(f"constraints (Bc, A) and attrs (Bi, A) must share A, got {tuple(constraints.shape)} "
                         f"and {tuple(attrs.shape)}")
    c = constraints[:, None, :]
    return ((c < 0) | (c == attrs[None, :, :])).all(dim=-1)
