"""The shapes world: prompt grammar, renderer and teachers, scene parser, scorer.
See shared/specs/shapes-world.md."""

from evolve.shapes.grammar import (CATEGORIES, COLORS, COUNTS, RELATIONS, SHAPES, Prompt, PromptError,
                                   all_prompts, format_prompt, heldout_prompts, parse, sample_prompt,
                                   vocabulary)
from evolve.shapes.render import (DrawSpec, SceneObject, apply_flaws, draw, from_png, layout, render,
                                  teacher_render, to_png)
from evolve.shapes.reading import read
from evolve.shapes.scene import CheckResult, DetectedObject, check, detect, satisfies
from evolve.shapes.scorer import ScoreReport, read_prompts_jsonl, score, score_folder, write_prompts_jsonl

__all__ = [
    "CATEGORIES", "COLORS", "COUNTS", "RELATIONS", "SHAPES", "Prompt", "PromptError",
    "all_prompts", "format_prompt", "heldout_prompts", "parse", "sample_prompt", "vocabulary",
    "DrawSpec", "SceneObject", "apply_flaws", "draw", "from_png", "layout", "render",
    "teacher_render", "to_png",
    "read",
    "CheckResult", "DetectedObject", "check", "detect", "satisfies",
    "ScoreReport", "read_prompts_jsonl", "score", "score_folder", "write_prompts_jsonl",
]
