"""EvolveDirector's curation of the training data: what the loop buys and keeps.

`Curator` is the paper's method; the experiment arms (random sampling, random
selection of the teacher image) are its variants in `evolve/arms.py`. Each
step is the loop's call (evolve/loop.py), so the story reads there:

- `seed_prompts()`: the seed set's prompts, from the world;
- `acquire(prompts, rnd)`: every teacher draws each new prompt, the judge
  picks the image that fits it best (no student image is needed for that);
- `judge(records, checkpoint, rnd, rng)`: the student draws part of the
  training prompts, the judge compares each with the teachers' images;
- `new_prompts(records, plan, rnd)`: the judge's variants of the prompts the
  teachers won (expansion) and, now and then, new ones (mutation).
The decisions themselves are pure functions in `evolve/evolution.py`.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np

from evolve import evolution
from evolve.config import RunConfig
from evolve.dataset import Record, write_json_atomic
from evolve.images import save_grid, thumbnail
from evolve.judging import DiscriminateRequest, DiscriminateVerdict, ExpandRequest, MutateRequest, TeacherImage
from evolve.ledger import Ledger
from evolve.parts import Parts
from evolve.run_folder import RunFolder
from evolve.seeds import stable_seed
from evolve.store import ImageStore

log = logging.getLogger("evolve")


class Phases:
    """Where a round's time goes: `with phases("judge_s"): ...` adds the time
    inside to that phase (heldout_s, sample_s, teachers_s, judge_s, expand_s,
    select_s, publish_s), and tells `show` (a terminal's status line) which
    phase is running."""

    def __init__(self, show=None) -> None:
        self.seconds: dict[str, float] = {}
        self.show = show

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        with self.show(name.removesuffix("_s")) if self.show is not None else contextlib.nullcontext():
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def take(self) -> dict[str, float]:
        """This round's phases so far (rounded), and start counting afresh."""
        out, self.seconds = {k: round(v, 2) for k, v in self.seconds.items()}, {}
        return out


class Curator:
    images_per_prompt: int | None = None  # None: every teacher draws every new prompt

    def __init__(self, cfg: RunConfig, parts: Parts, folder: RunFolder, phases: Phases, say=print,
                 heldout_keys: frozenset = frozenset()) -> None:
        self.cfg, self.parts, self.folder, self.phase, self.say = cfg, parts, folder, phases, say
        self.store = ImageStore(folder.images)
        self.teacher_names = [t.name for t in cfg.teachers]
        # (prompt, seed) of held-out images: bought to score, never training images
        self.heldout_keys = heldout_keys

    # -- the loop's steps ---------------------------------------------------------------------
    def seed_prompts(self) -> list[evolution.NewPrompt]:
        rng = np.random.default_rng(self.cfg.seed)
        return [evolution.NewPrompt(p.text, "seed", category=p.category)
                for p in self.parts.world.seed_prompts(rng)]

    def acquire(self, cands: list[evolution.NewPrompt], rnd: int) -> list[Record]:
        """Teachers draw the new prompts the budget pays for; the judge picks
        each one's best image."""
        cands = self.affordable(cands)
        if not cands:
            return []
        seeds = [self.candidate_seed(c, rnd) for c in cands]
        with self.phase("teachers_s"):
            bought = self.parts.teachers.buy([(c.prompt, s) for c, s in zip(cands, seeds)])
        keep, reqs, refs = [], [], []
        for i, c in enumerate(cands):
            ok = {t: res[i] for t, res in bought.items() if "ref" in res[i]}
            if not ok:
                errs = {t: res[i].get("error") for t, res in bought.items()}
                log.warning("no teacher delivered %r: %s", c.prompt, errs)
                continue
            keep.append(i)
            refs.append({t: r["ref"] for t, r in ok.items()})
            reqs.append(DiscriminateRequest(
                prompt=c.prompt,
                teacher_images=[TeacherImage(teacher=t, image=self.store.get(r["ref"])) for t, r in ok.items()]))
        verdicts = self.pick(reqs, refs, rnd)
        out = evolution.select_records([cands[i] for i in keep], [seeds[i] for i in keep], verdicts, refs,
                                       [self.category(cands[i]) for i in keep], rnd)
        self.folder.log_verdicts(f"select_{rnd:03d}", [
            {"record_id": r.id, "prompt": r.prompt, "verdict": v.model_dump(mode="json")}
            for r, v in zip(out, verdicts)])
        return out

    def judge(self, records: list[Record], checkpoint: str, rnd: int, rng: np.random.Generator
              ) -> tuple[list[Record], list[DiscriminateVerdict]]:
        """The student's images of some training prompts against the teachers'."""
        judged = evolution.choose_eval_records(records, self.cfg.evolution, rng)
        with self.phase("sample_s"):
            student = self.parts.sample(checkpoint, [r.prompt for r in judged], [r.seed for r in judged])
        # Every teacher's image of these prompts was bought when the prompt joined:
        # the gateways answer from the ledger, nothing is paid again.
        with self.phase("teachers_s"):
            bought = self.parts.teachers.buy([(r.prompt, r.seed) for r in judged])
        reqs = [DiscriminateRequest(prompt=r.prompt, student_image=student[i], teacher_images=[
            TeacherImage(teacher=t, image=self.store.get(res[i]["ref"])) for t, res in bought.items()
            if "ref" in res[i]]) for i, r in enumerate(judged)]
        latencies: list[float] = []
        with self.phase("judge_s"):
            verdicts = self.parts.judge.discriminate(reqs, latencies)
        self.parts.metrics.judged(latencies)
        self.save_judge_grid(rnd, judged, reqs, verdicts)
        self.folder.log_verdicts(f"judge_{rnd:03d}", [
            {"record_id": r.id, "prompt": r.prompt, "verdict": v.model_dump(mode="json")}
            for r, v in zip(judged, verdicts)])
        return judged, verdicts

    def plan(self, judged: list[Record], verdicts: list[DiscriminateVerdict], rng: np.random.Generator
             ) -> tuple[evolution.RoundPlan, evolution.RoundStats]:
        """What the verdicts say to delete and expand, and whether to mutate."""
        return evolution.plan_round(judged, verdicts, self.cfg.evolution, rng)

    def new_prompts(self, records: list[Record], plan: evolution.RoundPlan, rnd: int
                    ) -> list[evolution.NewPrompt]:
        """Expansion of the prompts the teachers won, and mutation when the plan says so."""
        by_id = {r.id: r for r in records}
        training = sorted({r.prompt for r in records})
        evo = self.cfg.evolution
        with self.phase("expand_s"):
            expansions = dict(zip(plan.expand_ids, self.parts.judge.expand([ExpandRequest(
                prompt=by_id[rid].prompt, k=evo.expand_k, seed=stable_seed(rid, rnd),
                avoid_prompts=training) for rid in plan.expand_ids])))
            mutation = None
            if plan.mutate and evo.mutate_n > 0:
                mutation = self.parts.judge.mutate([MutateRequest(
                    avoid_prompts=training, n=evo.mutate_n, seed=stable_seed(self.cfg.seed, "mutate", rnd))])[0]
        self.folder.log_verdicts(f"evolve_{rnd:03d}", [
            {"op": "expand", "record_id": rid, **e.model_dump(mode="json")} for rid, e in expansions.items()
        ] + ([{"op": "mutate", **mutation.model_dump(mode="json")}] if mutation is not None else []))
        parents = {rid: by_id[rid].category for rid in plan.expand_ids}
        return evolution.new_prompts(expansions, mutation, set(training), evo.expand_k if evo.reseed else 0,
                                     parents)

    # -- pieces ------------------------------------------------------------------------------------
    def pick(self, reqs: list[DiscriminateRequest], refs: list[dict[str, str]], rnd: int
             ) -> list[DiscriminateVerdict]:
        """The judge's choice of each new prompt's training image."""
        with self.phase("select_s"):
            return self.parts.judge.discriminate(reqs)

    def category(self, c: evolution.NewPrompt) -> str | None:
        """The world's category of a prompt where it knows one, else what the
        prompt came with (an expansion inherits its parent's)."""
        return self.parts.world.category(c.prompt) or c.category

    def candidate_seed(self, c: evolution.NewPrompt, rnd: int) -> int:
        """The teachers' seed for a new prompt; another copy of a prompt draws another image."""
        return stable_seed(self.cfg.seed, c.prompt, rnd, *([c.copy] if c.copy else []))

    def training_images_bought(self) -> int:
        """Images paid for as training data, across restarts (the ledger; held-out
        images bought to score the models do not count)."""
        ledger = Ledger(self.folder.ledger)
        try:  # the ledger's count, less the held-out keys it holds (a few lookups, not a read of every purchase)
            size = self.cfg.student.image_size
            heldout = sum(ledger.lookup(t.name, prompt, seed, size) is not None
                          for t in self.cfg.teachers for prompt, seed in self.heldout_keys)
            return len(ledger) - heldout
        finally:
            ledger.close()

    def affordable(self, cands: list[evolution.NewPrompt], quiet: bool = False) -> list[evolution.NewPrompt]:
        """The first candidates the run's caps still pay for: the total budget
        (`budget`, dollars) and the training images (`max_images`; every teacher
        draws every new prompt unless `images_per_prompt` says otherwise). Each
        teacher's own budget is kept by its gateway. `quiet`: a probe, not a
        purchase: say nothing about what was cut."""
        say = (lambda _msg: None) if quiet else self.say
        n = len(cands)
        if not cands:
            return cands
        if self.cfg.budget is not None:
            stats = self.parts.teachers.stats().values()
            spent = sum(s["spent"] for s in stats)  # certain + uncertain: a call that may be billed counts
            uncertain = sum(s.get("uncertain", 0.0) for s in stats)
            per_prompt = sum(t.price_per_image for t in self.cfg.teachers)
            if per_prompt > 0:
                n = min(n, max(0, int((self.cfg.budget - spent + 1e-9) // per_prompt)))
            if n < len(cands):
                of_which = f" (${uncertain:.2f} of it uncertain)" if uncertain > 1e-9 else ""
                say(f"total budget ${self.cfg.budget:.2f}: ${spent:.2f} spent{of_which}, "
                    f"{n} of {len(cands)} new prompts bought")
        if self.cfg.max_images is not None:
            bought = self.training_images_bought()
            left = max(0, (self.cfg.max_images - bought) // (self.images_per_prompt or len(self.cfg.teachers)))
            if left < n:
                say(f"image budget {self.cfg.max_images}: {bought} bought, {left} of {len(cands)} new prompts bought")
                n = left
        return cands[:n]

    def spent(self) -> bool:
        """Nothing more can be bought: the image budget, the total budget or every
        teacher's own budget is used up (a new prompt costs one image per teacher)."""
        if not self.affordable([evolution.NewPrompt("", "expand")], quiet=True):  # the run's caps
            return True
        stats = self.parts.teachers.stats()
        return all(t.budget is not None and stats[t.name]["spent"] + t.price_per_image > t.budget + 1e-9
                   for t in self.cfg.teachers)

    def save_judge_grid(self, rnd: int, judged: list[Record], reqs: list[DiscriminateRequest],
                        verdicts: list[DiscriminateVerdict], rows: int = 8) -> None:
        """What the judge saw, for people: `grids/judge_NNN.png`, one row per judged
        prompt (student, then each teacher), and `grids/judge_NNN.json` saying
        what each row and column is and what the judge decided."""
        size = self.cfg.student.image_size
        blank = np.zeros((size, size, 3), np.uint8)
        images, meta = [], []
        for rec, req, v in list(zip(judged, reqs, verdicts))[:rows]:
            mine = {t.teacher: t.image for t in req.teacher_images}
            cells = [req.student_image] + [mine.get(n) for n in self.teacher_names]
            images += [thumbnail(c, size) if c is not None else blank for c in cells]
            meta.append({"record_id": rec.id, "prompt": rec.prompt, "decided": v.decided,
                         "student_matches": v.student_matches, "best_teacher": v.best_teacher})
        if not images:
            return
        save_grid(images, self.folder.grids / f"judge_{rnd:03d}.png", cols=1 + len(self.teacher_names))
        write_json_atomic(self.folder.grids / f"judge_{rnd:03d}.json",
                          {"columns": ["student"] + self.teacher_names, "rows": meta})
