"""Image pairs whose right answer is known, for `evolve judge-eval` (evolve/judge_eval.py)."""

from __future__ import annotations

import numpy as np

from evolve import shapes
from evolve.config import FlawProfile
from evolve.judge_eval import Pair
from evolve.shapes.render import teacher_render

# The flaw that breaks each category's skill (shape, where the skill has no flaw of its own).
SKILL_FLAW = {
    "counting": FlawProfile(count=1.0),
    "colors": FlawProfile(color=1.0),
    "color_attr": FlawProfile(color=1.0),
    "position": FlawProfile(relation=1.0),
    "single_object": FlawProfile(shape=1.0),
    "two_object": FlawProfile(shape=1.0),
}


def make_pairs(n: int, size: int = 32, seed: int = 0) -> list[Pair]:
    """`n` pairs, categories in turn; each image checked by the scene parser so the
    truth is certain (a pair whose images the parser cannot tell apart is skipped)."""
    rng = np.random.default_rng(seed)
    pairs: list[Pair] = []
    tries = 0
    while len(pairs) < n and tries < 20 * n:
        cat = shapes.CATEGORIES[tries % len(shapes.CATEGORIES)]
        tries += 1
        prompt = shapes.sample_prompt(rng, cat)
        s = int(rng.integers(2**31))
        right = shapes.render(prompt, seed=s, size=size)
        wrong, fired = teacher_render(prompt, s + 1, size, SKILL_FLAW[cat], teacher_seed=seed)
        if not fired or not shapes.check(prompt, right).satisfied or shapes.check(prompt, wrong).satisfied:
            continue
        pairs.append(Pair(prompt.text, cat, shapes.to_png(right), shapes.to_png(wrong), tuple(fired)))
    return pairs


