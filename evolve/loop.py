"""The main job, top to bottom: EvolveDirector as one loop.

    seed set: every teacher draws each seed prompt, the judge keeps the best image -> v0
    each round:
        weights   the student after steps_per_round steps on this version
        held-out  how good it is now
        judge     it draws part of the training prompts; the judge compares with the teachers
        evolve    delete what it matches, expand where a teacher wins, mutate now and then
        publish   the next version; training switches to it without stopping
    final student: trained on the last version too, then scored
    report

The loop is handed its parts (world, teachers, judge, trainer, sampler) by
`build_parts` (evolve/cluster.py on a Ray cluster; stand-ins in tests), so
nothing here is Ray. Everything a run makes lives in its run folder; a run
that stopped resumes at the first round whose statistics are missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evolve import evolution
from evolve.arms import make_curator
from evolve.config import RunConfig, StudentConfig
from evolve.curation import Curator, Phases
from evolve.dataset import DatasetVersions, write_json_atomic
from evolve.evaluation import Evaluator
from evolve.parts import Parts
from evolve.run_folder import RunFolder
from evolve.storage import local_folder
from evolve.seeds import stable_seed
from evolve.world import HeldoutPrompt, World
from evolve.worlds import make_world

log = logging.getLogger("evolve")

STOP_REASONS = {
    "rounds": "all rounds done",
    "target": "the student reached target_heldout",
    "wall_clock": "max_wall_s passed",
    "budget": "the budget is spent",
    "interrupted": "interrupted (Ctrl-C or SIGTERM)",
}


@dataclass
class Prepared:
    """A run ready to start: its resolved config, start checkpoint, world, folder, held-out prompts."""

    cfg: RunConfig
    init: str | None
    world: World
    folder: RunFolder
    heldout: list[HeldoutPrompt]


def prepare(cfg: RunConfig) -> Prepared:
    """Everything that can be wrong with a run's input, checked before anything
    is bought: the config against the run folder, the world's prompts (read,
    and held-out ones kept out of the seeds), the start checkpoint."""
    cfg, init, world = resolve(cfg)
    folder = RunFolder(cfg.run_dir)
    folder.check_config(cfg)
    folder.attach_ledger()
    if init is not None:
        init = folder.share_start(init)  # on an object store: where every node loads it from
    if folder.first_unfinished_round() == 0 and DatasetVersions(folder.datasets).latest() is None:
        world.seed_prompts(np.random.default_rng(cfg.seed))  # a bad seed file fails here, not after buying
    return Prepared(cfg, init, world, folder, heldout_prompts(world, folder))


def main(cfg: RunConfig, build_parts, progress=None) -> dict:
    """Prepare `cfg` and run it with the parts `build_parts(cfg, folder, init,
    world)` (a context manager) makes; returns the report. `progress`: where
    the run's own news goes (`evolve.progress.Progress` on a terminal, or a
    callable taking a line)."""
    p = prepare(cfg)
    with build_parts(p.cfg, p.folder, p.init, p.world) as parts:
        return run(p.cfg, parts, p.folder, p.init, p.heldout, as_progress(progress))


def run(cfg: RunConfig, parts: Parts, folder: RunFolder, init: str | None, heldout: list[HeldoutPrompt],
        progress) -> dict:
    progress = as_progress(progress)
    say, trainer = progress.say, parts.trainer
    phases = Phases(progress.phase)
    versions = DatasetVersions(folder.datasets)
    curator = make_curator(cfg, parts, folder, phases, say, frozenset((h.prompt, h.seed) for h in heldout))
    evaluator = Evaluator(cfg.evaluation, parts, folder, heldout, say)
    start, t0, stop, final = folder.first_unfinished_round(), time.time(), "rounds", None
    try:
        # The seed set: every teacher draws each seed prompt, the judge keeps the best image.
        if versions.latest() is None:
            with progress.phase("seed set"):
                seed_set(cfg, curator, versions, folder, say)
        # The student before any round.
        if not folder.baseline.exists():
            with progress.phase("scoring the start"):
                acc = evaluator.student(init, "init")
            write_json_atomic(folder.baseline, {"heldout": acc})
            say(f"start: held-out {describe(acc)}")
            progress.update(heldout=brief(acc))
        phases.take()
        if start < cfg.rounds or not folder.final_stats(cfg.rounds).exists():
            with progress.phase("starting training"):
                trainer.publish(start, versions.read(start))
        progress.start(min(start, cfg.rounds))
        for rnd in range(start, cfg.rounds):
            t = time.time()
            records = versions.read(rnd)
            # 1. Weights: the student after steps_per_round steps on this version.
            with progress.phase("training"):
                snap = trainer.weights_after(rnd, cfg.train.steps_per_round, folder.checkpoint(rnd))
            waited = time.time() - t
            label_world(folder.checkpoint(rnd), parts.world)
            ckpt = folder.share(folder.checkpoint(rnd))  # what the sampler and the next round's workers load
            # 2. Held-out: how good it is now.
            with phases("heldout_s"):
                acc = evaluator.student(ckpt, rnd)
            # 3. Judge: it draws some training prompts; the judge compares them with the teachers'.
            rng = np.random.default_rng(stable_seed(cfg.seed, "eval", rnd))
            judged, verdicts = curator.judge(records, ckpt, rnd, rng)
            plan, stats = curator.plan(judged, verdicts, rng)
            # 4. Evolve: delete what it matches, expand where a teacher wins, mutate now and then.
            added = curator.acquire(curator.new_prompts(records, plan, rnd), rnd + 1)
            nxt = evolution.apply_delta(records, plan.delete_ids, added, cfg.evolution.max_dataset)
            # 5. Publish: the next version, which training switches to at its next step boundary.
            with phases("publish_s"):
                if versions.latest() == rnd:  # a resumed round may have written it already
                    versions.write(rnd + 1, nxt, {"round": rnd + 1})
                trainer.publish(rnd + 1, versions.read(rnd + 1))
            row = round_row(rnd, records, plan, stats, added, acc, curator, parts, phases.take(), t,
                            {"trainer_step": snap.get("step"), "waited_for_trainer_s": round(waited, 1)})
            write_json_atomic(folder.round_stats(rnd), row)
            folder.save_state()  # on an object store: the round's files, its statistics last
            say(f"round {rnd}: held-out {describe(acc)}  student wins {stats.student_win_rate:.0%}  dataset "
                f"{len(records)} -> +{len(added)} -{len(plan.delete_ids)}  bought {row['images_bought']}  "
                f"spend ${sum(row['spend'].values()):.2f}{uncertain_part(row)}  ({row['round_s']:.0f} s)")
            progress.update(round=rnd + 1, heldout=brief(acc), spend=sum(row["spend"].values()),
                            images=row["images_bought"])
            reason = stop_reason(cfg, curator, acc, t0)
            if reason is not None and rnd + 1 < cfg.rounds:
                stop = reason
                say(f"stopping after round {rnd}: {STOP_REASONS[reason]}")
                break
        # The final student: trained on the last evolved version too, then scored.
        if stop == "rounds":
            with progress.phase("final student"):
                final = final_student(cfg, trainer, evaluator, folder, say)
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM from `ray job stop`): what is finished is on disk. The
        # round in flight is redone by a resumed run (its purchases are in the
        # ledger, so nothing is bought twice).
        stop = "interrupted"
        say("interrupted: writing the report of the finished rounds (resume with --resume)")
    trainer_summary(trainer, folder, say)
    trainer.close()
    with progress.phase("report"):
        report = final_report(cfg, parts, evaluator, folder, time.time() - t0, final, stop, say)
        folder.save_state()
        return report


# --------------------------------------------------------------------------- before the rounds


def resolve(cfg: RunConfig) -> tuple[RunConfig, str | None, World]:
    """The run as it will be: the student's architecture from its start checkpoint,
    a small student's words from the world, the judge's grammar check from the
    world. Returns (config, start checkpoint or None, world)."""
    from evolve.student.generate import BASE_CHECKPOINT

    init = None
    if cfg.init_checkpoint is not None and not cfg.from_scratch:
        # A path, or the URI of a committed folder (fetched into this node's cache).
        if not (local_folder(cfg.init_checkpoint) / "config.json").exists():
            raise FileNotFoundError(f"init_checkpoint {cfg.init_checkpoint} has no config.json")
        init = str(cfg.init_checkpoint)
    elif not cfg.from_scratch:
        if cfg.student.is_latent:
            raise ValueError("the shipped base student is the pixel-space shapes-world one; a latent student "
                             "starts from init_checkpoint (e.g. PixArt-alpha's transformer) or from_scratch")
        if cfg.world.kind != "shapes":
            raise ValueError(f"the shipped base student knows the shapes world only; a {cfg.world.kind}-world "
                             "run starts from init_checkpoint or from_scratch")
        init = str(BASE_CHECKPOINT)
    student = cfg.student
    if init is not None:  # the architecture is the checkpoint's, whatever the config says
        here = local_folder(init)
        student = StudentConfig.model_validate_json((here / "config.json").read_text())
        if not student.is_latent and student.vocabulary is None and (here / "tokenizer.json").exists():
            # The workers build the student before loading its weights: with the checkpoint's words.
            from evolve.student.text import checkpoint_words

            student = StudentConfig.model_validate({**student.model_dump(),
                                                    "vocabulary": checkpoint_words(here / "tokenizer.json")})
    world = make_world(cfg.world)
    if init is None and not student.is_latent and student.vocabulary is None:
        words = world.vocabulary()
        if words is None:
            raise ValueError(f"a pixel-space student needs its words (student.vocabulary); the {world.name} "
                             "world gives none")
        student = StudentConfig.model_validate({**student.model_dump(), "vocabulary": tuple(words)})
    enc = student.encoders
    if init is None and enc is not None and enc.text_encoder is None and enc.tiny_vocabulary is None:
        words = world.vocabulary() or []
        student = StudentConfig.model_validate({**student.model_dump(), "encoders": {
            **enc.model_dump(), "tiny_vocabulary": tuple(words)}})
    judge = cfg.judge
    if judge.grammar_check is None:
        judge = judge.model_copy(update={"grammar_check": cfg.world.kind == "shapes"})
    cfg = cfg.model_copy(update={"student": student, "judge": judge})
    if student != cfg.student:
        log.info("student architecture taken from %s", init)
    return cfg, init, world


def heldout_prompts(world: World, folder: RunFolder) -> list[HeldoutPrompt]:
    """The run's held-out prompts: the world's at the first start (kept in
    `heldout.json`), the run folder's own copy ever after."""
    path = folder.root / "heldout.json"
    kept = folder.read_json(path)
    if kept is not None:
        return [HeldoutPrompt(**h) for h in kept]
    items = world.heldout()
    if not items:
        raise ValueError(f"the {world.name} world has no held-out prompts")
    folder.make()
    write_json_atomic(path, [h.__dict__ for h in items])
    return items


def uncertain_part(row: dict) -> str:
    """The part of the spend whose calls may or may not have been billed, when there is one."""
    uncertain = sum((row.get("spend_uncertain") or {}).values())
    return f" (${uncertain:.2f} uncertain)" if uncertain > 1e-9 else ""


def seed_set(cfg: RunConfig, curator: Curator, versions: DatasetVersions, folder: RunFolder, say) -> None:
    prompts = curator.seed_prompts()
    records = curator.acquire(prompts, 0)
    if len(records) < cfg.train.num_workers:
        raise RuntimeError(f"seed set: the teachers delivered {len(records)} of {len(prompts)} prompts, "
                           f"fewer than the {cfg.train.num_workers} training workers (see the warnings above "
                           f"and the ledger {folder.ledger})")
    versions.write(0, records, {"round": 0})
    say(f"seed set: {len(records)} prompts, version v0000")


# --------------------------------------------------------------------------- after each round


def describe(acc: dict) -> str:
    """A held-out result in a few words: accuracy (scene), or alignment and win rates (VLM)."""
    if acc.get("metric") != "vlm":
        return f"{acc['overall']:.1%}"
    parts = []
    if "alignment" in acc:
        parts.append(f"alignment {acc['alignment']['overall']:.2f}")
    for t, w in (acc.get("win_rate") or {}).items():
        parts.append(f"vs {t} {'-' if w['rate'] is None else format(w['rate'], '.0%')}")
    return ", ".join(parts) or f"{acc['overall']:.2f}"


def brief(acc: dict) -> float | str:
    """The held-out figure for a status line: an accuracy, or the VLM's alignment in words."""
    return f"alignment {acc['overall']:.2f}" if acc.get("metric") == "vlm" else acc["overall"]


def round_row(rnd, records, plan, stats, added, acc, curator: Curator, parts: Parts, phases: dict,
              t: float, timing: dict) -> dict:
    teachers = parts.teachers.stats()
    row = {
        "round": rnd,
        "dataset_size": len(records),
        "judged": stats.judged,
        "no_verdict": stats.no_verdict,
        "student_win_rate": stats.student_win_rate,
        "teacher_wins": stats.teacher_wins,
        "deleted": len(plan.delete_ids),
        "expanded_from": len(plan.expand_ids),
        "mutated": plan.mutate,
        "added": {op: sum(1 for a in added if a.op == op) for op in ("expand", "reseed", "mutate")},
        # The ledger, not this process's counters: a resumed run counts from its start.
        "images_bought": curator.training_images_bought(),
        "spend": {n: round(s["spent"], 4) for n, s in teachers.items()},  # certain + uncertain
        "spend_uncertain": {n: round(s.get("uncertain", 0.0), 4) for n, s in teachers.items()},
        "heldout": acc,
        **timing,
        "phases": phases,
        "round_s": round(time.time() - t, 1),
    }
    train = parts.trainer.status().get("metrics", {})
    parts.metrics.set(round=rnd, dataset_size=len(records), student_win_rate=stats.student_win_rate,
                      heldout_accuracy=acc["overall"], images_bought=row["images_bought"],
                      spend_usd=sum(row["spend"].values()), train_loss=train.get("loss"),
                      train_images_per_s=train.get("images_per_s"), trainer_step=train.get("step"))
    return row


def stop_reason(cfg: RunConfig, curator: Curator, acc: dict, t0: float) -> str | None:
    """Why the run should stop after this round (a key of STOP_REASONS), or None."""
    if cfg.target_heldout is not None and acc["overall"] >= cfg.target_heldout:
        return "target"
    if cfg.max_wall_s is not None and time.time() - t0 >= cfg.max_wall_s:
        return "wall_clock"
    if cfg.stop_when_spent and curator.spent():
        return "budget"
    return None


# --------------------------------------------------------------------------- the end


def final_student(cfg: RunConfig, trainer, evaluator: Evaluator, folder: RunFolder, say) -> dict:
    """The run's student is trained on the last evolved version too (steps_per_round
    on it), then scored on the held-out set like every round."""
    path = folder.final_stats(cfg.rounds)
    if path.exists():
        return json.loads(path.read_text())
    last, t = cfg.rounds, time.time()  # version `last` was published by the last round
    ckpt = folder.checkpoints / "final"
    snap = trainer.weights_after(last, cfg.train.steps_per_round, ckpt)
    label_world(ckpt, evaluator.parts.world)
    ref = folder.share(ckpt)
    acc = evaluator.student(ref, "final")
    final = {"version": last, "trainer_step": snap.get("step"), "checkpoint": ref, "heldout": acc,
             "final_s": round(time.time() - t, 1)}
    write_json_atomic(path, final)
    say(f"final student (v{last:04d}, step {snap.get('step')}): held-out {describe(acc)}")
    return final


def label_world(checkpoint: Path, world: World) -> None:
    """Say which world a checkpoint learnt (`world.json`): `evolve serve` then
    checks prompts with that world's grammar, if it has one."""
    write_json_atomic(Path(checkpoint) / "world.json", {"kind": world.name})


def trainer_summary(trainer, folder: RunFolder, say) -> None:
    """How a continuous trainer spent the run: steps, and the time its workers
    waited on the loop (polls and data swaps), in `rounds/trainer.json`."""
    st = trainer.status()
    m = st.get("metrics")
    if not m:
        return
    summary = {"steps": m.get("step"), "train_s": m.get("train_s"), "data_wait_s": m.get("data_wait_s"),
               "wait_fraction": (m.get("data_wait_s") or 0) / max(m.get("train_s") or 1e-9, 1e-9),
               "versions_started_at_step": st.get("first_step"), "snapshots": st.get("snapshots")}
    write_json_atomic(folder.rounds / "trainer.json", summary)
    say(f"trainer: {summary['steps']} steps, waited on the loop {summary['wait_fraction']:.1%} of its time")


def final_report(cfg: RunConfig, parts: Parts, evaluator: Evaluator, folder: RunFolder, wall_s: float,
                 final: dict | None, stopped: str, say) -> dict:
    from evolve.report import write_report

    if stopped == "interrupted":
        # Someone is waiting for the process to end (and `ray job stop` kills it
        # soon): no teacher images are bought to score the teachers now.
        say("teachers not scored: the run was interrupted")
        teachers = {}
    else:
        teachers = evaluator.teachers()
    return write_report(folder, teachers, parts.teachers.stats(), wall_s, say, final, stopped=stopped)


# --------------------------------------------------------------------------- progress


class Lines:
    """Progress as plain lines through `say` (tests, tools, non-terminals)."""

    def __init__(self, say=print) -> None:
        self.say = say

    def phase(self, name: str):
        return contextlib.nullcontext()

    def update(self, **fields) -> None:
        pass

    def start(self, done: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


def as_progress(progress):
    if progress is None:
        return Lines()
    return progress if hasattr(progress, "phase") else Lines(progress)
