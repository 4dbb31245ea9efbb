"""The parts the loop is handed: what each must do, not how it is done.

`evolve/cluster.py` builds them on a Ray cluster (teacher gateway actors, the
judge on Ray Serve, Ray Train, sampling in Ray tasks); tests hand the loop
plain-Python stand-ins. Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from evolve.dataset import Record
from evolve.judging import (AlignRequest, AlignResult, CompareRequest, Comparison, DiscriminateRequest,
                            DiscriminateVerdict, ExpandRequest, ExpandResult, MutateRequest, MutateResult,
                            QuestionsRequest, QuestionsResult)
from evolve.world import World


class Teachers(Protocol):
    """Every purchase goes through here (the gateways: limits, retries, budget, ledger).

    A result per item: {"ref": image-store ref, ...} or {"error": text, "kind": why}."""

    def buy(self, items: list[tuple[str, int]]) -> dict[str, list[dict]]:
        """Every teacher draws every (prompt, seed); an image bought before costs nothing."""

    def buy_from(self, teacher: str, items: list[tuple[str, int]]) -> list[dict]:
        """One teacher draws the items."""

    def stats(self) -> dict[str, dict]:
        """Per teacher: {"spent", "paid_calls", ...}, counted from the ledger."""


class Judge(Protocol):
    """The judge's duties, one answer per request, in order."""

    def discriminate(self, reqs: list[DiscriminateRequest], latencies: list[float] | None = None
                     ) -> list[DiscriminateVerdict]: ...

    def expand(self, reqs: list[ExpandRequest]) -> list[ExpandResult]: ...

    def mutate(self, reqs: list[MutateRequest]) -> list[MutateResult]: ...

    def compare(self, reqs: list[CompareRequest]) -> list[Comparison]: ...

    def align(self, reqs: list[AlignRequest]) -> list[AlignResult]: ...

    def questions(self, reqs: list[QuestionsRequest]) -> list[QuestionsResult]: ...


class Trainer(Protocol):
    """Student training, fed dataset versions."""

    def publish(self, version: int, records: list[Record]) -> None:
        """Train on this version from now on."""

    def weights_after(self, version: int, steps: int, out: Path) -> dict:
        """Block until the student has trained `steps` steps on `version`; put
        its EMA weights in `out` (a checkpoint folder). Returns {"step": ...}."""

    def status(self) -> dict:
        """{"metrics": {"step", "loss", "images_per_s", "train_s", "data_wait_s"}, ...}."""

    def close(self) -> None: ...


class Sampler(Protocol):
    def __call__(self, checkpoint: str | None, prompts: list[str], seeds: list[int]) -> list[bytes]:
        """PNG images of a student checkpoint (EMA weights), one per (prompt, seed)."""


class Metrics(Protocol):
    def set(self, **values: float | None) -> None: ...

    def judged(self, seconds: list[float]) -> None: ...


class NoMetrics:
    """Metrics that go nowhere (tests, tools)."""

    def set(self, **values: float | None) -> None:
        pass

    def judged(self, seconds: list[float]) -> None:
        pass


@dataclass
class Parts:
    world: World
    teachers: Teachers
    judge: Judge
    trainer: Trainer
    sample: Sampler
    metrics: Metrics = field(default_factory=NoMetrics)


class InProcessJudge:
    """A judge backend (serve/judge_backends.py: the scene parser, a VLM client)
    called in this process, one request after another: for tools (`evolve
    eval`) and tests. The cluster's judge is the Serve deployment instead."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def discriminate(self, reqs, latencies=None):
        return list(self.backend.discriminate(list(reqs))) if reqs else []

    def expand(self, reqs):
        return [self.backend.expand(r) for r in reqs]

    def mutate(self, reqs):
        return [self.backend.mutate(r) for r in reqs]

    def compare(self, reqs):
        return [self.backend.compare(r.prompt, r.first, r.second) for r in reqs]

    def align(self, reqs):
        return [self.backend.align(r) for r in reqs]

    def questions(self, reqs):
        return [self.backend.questions(r) for r in reqs]
