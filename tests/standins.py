"""Plain-Python stand-ins for the loop's parts (evolve/parts.py), so the round
loop runs in one process in seconds: teachers that draw shapes-world scenes
into a real image store and ledger, a trainer that "learns" by counting steps,
a sampler whose flaws fade with those steps, and the judge backends in process.
What they stand in for is tested for real elsewhere (gateways, Ray Train,
Serve); here it is the loop's logic that is under test."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from evolve.config import FlawProfile, RunConfig
from evolve.dataset import atomic_dir
from evolve.images import to_png
from evolve.ledger import Ledger
from evolve.parts import InProcessJudge, Parts
from evolve.run_folder import RunFolder
from evolve.shapes import PromptError, read
from evolve.shapes.render import teacher_render
from evolve.store import ImageStore


class LocalTeachers:
    """Each configured teacher draws with its flaw profile; bought once per
    (teacher, prompt, seed, size), every purchase in the run's ledger, each
    teacher's budget kept; a prompt that is not a shapes scene is refused."""

    def __init__(self, cfg: RunConfig, folder: RunFolder) -> None:
        self.cfg, self.size = cfg, cfg.student.image_size
        self.store, self.ledger = ImageStore(folder.images), Ledger(folder.ledger)
        self.calls: list[tuple[str, str, int]] = []  # every paid draw

    def _one(self, t, prompt: str, seed: int) -> dict:
        hit = self.ledger.lookup(t.name, prompt, seed, self.size)
        if hit is not None:
            return {"ref": hit["ref"], "cached": True}
        try:
            scene = read(prompt)
        except PromptError as e:
            return {"error": str(e), "kind": "bad_request"}
        if self.ledger.spent(t.name) + t.price_per_image > t.budget + 1e-9:
            return {"error": f"teacher {t.name}: budget {t.budget} reached", "kind": "budget"}
        img, _ = teacher_render(scene, seed, self.size, t.flaws, teacher_seed=t.seed)
        ref = self.store.put(to_png(img))
        self.ledger.record({"teacher": t.name, "prompt": prompt, "seed": seed, "size": self.size, "ref": ref,
                            "price": t.price_per_image})
        self.calls.append((t.name, prompt, seed))
        return {"ref": ref}

    def buy(self, items):
        return {t.name: [self._one(t, p, s) for p, s in items] for t in self.cfg.teachers}

    def buy_from(self, teacher, items):
        t = next(t for t in self.cfg.teachers if t.name == teacher)
        return [self._one(t, p, s) for p, s in items]

    def stats(self):
        return {t.name: {"spent": self.ledger.spent(t.name),
                         "paid_calls": sum(c[0] == t.name for c in self.calls)} for t in self.cfg.teachers}


class StepTrainer:
    """Trains nothing: counts steps per published version and writes a
    checkpoint folder that says how many steps it stands for."""

    def __init__(self) -> None:
        self.published: list[int] = []
        self.step = 0
        self.closed = False

    def publish(self, version, records):
        assert records, "published an empty version"
        self.published.append(version)

    def weights_after(self, version, steps, out: Path):
        assert version in self.published, f"weights of unpublished version {version}"
        self.step += steps
        with atomic_dir(out) as tmp:
            tmp.mkdir(parents=True)
            (tmp / "step.json").write_text(json.dumps({"step": self.step}))
        return {"step": self.step}

    def status(self):
        return {}

    def close(self):
        self.closed = True


class FadingSampler:
    """A 'student' that draws the scene with flaws whose chance halves every
    `half_life` steps of its checkpoint (the start checkpoint: none trained)."""

    def __init__(self, size: int, flaws: FlawProfile = FlawProfile(count=0.8, color=0.8, relation=0.8, shape=0.3),
                 half_life: int = 6) -> None:
        self.size, self.flaws, self.half_life = size, flaws, half_life

    def __call__(self, checkpoint, prompts, seeds):
        step = 0
        if checkpoint and (Path(checkpoint) / "step.json").exists():
            step = json.loads((Path(checkpoint) / "step.json").read_text())["step"]
        k = 0.5 ** (step / self.half_life)
        flaws = FlawProfile(**{f: v * k for f, v in self.flaws.model_dump().items()})
        out = []
        for p, s in zip(prompts, seeds):
            try:
                scene = read(p)
            except PromptError:  # nothing it could draw: a black image
                out.append(to_png(np.zeros((self.size, self.size, 3), np.uint8)))
                continue
            out.append(to_png(teacher_render(scene, s, self.size, flaws, teacher_seed=77)[0]))
        return out


def local_parts(judge_backend=None):
    """A `build_parts` for `evolve.loop.main`: the stand-ins above and a judge
    backend in process (the scene parser unless another is given)."""
    from serve.judge_backends import SceneJudgeBackend

    @contextlib.contextmanager
    def build(cfg, folder, init, world):
        parts = Parts(world=world, teachers=LocalTeachers(cfg, folder),
                      judge=InProcessJudge(judge_backend or SceneJudgeBackend(seed=cfg.judge.seed)),
                      trainer=StepTrainer(), sample=FadingSampler(cfg.student.image_size))
        build.parts = parts
        yield parts

    return build
