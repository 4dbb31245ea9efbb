"""The loop's parts on a Ray cluster: the one module of `evolve/` (besides the
CLI) that imports `actors/` and `serve/`.

    with cluster_parts(cfg, folder, init, world) as parts:   # evolve.loop.main calls it
        ...

- teachers: an embedded teacher host (a Ray actor serving the shapes-world
  teachers over HTTP) where the config has embedded teachers, and one gateway
  actor per teacher (`teacher:<name>`);
- judge: the `judge` Serve application (and, for backend "vllm", the VLM it
  talks to; for "embedded_vlm", the embedded VLM host actor), reached through
  its handle; requests a dying replica loses are asked again;
- trainer: one Ray Train run for the whole job, fed through a TrainerFeed
  actor (`train.schedule: continuous`), or one fit() per round ("rounds");
- sample: student images in a Ray task;
- metrics: `ray.util.metrics` gauges for the dashboard;
- and, with `serve_edgen`, the student served at /edgen while it trains.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from evolve.config import EdgenServeConfig, RunConfig
from evolve.dataset import Record
from evolve.images import to_png
from evolve.parts import Parts
from evolve.placement import Ask, check_placement
from evolve.run_folder import RunFolder
from evolve.storage import copy_folder
from evolve.world import World

log = logging.getLogger("evolve")


@contextlib.contextmanager
def cluster_parts(cfg: RunConfig, folder: RunFolder, init: str | None, world: World):
    """Start every part the loop needs (in the cluster `ray.init` joined); stop them on the way out."""
    from ray import serve

    check_placement(asks(cfg), cluster_node_types())  # before anything starts or is bought
    closing: list = []
    try:
        proxies = cfg.serve_proxies if cfg.serve_proxies != "auto" else (
            "EveryNode" if cfg.judge.backend == "vllm" else "HeadOnly")
        serve.start(proxy_location=proxies, http_options={"host": "127.0.0.1", "port": cfg.serve_port})
        teachers = RayTeachers(cfg, folder)
        closing.append(teachers)
        judge = RayJudge(cfg, folder)
        closing.append(judge)
        trainer = (ContinuousTrainer if cfg.train.schedule == "continuous" else RoundsTrainer)(
            cfg, folder, init, replay_rows(cfg, world))
        closing.append(trainer)
        if cfg.serve_edgen:
            closing.append(EdgenDuringRun(cfg, folder, init))
        yield Parts(world=world, teachers=teachers, judge=judge, trainer=trainer,
                    sample=RaySampler(cfg), metrics=RayMetrics(folder.root.name))
    finally:
        for part in reversed(closing):
            try:
                part.close()
            except Exception:  # noqa: BLE001 - best effort on the way out; the first error stands
                log.exception("stopping %s", type(part).__name__)


# --------------------------------------------------------------------------- placement

SAMPLER_CPUS = 0.5   # on 2 CPUs the sampling task must fit beside the continuous trainer's workers
HEAD = "node:__internal_head__"  # a resource Ray gives the head node alone


def asks(cfg: RunConfig) -> list[Ask]:
    """Every bundle the run's parts ask for, from its config."""
    from serve.diffusers_teacher import DiffusersTeacherConfig
    from serve.judge import JUDGE_REPLICA_CPUS, vllm_llm_config

    tc, jc = cfg.train, cfg.judge
    out = [Ask("train (the training workers: train.cpus_per_worker, use_gpu, worker_resources)",
               {"CPU": tc.cpus_per_worker, **({"GPU": 1.0} if tc.use_gpu else {}), **tc.worker_resources},
               tc.num_workers),
           Ask("judge (its Serve replica: judge.resources)", {"CPU": JUDGE_REPLICA_CPUS, **jc.resources}),
           Ask("sample (the student sampling task: sample.num_gpus, resources)",
               {"CPU": SAMPLER_CPUS, **({"GPU": cfg.sample.num_gpus} if cfg.sample.num_gpus else {}),
                **cfg.sample.resources})]
    if jc.backend == "vllm":
        pg = vllm_llm_config(jc).get("placement_group_config") or {"bundles": [{"GPU": 1.0}]}
        out += [Ask("judge's vLLM engine (judge.llm placement_group_config, judge.resources)", dict(b))
                for b in pg["bundles"]]
    for t in cfg.teachers:
        if t.kind == "diffusers":
            p = DiffusersTeacherConfig.model_validate(t.pipeline)
            out.append(Ask(f"teacher {t.name!r} (its diffusers pipeline's Serve replica: pipeline.num_cpus, "
                           "num_gpus, resources)",
                           {"CPU": p.num_cpus, **({"GPU": p.num_gpus} if p.num_gpus else {}), **p.resources}))
    return out



def cluster_node_types() -> dict[str, dict[str, float]]:
    """The cluster's live nodes and, on a `ray up` cluster, the node types its
    autoscaler can launch (`ray up` gives the head its config as
    ~/ray_bootstrap_config.yaml: cluster.yaml's head start command)."""
    import ray

    types = {f"node {n['NodeManagerAddress']} {n['NodeID'][:8]}": dict(n["Resources"])
             for n in ray.nodes() if n["Alive"]}
    boot = Path.home() / "ray_bootstrap_config.yaml"
    if boot.exists():
        import yaml

        for name, t in (yaml.safe_load(boot.read_text()).get("available_node_types") or {}).items():
            if t.get("max_workers", 1) or name == "head":
                types[f"node type {name}"] = {k: float(v) for k, v in (t.get("resources") or {}).items()}
    return types


def on_this_node():
    """A scheduling strategy that keeps an actor on the caller's (the driver's)
    node: where the ledger's writers are, and whose death ends the run anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


# --------------------------------------------------------------------------- teachers


class RayTeachers:
    """Teacher gateway actors; the embedded teachers' HTTP host and the run's own
    diffusers pipelines (Serve apps `teacher-<name>`) where the config has any."""

    def __init__(self, cfg: RunConfig, folder: RunFolder) -> None:
        import ray
        from ray import serve

        from actors.teacher_gateway import start_gateway
        from serve.diffusers_teacher import DiffusersTeacherConfig, build_diffusers_teacher_app
        from serve.teachers import EmbeddedTeacherHost

        size = cfg.student.image_size
        embedded = [t for t in cfg.teachers if t.kind == "embedded"]
        self.host, self.apps = None, []
        urls: dict[str, str] = {}
        if embedded:
            # Beside the gateways that buy from it: it listens on that node's loopback.
            self.host = EmbeddedTeacherHost.options(name=f"teachers-http:{folder.root.name}",
                                                    scheduling_strategy=on_this_node()).remote()
            urls = ray.get(self.host.start.remote(embedded, size))
        teachers = []
        for t in cfg.teachers:
            if t.kind == "diffusers":  # served here, then bought from like any OpenAI-Images API
                dcfg = DiffusersTeacherConfig.model_validate(t.pipeline)
                app = f"teacher-{t.name}"
                serve.run(build_diffusers_teacher_app(dcfg), name=app, route_prefix=f"/{app}")
                self.apps.append(app)
                urls[t.name] = f"http://127.0.0.1:{cfg.serve_port}/{app}/v1"
                t = t.model_copy(update={"kind": "openai", "model": t.model or dcfg.model_name, "pipeline": None,
                                         "idempotency": t.honours_idempotency})
            teachers.append(t)
        self.gateways = {t.name: start_gateway(t, urls.get(t.name, t.base_url), folder.images, folder.ledger, size)
                         for t in teachers}

    def buy(self, items: list[tuple[str, int]]) -> dict[str, list[dict]]:
        import ray

        refs = {n: g.render_many.remote(items) for n, g in self.gateways.items()}
        return {n: ray.get(r) for n, r in refs.items()}

    def buy_from(self, teacher: str, items: list[tuple[str, int]]) -> list[dict]:
        import ray

        return ray.get(self.gateways[teacher].render_many.remote(items)) if items else []

    def stats(self) -> dict[str, dict]:
        import ray

        return {n: ray.get(g.stats.remote()) for n, g in self.gateways.items()}

    def close(self) -> None:
        import ray
        from ray import serve

        for g in self.gateways.values():
            ray.kill(g)
        if self.host is not None:
            ray.get(self.host.stop.remote())
            ray.kill(self.host)
        for app in self.apps:
            with contextlib.suppress(Exception):
                serve.delete(app)


# --------------------------------------------------------------------------- judge


class RayJudge:
    """The judge's Serve application, asked through its handle."""

    def __init__(self, cfg: RunConfig, folder: RunFolder) -> None:
        import ray

        from serve.judge import deploy_judge

        jc = cfg.judge
        self.apps = ["judge"] + ["vlm"] * (jc.backend == "vllm")
        self.vlm_host = None
        if jc.backend == "embedded_vlm":
            # The embedded VLM serves chat completions on 127.0.0.1; the judge
            # talks to it over HTTP as to any OpenAI-compatible VLM.
            from serve.embedded_vlm import EmbeddedVLMHost

            # It listens on the loopback of the node it runs on: the head, and the
            # judge's replica with it.
            self.vlm_host = EmbeddedVLMHost.options(name=f"embedded-vlm:{folder.root.name}",
                                                    resources={HEAD: 0.001}).remote()
            url = ray.get(self.vlm_host.start.remote(jc.templates.model_dump(), jc.embedded_vlm.model_dump()))
            jc = jc.model_copy(update={"backend": "openai", "base_url": url, "model": "embedded-vlm",
                                       "resources": {**jc.resources, HEAD: 0.001}})
        self.handle = deploy_judge(jc, cfg.serve_port)

    def ask(self, method: str, reqs: list, latencies: list[float] | None = None, retries: int = 5) -> list:
        """The judge's answers to `reqs` (one `method` call each, batched by Serve).

        A replica that dies under a request (killed, node lost) fails it with a
        RayActorError; Serve starts another, and the failed requests are asked
        again: judging is free and repeatable. `latencies` receives each
        answer's seconds (for metrics)."""
        from ray.exceptions import RayActorError

        out: list = [None] * len(reqs)
        pending = list(range(len(reqs)))
        t = time.perf_counter()
        error = None
        for attempt in range(retries + 1):
            responses = {i: getattr(self.handle, method).remote(reqs[i]) for i in pending}
            failed = []
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

    def discriminate(self, reqs, latencies=None):
        return self.ask("discriminate", reqs, latencies)

    def expand(self, reqs):
        return self.ask("expand", reqs)

    def mutate(self, reqs):
        return self.ask("mutate", reqs)

    def compare(self, reqs):
        return self.ask("compare", reqs)

    def align(self, reqs):
        return self.ask("align", reqs)

    def questions(self, reqs):
        return self.ask("questions", reqs)

    def close(self) -> None:
        import ray
        from ray import serve

        for name in self.apps:
            with contextlib.suppress(Exception):  # best effort on shutdown
                serve.delete(name)
        if self.vlm_host is not None:
            ray.get(self.vlm_host.stop.remote())
            ray.kill(self.vlm_host)


# --------------------------------------------------------------------------- training


def replay_rows(cfg: RunConfig, world: World) -> list[list[dict]] | None:
    """Per training worker, the base-curriculum rows its batches replay (prior
    preservation: skills whose prompts the loop deleted are not forgotten), or
    None where the world has none or the student does not replay."""
    tc, sc = cfg.train, cfg.student
    if tc.replay_fraction <= 0 or sc.is_latent:
        return None
    rows = [world.replay_rows(tc.replay_per_prompt, sc.image_size, seed=1000 + rank) for rank in range(tc.num_workers)]
    if rows[0] is None:
        log.warning("the %s world has no replay data: train.replay_fraction is not used", world.name)
        return None
    return rows


class RoundsTrainer:
    """`train.schedule: rounds`: one fit() of steps_per_round a version, each from
    the previous version's weights (simpler and exactly repeatable)."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, init: str | None, replay=None) -> None:
        self.cfg, self.folder, self.init, self.replay = cfg, folder, init, replay
        self.sizes: dict[int, int] = {}

    def publish(self, version: int, records: list[Record]) -> None:
        self.sizes[version] = len(records)

    def weights_after(self, version: int, steps: int, out: Path) -> dict:
        from evolve.student.data import version_dataset
        from evolve.student.train import fit_student

        start = self.folder.checkpoint_ref(version - 1) if version > 0 else self.init
        # Ray Train deals the dataset out with streaming_split(equal=True), which
        # leaves out the remainder: padded, as in streaming_shards.
        pad = -self.sizes[version] % self.cfg.train.num_workers
        fit_student(version_dataset(self.cfg, self.folder, version, self.sizes[version], pad),
                    student_cfg=self.cfg.student,
                    train_cfg=self.cfg.train, steps=steps, storage_path=str(self.folder.train_storage),
                    name=f"round_{version:03d}", init_checkpoint=start, out_dir=str(out),
                    features=self.folder.features, replay=self.replay)
        return {"step": steps}

    def status(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class ContinuousTrainer:
    """`train.schedule: continuous`: one Ray Train run for the whole job.

    `fit()` blocks, so it runs in a thread of the driver, and meets the loop
    through a TrainerFeed actor: `publish` hands it a new dataset version (one
    Ray Data shard per worker), `weights_after` waits for an EMA snapshot
    trained `steps` steps on a version and copies it into the run folder. The
    trainer never waits for the loop: it keeps training on the version it has
    until a newer one arrives (unless `train.lockstep`)."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, init: str | None, replay=None) -> None:
        from actors.trainer_feed import TrainerFeed

        self.cfg, self.folder, self.init, self.replay = cfg, folder, init, replay
        self.name = f"trainer-feed:{folder.root.name}"
        self.feed = TrainerFeed.options(name=self.name, scheduling_strategy=on_this_node()).remote(
            cfg.train.num_workers, cfg.train.steps_per_round if cfg.train.lockstep else None)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.closed = False

    def _fit(self) -> None:
        from evolve.student.train import fit_student

        try:
            fit_student(None, student_cfg=self.cfg.student, train_cfg=self.cfg.train, steps=None,
                        storage_path=str(self.folder.train_storage), name="continuous",
                        init_checkpoint=self.init, feed=self.name, snapshot_dir=str(self.folder.snapshots),
                        features=self.folder.features, replay=self.replay)
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
            self.error = e

    def publish(self, version: int, records: list[Record]) -> None:
        import ray

        from evolve.student.data import streaming_shards

        # Lazy: the workers' reads run the version's pipeline (records, images,
        # features), streamed from the run folder; nothing is read here.
        shards = streaming_shards(self.cfg, self.folder, version, len(records))
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
        copy_folder(snap["path"], out)  # a path, or a URI on the run's object store
        return snap

    def status(self) -> dict:
        import ray

        return ray.get(self.feed.status.remote())

    def close(self, timeout_s: float = 300) -> None:
        """Ask the workers to checkpoint and return; wait for fit() to end."""
        import ray

        if self.closed:
            return
        self.closed = True
        try:
            ray.get(self.feed.finish.remote())
            if self.thread is not None:
                self.thread.join(timeout_s)
        finally:
            ray.kill(self.feed)
        if self.error is not None:
            raise RuntimeError(f"the training run failed: {self.error!r}") from self.error


# --------------------------------------------------------------------------- sampling, Edgen, metrics


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


class RaySampler:
    """Student images as PNG bytes, sampled in a Ray task from the EMA weights."""

    def __init__(self, cfg: RunConfig) -> None:
        import ray

        self.cfg = cfg
        self.task = ray.remote(num_cpus=SAMPLER_CPUS, num_gpus=cfg.sample.num_gpus,
                               resources=dict(cfg.sample.resources))(_sample_pngs)

    def __call__(self, checkpoint: str | None, prompts: list[str], seeds: list[int]) -> list[bytes]:
        import ray

        if not prompts:
            return []
        return ray.get(self.task.remote(checkpoint, prompts, seeds, self.cfg.student, self.cfg.sample))


class EdgenDuringRun:
    """Users watch the student improve: Edgen at /edgen serves the run's start
    checkpoint and follows each new checkpoint of the run, in the run's world."""

    def __init__(self, cfg: RunConfig, folder: RunFolder, init: str | None) -> None:
        from ray import serve

        from serve.edgen import build_edgen_app

        ecfg = EdgenServeConfig(checkpoint=init, watch_dir=str(folder.shared_checkpoints), num_cpus=0.1,
                                grammar_check=cfg.world.kind == "shapes")
        serve.run(build_edgen_app(ecfg), name="edgen", route_prefix="/edgen")

    def close(self) -> None:
        from ray import serve

        with contextlib.suppress(Exception):
            serve.delete("edgen")


class RayMetrics:
    """The loop's state for the Ray dashboard / Prometheus (`ray.util.metrics`),
    tagged by run; the teacher gateways and Serve export their own."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Gauge, Histogram

        self.tags = {"run": run}
        keys = ("run",)
        names = {"round": "last finished round", "dataset_size": "training records in the round's version",
                 "student_win_rate": "share of judged prompts where the student matched the best teacher",
                 "heldout_accuracy": "student's held-out score after the round",
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
