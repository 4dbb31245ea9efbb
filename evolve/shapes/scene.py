"""Read a shapes-world image back into objects and check it against its prompt.

This is the judge that can see: it reads pixels only (no knowledge of how the
image was made) and applies the spec's four rules. It must also read the
student's blurry, noisy images, so foreground is a brightness threshold, specks
are dropped, and shapes are classified by the best-matching template rather
than by exact pixel patterns.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from evolve.shapes.grammar import COLORS, SHAPES, Prompt, parse
from evolve.shapes.render import relation_gap, shape_mask

# Foreground: brightest channel above half the dimmest palette colour's
# brightest channel (magenta, 200), so a blurred edge splits evenly.
FG_THRESHOLD = 100
# Components smaller than this share of the canvas are noise: the smallest
# real object (a triangle of side 0.18 S) covers about 0.016 S^2.
MIN_AREA_FRAC = 0.004
# A blob further than this (RGB distance) from every palette colour has no
# colour; the closest palette pair (cyan, blue) is ~123 apart.
COLOR_TOL = 80.0
POSITION_TOL = 0.05  # the spec's relation margin, as a share of S

_PALETTE = np.array(list(COLORS.values()), float)
_NAMES = list(COLORS)


@dataclass
class DetectedObject:
    shape: str
    color: str | None  # nearest palette colour, None if far from all
    cx: float  # pixel centroid, in the same continuous coordinates as SceneObject
    cy: float
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


def _classify(blob: np.ndarray) -> str:
    """The shape whose template, stretched to the blob's bounding box, overlaps it best (IoU).
    Covers what fill ratio alone would (square 1, circle ~0.79, triangle ~0.5)
    and tells a triangle's downward-growing width from its mirror image."""
    h, w = blob.shape
    area = blob.sum()

    def iou(shape):
        t = shape_mask(shape, w, h)
        inter = np.logical_and(blob, t).sum()
        return inter / (area + t.sum() - inter)

    return max(SHAPES, key=iou)


def _color_name(rgb: np.ndarray) -> str | None:
    d = np.linalg.norm(_PALETTE - rgb, axis=1)
    i = int(d.argmin())
    return _NAMES[i] if d[i] <= COLOR_TOL else None


def detect(image: np.ndarray) -> list[DetectedObject]:
    """Objects in an (H, W, 3) uint8 image: 8-connected foreground blobs, specks dropped,
    in raster order of their first pixel."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    fg = img.max(axis=2) > FG_THRESHOLD
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    min_area = max(3, round(MIN_AREA_FRAC * img.shape[0] * img.shape[1]))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        blob = labels[sl] == i
        area = int(blob.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(blob)
        y0, x0 = sl[0].start, sl[1].start
        out.append(DetectedObject(
            shape=_classify(blob),
            color=_color_name(np.median(img[sl][blob], axis=0)),
            cx=float(x0 + xs.mean() + 0.5),
            cy=float(y0 + ys.mean() + 0.5),
            area=area,
            bbox=(x0, y0, sl[1].stop, sl[0].stop),
        ))
    return out


@dataclass
class CheckResult:
    satisfied: bool
    checks: dict[str, bool]  # only the checks that apply to the prompt's category
    failed: list[str]
    score: float  # graded quality in [0, 1]; 1 iff satisfied
    objects: list[DetectedObject] = field(default_factory=list)  # what was seen, for debugging


def check(prompt: Prompt | str, image: np.ndarray) -> CheckResult:
    """Apply the spec's four rules to the pixels of `image`.

    Each check also gets partial credit in [0, 1) when it fails, so that `score`
    (their mean) ranks near misses above gross ones: a count off by one beats
    one off by three, a relation the right way round but too close beats a
    reversed one.
    """
    p = prompt if isinstance(prompt, Prompt) else parse(prompt)
    image = np.asarray(image)
    objs = detect(image)
    size = image.shape[1]
    credit: dict[str, float] = {}

    # 1. objects: as many as the prompt names
    miss = abs(len(objs) - p.n_objects)
    credit["objects"] = 1.0 / (1 + miss)

    # 2. shapes: the multisets agree; credit is the matched share
    want, got = Counter(p.shapes), Counter(o.shape for o in objs)
    matched = sum((want & got).values())
    credit["shapes"] = matched / max(p.n_objects, len(objs))

    # 3. colours: every object of a shape the prompt binds a colour to has that colour
    if p.category in ("colors", "color_attr"):
        bound = [(s, c) for s, c in zip(p.shapes, p.colors) if c is not None]
        ok = 0.0
        for s, c in bound:
            mine = [o for o in objs if o.shape == s]
            ok += sum(o.color == c for o in mine) / len(mine) if mine else 0.0
        credit["colors"] = ok / len(bound)

    # 4. position: every (A, B) pair of the two shapes keeps the relation with margin
    if p.relation is not None:
        a_objs = [o for o in objs if o.shape == p.shapes[0]]
        b_objs = [o for o in objs if o.shape == p.shapes[1]]
        gaps = [relation_gap(p.relation, (a.cx, a.cy), (b.cx, b.cy)) for a in a_objs for b in b_objs]
        if gaps and min(gaps) > POSITION_TOL * size:
            credit["position"] = 1.0
        elif gaps:  # half credit where pairs at least lean the right way
            credit["position"] = 0.5 * sum(g > 0 for g in gaps) / len(gaps)
        else:
            credit["position"] = 0.0

    checks = {k: v == 1.0 for k, v in credit.items()}
    failed = [k for k, ok in checks.items() if not ok]
    # the mean of the credits is 1 only when every check passes
    score = float(np.mean(list(credit.values())))
    return CheckResult(not failed, checks, failed, score if failed else 1.0, objs)


def satisfies(prompt: Prompt | str, image: np.ndarray) -> bool:
    return check(prompt, image).satisfied
