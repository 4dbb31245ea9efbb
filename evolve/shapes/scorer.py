"""GenEval-style scoring of a set of images: accuracy per category, and overall
as the mean over the categories present (so a large category cannot drown a small one)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evolve.shapes.grammar import CATEGORIES, Prompt, parse
from evolve.shapes.render import from_png
from evolve.shapes.scene import check


@dataclass
class ScoreReport:
    overall: float  # mean over categories present of their accuracy
    per_category: dict[str, float]
    n: int
    per_check_failures: dict[str, int]  # check name -> images failing it ("missing": no image)
    missing: list[str] = field(default_factory=list)  # ids without a readable image (score_folder)
    per_category_n: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_prompt(p: Prompt | str) -> Prompt:
    return p if isinstance(p, Prompt) else parse(p)


def _report(cats: list[str], ok: list[bool], fails: Counter, missing: list[str]) -> ScoreReport:
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for c, s in zip(cats, ok):
        by_cat[c].append(s)
    order = [c for c in CATEGORIES if c in by_cat]
    per_category = {c: float(np.mean(by_cat[c])) for c in order}
    overall = float(np.mean(list(per_category.values()))) if per_category else 0.0
    return ScoreReport(overall, per_category, len(ok), dict(fails), missing,
                       {c: len(by_cat[c]) for c in order})


def score(prompts: list[Prompt | str], images: list[np.ndarray | bytes]) -> ScoreReport:
    """Score images (arrays or PNG bytes) against their prompts, pairwise."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    cats, ok, fails = [], [], Counter()
    for p, img in zip(prompts, images):
        p = _as_prompt(p)
        if isinstance(img, (bytes, bytearray)):
            img = from_png(img)
        r = check(p, img)
        cats.append(p.category)
        ok.append(r.satisfied)
        fails.update(r.failed)
    return _report(cats, ok, fails, [])


def write_prompts_jsonl(prompts: list[Prompt | str], path: Path, ids: list[str] | None = None) -> list[str]:
    """Write {"id", "prompt"} lines (ids default to 00000, 00001, ...); return the ids."""
    texts = [_as_prompt(p).text for p in prompts]  # validate before writing anything
    ids = [f"{i:05d}" for i in range(len(texts))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(texts) or len(set(ids)) != len(ids):
        raise ValueError("ids must be unique and one per prompt")
    Path(path).write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in zip(ids, texts)))
    return ids


def read_prompts_jsonl(path: Path) -> list[tuple[str, Prompt]]:
    """(id, prompt) pairs of a prompts file; errors name the line."""
    out, seen = [], set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pid, prompt = str(rec["id"]), parse(rec["prompt"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: bad prompt record: {e}") from e
        if pid in seen:
            raise ValueError(f"{path}:{n}: duplicate id {pid!r}")
        seen.add(pid)
        out.append((pid, prompt))
    return out


def score_folder(folder: Path, prompts_jsonl: Path) -> ScoreReport:
    """Score folder/<id>.png for every record of prompts_jsonl. A missing or
    unreadable image counts as a failed image (check "missing") and its id is
    listed in report.missing."""
    folder = Path(folder)
    cats, ok, fails, missing = [], [], Counter(), []
    for pid, p in read_prompts_jsonl(prompts_jsonl):
        cats.append(p.category)
        path = folder / f"{pid}.png"
        try:
            img = from_png(path.read_bytes())
        except (OSError, ValueError):
            ok.append(False)
            fails["missing"] += 1
            missing.append(pid)
            continue
        r = check(p, img)
        ok.append(r.satisfied)
        fails.update(r.failed)
    return _report(cats, ok, fails, missing)


def heldout_set(per_category: int = 16, seed: int = 1234) -> list[Prompt]:
    """The evaluation set: `per_category` images per category. Categories with
    fewer distinct prompts (single_object has 3) repeat theirs; each repeat is
    drawn with its own seed, so every category is measured on as many images."""
    from evolve.shapes.grammar import CATEGORIES, heldout_prompts

    held = heldout_prompts(per_category, seed)
    out: list[Prompt] = []
    for cat in CATEGORIES:
        pool = [p for p in held if p.category == cat]
        out += [pool[i % len(pool)] for i in range(per_category)]
    return out
