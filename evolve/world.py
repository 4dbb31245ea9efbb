"""Worlds: where the loop's prompts come from and how images are scored against them.

The loop treats prompts as opaque text. Everything it needs to know about a
domain comes from its `World`:

- `seed_prompts(rng)`: the seed set the first dataset version is bought for;
- `heldout()`: the held-out prompts (with the seed of each image), never
  among the seeds;
- `category(prompt)`: a prompt's skill where the world knows it, else None
  (the loop then inherits the parent's, or leaves it unknown);
- `score(prompts, images)`: an exact scorer, for worlds that have one (the
  shapes world's scene parser); None elsewhere, where the VLM scores;
- `replay_rows(...)`, `vocabulary()`: optional training aids (a base
  curriculum to replay, the words of a small student's tokenizer);
- `canonical(text)`: the world's own form of a prompt, or ValueError for one
  outside it (the judge screens generated prompts with it);
- `sample(rng, n)`: prompts drawn uniformly (the random-sampling arm);
- `judge_pairs(n, size, seed)`: image pairs whose right answer is known
  (`evolve judge-eval`), where the world can make them.

`evolve.worlds.make_world(cfg)` is the one place that picks a world by name:
nothing else in `evolve/` imports a world's package.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

UNKNOWN = "unknown"  # how reports name the group of prompts without a category


@dataclass(frozen=True)
class WorldPrompt:
    """A prompt as a world hands it out: its text and, where known, its skill."""

    text: str
    category: str | None = None


@dataclass(frozen=True)
class HeldoutPrompt:
    """One held-out image to draw: the prompt, its skill, and the seed every
    model (student each round, teachers once) draws it with."""

    id: str
    prompt: str
    category: str | None
    seed: int


class World:
    """The interface, with the defaults of a world that has no optional part."""

    name = "world"
    exact_scorer = False  # True where `score` is implemented

    def seed_prompts(self, rng: np.random.Generator, repeat: bool = False) -> list[WorldPrompt]:
        """The seed set. `repeat`: a prompt may come more than once (the
        random-sampling arm buys images, and a repeated prompt is another seed)."""
        raise NotImplementedError

    def heldout(self) -> list[HeldoutPrompt]:
        raise NotImplementedError

    def category(self, prompt: str) -> str | None:
        return None

    def score(self, prompts: list[str], images: list[bytes]) -> dict | None:
        """An exact score of PNG images against their prompts ({"overall",
        "per_category", "n", ...}), or None where the world has no exact scorer."""
        return None

    def replay_rows(self, per_prompt: int, size: int, seed: int) -> list[dict] | None:
        """Rows {"prompt", "image": PNG bytes} a student may replay beside the
        evolved data (prior preservation), or None."""
        return None

    def vocabulary(self) -> list[str] | None:
        """Words for a small word-level tokenizer, or None (use a real one)."""
        return None

    def canonical(self, text: str) -> str:
        return text

    def sample(self, rng: np.random.Generator, n: int) -> list[str]:
        """`n` prompts drawn uniformly from the world (with replacement)."""
        pool = [p.text for p in self.seed_prompts(rng)]
        return [pool[int(i)] for i in rng.integers(len(pool), size=n)]

    def judge_pairs(self, n: int, size: int, seed: int) -> list | None:
        return None
