"""The experiment arms: EvolveDirector's curation with one part swapped, for the
paper's comparisons (benchmarks/science.py). The loop is the same for all of
them; `make_curator` picks by configuration.

- `RandomSampling` (`evolution.strategy: random`): the paper's baseline. The
  training set is prompts drawn uniformly from the world, one teacher image
  each (teachers in turn), no judge, never evolved.
- `RandomSelection` (`evolution.select: random`): EvolveDirector, but a new
  prompt trains on a teacher's image picked at random instead of the judge's
  best (the multi-teacher choice ablated).
"""

from __future__ import annotations

import logging

import numpy as np

from evolve import evolution
from evolve.curation import Curator
from evolve.dataset import Record, record_id
from evolve.judging import DiscriminateRequest, DiscriminateVerdict
from evolve.seeds import stable_seed

log = logging.getLogger("evolve")


class RandomSampling(Curator):
    images_per_prompt = 1  # every image bought is a training image

    def seed_prompts(self) -> list[evolution.NewPrompt]:
        # With replacement: the budget is in images, and a world may have fewer
        # prompts than a large budget (a prompt drawn again is a new seed).
        rng = np.random.default_rng(self.cfg.seed)
        return [evolution.NewPrompt(p.text, "seed", category=p.category)
                for p in self.parts.world.seed_prompts(rng, repeat=True)]

    def acquire(self, cands: list[evolution.NewPrompt], rnd: int) -> list[Record]:
        """Each prompt bought from one teacher, in turn; no judge."""
        cands = self.affordable(cands)
        names = self.teacher_names
        # The index too: a prompt drawn twice is two images (two seeds).
        seeds = [stable_seed(self.cfg.seed, c.prompt, rnd, i) for i, c in enumerate(cands)]
        mine = {t: [i for i in range(len(cands)) if i % len(names) == k] for k, t in enumerate(names)}
        with self.phase("teachers_s"):
            got = {t: self.parts.teachers.buy_from(t, [(cands[i].prompt, seeds[i]) for i in idx]) if idx else []
                   for t, idx in mine.items()}
        out = []
        for t, idx in mine.items():
            for i, res in zip(idx, got[t]):
                if "ref" not in res:
                    log.warning("teacher %s did not deliver %r: %s", t, cands[i].prompt, res.get("error"))
                    continue
                c = cands[i]
                out.append(Record(id=record_id(c.prompt, seeds[i], rnd, c.op), prompt=c.prompt,
                                  category=self.category(c), teacher=t, image_ref=res["ref"],
                                  seed=seeds[i], round_added=rnd, parent_id=c.parent_id, op=c.op))
        return sorted(out, key=lambda r: r.id)

    def judge(self, records, checkpoint, rnd, rng):
        return [], []  # the baseline is never judged

    def plan(self, judged, verdicts, rng):
        return evolution.RoundPlan((), (), False), evolution.RoundStats()

    def new_prompts(self, records, plan, rnd):
        return []  # ... and never evolved: the data stays as bought

    def spent(self) -> bool:
        return False  # nothing is bought after the seed set, so a spent budget stops nothing


class RandomSelection(Curator):
    def pick(self, reqs: list[DiscriminateRequest], refs: list[dict[str, str]], rnd: int
             ) -> list[DiscriminateVerdict]:
        rng = np.random.default_rng(stable_seed(self.cfg.seed, "select", rnd))
        return [DiscriminateVerdict(prompt=q.prompt, best_teacher=str(rng.choice(sorted(r))),
                                    reason="picked at random (evolution.select: random)")
                for q, r in zip(reqs, refs)]


def make_curator(cfg, *args, **kwargs) -> Curator:
    """EvolveDirector's curator, or the arm the configuration names."""
    if cfg.evolution.strategy == "random":
        return RandomSampling(cfg, *args, **kwargs)
    if cfg.evolution.select == "random":
        return RandomSelection(cfg, *args, **kwargs)
    return Curator(cfg, *args, **kwargs)
