"""The free-text world behind the `World` interface (evolve/world.py): prompts
from the user's files, no grammar, no exact scorer (the VLM judge scores)."""

from __future__ import annotations

import re

import numpy as np

from evolve.config import PromptsWorldConfig
from evolve.judging import normalize_prompt
from evolve.prompts.files import FilePrompt, PromptFileError, load_prompts
from evolve.seeds import stable_seed
from evolve.world import HeldoutPrompt, World, WorldPrompt

_WORD = re.compile(r"[a-z0-9']+")


class PromptsWorld(World):
    """Seed and held-out prompts from two files (`cfg.seed`, `cfg.heldout`).

    Nothing is read when the world is made: the files are loaded once, on first
    use, and `seed_prompts` and `heldout` validate them first, so a bad file
    fails before anything is bought."""

    name = "prompts"

    def __init__(self, cfg: PromptsWorldConfig) -> None:
        self.cfg = cfg
        self._files: tuple[list[FilePrompt], list[FilePrompt]] | None = None
        self._categories: dict[str, str | None] | None = None
        self._valid = False

    def _load(self) -> tuple[list[FilePrompt], list[FilePrompt]]:
        if self._files is None:
            n = self.cfg.max_prompt_chars
            self._files = load_prompts(self.cfg.seed, n), load_prompts(self.cfg.heldout, n)
        return self._files

    def validate(self) -> None:
        """Load both files (PromptFileError for a bad one) and check that no
        held-out prompt is among the seeds, near-duplicates included (case,
        punctuation, articles and spacing do not count)."""
        if self._valid:
            return
        seeds, held = self._load()
        first: dict[str, FilePrompt] = {}
        for p in seeds:
            first.setdefault(normalize_prompt(p.text), p)
        clashes = [(h, first[normalize_prompt(h.text)]) for h in held if normalize_prompt(h.text) in first]
        if clashes:
            (h, s), rest = clashes[0], clashes[1:]
            more = f" (and {len(rest)} more, held-out lines {', '.join(str(c[0].line) for c in rest[:10])}" \
                   f"{', ...' if len(rest) > 10 else ''})" if rest else ""
            raise PromptFileError(self.cfg.heldout.path, h.line, f"held-out prompt {h.text!r} is among the seeds "
                                  f"({self.cfg.seed.path}, line {s.line}: {s.text!r}){more}")
        self._valid = True

    def seed_prompts(self, rng: np.random.Generator, repeat: bool = False) -> list[WorldPrompt]:
        """The seed file's prompts, in file order. The file is the seed set, so
        `rng` is unused and `repeat` changes nothing (a prompt the file repeats
        comes as often as the file has it)."""
        self.validate()
        return [WorldPrompt(p.text, p.category) for p in self._load()[0]]

    def heldout(self) -> list[HeldoutPrompt]:
        """`heldout_images_per_prompt` images per held-out prompt, each with a seed
        fixed by the file's id: id `{file_id}` for one image a prompt, else
        `{file_id}#{k}`."""
        self.validate()
        k_n = self.cfg.heldout_images_per_prompt
        return [HeldoutPrompt(p.id if k_n == 1 else f"{p.id}#{k}", p.text, p.category,
                              stable_seed("heldout", p.id, k))
                for p in self._load()[1] for k in range(k_n)]

    def category(self, prompt: str) -> str | None:
        """The category the files give this exact text (the seed file's first), else None."""
        if self._categories is None:
            cats: dict[str, str | None] = {}
            for p in self._load()[0] + self._load()[1]:
                cats.setdefault(p.text, p.category)
            self._categories = cats
        return self._categories.get(prompt)

    def vocabulary(self) -> list[str]:
        """The distinct words (runs of a-z, 0-9 and ') of all seed and held-out
        prompts, lower-cased and sorted: for a small word-level tokenizer."""
        seeds, held = self._load()
        return sorted({w for p in seeds + held for w in _WORD.findall(p.text.lower())})

    def canonical(self, text: str) -> str:
        """Free text has no grammar: the text itself, stripped."""
        return text.strip()

    def sample(self, rng: np.random.Generator, n: int) -> list[str]:
        """`n` seed-file prompts drawn uniformly, with replacement."""
        pool = [p.text for p in self.seed_prompts(rng)]
        return [pool[int(i)] for i in rng.integers(len(pool), size=n)]
