"""The base curriculum: what the shapes-world base student is pretrained on,
and what the loop's students replay beside the evolved data.

Exact renders (no teacher, no flaw) of every prompt of the categories that
teach drawing: single objects, colours, two different objects. Counting,
position and colour binding are left to the teachers and the loop."""

from __future__ import annotations

from evolve.shapes.grammar import all_prompts
from evolve.shapes.render import render, to_png

BASE_CATEGORIES = ("single_object", "colors", "two_object")


def curriculum(per_prompt: int, size: int, seed: int = 0) -> list[dict]:
    """Rows {prompt, image} of exact renders of every prompt of the base categories.

    The grammar is finite (single_object has 3 prompts, two_object 6) so the
    held-out set shares its prompts with training, as GenEval's do with real
    models; what is held out is the images (the evaluation's own seeds)."""
    rows = []
    for cat in BASE_CATEGORIES:
        for p in all_prompts(cat):
            for k in range(per_prompt):
                rows.append({"prompt": p.text, "image": to_png(render(p, seed=seed * 1_000_003 + k, size=size))})
    return rows
