"""The main job: EvolveDirector rounds as one Ray program.

    seed prompts -> teachers render -> judge picks best image -> v0
    each round: train (Ray Train, fed by Ray Data) -> score on held-out set
                -> student samples judged prompts -> judge discriminates
                -> evolution (pure, evolve.evolution) -> teachers render new
                prompts -> judge picks best -> next dataset version

Everything a run makes lives in its run folder; a run that stopped resumes at
the first round whose statistics are missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from evolve import evolution
from evolve.config import RunConfig, StudentConfig
from evolve.dataset import DatasetVersions, Record, atomic_dir, record_id, write_json_atomic
from evolve.judging import (DiscriminateRequest, DiscriminateVerdict, ExpandRequest, MutateRequest,
                            TeacherImage)
from evolve.ledger import Ledger
from evolve.shapes.grammar import parse, sample_prompt
from evolve.shapes.scorer import heldout_set, score
from evolve.shapes.render import from_png, to_png
from evolve.store import ImageStore

log = logging.getLogger("evolve")

BASE_CHECKPOINT = Path(__file__).parent / "assets" / "base_student"


def stable_seed(*parts: Any) -> int:
    """A seed from values, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little") >> 1


class RunFolder:
    """Paths of everything one run makes."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.config = self.root / "config.json"
        self.images = self.root / "images"
        self.features = self.root / "features"  # a LatentStudent's latents and captions, beside the images
        self.ledger = self.root / "ledger.jsonl"
        self.datasets = self.root / "datasets"
        self.checkpoints = self.root / "checkpoints"
        self.train_storage = self.root / "ray_train"
        self.snapshots = self.checkpoints / "live"
        self.rounds = self.root / "rounds"
        self.grids = self.root / "grids"
        self.verdicts = self.root / "verdicts"  # every judge answer, raw and parsed, per round
        self.report = self.root / "report.json"

    def checkpoint(self, rnd: int) -> Path:
        return self.checkpoints / f"round_{rnd:03d}"

    def round_stats(self, rnd: int) -> Path:
        return self.rounds / f"round_{rnd:03d}.json"

    def make(self) -> None:
        for p in (self.root, self.images, self.datasets, self.checkpoints, self.rounds, self.grids):
            p.mkdir(parents=True, exist_ok=True)


def resolve_init_checkpoint(cfg: RunConfig) -> str | None:
    if cfg.from_scratch:
        return None
    if cfg.init_checkpoint is not None:
        if not Path(cfg.init_checkpoint, "config.json").exists():
            raise FileNotFoundError(f"init_checkpoint {cfg.init_checkpoint} has no config.json")
        return str(cfg.init_checkpoint)
    if cfg.student.is_latent:
        raise ValueError("the shipped base student is the pixel-space shapes-world one; a latent student "
                         "starts from init_checkpoint (e.g. PixArt-alpha's transformer) or from_scratch")
    if (BASE_CHECKPOINT / "config.json").exists():
        return str(BASE_CHECKPOINT)
    log.warning("no shipped base student at %s: starting from random weights", BASE_CHECKPOINT)
    return None


# --------------------------------------------------------------------------- services


class Services:
    """Handles to the long-lived parts: teacher gateways (actors) and the judge (Serve)."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, init: str | None = None):
        import ray
        from ray import serve

        from actors.teacher_gateway import start_gateway
        from serve.judge import deploy_judge
        from serve.teachers import EmbeddedTeacherHost

        size = cfg.student.image_size
        embedded = [t for t in cfg.teachers if t.kind == "embedded"]
        self.teacher_host = None
        urls: dict[str, str] = {}
        if embedded:
            self.teacher_host = EmbeddedTeacherHost.options(name=f"teachers-http:{folder.root.name}").remote()
            urls = ray.get(self.teacher_host.start.remote(embedded, size))
        self.gateways = {}
        for t in cfg.teachers:
            url = urls[t.name] if t.kind == "embedded" else t.base_url
            self.gateways[t.name] = start_gateway(t, url, folder.images, folder.ledger, size)
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve_port})
        self.cfg_judge_backend = cfg.judge.backend
        self.judge = deploy_judge(cfg.judge, cfg.serve_port)
        self.edgen = None
        if cfg.serve_edgen:
            # Users watch the student improve: the endpoint starts on the run's
            # start checkpoint and follows each new round's checkpoint.
            from evolve.config import EdgenServeConfig
            from serve.edgen import build_edgen_app

            ecfg = EdgenServeConfig(checkpoint=init, watch_dir=folder.checkpoints, num_cpus=0.1)
            self.edgen = serve.run(build_edgen_app(ecfg), name="edgen", route_prefix="/edgen")

    def teacher_stats(self) -> dict[str, dict]:
        import ray

        return {n: ray.get(g.stats.remote()) for n, g in self.gateways.items()}

    def buy(self, items: list[tuple[str, int]]) -> dict[str, list[dict]]:
        """Every teacher renders every (prompt, seed); cached images cost nothing."""
        import ray

        refs = {n: g.render_many.remote(items) for n, g in self.gateways.items()}
        return {n: ray.get(r) for n, r in refs.items()}

    def buy_from(self, teacher: str, items: list[tuple[str, int]]) -> list[dict]:
        """One teacher renders the items (the random-sampling baseline buys this way)."""
        import ray

        return ray.get(self.gateways[teacher].render_many.remote(items)) if items else []

    def ask_judge(self, method: str, reqs: list, latencies: list[float] | None = None,
                  retries: int = 5) -> list:
        """The judge's answers to `reqs` (one `method` call each, batched by Serve).

        A replica that dies under a request (killed, node lost) fails it with a
        RayActorError; Serve starts another, and the failed requests are asked
        again: judging is free and repeatable. `latencies` receives each
        answer's seconds (for metrics)."""
        from ray.exceptions import RayActorError

        out: list = [None] * len(reqs)
        pending = list(range(len(reqs)))
        t = time.perf_counter()
        for attempt in range(retries + 1):
            responses = {i: getattr(self.judge, method).remote(reqs[i]) for i in pending}
            failed, error = [], None
            for i, r in responses.items():
                try:
                    out[i] = r.result()
                except RayActorError as e:
                    failed.append(i)
                    error = e
                    continue
                if latencies is not None:
                    latencies.append(time.perf_counter() - t)
            if not failed:
                return out
            log.warning("judge replica lost under %d %s requests (%s); asking again", len(failed), method,
                        type(error).__name__)
            time.sleep(min(2.0 ** attempt, 10.0))
            pending = failed
        raise RuntimeError(f"the judge failed {len(pending)} {method} requests {retries + 1} times") from error

    def discriminate(self, reqs: list[DiscriminateRequest],
                     latencies: list[float] | None = None) -> list[DiscriminateVerdict]:
        return self.ask_judge("discriminate", reqs, latencies)

    def close(self) -> None:
        import ray
        from ray import serve

        apps = ["judge"] + ["vlm"] * (self.cfg_judge_backend == "vllm") + ["edgen"] * (self.edgen is not None)
        for name in apps:
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        for g in self.gateways.values():
            ray.kill(g)
        if self.teacher_host is not None:
            ray.get(self.teacher_host.stop.remote())
            ray.kill(self.teacher_host)


# --------------------------------------------------------------------------- student


def version_dataset(cfg: RunConfig, folder: RunFolder, records: list[Record]):
    """A dataset version as a Ray Dataset of {"prompt", "image" (PNG bytes)};
    for a latent student, of its precomputed features (encoded on the way
    where missing: `latent_dataset`)."""
    import ray

    store_root = str(folder.images)
    rows = [{"prompt": r.prompt, "image_ref": r.image_ref} for r in records]
    if cfg.student.is_latent:
        from evolve.student.encoders import latent_dataset

        ds = latent_dataset(rows, str(folder.features), store_root, cfg.student.encoders,
                            min_blocks=cfg.train.num_workers, in_memory=cfg.train.features_in_memory)
        ds.context.enable_progress_bars = False
        return ds

    def load(batch: dict) -> dict:
        store = ImageStore(store_root)
        return {"prompt": batch["prompt"], "image": np.array([store.get(r) for r in batch["image_ref"]], dtype=object)}

    # A sliver of CPU per Data task: with 2 CPUs the train workers' share plus
    # the actors leave less than one whole CPU, and a 1-CPU Data task would wait forever.
    ds = ray.data.from_items(rows).map_batches(load, batch_format="numpy", num_cpus=0.25)
    # Workers read a shard in one go; an open progress bar there would only
    # repeat itself in the logs for as long as the shard is in use.
    ds.context.enable_progress_bars = False
    return ds


def train_round(cfg: RunConfig, folder: RunFolder, records: list[Record], rnd: int,
                init: str | None) -> Path:
    """The "rounds" schedule: one fit() of steps_per_round on this version."""
    from evolve.student.train import fit_student

    out = folder.checkpoint(rnd)
    fit_student(version_dataset(cfg, folder, records), student_cfg=cfg.student, train_cfg=cfg.train,
                steps=cfg.train.steps_per_round, storage_path=str(folder.train_storage),
                name=f"round_{rnd:03d}", init_checkpoint=init, out_dir=str(out), features=folder.features)
    return out


class ContinuousTrainer:
    """The "continuous" schedule: one Ray Train run for the whole job.

    The trainer runs in a background thread of the driver (`fit()` blocks) and
    meets the loop through a TrainerFeed actor: `publish` hands it a new
    dataset version (one Ray Data shard per worker), `weights_after` waits for
    an EMA snapshot trained `steps` steps on a version and copies it into the
    run folder. The trainer never waits for the loop: it keeps training on the
    version it has until a newer one arrives."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, init: str | None):
        from actors.trainer_feed import TrainerFeed

        self.cfg, self.folder, self.init = cfg, folder, init
        self.feed = TrainerFeed.options(name=f"trainer-feed:{folder.root.name}").remote(
            cfg.train.num_workers, cfg.train.steps_per_round if cfg.train.lockstep else None)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _fit(self) -> None:
        from evolve.student.train import fit_student

        try:
            fit_student(None, student_cfg=self.cfg.student, train_cfg=self.cfg.train, steps=None,
                        storage_path=str(self.folder.train_storage), name="continuous",
                        init_checkpoint=self.init, feed=f"trainer-feed:{self.folder.root.name}",
                        snapshot_dir=str(self.folder.snapshots), features=self.folder.features)
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
            self.error = e

    def publish(self, version: int, records: list[Record]) -> None:
        import ray

        # split() hands out whole blocks: version_dataset makes at least one per worker.
        shards = version_dataset(self.cfg, self.folder, records).split(self.cfg.train.num_workers, equal=False)
        ray.get(self.feed.publish.remote(version, shards))
        if self.thread is None:
            self.thread = threading.Thread(target=self._fit, name="continuous-trainer", daemon=True)
            self.thread.start()

    def weights_after(self, version: int, steps: int, out: Path) -> dict:
        """Block until the trainer has done `steps` steps on `version`; copy that
        snapshot to `out` (whole, then renamed). Returns the snapshot's record."""
        import ray

        ref = self.feed.wait_snapshot.remote(version, steps)
        while not ray.wait([ref], timeout=2.0)[0]:
            if self.error is not None or (self.thread is not None and not self.thread.is_alive()):
                raise RuntimeError(f"the training run stopped: {self.error!r}") from self.error
        snap = ray.get(ref)
        with atomic_dir(out) as tmp:
            shutil.copytree(snap["path"], tmp)
        return snap

    def status(self) -> dict:
        import ray

        return ray.get(self.feed.status.remote())

    def close(self, timeout_s: float = 300) -> None:
        """Ask the workers to checkpoint and return; wait for fit() to end."""
        import ray

        try:
            ray.get(self.feed.finish.remote())
            if self.thread is not None:
                self.thread.join(timeout_s)
        finally:
            ray.kill(self.feed)
        if self.error is not None:
            raise RuntimeError(f"the training run failed: {self.error!r}") from self.error


def _sample_pngs(ckpt: str | None, prompts: list[str], seeds: list[int], student_cfg, sample_cfg) -> list[bytes]:
    import torch

    from evolve.student.diffusion import sample
    from evolve.student.generate import load_student
    from evolve.student.model import build_student

    torch.set_num_threads(2)
    student = load_student(ckpt) if ckpt else build_student(student_cfg).eval()
    if sample_cfg.num_gpus > 0:
        student = student.to("cuda")
    return [to_png(i) for i in sample(student, prompts, seeds, sample_cfg)]


_sample_task = None


def sample_student(cfg: RunConfig, checkpoint: str | None, prompts: list[str], seeds: list[int]) -> list[bytes]:
    """Student images as PNG bytes, sampled in a Ray task from the EMA weights."""
    import ray

    global _sample_task
    if not prompts:
        return []
    if _sample_task is None:
        # Half a CPU: on 2 CPUs it must fit beside the continuous trainer's workers.
        _sample_task = ray.remote(num_cpus=0.5)(_sample_pngs)
    task = _sample_task.options(num_gpus=cfg.sample.num_gpus) if cfg.sample.num_gpus else _sample_task
    return ray.get(task.remote(checkpoint, prompts, seeds, cfg.student, cfg.sample))


# --------------------------------------------------------------------------- the loop

STOP_REASONS = {
    "rounds": "all rounds done",
    "target": "the student reached target_heldout",
    "wall_clock": "max_wall_s passed",
    "budget": "the budget is spent",
    "interrupted": "interrupted (Ctrl-C or SIGTERM)",
}


class LoopMetrics:
    """The loop's state for the Ray dashboard / Prometheus (`ray.util.metrics`),
    tagged by run; the teacher gateways and Serve export their own."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Gauge, Histogram

        self.tags = {"run": run}
        keys = ("run",)
        names = {"round": "last finished round", "dataset_size": "training records in the round's version",
                 "student_win_rate": "share of judged prompts where the student matched the best teacher",
                 "heldout_accuracy": "student's held-out accuracy after the round",
                 "images_bought": "teacher images paid for", "spend_usd": "money spent on all teachers",
                 "train_loss": "trainer's recent loss", "train_images_per_s": "trainer throughput",
                 "trainer_step": "trainer's step"}
        self.gauges = {k: Gauge(f"evolve_{k}", d, tag_keys=keys) for k, d in names.items()}
        self.judge_latency = Histogram("evolve_judge_latency_s", "seconds from asking the judge to its verdict",
                                       boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tag_keys=keys)

    def set(self, **values: float | None) -> None:
        for k, v in values.items():
            if v is not None:
                self.gauges[k].set(float(v), tags=self.tags)

    def judged(self, seconds: list[float]) -> None:
        for s in seconds:
            self.judge_latency.observe(s, tags=self.tags)


class EvolveRun:
    def __init__(self, cfg: RunConfig, progress=print):
        self.cfg = cfg
        self.folder = RunFolder(cfg.run_dir)
        self.versions = DatasetVersions(self.folder.datasets)
        self.store = ImageStore(self.folder.images)
        self.say = progress
        self.heldout = [p.text for p in heldout_set(cfg.heldout_per_category)]
        # The same seeds score the student every round and the teachers at the end.
        self.heldout_seeds = [stable_seed("heldout", i) for i in range(len(self.heldout))]
        self.phases: dict[str, float] = {}

    # -- setup / resume -------------------------------------------------------
    def _check_config(self) -> None:
        self.folder.make()
        if self.folder.config.exists():
            old = RunConfig.load(self.folder.config)
            # What does not change the run's results may differ on resume; the
            # folder itself may have moved (nothing inside it stores its path).
            free = {"run_dir", "rounds", "serve_port", "serve_edgen", "max_wall_s", "target_heldout",
                    "stop_when_spent"}
            mine = self.cfg.model_dump(exclude=free)
            theirs = old.model_dump(exclude=free)
            if mine != theirs:
                diff = sorted(k for k in mine if mine[k] != theirs.get(k))
                raise ValueError(f"run folder {self.folder.root} holds a run with another config "
                                 f"(differs in {diff}); use a new --run-dir")
        self.cfg.save(self.folder.config)

    def first_unfinished_round(self) -> int:
        r = 0
        while self.folder.round_stats(r).exists():
            r += 1
        return r

    # -- pieces -----------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the time spent inside to this round's `phases[name]`: heldout_s
        (scoring), sample_s (student images of judged prompts), judge_s
        (discriminating them), expand_s (variants, mutations), teachers_s
        (buying new prompts' images), select_s (the judge picking each one's
        best image), publish_s (writing the version, handing it to the trainer)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t

    def log_verdicts(self, tag: str, entries: list[dict]) -> None:
        """The judge's answers (raw and parsed) beside the samples they decided,
        in `verdicts/<tag>.json`; written whole, so a resumed round rewrites it."""
        write_json_atomic(self.folder.verdicts / f"{tag}.json", entries)

    def affordable(self, svc: Services, cands: list[evolution.NewPrompt],
                   images_per_prompt: int | None = None, quiet: bool = False) -> list[evolution.NewPrompt]:
        """The first candidates the run's caps still pay for: the total budget
        (`budget`, dollars) and the training images (`max_images`; every teacher
        renders every new prompt unless `images_per_prompt` says otherwise).
        Each teacher's own budget is kept by its gateway. `quiet`: say nothing
        about what was cut (a probe, not a purchase)."""
        say = (lambda _msg: None) if quiet else self.say
        n = len(cands)
        if not cands:
            return cands
        if self.cfg.budget is not None:
            spent = sum(s["spent"] for s in svc.teacher_stats().values())
            per_prompt = sum(t.price_per_image for t in self.cfg.teachers)
            if per_prompt > 0:
                n = min(n, max(0, int((self.cfg.budget - spent + 1e-9) // per_prompt)))
            if n < len(cands):
                say(f"total budget ${self.cfg.budget:.2f}: ${spent:.2f} spent, "
                         f"{n} of {len(cands)} new prompts bought")
        if self.cfg.max_images is not None:

            bought = len(Ledger(self.folder.ledger))  # every image paid for, across restarts
            per = images_per_prompt or len(self.cfg.teachers)
            left = max(0, (self.cfg.max_images - bought) // per)
            if left < n:
                say(f"image budget {self.cfg.max_images}: {bought} bought, {left} of {len(cands)} "
                         f"new prompts bought")
                n = left
        return cands[:n]

    def acquire_random(self, svc: Services, cands: list[evolution.NewPrompt], rnd: int) -> list[Record]:
        """The random-sampling baseline: each prompt bought from one teacher (in
        turn), no judge, so every image bought is a training image."""
        cands = self.affordable(svc, cands, images_per_prompt=1)
        names = [t.name for t in self.cfg.teachers]
        # The index too: a prompt drawn twice is two images (two seeds).
        seeds = [stable_seed(self.cfg.seed, c.prompt, rnd, i) for i, c in enumerate(cands)]
        mine = {t: [i for i in range(len(cands)) if i % len(names) == k] for k, t in enumerate(names)}
        got = {t: svc.buy_from(t, [(cands[i].prompt, seeds[i]) for i in idx]) for t, idx in mine.items()}
        out = []
        for t, idx in mine.items():
            for i, res in zip(idx, got[t]):
                if "ref" not in res:
                    log.warning("teacher %s did not deliver %r: %s", t, cands[i].prompt, res.get("error"))
                    continue
                c = cands[i]
                out.append(Record(id=record_id(c.prompt, seeds[i], rnd, c.op), prompt=c.prompt,
                                  category=parse(c.prompt).category, teacher=t, image_ref=res["ref"],
                                  seed=seeds[i], round_added=rnd, parent_id=c.parent_id, op=c.op))
        return sorted(out, key=lambda r: r.id)

    def candidate_seed(self, c: evolution.NewPrompt, rnd: int) -> int:
        """The teachers' seed for a new prompt; another copy of a prompt draws another image."""
        return stable_seed(self.cfg.seed, c.prompt, rnd, *([c.copy] if c.copy else []))

    def acquire(self, svc: Services, cands: list[evolution.NewPrompt], rnd: int) -> list[Record]:
        """Teachers render new prompts; the judge picks each prompt's best image
        (no student image is needed for that)."""
        if self.cfg.evolution.strategy == "random":
            return self.acquire_random(svc, cands, rnd)
        cands = self.affordable(svc, cands)
        if not cands:
            return []
        seeds = [self.candidate_seed(c, rnd) for c in cands]
        with self.phase("teachers_s"):
            bought = svc.buy([(c.prompt, s) for c, s in zip(cands, seeds)])
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
        if self.cfg.evolution.select == "random":  # ablation: no judge between teachers
            rng = np.random.default_rng(stable_seed(self.cfg.seed, "select", rnd))
            verdicts = [DiscriminateVerdict(prompt=q.prompt, best_teacher=str(rng.choice(sorted(r))),
                                            reason="picked at random (evolution.select: random)")
                        for q, r in zip(reqs, refs)]
        else:
            with self.phase("select_s"):
                verdicts = svc.discriminate(reqs)
        out = evolution.select_records(
            [cands[i] for i in keep], [seeds[i] for i in keep], verdicts, refs,
            [parse(cands[i].prompt).category for i in keep], rnd)
        self.log_verdicts(f"select_{rnd:03d}", [
            {"record_id": r.id, "prompt": r.prompt, "verdict": v.model_dump(mode="json")}
            for r, v in zip(out, verdicts)])
        return out

    def seed_set(self, svc: Services) -> None:
        rng = np.random.default_rng(self.cfg.seed)
        cats = self.cfg.seed_categories
        prompts: list[str] = []
        tries = 0
        # The random baseline samples with replacement: its budget is in images, and
        # the grammar has fewer prompts than a large budget (a prompt again = a new seed).
        repeat = self.cfg.evolution.strategy == "random"
        while len(prompts) < self.cfg.seed_prompts and tries < 100 * self.cfg.seed_prompts:
            tries += 1
            cat = None if cats is None else cats[int(rng.integers(len(cats)))]
            p = sample_prompt(rng, cat).text
            if repeat or p not in prompts:
                prompts.append(p)
        records = self.acquire(svc, [evolution.NewPrompt(p, "seed") for p in prompts], 0)
        if len(records) < self.cfg.train.num_workers:
            raise RuntimeError(f"seed set: the teachers delivered {len(records)} of {len(prompts)} prompts, "
                               f"fewer than the {self.cfg.train.num_workers} training workers (see the "
                               f"warnings above and the job log {self.folder.root / 'ledger.jobs.jsonl'})")
        self.versions.write(0, records, {"round": 0})
        self.say(f"seed set: {len(records)} prompts, version v0000")

    def score_heldout(self, checkpoint: str | None, rnd: int | str) -> dict:
        pngs = sample_student(self.cfg, checkpoint, self.heldout, self.heldout_seeds)
        imgs = [from_png(p) for p in pngs]
        save_grid(imgs[:: max(1, len(imgs) // 48)][:48], self.folder.grids / f"round_{rnd}.png")
        return score(self.heldout, imgs).to_dict()

    def judge_round(self, svc: Services, records: list[Record], ckpt: str, rnd: int):
        rng = np.random.default_rng(stable_seed(self.cfg.seed, "eval", rnd))
        judged = evolution.choose_eval_records(records, self.cfg.evolution, rng)
        with self.phase("sample_s"):
            student = sample_student(self.cfg, ckpt, [r.prompt for r in judged], [r.seed for r in judged])
        # All teachers' images of these prompts were bought when the prompt joined:
        # the gateways answer from the ledger, nothing is paid again.
        with self.phase("teachers_s"):
            bought = svc.buy([(r.prompt, r.seed) for r in judged])
        reqs = []
        for i, r in enumerate(judged):
            imgs = [TeacherImage(teacher=t, image=self.store.get(res[i]["ref"]))
                    for t, res in bought.items() if "ref" in res[i]]
            reqs.append(DiscriminateRequest(prompt=r.prompt, student_image=student[i], teacher_images=imgs))
        latencies: list[float] = []
        with self.phase("judge_s"):
            verdicts = svc.discriminate(reqs, latencies)
        self.metrics.judged(latencies)
        self.save_judge_grid(rnd, judged, reqs, verdicts)
        self.log_verdicts(f"judge_{rnd:03d}", [
            {"record_id": r.id, "prompt": r.prompt, "verdict": v.model_dump(mode="json")}
            for r, v in zip(judged, verdicts)])
        plan, stats = evolution.plan_round(judged, verdicts, self.cfg.evolution, rng)
        return judged, plan, stats

    def save_judge_grid(self, rnd: int, judged: list[Record], reqs: list[DiscriminateRequest],
                        verdicts: list[DiscriminateVerdict], rows: int = 8) -> None:
        """What the judge saw, for people: `grids/judge_NNN.png`, one row per judged
        prompt (student, then each teacher), and `grids/judge_NNN.json` saying
        what each row and column is and what the judge decided."""
        names = [t.name for t in self.cfg.teachers]
        size = self.cfg.student.image_size
        blank = np.zeros((size, size, 3), np.uint8)
        images, meta = [], []
        for rec, req, v in list(zip(judged, reqs, verdicts))[:rows]:
            mine = {t.teacher: t.image for t in req.teacher_images}
            cells = [req.student_image] + [mine.get(n) for n in names]
            images += [from_png(c) if c is not None else blank for c in cells]
            meta.append({"record_id": rec.id, "prompt": rec.prompt, "decided": v.decided,
                         "student_matches": v.student_matches, "best_teacher": v.best_teacher})
        if not images:
            return
        save_grid(images, self.folder.grids / f"judge_{rnd:03d}.png", cols=1 + len(names))
        write_json_atomic(self.folder.grids / f"judge_{rnd:03d}.json",
                          {"columns": ["student"] + names, "rows": meta})

    def evolve(self, svc: Services, records: list[Record], plan: evolution.RoundPlan,
               rnd: int) -> tuple[list[Record], list[Record]]:
        by_id = {r.id: r for r in records}
        training = sorted({r.prompt for r in records})
        with self.phase("expand_s"):
            expansions = dict(zip(plan.expand_ids, svc.ask_judge("expand", [ExpandRequest(
                prompt=by_id[rid].prompt, k=self.cfg.evolution.expand_k, seed=stable_seed(rid, rnd),
                avoid_prompts=training) for rid in plan.expand_ids])))
            mutation = None
            if plan.mutate and self.cfg.evolution.mutate_n > 0:
                mutation = svc.ask_judge("mutate", [MutateRequest(
                    avoid_prompts=training, n=self.cfg.evolution.mutate_n,
                    seed=stable_seed(self.cfg.seed, "mutate", rnd))])[0]
        self.log_verdicts(f"evolve_{rnd:03d}", [
            {"op": "expand", "record_id": rid, **e.model_dump(mode="json")} for rid, e in expansions.items()
        ] + ([{"op": "mutate", **mutation.model_dump(mode="json")}] if mutation is not None else []))
        evo = self.cfg.evolution
        cands = evolution.new_prompts(expansions, mutation, set(training), evo.expand_k if evo.reseed else 0)
        added = self.acquire(svc, cands, rnd + 1)
        nxt = evolution.apply_delta(records, plan.delete_ids, added, self.cfg.evolution.max_dataset)
        return nxt, added

    # -- main -------------------------------------------------------------------
    def run(self) -> dict:
        init = resolve_init_checkpoint(self.cfg)
        if init is not None:
            # The student's architecture is the checkpoint's, whatever the config says.
            arch = StudentConfig.model_validate_json(Path(init, "config.json").read_text())
            if arch != self.cfg.student:
                log.info("student architecture taken from %s", init)
                self.cfg = self.cfg.model_copy(update={"student": arch})
        cfg = self.cfg
        self._check_config()
        start = self.first_unfinished_round()
        t0 = time.time()
        svc = Services(cfg, self.folder, init)
        self.metrics = LoopMetrics(self.folder.root.name)
        trainer, stop = None, "rounds"
        continuous = cfg.train.schedule == "continuous"
        final_path = self.folder.rounds / f"final_v{cfg.rounds:04d}.json"
        # A progress bar on a terminal; none in logs, CI or `ray job submit` output.
        bar = tqdm(total=cfg.rounds, initial=min(start, cfg.rounds), desc="rounds", unit="round",
                   disable=None if not os.environ.get("CI") else True)
        try:
            try:
                if self.versions.latest() is None:
                    self.seed_set(svc)
                baseline_path = self.folder.rounds / "baseline.json"
                if not baseline_path.exists():
                    acc = self.score_heldout(init, "init")
                    write_json_atomic(baseline_path, {"heldout": acc})
                    self.say(f"start: held-out accuracy {acc['overall']:.1%}")
                if continuous and (start < cfg.rounds or not final_path.exists()):
                    trainer = ContinuousTrainer(cfg, self.folder, init)
                    trainer.publish(start, self.versions.read(start))
                for rnd in range(start, cfg.rounds):
                    init = self.play_round(svc, rnd, init, trainer)
                    bar.update(1)
                    reason = self.stop_reason(svc, rnd, t0)
                    if reason is not None and rnd + 1 < cfg.rounds:
                        stop = reason
                        self.say(f"stopping after round {rnd}: {STOP_REASONS[reason]}")
                        break
                if trainer is not None and stop == "rounds":
                    self.final_student(trainer, final_path)
            except KeyboardInterrupt:
                # Ctrl-C (or SIGTERM from `ray job stop`): what is finished is on disk;
                # report it. The round in flight is redone by a resumed run (its
                # purchases are in the ledger, so nothing is bought twice).
                stop = "interrupted"
                self.say("interrupted: writing the report of the finished rounds (resume with --resume)")
            if trainer is not None:
                self.trainer_summary(trainer, time.time() - t0)
                trainer, closing = None, trainer
                closing.close()
            final = json.loads(final_path.read_text()) if continuous and final_path.exists() else None
            bar.close()
            report = self.final_report(svc, time.time() - t0, final, stop)
        finally:
            if trainer is not None:  # an error on the way: stop training, keep the error
                try:
                    trainer.close(timeout_s=60)
                except Exception:  # noqa: BLE001
                    log.exception("stopping the trainer")
            svc.close()
        return report

    def final_student(self, trainer: "ContinuousTrainer", path: Path) -> None:
        """Continuous schedule: the run's student is trained on the last evolved
        version too (the rounds schedule stops before it): steps_per_round on
        it, then scored on the held-out set like every round."""
        if path.exists():
            return
        last, t = self.cfg.rounds, time.time()  # version `last` was published by the last round
        ckpt = self.folder.checkpoints / "final"
        snap = trainer.weights_after(last, self.cfg.train.steps_per_round, ckpt)
        acc = self.score_heldout(str(ckpt), "final")
        write_json_atomic(path, {"version": last, "trainer_step": snap["step"], "checkpoint": str(ckpt),
                                 "heldout": acc, "final_s": round(time.time() - t, 1)})
        self.say(f"final student (v{last:04d}, step {snap['step']}): held-out {acc['overall']:.1%}")

    def trainer_summary(self, trainer: "ContinuousTrainer", wall_s: float) -> dict:
        """How the continuous trainer spent the run: steps, and the time its
        workers waited on the loop (polls and data swaps)."""
        st = trainer.status()
        m = st["metrics"]
        summary = {"steps": m.get("step"), "train_s": m.get("train_s"), "data_wait_s": m.get("data_wait_s"),
                   "wait_fraction": (m.get("data_wait_s") or 0) / max(m.get("train_s") or 1e-9, 1e-9),
                   "versions_started_at_step": st["first_step"], "snapshots": st["snapshots"]}
        write_json_atomic(self.folder.rounds / "trainer.json", summary)
        self.say(f"trainer: {summary['steps']} steps, waited on the loop {summary['wait_fraction']:.1%} "
                 f"of its time")
        return summary

    def play_round(self, svc: Services, rnd: int, init: str | None,
                   trainer: "ContinuousTrainer | None" = None) -> str:
        cfg = self.cfg
        t = time.time()
        records = self.versions.read(rnd)
        timing = {}
        if trainer is None:
            init = str(self.folder.checkpoint(rnd - 1)) if rnd > 0 else init
            ckpt = str(train_round(cfg, self.folder, records, rnd, init))
            timing["train_s"] = round(time.time() - t, 1)
        else:
            snap = trainer.weights_after(rnd, cfg.train.steps_per_round, self.folder.checkpoint(rnd))
            ckpt = str(self.folder.checkpoint(rnd))
            timing = {"trainer_step": snap["step"], "waited_for_trainer_s": round(time.time() - t, 1)}
        self.phases = {}  # where the round's time goes: see `phase`
        with self.phase("heldout_s"):
            acc = self.score_heldout(ckpt, rnd)
        if cfg.evolution.strategy == "random":  # the baseline: no judge, the data stays as bought
            plan, stats = evolution.RoundPlan((), (), False), evolution.RoundStats()
            nxt, added = records, []
        else:
            judged, plan, stats = self.judge_round(svc, records, ckpt, rnd)
            # The last round evolves too: its version is the run's evolved dataset,
            # and a run resumed with more rounds trains on it.
            nxt, added = self.evolve(svc, records, plan, rnd)
        with self.phase("publish_s"):
            if self.versions.latest() == rnd:  # a resumed round may have written it already
                self.versions.write(rnd + 1, nxt, {"round": rnd + 1})
            if trainer is not None:
                trainer.publish(rnd + 1, self.versions.read(rnd + 1))
        phases = {k: round(v, 2) for k, v in self.phases.items()}
        teachers = svc.teacher_stats()
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
            "images_bought": len(Ledger(self.folder.ledger)),
            "spend": {n: round(s["spent"], 4) for n, s in teachers.items()},
            "heldout": acc,
            **timing,
            "phases": phases,
            "round_s": round(time.time() - t, 1),
        }
        write_json_atomic(self.folder.round_stats(rnd), row)
        train = trainer.status()["metrics"] if trainer is not None else {}
        self.metrics.set(round=rnd, dataset_size=len(records), student_win_rate=stats.student_win_rate,
                         heldout_accuracy=acc["overall"], images_bought=row["images_bought"],
                         spend_usd=sum(row["spend"].values()), train_loss=train.get("loss"),
                         train_images_per_s=train.get("images_per_s"), trainer_step=train.get("step"))
        self.say(f"round {rnd}: held-out {acc['overall']:.1%}  student wins {stats.student_win_rate:.0%}"
                 f"  dataset {len(records)} -> +{len(added)} -{len(plan.delete_ids)}"
                 f"  bought {row['images_bought']}  spend ${sum(row['spend'].values()):.2f}"
                 f"  ({row['round_s']:.0f} s)")
        return ckpt

    def stop_reason(self, svc: Services, rnd: int, t0: float) -> str | None:
        """Why the run should stop after round `rnd` (a key of STOP_REASONS), or None."""
        cfg = self.cfg
        acc = json.loads(self.folder.round_stats(rnd).read_text())["heldout"]["overall"]
        if cfg.target_heldout is not None and acc >= cfg.target_heldout:
            return "target"
        if cfg.max_wall_s is not None and time.time() - t0 >= cfg.max_wall_s:
            return "wall_clock"
        if cfg.stop_when_spent and cfg.evolution.strategy == "evolve" and self.spent(svc):
            return "budget"
        return None

    def spent(self, svc: Services) -> bool:
        """Nothing more can be bought: the image budget, the total budget or every
        teacher's own budget is used up (a new prompt costs one image per teacher)."""
        cfg = self.cfg
        if not self.affordable(svc, [evolution.NewPrompt("", "expand")], quiet=True):  # the run's caps
            return True
        stats = svc.teacher_stats()
        return all(t.budget is not None and stats[t.name]["spent"] + t.price_per_image > t.budget + 1e-9
                   for t in cfg.teachers)

    def final_report(self, svc: Services, wall_s: float, final: dict | None = None,
                     stopped: str = "rounds") -> dict:
        from evolve.report import write_report

        teachers = {}
        if stopped == "interrupted":
            # Someone is waiting for the process to end (and `ray job stop` kills it
            # soon): no teacher images are bought to score the teachers now.
            self.say("teachers not scored: the run was interrupted")
            bought = {}
        else:
            bought = svc.buy(list(zip(self.heldout, self.heldout_seeds)))
        for t, res in bought.items():
            got = [(p, from_png(self.store.get(r["ref"]))) for p, r in zip(self.heldout, res) if "ref" in r]
            refused = [r.get("kind", "error") for r in res if "ref" not in r]
            why = ", ".join(sorted(set(refused)))
            if not got:
                self.say(f"teacher {t}: not scored, none of its {len(res)} held-out images was bought ({why})")
                continue
            # An image the teacher did not deliver (its budget spent, a refusal) is
            # not a wrong image: score what was bought, and say how much is missing.
            scored = score([p for p, _ in got], [i for _, i in got]).to_dict()
            teachers[t] = {**scored, "not_bought": len(refused)}
            if refused:
                self.say(f"teacher {t}: scored on {len(got)} of {len(res)} held-out images; "
                         f"{len(refused)} not bought ({why})")
        return write_report(self.folder, teachers, svc.teacher_stats(), wall_s, self.say, final,
                            stopped=stopped)


def save_grid(images: list[np.ndarray], path: Path, scale: int = 3, cols: int = 8) -> None:
    from PIL import Image

    if not images:
        return
    n = len(images)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    h, w, _ = images[0].shape
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 64, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
