"""Atomic yes/no questions about a shapes-world scene (TIFA / DSG style): written and answered here.

Both shapes-world parties that decompose a prompt use this module, so they
agree word for word: the scene judge (`serve/judge_backends.py`) and the
embedded VLM (`serve/embedded_vlm.py`). `write` turns a prompt into at most n
questions, one per object, attribute, relation and count it names; `answer`
reads the pixels for one question of these forms:

    Is there a {shape}?
    Is the {shape} {color}?
    Is there exactly one {shape}?        Are there exactly {count} {shape}s?
    Is there exactly one object?         Are there exactly {count} objects?
    Is the {shape} {to the left of | to the right of | above | below} the {shape2}?
    Does the image show "{prompt}"?      (text that reads as no scene gets only this one)

An answer is (truth, credit): credit in [0, 1] is 1 iff true and grades a
miss as `scene.check` grades its checks (a count off by one beats one off by
three), so a scorer can give partial credit.
"""

from __future__ import annotations

import re

import numpy as np

from evolve.shapes.grammar import COLORS, COUNTS, SHAPES, Prompt, PromptError
from evolve.shapes.reading import read
from evolve.shapes.render import relation_gap
from evolve.shapes.scene import POSITION_TOL, DetectedObject, check, detect

_COUNT_WORD = {n: w for w, n in COUNTS.items()}
# The grammar's relations as a question says them.
_SAID = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_HEARD = {v: k for k, v in _SAID.items()}


def whole(text: str) -> str:
    """The one question about a whole description: what is asked when it reads as no scene."""
    return f'Does the image show "{text}"?'


def _exactly(n: int, noun: str) -> str:
    return f"Is there exactly one {noun}?" if n == 1 else f"Are there exactly {_COUNT_WORD[n]} {noun}s?"


def questions_for(p: Prompt) -> list[str]:
    """Every atomic question of a parsed prompt, the ones that define its skill first."""
    if p.category == "counting":
        return [_exactly(p.n_objects, p.shapes[0]), _exactly(p.n_objects, "object")]
    out = [f"Is there a {s}?" for s in p.shapes]
    out += [f"Is the {s} {c}?" for s, c in zip(p.shapes, p.colors) if c is not None]
    if p.relation is not None:
        out.append(f"Is the {p.shapes[0]} {_SAID[p.relation]} the {p.shapes[1]}?")
    out.append(_exactly(p.n_objects, "object"))
    return out


def write(text: str, n: int) -> list[str]:
    """At most `n` (>= 1) yes/no questions that together check an image against `text`."""
    try:
        p = read(text)
    except PromptError:
        return [whole(text)]
    return questions_for(p)[:max(1, n)]


_S = "|".join(SHAPES)
_C = "|".join(COLORS)
_N = "|".join(w for w in COUNTS if w != "one")
_FORMS = [
    ("exists", re.compile(rf"is there an? ({_S})")),
    ("color", re.compile(rf"is the ({_S}) ({_C})")),
    ("count", re.compile(rf"is there exactly (one) ({_S}|object)|are there exactly ({_N}) ({_S}|object)s")),
    ("relation", re.compile(rf"is the ({_S}) ({'|'.join(_HEARD)}) the ({_S})")),
]
_WHOLE = re.compile(r'\s*does the image show\s+"(.+)"\s*\?\s*', re.S | re.I)


def _credit(ok: bool, credit: float) -> tuple[bool, float]:
    return ok, 1.0 if ok else min(max(float(credit), 0.0), 0.999)


def answer(question: str, image: np.ndarray) -> tuple[bool, float] | None:
    """(truth, credit) of one question of this module's forms, read from the pixels;
    None for a question of another form, or about text that reads as no scene."""
    if m := _WHOLE.fullmatch(question):
        try:
            res = check(read(m.group(1)), image)
        except PromptError:
            return None
        return _credit(res.satisfied, res.score)
    q = " ".join(question.lower().split()).rstrip("?").rstrip()
    for kind, rx in _FORMS:
        if m := rx.fullmatch(q):
            return _answer(kind, [g for g in m.groups() if g is not None], detect(image), image.shape[1])
    return None


def _answer(kind: str, g: list[str], objs: list[DetectedObject], size: int) -> tuple[bool, float]:
    if kind == "exists":
        return _credit(any(o.shape == g[0] for o in objs), 0.0)
    if kind == "color":
        mine = [o for o in objs if o.shape == g[0]]
        share = sum(o.color == g[1] for o in mine) / len(mine) if mine else 0.0
        return _credit(share == 1.0, share)
    if kind == "count":
        n = COUNTS[g[0]]
        got = len(objs) if g[1] == "object" else sum(o.shape == g[1] for o in objs)
        return _credit(got == n, 1.0 / (1 + abs(got - n)))
    a = [o for o in objs if o.shape == g[0]]
    b = [o for o in objs if o.shape == g[2]]
    gaps = [relation_gap(_HEARD[g[1]], (x.cx, x.cy), (y.cx, y.cy)) for x in a for y in b]
    if not gaps:
        return False, 0.0
    # as scene.check: every pair keeps the relation with margin; half credit for leaning right
    return _credit(min(gaps) > POSITION_TOL * size, 0.5 * sum(x > 0 for x in gaps) / len(gaps))
