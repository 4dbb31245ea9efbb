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
import posixpath
import random
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
    from evolve.images import from_png

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


# -- the worker ----------------------------------------------------------------------
class Worker:
    """One Ray Train worker: the student, its EMA and optimizer, its data and its
    step counts. `train_loop_per_worker` builds one and runs `fixed` (a number
    of steps on the "train" shard) or `fed` (continuous training)."""

    def __init__(self, config: dict) -> None:
        import ray.train
        import ray.train.torch

        self.scfg = scfg = StudentConfig.model_validate(config["student"])
        self.tcfg = tcfg = TrainConfig.model_validate(config["train"])
        if tcfg.worker_nice:
            # On shared CPUs the loop's sampling and judging are what someone waits
            # for; training takes the CPU time they leave (it never waits on them).
            os.nice(tcfg.worker_nice)
        torch.set_num_threads(int(config.get("threads", tcfg.torch_threads)))
        self.features = config.get("features")
        self.snapshot_dir = config.get("snapshot_dir")  # a path, or a folder of an object store
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

        # The device first: EMA and optimizer state then live where the weights do
        # (a checkpoint's tensors are copied in, whatever device they were saved from).
        self.device = device = ray.train.torch.get_device()
        torch.manual_seed(tcfg.seed)
        self.student = build_student(scfg).to(device)
        if tcfg.gradient_checkpointing:
            self.student.denoiser.enable_gradient_checkpointing()
        self.ema = EMA(self.student, tcfg.ema_max_decay)
        # FSDP: weights and EMA load whole, then are sharded; the optimizer is made
        # for the shards, and its saved state loaded into them.
        self.fsdp = tcfg.parallel == "fsdp" and self.world > 1
        self.opt = None if self.fsdp else self.new_optimizer()
        self.state, saved_optimizer = self.load(config.get("init_checkpoint"))
        self.total = int(self.state.get("total_steps", 0))
        self.start_total = self.total - self.step
        if self.fsdp:
            from evolve.student.fsdp import load_optimizer, shard_student

            self.ema = shard_student(self.student, self.ema)
            self.model, self.opt = self.student, self.new_optimizer()
            if saved_optimizer is not None and not load_optimizer(self.student, self.opt, saved_optimizer):
                self.opt = self.new_optimizer()  # not this run's kind of optimizer file: start it afresh
            self.state["optimizer_loaded"] = saved_optimizer is not None and self.opt.state != {}
        else:
            self.model = ray.train.torch.prepare_model(self.student)
        # lr warm-up counts the optimizer's own steps: a fresh AdamW (random init, or
        # a checkpoint shipped without optimizer.pt) warms up again, a loaded one not.
        self.lr_at = lr_schedule(tcfg, 0 if self.state.get("optimizer_loaded") else self.total - self.step)

        self.local_bs = max(1, tcfg.batch_size // self.world)
        self.batches = self.make_batches(config.get("replay"))
        self.train_step = TrainStep(self.model, self.student, self.ema, self.opt, scfg, tcfg, device, self.gen)
        self.version: int | None = None  # the dataset version trained on (continuous)
        self.feed = None
        self.checkpointed = False  # the last thing reported carried a checkpoint
        self.t_start = time.perf_counter()

    def new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.parameters(), lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay)

    def load(self, init_checkpoint: str | None) -> tuple[dict, dict | None]:
        """Weights from the run's own latest checkpoint (`ray.train.get_checkpoint()`:
        a resume, step count included), else `init_checkpoint` (step 0), else the
        seeded random init. Returns (state.json, FSDP's saved optimizer state)."""
        import ray.train

        def from_dir(d) -> tuple[dict, dict | None]:
            saved = None
            if self.fsdp and (Path(d) / OPTIMIZER_NAME).exists():
                saved = torch.load(Path(d) / OPTIMIZER_NAME, weights_only=True)
            return load_checkpoint(d, self.student, self.ema, self.opt), saved

        resume = ray.train.get_checkpoint()
        self.step = 0
        if resume is not None:
            with resume.as_directory() as d:
                state, saved = from_dir(d)
            self.step = int(state.get("step", 0))
            return state, saved
        if init_checkpoint:  # a path, or the URI of a run's shared checkpoint (fetched to this node)
            from evolve.storage import local_folder

            return from_dir(local_folder(init_checkpoint))
        return {}, None

    def make_batches(self, replay_rows: list[list[dict]] | None) -> "Batches":
        """The batch source. Prior preservation: part of every batch (replay_fraction)
        replays this rank's rows of `replay_rows` (a base curriculum; no teacher
        image), so that skills whose prompts the loop deleted are not forgotten."""
        tcfg, rank = self.tcfg, self.rank
        n_replay = round(self.local_bs * tcfg.replay_fraction) if replay_rows and tcfg.replay_fraction > 0 else 0
        replay = rows_to_tensors(replay_rows[rank], self.scfg.image_size) if n_replay else None
        self.gen = torch.Generator().manual_seed(tcfg.seed * 1000 + rank + 7919 * self.total)
        return Batches(self.student, self.scfg, tcfg.cond_drop, self.local_bs, self.device, self.gen,
                       random.Random(tcfg.seed * 1000 + rank + 7919 * self.total), replay, n_replay,
                       torch.Generator().manual_seed(tcfg.seed + rank + self.total), self.features)

    def use(self, shard) -> None:
        """Train on this Ray Data shard from now on (reading it runs its
        precompute: Ray Data is lazy)."""
        part = load_shard(shard, self.scfg)
        if self.scfg.is_latent and self.batches.null is None:
            # What a dropped caption becomes (classifier-free guidance); the
            # precompute that made the shard has put it in the store.
            from evolve.student.encoders import FeatureStore

            emb, mask = FeatureStore(self.features).get_text("")
            self.batches.null = torch.from_numpy(emb).float(), torch.from_numpy(mask)
        self.batches.use(part)

    # -- the two ways to train ---------------------------------------------------------
    def fixed(self, shard, steps: int) -> None:
        """`steps` steps on one shard; a checkpoint at the end (and every checkpoint_every)."""
        self.use(shard)
        window = self.new_window()
        while self.step < steps:
            window = self.one_step(window, last=self.step + 1 == steps)
        if not self.checkpointed:  # nothing was left to do (a finished run resumed, or steps=0)
            self.report({"loss": float(self.state.get("loss") or float("nan")), "step": self.step,
                         "total_steps": self.total}, True)

    def fed(self, feed) -> None:
        """Continuous training: every poll_every steps ask the feed what to do (new
        data, a snapshot the loop waits for, hold, stop), then train on."""
        from evolve.student.feed import FeedClient

        self.feed = FeedClient(feed, self.rank)
        window = self.new_window()
        while True:
            if self.version is None or self.step % self.tcfg.poll_every == 0:
                ans = self.poll()
                if ans["snapshot"] and self.step > 0:  # the loop waits for weights after this many steps
                    self.snapshot()
                if ans.get("hold") and not ans["stop"]:  # lockstep: this version has had its steps
                    ans = self.poll(held=True)
                if ans["stop"]:
                    break
            window = self.one_step(window)
        if not self.checkpointed:
            self.report({"loss": float(self.state.get("loss") or float("nan")), "step": self.step,
                         "total_steps": self.total}, True)

    # -- pieces ---------------------------------------------------------------------------
    def new_window(self) -> dict:
        """What a metrics report averages over: losses, images seen, since when."""
        return {"losses": [], "seen": 0, "t": time.perf_counter()}

    def one_step(self, window: dict, last: bool = False) -> dict:
        """One training step; every report_every steps (and at `last`) a metrics
        report, with a checkpoint where due. Returns the (new) report window."""
        x, cond, mask = self.batches.next()
        loss = self.train_step(x, cond, mask, self.lr_at(self.total))
        self.step += 1
        self.total += 1
        window["losses"].append(loss)  # read at report time: no device sync per step
        window["seen"] += len(x) * self.world
        if self.step % self.tcfg.report_every and not last:
            return window
        now = time.perf_counter()
        metrics = {"loss": float(torch.stack(window["losses"]).float().mean()), "step": self.step,
                   "total_steps": self.total, "images_per_s": window["seen"] / max(now - window["t"], 1e-9),
                   "lr": self.lr_at(self.total - 1), "epoch": self.step * self.local_bs / self.batches.n,
                   "data_wait_s": self.wait_s(), "train_s": now - self.t_start}
        self.state["loss"], self.state["images_per_s"] = metrics["loss"], metrics["images_per_s"]
        ckpt = last or bool(self.tcfg.checkpoint_every and self.step % self.tcfg.checkpoint_every == 0)
        self.report(metrics, ckpt)
        window = self.new_window()
        self.checkpointed = ckpt
        return window

    def wait_s(self) -> float:
        return self.feed.wait_s if self.feed is not None else 0.0

    def progress(self) -> dict:
        """Where training stands, for the feed (the loop's view of the trainer)."""
        return {"step": self.step, "total_steps": self.total, "train_s": time.perf_counter() - self.t_start,
                "data_wait_s": self.wait_s(), "loss": self.state.get("loss"),
                "images_per_s": self.state.get("images_per_s")}

    def poll(self, held: bool = False) -> dict:
        """The feed's answer for this step; a newly published version's shard is swapped in."""
        ans = self.feed.poll(self.step, self.version, self.progress() if self.rank == 0 else None, held)
        if ans["shard"] is not None:
            t = time.perf_counter()
            self.use(ans["shard"])
            self.version = ans["version"]
            self.feed.wait_s += time.perf_counter() - t  # swapping data is waiting on the loop too
        return ans

    def gathered(self) -> dict | None:
        """FSDP: full weights, EMA and optimizer state, gathered by every rank
        (collective) for rank 0 to write. None without FSDP."""
        if not self.fsdp:
            return None
        from evolve.student.fsdp import full_states

        return full_states(self.student, self.ema, self.opt)

    def snapshot(self) -> None:
        """EMA weights for the loop to sample (rank 0 writes them whole, then
        renames); every rank reports it as a Ray Train checkpoint too, a resume point."""
        metrics, full = self.progress(), self.gathered()
        if self.rank == 0:
            final = self.write_snapshot(f"step_{self.step:07d}", full)
            self.feed.snapshot(self.step, final, {**metrics, "version": self.version})
        self.report(metrics, True, full)
        self.checkpointed = True

    def write_snapshot(self, name: str, full: dict | None) -> str:
        """The EMA weights as folder `name` of snapshot_dir, whole or not at all
        (locally renamed into place; on an object store committed by a marker
        written last); the oldest beyond keep_snapshots removed. -> its path or URI."""
        from evolve.storage import Storage

        folder = Storage.at(self.snapshot_dir)
        if folder.is_local:
            folder.local_path().mkdir(parents=True, exist_ok=True)
            with atomic_dir(folder.local_path(name)) as tmp:
                save_weights(tmp, self.student, self.ema, full)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                save_weights(tmp, self.student, self.ema, full)
                folder.upload_dir(tmp, name)
        for old in [n for n in folder.list() if n.startswith("step_")][:-self.tcfg.keep_snapshots]:
            folder.delete_dir(old)
        return folder.uri(name)

    def report(self, metrics: dict, with_checkpoint: bool, full: dict | None = None) -> None:
        """`ray.train.report` on every rank; with a checkpoint, rank 0 writes it
        (under FSDP every rank gathers, so every rank calls `gathered`)."""
        import ray.train
        from ray.train import Checkpoint

        if not with_checkpoint:
            ray.train.report(metrics)
            return
        state = {"step": self.step, "total_steps": self.total, "ema_updates": self.ema.num_updates,
                 "run_start_total": self.start_total, "loss": metrics.get("loss"),
                 "images_per_s": metrics.get("images_per_s"), "train_s": time.perf_counter() - self.t_start,
                 "feed_wait_s": self.wait_s(), "batch_s": self.batches.seconds}
        full = full or self.gathered()
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                save_checkpoint(tmp, self.student, self.ema, self.opt, state, full)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker loop. config: {"student": StudentConfig dict, "train":
    TrainConfig dict, "steps": int | None, "init_checkpoint": str | None,
    "feed": TrainerFeed actor name | None, "snapshot_dir": str | None,
    "features": FeatureStore root | None (a LatentStudent's null caption),
    "replay": rows to replay, one list per rank | None}.

    Without a feed it trains `steps` steps on the "train" dataset shard. With a
    feed (continuous training) it asks the feed at every `poll_every`-th step
    boundary which dataset version to train on, swaps its shard in place when a
    new one is published, writes an EMA snapshot when the feed says the loop
    wants one (also a Ray Train checkpoint, to resume from), and returns when
    the feed says stop."""
    import ray.train

    worker = Worker(config)
    worker.model.train()
    if config.get("feed"):
        worker.fed(config["feed"])
    else:
        worker.fixed(ray.train.get_dataset_shard("train"), int(config["steps"]))


# -- driver side -----------------------------------------------------------------------
def _where(folder: str | Path | None) -> str | None:
    """A folder the workers open: an absolute path, or a URI as it is."""
    from evolve.storage import is_remote

    if folder is None:
        return None
    return str(folder) if is_remote(folder) else str(Path(folder).resolve())


def train_storage(storage_path: str | Path) -> dict:
    """Ray Train's RunConfig storage for a path or an object-store folder: on an
    object store the filesystem is passed in (`storage_filesystem`, with the
    path inside it), so its endpoint and region are the run folder's own."""
    from evolve.storage import Storage, is_remote

    if not is_remote(storage_path):
        return {"storage_path": str(Path(storage_path).resolve())}
    st = Storage.at(storage_path)
    return {"storage_path": st.path(), "storage_filesystem": st.filesystem}


def fit_student(dataset, *, student_cfg: StudentConfig, train_cfg: TrainConfig, steps: int | None,
                storage_path: str | Path, name: str, init_checkpoint: str | Path | None = None,
                out_dir: str | Path | None = None, feed: str | None = None,
                snapshot_dir: str | Path | None = None, features: str | Path | None = None,
                replay: list[list[dict]] | None = None) -> str:
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
    that holds its null caption. `replay`: per worker, rows {prompt, image}
    that part of each batch replays (`train_cfg.replay_fraction`; pixel
    students)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from evolve.ray_env import train_torch_config
    from evolve.storage import is_remote

    if (feed is None) == (dataset is None):
        raise ValueError("fit_student needs either a dataset or a feed, not both")
    if feed is not None and snapshot_dir is None:
        raise ValueError("continuous training (feed) needs a snapshot_dir")
    if student_cfg.is_latent and features is None:
        raise ValueError("a latent student trains on precomputed features: pass their FeatureStore root")

    trainer = TorchTrainer(
        train_loop_per_worker,
        torch_config=train_torch_config(),  # on a local instance, the DDP rendezvous on loopback only
        train_loop_config={
            "student": student_cfg.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json"),
            "steps": None if steps is None else int(steps),
            "threads": train_cfg.torch_threads,
            "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
            "feed": feed,
            "snapshot_dir": _where(snapshot_dir),
            "features": _where(features),
            "replay": replay,
        },
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker, **({"GPU": 1} if train_cfg.use_gpu else {}),
                                  **train_cfg.worker_resources}),
        run_config=RunConfig(**train_storage(storage_path), name=name,
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
        if is_remote(storage_path):  # its URI (a Ray Train checkpoint: ray.train.Checkpoint reads it)
            from evolve.storage import Storage

            st = Storage.at(storage_path)
            return st.uri(posixpath.relpath(src, st.root))
        return str(src)
    with atomic_dir(out_dir) as tmp:
        result.checkpoint.to_directory(str(tmp))
    return str(out_dir)
