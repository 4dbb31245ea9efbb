"""Draw shapes-world prompts: random valid geometry, flat colours, exact pixels.

The pipeline is   prompt --apply_flaws--> DrawSpec --layout--> [SceneObject] --draw--> image.
A correct renderer is `render`; an embedded teacher is `teacher_render`, which
first lets its flaw profile corrupt what gets drawn. Everything is
deterministic in its arguments (rngs come from sha256 of the inputs, never
from Python's salted hash()), so an image can always be drawn again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from evolve.config import FlawProfile
from evolve.images import PNG_MAGIC, from_png, to_png  # noqa: F401 - PNG helpers, re-exported
from evolve.shapes.grammar import COLORS, COUNTS, SHAPES, Prompt, parse

# Geometry. The spec asks for >= 1 background pixel between bounding boxes and
# a 0.05 S margin for relations; we draw with more so that correct images stay
# correct under the blur and noise of a student that imitates them.
GAP = 2
POSITION_MARGIN = 0.15
MAX_TRIES = 200

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class SceneObject:
    """One object to draw: its bounding box is centred at (cx, cy) with half side r (pixels)."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float

    def box(self) -> tuple[int, int, int]:
        """(x0, y0, side) of the pixel box that `draw` fills."""
        side = max(1, _round(2 * self.r))
        return _round(self.cx - self.r), _round(self.cy - self.r), side


@dataclass(frozen=True)
class DrawSpec:
    """What a renderer draws: like a Prompt's parts but free of the grammar's
    constraints, because a flawed teacher may draw scenes no prompt describes
    (two circles for "a circle and a square"). colors[i] None = pick at random."""

    shapes: tuple[str, ...]
    colors: tuple[str | None, ...]
    relation: str | None = None

    @classmethod
    def of(cls, prompt: Prompt) -> "DrawSpec":
        return cls(prompt.shapes, prompt.colors, prompt.relation)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up, unlike round()'s half-to-even


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def _as_prompt(prompt: Prompt | str) -> Prompt:
    return prompt if isinstance(prompt, Prompt) else parse(prompt)


# -- shapes as pixel masks ---------------------------------------------------------

@lru_cache(maxsize=4096)
def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of `shape` filling a w x h box. Each shape touches all
    four sides of its box, so the drawn bounding box is the intended one.
    Integer arithmetic on pixel centres keeps it exact (no float ties)."""
    x2 = 2 * np.arange(w)[None, :] + 1 - w  # 2 * (pixel centre - box centre)
    y = np.arange(h)[:, None]
    if shape == "square":
        m = np.ones((h, w), bool)
    elif shape == "circle":  # ellipse inscribed in the box
        y2 = 2 * y + 1 - h
        m = x2 ** 2 * h ** 2 + y2 ** 2 * w ** 2 <= w ** 2 * h ** 2
    elif shape == "triangle":  # apex at the top centre, flat base on the bottom row
        # row y covers half-width (y + 1) / h * w / 2, measured at the row's bottom edge
        m = np.abs(x2) * h <= (y + 1) * w
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    m = np.broadcast_to(m, (h, w)).copy()
    m.flags.writeable = False  # cached: shared by every caller
    return m


@lru_cache(maxsize=4096)
def _mask_centroid(shape: str, side: int) -> tuple[float, float]:
    ys, xs = np.nonzero(shape_mask(shape, side, side))
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def drawn_centroid(obj: SceneObject) -> tuple[float, float]:
    """Centroid of the pixels `draw` paints for obj (a triangle's lies below its box centre)."""
    x0, y0, side = obj.box()
    dx, dy = _mask_centroid(obj.shape, side)
    return x0 + dx, y0 + dy


def relation_gap(relation: str, a: tuple[float, float], b: tuple[float, float]) -> float:
    """How far point a is on the `relation` side of point b, in pixels (y grows downwards).
    Positive means the relation holds; the scene check asks for > 0.05 S."""
    (ax, ay), (bx, by) = a, b
    return {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation]


# -- layout and drawing -------------------------------------------------------------

def side_range(n_objects: int, size: int) -> tuple[int, int]:
    """Integer box sides allowed by the spec: r = side/2 in [0.13, 0.19] S for
    1-2 objects, [0.09, 0.12] S for 3-4."""
    lo, hi = (0.13, 0.19) if n_objects <= 2 else (0.09, 0.12)
    return math.ceil(2 * lo * size - 1e-9), math.floor(2 * hi * size + 1e-9)


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """At least GAP background pixels between boxes (x0, y0, side), along x or y."""
    (ax, ay, an), (bx, by, bn) = a, b
    return (ax + an + GAP <= bx or bx + bn + GAP <= ax or
            ay + an + GAP <= by or by + bn + GAP <= ay)


def layout(spec: Prompt | DrawSpec, rng: np.random.Generator, size: int) -> list[SceneObject]:
    """Random valid geometry for a prompt (or DrawSpec): sizes in the spec's
    range, inside the canvas, boxes apart, open colours random, and for a
    relation the drawn centroids of objects 0 and 1 satisfy it by POSITION_MARGIN * S.
    Rejection sampling; raises RuntimeError if no layout is found."""
    n = len(spec.shapes)
    lo, hi = side_range(n, size)
    if not 1 <= lo <= hi < size:
        raise RuntimeError(f"canvas {size} px is too small for {n} objects")
    palette = list(COLORS)
    colors = [c if c is not None else palette[int(rng.integers(len(palette)))] for c in spec.colors]
    margin = POSITION_MARGIN * size

    for _ in range(MAX_TRIES):  # restart the scene when one object finds no room
        boxes, objs = [], []
        for shape, color in zip(spec.shapes, colors):
            for _ in range(MAX_TRIES):
                side = int(rng.integers(lo, hi + 1))
                box = (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1)), side)
                obj = SceneObject(shape, color, box[0] + side / 2, box[1] + side / 2, side / 2)
                if not all(_apart(box, b) for b in boxes):
                    continue
                if spec.relation is not None and len(objs) == 1 and \
                        relation_gap(spec.relation, drawn_centroid(objs[0]), drawn_centroid(obj)) <= margin:
                    continue
                boxes.append(box)
                objs.append(obj)
                break
            else:
                break
        if len(objs) == n:
            return objs
    raise RuntimeError(f"no layout found for {spec} on a {size} px canvas after {MAX_TRIES} tries")


def draw(objects: list[SceneObject], size: int) -> np.ndarray:
    """Paint objects in flat colour on black; (size, size, 3) uint8. Parts outside the canvas are clipped."""
    img = np.zeros((size, size, 3), np.uint8)
    for o in objects:
        x0, y0, side = o.box()
        m = shape_mask(o.shape, side, side)
        # clip the box to the canvas
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + side, size), min(y0 + side, size)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        sub = m[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        img[cy0:cy1, cx0:cx1][sub] = COLORS[o.color]
    return img


def render(prompt: Prompt | str, seed: int, size: int = 32) -> np.ndarray:
    """A correct image of the prompt; deterministic in (prompt text, seed, size)."""
    p = _as_prompt(prompt)
    return draw(layout(p, _rng(f"{p.text}|{seed}|{size}"), size), size)


# -- teachers -------------------------------------------------------------------------

def apply_flaws(prompt: Prompt, flaws: FlawProfile, rng: np.random.Generator) -> tuple[DrawSpec, list[str]]:
    """Corrupt a prompt as a flawed teacher would; return what to draw and the
    flaws that fired, in this order:

    - "count" (counting): one object more or fewer, staying within 1..4.
    - "color" (colors, color_attr): color_attr swaps its two colours or
      replaces one; colors replaces its colour by another.
    - "relation" (position): the opposite relation.
    - "shape" (any): one object drawn as a different shape.

    Every fired flaw makes the scene fail the prompt's check. The result is a
    DrawSpec, not a Prompt, since the scene may break the grammar's rules.
    """
    shapes, colors, relation = list(prompt.shapes), list(prompt.colors), prompt.relation
    fired = []
    palette = list(COLORS)

    def pick(options):
        return options[int(rng.integers(len(options)))]

    if prompt.category == "counting" and rng.random() < flaws.count:
        n = len(shapes)
        n2 = n + pick([d for d in (-1, 1) if 1 <= n + d <= max(COUNTS.values())])
        shapes, colors = [shapes[0]] * n2, [None] * n2
        fired.append("count")
    if prompt.category in ("colors", "color_attr") and rng.random() < flaws.color:
        if prompt.category == "color_attr" and rng.random() < 0.5:
            colors = colors[::-1]
        else:
            i = int(rng.integers(len(colors)))
            colors[i] = pick([c for c in palette if c != colors[i]])
        fired.append("color")
    if relation is not None and rng.random() < flaws.relation:
        relation = OPPOSITE[relation]
        fired.append("relation")
    if rng.random() < flaws.shape:
        i = int(rng.integers(len(shapes)))
        shapes[i] = pick([s for s in SHAPES if s != shapes[i]])
        fired.append("shape")
    return DrawSpec(tuple(shapes), tuple(colors), relation), fired


def teacher_render(prompt: Prompt | str, seed: int, size: int, flaws: FlawProfile,
                   teacher_seed: int) -> tuple[np.ndarray, list[str]]:
    """An embedded teacher's image and the flaws that fired; deterministic in all arguments.
    Flaws and layout use separate streams, so a teacher draws the same layout
    whether or not a flaw fires elsewhere in its profile."""
    p = _as_prompt(prompt)
    key = f"{p.text}|{seed}|{size}|teacher={teacher_seed}"
    spec, fired = apply_flaws(p, flaws, _rng(key + "|flaws"))
    return draw(layout(spec, _rng(key + "|layout"), size), size), fired

