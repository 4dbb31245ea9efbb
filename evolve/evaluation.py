"""Scoring students and teachers on the held-out prompts.

Two ways, chosen by `evaluation.metric` (auto: the world's exact scorer where
it has one, else the VLM):

- **scene**: the world's exact scorer (the shapes world's scene parser):
  accuracy per category, overall the mean over categories (GenEval's way).
- **vlm**, as the paper scores Edgen, through the judge:
  - the student's *win rate* against each teacher: every held-out image of
    the student meets that teacher's image of the same prompt and seed, asked
    both ways round; a win or a loss needs both answers to agree, anything
    else is a no-verdict, counted apart. The rate is wins / (wins + losses),
    with a 95% Wilson interval (scipy's `binomtest`);
  - a per-image *alignment* score: VQAScore (P("Yes") to "does this figure
    show {prompt}?", from the answer's logprobs) where the backend returns
    logprobs, else decomposed yes/no questions (TIFA / DSG): the VLM writes
    them once per prompt (cached in `eval/questions.json`) and answers them
    per image; the score is the mean P("Yes"). Overall: the mean over
    categories, as for the scene scorer; prompts without a category form
    their own group.

Every evaluation keeps its images (in the image store) and per-image scores in
`eval/<model>_<tag>.json`, so it can be looked at and rescored later.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from evolve.config import EvaluationConfig
from evolve.dataset import write_json_atomic
from evolve.images import from_png, save_grid
from evolve.judging import AlignRequest, CompareRequest, QuestionsRequest
from evolve.parts import Parts
from evolve.run_folder import RunFolder
from evolve.store import ImageStore
from evolve.world import UNKNOWN, HeldoutPrompt


def by_category(values: list[float | None], categories: list[str | None]) -> dict:
    """{"overall", "per_category", "per_category_n", "n", "no_verdict"} of
    per-image values (None: no verdict, left out); overall is the mean over
    the categories present."""
    groups: dict[str, list[float]] = defaultdict(list)
    for v, c in zip(values, categories):
        if v is not None:
            groups[c or UNKNOWN].append(float(v))
    per = {c: float(np.mean(v)) for c, v in sorted(groups.items())}
    return {"overall": float(np.mean(list(per.values()))) if per else 0.0, "per_category": per,
            "per_category_n": {c: len(v) for c, v in sorted(groups.items())},
            "n": sum(len(v) for v in groups.values()), "no_verdict": sum(v is None for v in values)}


def wilson(wins: int, n: int) -> list[float] | None:
    """95% Wilson score interval of a proportion (None without a trial)."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(wins, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def duel_outcome(student_first: str | None, student_second: str | None) -> str:
    """"win" / "loss" for the student when both orders agree, else "no_verdict".
    The arguments are the winners ("first"/"second"/None) of the question with
    the student shown first, and with it shown second."""
    if student_first == "first" and student_second == "second":
        return "win"
    if student_first == "second" and student_second == "first":
        return "loss"
    return "no_verdict"


def win_rate_report(outcomes: list[str | None], categories: list[str | None]) -> dict:
    """Wins, losses, no-verdicts, rate and interval, overall and per category;
    an outcome None (the teacher has no image of that prompt) is left out."""
    def one(os: list[str]) -> dict:
        w, lo = os.count("win"), os.count("loss")
        return {"wins": w, "losses": lo, "no_verdict": os.count("no_verdict"),
                "rate": w / (w + lo) if w + lo else None, "ci95": wilson(w, w + lo)}

    per: dict[str, list[str]] = defaultdict(list)
    for o, c in zip(outcomes, categories):
        if o is not None:
            per[c or UNKNOWN].append(o)
    return {**one([o for o in outcomes if o is not None]),
            "per_category": {c: one(os) for c, os in sorted(per.items())}}


class Evaluator:
    """Held-out figures of a student checkpoint (`student`) and of each teacher (`teachers`)."""

    def __init__(self, cfg: EvaluationConfig, parts: Parts, folder: RunFolder, items: list[HeldoutPrompt],
                 say=print) -> None:
        self.cfg, self.parts, self.folder, self.items, self.say = cfg, parts, folder, items, say
        self.store = ImageStore(folder.images)
        metric = cfg.metric
        if metric == "auto":
            metric = "scene" if parts.world.exact_scorer else "vlm"
        self.metric = metric
        self._bought: dict[str, list[dict]] | None = None

    # -- the two kinds of model ------------------------------------------------------------
    def student(self, checkpoint: str | None, tag) -> dict:
        """Draw the held-out images with `checkpoint` and score them; keeps a
        grid (`grids/round_<tag>.png`) and the images."""
        pngs = self.parts.sample(checkpoint, [h.prompt for h in self.items], [h.seed for h in self.items])
        imgs = [from_png(p) for p in pngs]
        save_grid(imgs[:: max(1, len(imgs) // 48)][:48], self.folder.grids / f"round_{tag}.png")
        against = self.teacher_images() if self.metric == "vlm" and self.cfg.win_rate else None
        report, per_image = self.score(self.items, pngs, against)
        self._keep(f"student_{tag}", self.items, pngs, per_image, report, checkpoint=checkpoint)
        return report

    def teachers(self) -> dict[str, dict]:
        """Each teacher scored on the held-out images it delivered ("not_bought":
        those it did not: a spent budget, a refusal)."""
        out = {}
        for t, pngs in self.teacher_images().items():
            have = [i for i, p in enumerate(pngs) if p is not None]
            why = ", ".join(sorted({r.get("kind", "error") for r in self._bought[t] if "ref" not in r}))
            if not have:
                self.say(f"teacher {t}: not scored, none of its {len(pngs)} held-out images was bought ({why})")
                continue
            items, mine = [self.items[i] for i in have], [pngs[i] for i in have]
            report, per_image = self.score(items, mine)
            out[t] = {**report, "not_bought": len(pngs) - len(have)}
            self._keep(f"teacher_{t}", items, mine, per_image, out[t])
            if len(have) < len(pngs):
                self.say(f"teacher {t}: scored on {len(have)} of {len(pngs)} held-out images; "
                         f"{len(pngs) - len(have)} not bought ({why})")
        return out

    def teacher_images(self) -> dict[str, list[bytes | None]]:
        """Every teacher's held-out images, None where it delivered none (bought
        once; asked again, the gateways answer from the ledger for free)."""
        if self._bought is None:
            self._bought = self.parts.teachers.buy([(h.prompt, h.seed) for h in self.items])
        return {t: [self.store.get(r["ref"]) if "ref" in r else None for r in res]
                for t, res in self._bought.items()}

    # -- scoring -------------------------------------------------------------------------------
    def score(self, items: list[HeldoutPrompt], pngs: list[bytes],
              against: dict[str, list[bytes | None]] | None = None) -> tuple[dict, list[dict]]:
        """(report, per-image scores) of `pngs`, one per item; `against`: each
        teacher's images of the same items, for win rates."""
        prompts, cats = [h.prompt for h in items], [h.category for h in items]
        per_image: list[dict] = [{} for _ in pngs]
        if self.metric == "scene":
            report = {"metric": "scene", **self.parts.world.score(prompts, pngs)}
        else:
            report = {"metric": "vlm"}
            if self.cfg.alignment != "none":
                scores, method = self.alignment(prompts, pngs)
                for row, s in zip(per_image, scores):
                    row["alignment"] = s
                report["alignment"] = {"method": method, **by_category(scores, cats)}
                report.update({k: report["alignment"][k] for k in ("overall", "per_category", "n")})
            if against:
                report["win_rate"] = {t: self.win_rate(prompts, cats, pngs, theirs, t, per_image)
                                      for t, theirs in against.items()}
            if "overall" not in report:  # no alignment asked for: the mean win rate stands in
                rates = [w["rate"] for w in report.get("win_rate", {}).values() if w["rate"] is not None]
                report.update(overall=float(np.mean(rates)) if rates else 0.0, per_category={}, n=len(pngs))
        if self.cfg.reference is not None:
            from evolve.config import ShapesWorldConfig
            from evolve.worlds import make_world

            report["reference"] = make_world(ShapesWorldConfig()).score(prompts, pngs)
        return report, per_image

    def win_rate(self, prompts: list[str], cats: list[str | None], pngs: list[bytes],
                 theirs: list[bytes | None], teacher: str, per_image: list[dict]) -> dict:
        """The student's images against one teacher's, both orders asked."""
        idx = [i for i, p in enumerate(theirs) if p is not None]
        reqs = [CompareRequest(prompt=prompts[i], first=a, second=b)
                for i in idx for a, b in ((pngs[i], theirs[i]), (theirs[i], pngs[i]))]
        answers = self.parts.judge.compare(reqs)
        outcomes: list[str | None] = [None] * len(pngs)
        for k, i in enumerate(idx):
            outcomes[i] = duel_outcome(answers[2 * k].winner, answers[2 * k + 1].winner)
            per_image[i].setdefault("against", {})[teacher] = outcomes[i]
        return win_rate_report(outcomes, cats)

    def alignment(self, prompts: list[str], pngs: list[bytes]) -> tuple[list[float | None], str]:
        """Per-image alignment scores and the method that gave them."""
        method = self._method(prompts[0], pngs[0])
        qs = self.questions(prompts) if method == "questions" else {}
        res = self.parts.judge.align([AlignRequest(prompt=p, image=i, questions=qs.get(p))
                                      for p, i in zip(prompts, pngs)])
        return [r.score for r in res], method

    def _method(self, prompt: str, png: bytes) -> str:
        """vqascore or questions; "auto" probes the backend once for logprobs and
        keeps the answer in `eval/method.json`, so every evaluation of a run
        (a resumed one too) uses one method."""
        if self.cfg.alignment != "auto":
            return self.cfg.alignment
        path = self.folder.eval / "method.json"
        known = self.folder.read_json(path)
        if known is None:
            probe = self.parts.judge.align([AlignRequest(prompt=prompt, image=png)])[0]
            known = {"alignment": "vqascore" if probe.logprobs else "questions",
                     "why": "the backend returns logprobs" if probe.logprobs else
                     "the backend returned no logprobs: decomposed yes/no questions instead"}
            write_json_atomic(path, known)
            self.say(f"alignment score: {known['alignment']} ({known['why']})")
        return known["alignment"]

    def questions(self, prompts: list[str]) -> dict[str, list[str]]:
        """Each prompt's yes/no questions, written by the VLM once (cached in the run folder)."""
        path = self.folder.eval / "questions.json"
        cache = self.folder.read_json(path) or {}
        missing = sorted({p for p in prompts if p not in cache})
        if missing:
            got = self.parts.judge.questions([QuestionsRequest(prompt=p, n=self.cfg.max_questions)
                                              for p in missing])
            cache.update({p: r.questions for p, r in zip(missing, got)})
            write_json_atomic(path, cache)
        return cache

    def _keep(self, name: str, items: list[HeldoutPrompt], pngs: list[bytes], per_image: list[dict],
              report: dict, **meta) -> None:
        rows = [{"id": h.id, "prompt": h.prompt, "category": h.category, "seed": h.seed,
                 "ref": self.store.put(p), **s} for h, p, s in zip(items, pngs, per_image)]
        write_json_atomic(self.folder.eval / f"{name}.json", {"model": name, **meta, "report": report,
                                                               "images": rows})
