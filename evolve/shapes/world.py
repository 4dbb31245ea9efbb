"""The shapes world behind the `World` interface (evolve/world.py)."""

from __future__ import annotations

import numpy as np

from evolve.config import ShapesWorldConfig
from evolve.seeds import stable_seed
from evolve.shapes.grammar import PromptError, all_prompts, parse, sample_prompt, vocabulary
from evolve.shapes.reading import read
from evolve.shapes.scorer import heldout_set, score
from evolve.world import HeldoutPrompt, World, WorldPrompt


class ShapesWorld(World):
    """Prompts from the grammar, held-out images scored exactly by the scene parser."""

    name = "shapes"
    exact_scorer = True

    def __init__(self, cfg: ShapesWorldConfig | None = None) -> None:
        self.cfg = cfg or ShapesWorldConfig()

    def seed_prompts(self, rng: np.random.Generator, repeat: bool = False) -> list[WorldPrompt]:
        """`seed_prompts` prompts of the grammar (of `seed_categories`, if set),
        distinct unless `repeat`."""
        n, cats = self.cfg.seed_prompts, self.cfg.seed_categories
        prompts: list[str] = []
        tries = 0
        while len(prompts) < n and tries < 100 * n:
            tries += 1
            cat = None if cats is None else cats[int(rng.integers(len(cats)))]
            p = sample_prompt(rng, cat).text
            if repeat or p not in prompts:
                prompts.append(p)
        return [WorldPrompt(p, parse(p).category) for p in prompts]

    def heldout(self) -> list[HeldoutPrompt]:
        # The same seeds score the student every round and the teachers at the end.
        return [HeldoutPrompt(f"{i:05d}", p.text, p.category, stable_seed("heldout", i))
                for i, p in enumerate(heldout_set(self.cfg.heldout_per_category))]

    def category(self, prompt: str) -> str | None:
        try:
            return read(prompt).category
        except PromptError:
            return None

    def score(self, prompts: list[str], images: list[bytes]) -> dict:
        """The scene parser's verdict per category (GenEval's mean over categories).
        Prompts are read as scenes (`reading.read`); one that reads as none is
        left out and counted in `unreadable`."""
        keep = [i for i, p in enumerate(prompts) if self.category(p) is not None]
        rep = score([read(prompts[i]) for i in keep], [images[i] for i in keep]).to_dict()
        return {**rep, "unreadable": len(prompts) - len(keep)}

    def replay_rows(self, per_prompt: int, size: int, seed: int) -> list[dict]:
        from evolve.shapes.curriculum import curriculum

        return curriculum(per_prompt, size, seed)

    def vocabulary(self) -> list[str]:
        return vocabulary()

    def canonical(self, text: str) -> str:
        """The grammar's own text of `text` (ValueError outside the grammar)."""
        try:
            return parse(text).text
        except PromptError as e:
            raise ValueError(str(e)) from None

    def sample(self, rng: np.random.Generator, n: int) -> list[str]:
        return [sample_prompt(rng).text for _ in range(n)]

    def judge_pairs(self, n: int, size: int, seed: int) -> list:
        from evolve.shapes.judge_pairs import make_pairs

        return make_pairs(n, size, seed)

    def all_prompts(self) -> list[str]:
        return [p.text for p in all_prompts()]
