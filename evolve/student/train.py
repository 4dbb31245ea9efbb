"""Training the student with Ray Train (V2): one readable loop.

    fit_student(dataset, student_cfg=..., train_cfg=..., steps=..., storage_path=...,
                name=..., init_checkpoint=None, out_dir=...) -> out_dir

Each worker reads its shard of the dataset (rows {"prompt": str, "image": PNG
bytes}; for a LatentStudent, precomputed latents and captions) once, decodes
it into memory, and then draws shuffled batches from it epoch after epoch (the
datasets here are a few thousand 32x32 images at most, and a second pass
through Ray Data per epoch would cost more than the step). At PixArt scale a
caption is ~1 MB (120 x 4096 fp16), so a shard of 10k rows needs ~10 GB of
host memory per worker; beyond that, streaming epochs is the way.

Where the weights come from, in order: the run's own latest checkpoint
(`ray.train.get_checkpoint()`, i.e. the same RunConfig name was fitted before:
model, EMA, optimizer and step resume), else `init_checkpoint` (a directory
written by `Student.save_pretrained`, e.g. the previous round or the shipped
base: raw weights, EMA and, when present, optimizer state; the step count
restarts at 0 but the lifetime count used for lr warm-up and EMA warm-up goes
on), else a seeded random init.

A checkpoint directory holds save_pretrained's files (config.json,
tokenizer.json, model.safetensors, ema.safetensors) plus optimizer.pt and
state.json ({"step": steps done in this run, "total_steps": lifetime, ...}).
Only rank 0 writes it; every rank calls `ray.train.report`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evolve.config import StudentConfig, TrainConfig
from evolve.dataset import atomic_dir
from evolve.student.diffusion import EMA, drop_mask, drop_prompts, make_noise_scheduler, training_loss
from evolve.student.model import EMA_NAME, WEIGHTS_NAME, build_student

OPTIMIZER_NAME = "optimizer.pt"
STATE_NAME = "state.json"


# -- checkpoint files ------------------------------------------------------------
def save_checkpoint(directory: str | Path, student: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer | None,
                    state: dict, full: dict | None = None) -> Path:
    """`full`: under FSDP, the gathered {"weights", "ema", "optimizer"} to write
    instead of the (sharded) objects' own."""
    d = save_weights(directory, student, ema, full)
    opt_sd = full["optimizer"] if full is not None else optimizer.state_dict() if optimizer is not None else None
    if opt_sd is not None:
        torch.save(opt_sd, d / OPTIMIZER_NAME)
    (d / STATE_NAME).write_text(json.dumps(state, indent=2))
    return d


def save_weights(directory: str | Path, student: torch.nn.Module, ema: EMA, full: dict | None = None) -> Path:
    """save_pretrained: the student's own weights and EMA, or FSDP's gathered ones (`full`)."""
    if full is None:
        return student.save_pretrained(directory, ema=ema)
    return student.save_pretrained(directory, ema=full["ema"], weights=full["weights"])


def load_checkpoint(directory: str | Path, student: torch.nn.Module, ema: EMA,
                    optimizer: torch.optim.Optimizer | None) -> dict:
    """Load raw weights, EMA and (if present and wanted) optimizer state into
    the given objects; return state.json (empty dict when absent)."""
    from safetensors.torch import load_file

    d = Path(directory)
    student.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
    state = json.loads((d / STATE_NAME).read_text()) if (d / STATE_NAME).exists() else {}
    ema_sd = load_file(str(d / EMA_NAME)) if (d / EMA_NAME).exists() else student.state_dict()
    ema.load_state_dict(ema_sd, num_updates=int(state.get("ema_updates", state.get("total_steps", 0))))
    state["optimizer_loaded"] = False
    if optimizer is not None and (d / OPTIMIZER_NAME).exists():
        try:
            optimizer.load_state_dict(torch.load(d / OPTIMIZER_NAME, weights_only=True))
            state["optimizer_loaded"] = True
        except (ValueError, KeyError, RuntimeError):  # another optimizer shape: start it fresh
            pass
    return state


# -- data ----------------------------------------------------------------------------
LATENT_COLUMNS = ("latent", "caption", "caption_mask")


def load_shard(shard, scfg: StudentConfig) -> dict:
    """Read one pass of a Ray Data shard into memory. A Student's rows are
    {"prompt", "image": PNG bytes} -> {"prompts", "images": uint8 (N, 3, S, S)};
    a LatentStudent's are precomputed features -> {"latent" (N, C, h, w),
    "caption" (N, L, D), "caption_mask" (N, L)}, or, when its features stay
    on disk (TrainConfig.features_in_memory off), only what names them:
    {"prompts", "image_refs", "buckets" (each latent's "HxW")}. All also get "n"."""
    parts = list(shard.iter_batches(batch_size=256, batch_format="numpy"))
    n = sum(len(b["prompt"]) for b in parts)
    if not n:
        raise RuntimeError("this worker's dataset shard is empty: fewer rows than workers?")
    if scfg.is_latent and "latent" not in parts[0]:
        refs = {"n": n, "prompts": [str(p) for b in parts for p in b["prompt"]],
                "image_refs": [str(r) for b in parts for r in b["image_ref"]]}
        if "bucket" in parts[0]:  # latents of several shapes (aspect buckets): batched by shape
            refs["buckets"] = [str(k) for b in parts for k in b["bucket"]]
        return refs
    if scfg.is_latent:
        return {"n": n, **{k: torch.from_numpy(np.concatenate([b[k] for b in parts])) for k in LATENT_COLUMNS}}
    prompts, images = rows_to_tensors([{"prompt": p, "image": b} for part in parts
                                       for p, b in zip(part["prompt"], part["image"])], scfg.image_size)
    return {"n": n, "prompts": prompts, "images": images}


def rows_to_tensors(rows: list[dict], image_size: int) -> tuple[list[str], torch.Tensor]:
    """Rows {prompt, image: PNG bytes} -> (prompts, uint8 images (N, 3, S, S))."""
    from evolve.shapes.render import from_png

    images = np.stack([from_png(bytes(r["image"]), image_size) for r in rows])
    return [str(r["prompt"]) for r in rows], torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches, epoch after epoch (a batch may span two)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def bucketed_batches(buckets: list[str], batch_size: int, generator: torch.Generator):
    """Endless index batches whose rows share a bucket (one latent shape, an
    aspect ratio): rows are dealt in shuffled order, epoch after epoch, into
    their bucket's buffer, and a full buffer is a batch (PixArt-alpha's
    AspectRatioBatchSampler). A bucket smaller than a batch fills over epochs."""
    if not buckets:
        raise ValueError("no rows to batch")
    pending: dict[str, list[int]] = {}
    while True:
        for i in torch.randperm(len(buckets), generator=generator).tolist():
            buf = pending.setdefault(buckets[i], [])
            buf.append(i)
            if len(buf) == batch_size:
                yield torch.tensor(buf)
                pending[buckets[i]] = []


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The forward pass's autocast dtype (None: full fp32) for TrainConfig.mixed_precision."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(f"mixed_precision fp16 needs a GPU worker, not {device}")
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


# -- one step ------------------------------------------------------------------------
class Batches:
    """Shuffled batches, epoch after epoch, from a shard (load_shard's dict), ready
    for the step: (x, conditioning, its mask) on the device, captions dropped
    at cond_drop for classifier-free guidance. A pixel student's batches can
    also replay rows of `replay` (prompts, uint8 images), n_replay per batch.

    A latent shard without its arrays ({"prompts", "image_refs"}) is read
    batch by batch from the FeatureStore at `features`, the next batch loading
    in a thread while the current one trains.

    `generator` orders the batches, `rng` drops the captions; the Ray Train
    loop and the plain benchmark loop both draw from this class."""

    def __init__(self, student: torch.nn.Module, scfg: StudentConfig, cond_drop: float, batch_size: int,
                 device: torch.device, generator: torch.Generator, rng: random.Random,
                 replay: tuple[list[str], torch.Tensor] | None = None, n_replay: int = 0,
                 replay_generator: torch.Generator | None = None, features: str | None = None) -> None:
        self.student, self.scfg, self.cond_drop, self.device = student, scfg, cond_drop, device
        self.gen, self.rng = generator, rng
        self.n_replay = n_replay if replay is not None else 0
        self.batch_size = max(1, batch_size - self.n_replay)
        self.replay = replay
        if self.n_replay:
            self.replay_order = batches(len(replay[0]), self.n_replay, replay_generator or torch.Generator())
        self.shard: dict | None = None
        self.null: tuple[torch.Tensor, torch.Tensor] | None = None  # a LatentStudent's caption for ""
        self.seconds = 0.0  # spent assembling batches: the data loader's share of the step
        self.features = features
        self.pending = None  # streamed features: the next batch, loading
        self.pool = None

    @property
    def n(self) -> int:
        return self.shard["n"]

    def use(self, shard: dict) -> None:
        """Train on this shard from now on (a new epoch order)."""
        if self.scfg.is_latent and self.null is None:
            raise RuntimeError("a latent student's batches need the null caption (set .null) first")
        if self.scfg.is_latent and "image_refs" in shard and self.features is None:
            raise ValueError("a shard of feature references needs the FeatureStore root (features=)")
        self.shard = shard
        if len(set(shard.get("buckets", ()))) > 1:
            self.order = bucketed_batches(shard["buckets"], self.batch_size, self.gen)
        else:
            self.order = batches(shard["n"], self.batch_size, self.gen)
        self.pending = None  # a batch of the old shard, loading: dropped

    def _read_features(self, shard: dict, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        from evolve.student.encoders import load_features

        batch = {"prompt": np.array([shard["prompts"][i] for i in idx], dtype=object),
                 "image_ref": np.array([shard["image_refs"][i] for i in idx], dtype=object)}
        out = {k: torch.from_numpy(v) for k, v in load_features(batch, self.features).items() if k != "prompt"}
        # Cast here, in the reader thread: the step's thread then only indexes.
        out["latent"], out["caption"] = out["latent"].float(), out["caption"].float()
        return out

    def _streamed(self) -> dict[str, torch.Tensor]:
        """The features of the batch loaded ahead, with the next one started."""
        from concurrent.futures import ThreadPoolExecutor

        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="feature-prefetch")
        if self.pending is None:  # a new shard: nothing loaded ahead yet
            self.pending = self.pool.submit(self._read_features, self.shard, next(self.order))
        now = self.pending.result()
        self.pending = self.pool.submit(self._read_features, self.shard, next(self.order))
        return now

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        if self.scfg.is_latent and "image_refs" in self.shard:
            data, idx = self._streamed(), slice(None)
        else:
            data, idx = self.shard, next(self.order)
        if self.scfg.is_latent:
            cap, mask = data["caption"][idx].float(), data["caption_mask"][idx]
            drop = torch.tensor(drop_mask(len(cap), self.cond_drop, self.rng), dtype=torch.bool)
            cap[drop], mask[drop] = self.null
            out = data["latent"][idx].to(self.device, non_blocking=True).float(), cap, mask
        else:
            prompts, x = [data["prompts"][i] for i in idx], data["images"][idx]
            if self.n_replay:
                ridx = next(self.replay_order)
                prompts += [self.replay[0][i] for i in ridx]
                x = torch.cat([x, self.replay[1][ridx]])
            ids, mask = self.student.encode_prompts(drop_prompts(prompts, self.cond_drop, self.rng))
            out = to_model_range(x.to(self.device, non_blocking=True)), ids, mask
        x, cond, mask = out[0], out[1].to(self.device), out[2].to(self.device)
        self.seconds += time.perf_counter() - t
        return x, cond, mask


class TrainStep:
    """One optimizer step: loss at random timesteps (autocast as configured),
    backward (fp16: scaled), gradient clipping, AdamW, EMA update. `model` is
    what runs forward (DDP-wrapped or not), `student` the module the EMA tracks."""

    def __init__(self, model: torch.nn.Module, student: torch.nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                 scfg: StudentConfig, tcfg: TrainConfig, device: torch.device, generator: torch.Generator) -> None:
        self.model, self.student, self.ema, self.opt = model, student, ema, optimizer
        self.scfg, self.tcfg, self.device, self.gen = scfg, tcfg, device, generator
        self.noise_sched = make_noise_scheduler(scfg)
        self.amp = autocast_dtype(tcfg.mixed_precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, lr: float) -> torch.Tensor:
        """-> the loss, detached (reading it is the caller's device sync, when it wants one)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = training_loss(self.model, self.noise_sched, x, cond, mask, self.scfg.prediction_type,
                                 self.tcfg.t_shift, self.gen)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16: scaled loss, gradients unscaled before clipping
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.ema.update(self.student)
        return loss.detach()


def lr_schedule(tcfg: TrainConfig, warm_offset: int = 0):
    """n (lifetime step) -> lr: linear warm-up over the optimizer's first warmup_steps."""
    def lr_at(n: int) -> float:
        n -= warm_offset
        return tcfg.lr * min(1.0, (n + 1) / tcfg.warmup_steps) if tcfg.warmup_steps else tcfg.lr
    return lr_at


# -- the loop ------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker loop. config: {"student": StudentConfig dict, "train":
    TrainConfig dict, "steps": int | None, "init_checkpoint": str | None,
    "feed": TrainerFeed actor name | None, "snapshot_dir": str | None,
    "features": FeatureStore root | None (a LatentStudent's null caption)}.

    Without a feed it trains `steps` steps on the "train" dataset shard. With a
    feed (continuous training) it asks the feed at every `poll_every`-th step
    boundary which dataset version to train on, swaps its shard in place when a
    new one is published, writes an EMA snapshot when the feed says the loop
    wants one (also a Ray Train checkpoint, to resume from), and returns when
    the feed says stop (or at `steps`, if given)."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    scfg = StudentConfig.model_validate(config["student"])
    tcfg = TrainConfig.model_validate(config["train"])
    if tcfg.worker_nice:
        # On shared CPUs the loop's sampling and judging are what someone waits
        # for; training takes the CPU time they leave (it never waits on them).
        os.nice(tcfg.worker_nice)
    steps = None if config.get("steps") is None else int(config["steps"])
    feed = ray.get_actor(config["feed"]) if config.get("feed") else None
    snapshot_dir = Path(config["snapshot_dir"]) if config.get("snapshot_dir") else None
    torch.set_num_threads(int(config.get("threads", tcfg.torch_threads)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    # The device first: EMA and optimizer state then live where the weights do
    # (a checkpoint's tensors are copied in, whatever device they were saved from).
    device = ray.train.torch.get_device()
    torch.manual_seed(tcfg.seed)
    student = build_student(scfg).to(device)
    if tcfg.gradient_checkpointing:
        student.denoiser.enable_gradient_checkpointing()
    ema = EMA(student, tcfg.ema_max_decay)
    # FSDP: weights and EMA load whole, then are sharded; the optimizer is made
    # for the shards, and its saved state loaded into them.
    fsdp = tcfg.parallel == "fsdp" and world > 1

    def new_optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW(student.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)

    opt = None if fsdp else new_optimizer()
    state: dict = {}
    step = 0
    saved_optimizer = None  # FSDP: the optimizer state to load once sharded

    def load(d) -> dict:
        nonlocal saved_optimizer
        if fsdp and (Path(d) / OPTIMIZER_NAME).exists():
            saved_optimizer = torch.load(Path(d) / OPTIMIZER_NAME, weights_only=True)
        return load_checkpoint(d, student, ema, opt)

    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = load(d)
        step = int(state.get("step", 0))
    elif config.get("init_checkpoint"):
        state = load(config["init_checkpoint"])
    total = int(state.get("total_steps", 0))
    start_total = total - step

    if fsdp:
        from evolve.student.fsdp import full_states, load_optimizer, shard_student

        ema = shard_student(student, ema)
        model, opt = student, new_optimizer()
        if saved_optimizer is not None and not load_optimizer(student, opt, saved_optimizer):
            opt = new_optimizer()  # not this run's kind of optimizer file: start it afresh
        state["optimizer_loaded"] = saved_optimizer is not None and opt.state != {}
    else:
        model = ray.train.torch.prepare_model(student)
    # lr warm-up counts the optimizer's own steps: a fresh AdamW (random init, or
    # a checkpoint shipped without optimizer.pt) warms up again, a loaded one not.
    lr_at = lr_schedule(tcfg, 0 if state.get("optimizer_loaded") else total - step)

    def gathered() -> dict | None:
        """FSDP: full weights, EMA and optimizer state, gathered by every rank
        (collective) for rank 0 to write. None without FSDP."""
        return full_states(student, ema, opt) if fsdp else None

    local_bs = max(1, tcfg.batch_size // world)
    # Prior preservation: part of every batch replays exact renders of the base
    # curriculum (what the base student was pretrained on; no teacher image),
    # so that skills whose prompts the loop deleted are not forgotten.
    # (Pixel students only: the curriculum is shapes-world renders, not latents.)
    n_replay = round(local_bs * tcfg.replay_fraction) if tcfg.replay_fraction > 0 and not scfg.is_latent else 0
    replay = None
    if n_replay:
        from evolve.pretrain import curriculum

        replay = rows_to_tensors(curriculum(tcfg.replay_per_prompt, scfg.image_size, seed=1000 + rank),
                                 scfg.image_size)
    gen = torch.Generator().manual_seed(tcfg.seed * 1000 + rank + 7919 * total)
    feeder = Batches(student, scfg, tcfg.cond_drop, local_bs, device, gen,
                     random.Random(tcfg.seed * 1000 + rank + 7919 * total), replay, n_replay,
                     torch.Generator().manual_seed(tcfg.seed + rank + total), config.get("features"))
    train_step = TrainStep(model, student, ema, opt, scfg, tcfg, device, gen)
    data = {"version": None, "wait_s": 0.0}  # the version trained on; time spent waiting on the feed

    def use_shard(shard) -> None:
        part = load_shard(shard, scfg)  # reading it runs its precompute (Ray Data is lazy)
        if scfg.is_latent and feeder.null is None:
            # What a dropped caption becomes (classifier-free guidance); the
            # precompute that made the shard has put it in the store.
            from evolve.student.encoders import FeatureStore

            emb, mask = FeatureStore(config["features"]).get_text("")
            feeder.null = torch.from_numpy(emb).float(), torch.from_numpy(mask)
        feeder.use(part)

    def progress() -> dict:
        """Where training stands, for the feed (the loop's view of the trainer)."""
        return {"step": step, "total_steps": total, "train_s": time.perf_counter() - t_start,
                "data_wait_s": data["wait_s"], "loss": state.get("loss"), "images_per_s": state.get("images_per_s")}

    def poll_feed(held: bool = False) -> dict:
        """Swap in a newly published dataset version; the feed's answer."""
        t = time.perf_counter()
        ans = ray.get(feed.poll.remote(rank, step, data["version"], progress() if rank == 0 else None, held))
        if ans["shard"] is not None:
            use_shard(ans["shard"])
            data["version"] = ans["version"]
        data["wait_s"] += time.perf_counter() - t
        return ans

    def write_snapshot(metrics: dict, full: dict | None) -> None:
        """EMA weights for the loop to sample: written whole, then renamed."""
        final = snapshot_dir / f"step_{step:07d}"
        with atomic_dir(final) as tmp:
            save_weights(tmp, student, ema, full)
        for old in sorted(snapshot_dir.glob("step_*"))[:-tcfg.keep_snapshots]:
            shutil.rmtree(old, ignore_errors=True)
        ray.get(feed.snapshot.remote(step, str(final), {**metrics, "version": data["version"]}))

    if feed is None:
        use_shard(ray.train.get_dataset_shard("train"))
    else:
        snapshot_dir.mkdir(parents=True, exist_ok=True)

    def report(metrics: dict, with_checkpoint: bool, full: dict | None = None) -> None:
        state_now = {"step": step, "total_steps": total, "ema_updates": ema.num_updates,
                     "run_start_total": start_total, "loss": metrics.get("loss"),
                     "images_per_s": metrics.get("images_per_s"), "train_s": time.perf_counter() - t_start,
                     "feed_wait_s": data["wait_s"], "batch_s": feeder.seconds}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        full = full or gathered()  # every rank reports a checkpoint, so every rank gathers
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(tmp, student, ema, opt, state_now, full)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)

    model.train()
    t_start = time.perf_counter()
    checkpointed = False
    losses, seen, t_last = [], 0, time.perf_counter()
    while steps is None or step < steps:
        if feed is not None and (data["version"] is None or step % tcfg.poll_every == 0):
            ans = poll_feed()
            if ans["snapshot"] and step > 0:  # the loop waits for weights after this many steps
                metrics = progress()
                full = gathered()
                if rank == 0:
                    write_snapshot(metrics, full)
                report(metrics, True, full)  # every rank reports; the snapshot is a resume point too
                checkpointed = True
            if ans.get("hold") and not ans["stop"]:  # lockstep: this version has had its steps
                ans = poll_feed(held=True)
            if ans["stop"]:
                break
        x, cond, mask = feeder.next()
        loss = train_step(x, cond, mask, lr_at(total))
        step += 1
        total += 1
        losses.append(loss)  # read at report time: no device sync per step
        seen += len(x) * world
        last = step == steps
        if step % tcfg.report_every == 0 or last:
            now = time.perf_counter()
            metrics = {"loss": float(torch.stack(losses).float().mean()), "step": step, "total_steps": total,
                       "images_per_s": seen / max(now - t_last, 1e-9), "lr": lr_at(total - 1),
                       "epoch": step * local_bs / feeder.n, "data_wait_s": data["wait_s"],
                       "train_s": now - t_start}
            state["loss"], state["images_per_s"] = metrics["loss"], metrics["images_per_s"]
            ckpt = last or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
            report(metrics, bool(ckpt))
            checkpointed = bool(ckpt)
            losses, seen, t_last = [], 0, time.perf_counter()
    if not checkpointed:  # nothing left to do (a finished run resumed, or steps=0)
        report({"loss": float(state.get("loss") or float("nan")), "step": step, "total_steps": total}, True)


# -- driver side -----------------------------------------------------------------------
def fit_student(dataset, *, student_cfg: StudentConfig, train_cfg: TrainConfig, steps: int | None,
                storage_path: str | Path, name: str, init_checkpoint: str | Path | None = None,
                out_dir: str | Path | None = None, feed: str | None = None,
                snapshot_dir: str | Path | None = None, features: str | Path | None = None) -> str:
    """Train with a TorchTrainer and return a plain checkpoint directory that
    `Student.from_pretrained` loads: `out_dir` if given (replaced), else the
    run's own final checkpoint folder under storage_path/name.

    Calling it again with the same storage_path and name resumes that run from
    its latest checkpoint (step count included) up to `steps`.

    Continuous training: `dataset=None`, `feed` names a TrainerFeed actor that
    hands out dataset versions and says when to stop, `snapshot_dir` receives
    the EMA snapshots; `steps=None` trains until the feed says stop. A worker
    that dies is replaced and the group resumes from the last checkpoint
    (`train_cfg.max_failures` times).

    A LatentStudent (student_cfg.encoders) trains on rows of precomputed
    features (`latent_dataset`) and needs `features`, the FeatureStore root
    that holds its null caption."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if (feed is None) == (dataset is None):
        raise ValueError("fit_student needs either a dataset or a feed, not both")
    if feed is not None and snapshot_dir is None:
        raise ValueError("continuous training (feed) needs a snapshot_dir")
    if student_cfg.is_latent and features is None:
        raise ValueError("a latent student trains on precomputed features: pass their FeatureStore root")

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "student": student_cfg.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json"),
            "steps": None if steps is None else int(steps),
            "threads": train_cfg.torch_threads,
            "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
            "feed": feed,
            "snapshot_dir": str(Path(snapshot_dir).resolve()) if snapshot_dir else None,
            "features": str(Path(features).resolve()) if features else None,
        },
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker, **({"GPU": 1} if train_cfg.use_gpu else {}),
                                  **train_cfg.worker_resources}),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=name,
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures)),
        datasets=None if dataset is None else {"train": dataset},
    )
    result = trainer.fit()
    if result.error is not None:  # pragma: no cover - fit() raises first in V2
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    src = result.checkpoint.path
    if out_dir is None:
        return str(src)
    with atomic_dir(out_dir) as tmp:
        result.checkpoint.to_directory(str(tmp))
    return str(out_dir)
