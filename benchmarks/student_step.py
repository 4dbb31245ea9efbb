"""Student speed on this machine: training s/step and images/s, and sampling
time, for the default UNet and the PixArt alternative side by side.

    python benchmarks/student_step.py [--threads 2] [--batch 32] [--steps 8] [--pixart-patch 4]
    python benchmarks/student_step.py --ray [--steps 60] [--repeats 2]   # + Ray Train vs the same plain loop

Single process, no Ray; fp32 on CPU. The training step is the real one
(`training_loss` + AdamW + EMA update). Sampling: 16 images, SampleConfig
defaults (DPM-Solver++ and classifier-free guidance).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evolve.config import SampleConfig, StudentConfig
from evolve.shapes import vocabulary
from evolve.student.diffusion import EMA, make_noise_scheduler, sample, training_loss
from evolve.student.model import Student, build_student

PROMPTS = ["a red circle and a blue square", "three triangles", "a square left of a circle", "a cyan triangle"]


WORDS = tuple(vocabulary())  # the shapes grammar's: the student's words in that world


def bench(cfg: StudentConfig, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    s = Student.from_config(cfg)
    ema = EMA(s)
    ns = make_noise_scheduler(cfg)
    opt = torch.optim.AdamW(s.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
    ids, mask = s.encode_prompts([PROMPTS[i % 4] for i in range(batch)])
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        loss = training_loss(s, ns, x, ids, mask, cfg.prediction_type)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(s)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[2:])
    sc = SampleConfig()
    t0 = time.perf_counter()
    sample(s, [PROMPTS[i % 4] for i in range(16)], list(range(16)), sc)
    return {"params_M": s.num_parameters() / 1e6, "s_per_step": step, "images_per_s": batch / step,
            "sample16_s": time.perf_counter() - t0, "sample_steps": sc.steps}


def plain_worker(rank: int, world: int, port: int, rows: list[dict], steps: int, batch: int, threads: int,
                 result: str, niceness: int = 0) -> None:
    """The training loop without Ray: the same Batches and TrainStep as the Ray
    Train worker, on rows[rank::world] (what Ray Data's split gives each
    worker), DDP over gloo when world > 1, the loss read every report_every
    steps as the Ray loop reports it, at the CPU priority of Ray's workers
    (`niceness`). Rank 0 writes {"train_s", "batch_s"}."""
    import json
    import os
    import random

    import torch.distributed as dist

    from evolve.config import TrainConfig
    from evolve.student.train import Batches, TrainStep, lr_schedule, rows_to_tensors

    os.nice(niceness - os.nice(0))
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    scfg = StudentConfig(vocabulary=WORDS)
    tcfg = TrainConfig(batch_size=batch, replay_fraction=0.0, worker_nice=0, num_workers=world,
                       torch_threads=threads)
    torch.manual_seed(tcfg.seed)
    student = build_student(scfg)
    ema = EMA(student, tcfg.ema_max_decay)
    opt = torch.optim.AdamW(student.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    cpu = torch.device("cpu")
    gen = torch.Generator().manual_seed(tcfg.seed * 1000 + rank)
    feeder = Batches(student, scfg, tcfg.cond_drop, batch // world, cpu, gen, random.Random(tcfg.seed * 1000 + rank))
    prompts, images = rows_to_tensors(rows[rank::world], scfg.image_size)
    feeder.use({"n": len(prompts), "prompts": prompts, "images": images})
    train_step, lr_at = TrainStep(model, student, ema, opt, scfg, tcfg, cpu, gen), lr_schedule(tcfg)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        losses.append(train_step(*feeder.next(), lr_at(step)))
        if (step + 1) % tcfg.report_every == 0 or step + 1 == steps:
            float(torch.stack(losses).mean())  # what a loop logs
            losses = []
    train_s = time.perf_counter() - t0
    if rank == 0:
        with open(result, "w") as f:
            json.dump({"train_s": train_s, "batch_s": feeder.seconds}, f)
    if world > 1:
        dist.destroy_process_group()


def bench_ray(steps: int, batch: int, repeats: int) -> None:
    """Ray Train's cost, measured fairly: the plain loop (plain_worker: torch
    processes, DDP over gloo) and fit_student (Ray Train workers, the same
    Batches and TrainStep) on the same 256 reference renders, same batch,
    same steps, in two layouts of this machine's 2 cores, alternated
    `repeats` times. Ray starts its workers at niceness 15 (its
    `worker_niceness`), so the plain processes run at Ray's workers' niceness
    too: on a shared machine priority, not Ray, would make the difference.
    Replay is off; `data stall` = waiting on the feed plus
    assembling batches, as a share of the Ray loop. Start-up (fit() wall minus
    the loop) is shown apart: it is paid once per fit, not per step."""
    import json
    import os
    import socket
    import tempfile

    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(k, v)
    import numpy as np
    import ray
    import torch.multiprocessing as mp

    from evolve.config import TrainConfig
    from evolve.shapes.grammar import sample_prompt
    from evolve.shapes.render import render, to_png
    from evolve.student.train import fit_student

    rng = np.random.default_rng(0)
    prompts = [sample_prompt(rng).text for _ in range(256)]
    rows = [{"prompt": p, "image": to_png(render(p, i, 32))} for i, p in enumerate(prompts)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds = ray.data.from_items(rows)
    niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    layouts = [dict(num_workers=1, cpus_per_worker=1.0, torch_threads=2),
               dict(num_workers=2, cpus_per_worker=0.5, torch_threads=1)]
    print(f"batch {batch}, {steps} steps, {repeats} alternations, every loop at niceness {niceness}; "
          f"s/step = the loop's own time / steps")
    print(f"{'layout':24s} {'plain s/step':>12s} {'ray s/step':>11s} {'ray cost':>9s} {'data stall':>11s} "
          f"{'ray start-up':>13s}")
    for layout in layouts:
        tcfg = TrainConfig(batch_size=batch, replay_fraction=0.0, worker_nice=0, **layout)
        world, threads = tcfg.num_workers, tcfg.torch_threads
        plain, ray_s, stall, startup = [], [], [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                with socket.socket() as sock:  # a free port for the gloo rendezvous
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                mp.spawn(plain_worker, args=(world, port, rows, steps, batch, threads, f"{tmp}/plain.json", niceness),
                         nprocs=world, join=True)
                plain.append(json.loads(open(f"{tmp}/plain.json").read())["train_s"] / steps)
                t0 = time.perf_counter()
                out = fit_student(ds, student_cfg=StudentConfig(vocabulary=WORDS), train_cfg=tcfg, steps=steps, storage_path=tmp,
                                  name="bench", out_dir=f"{tmp}/ckpt")
                wall = time.perf_counter() - t0
                st = json.loads(open(f"{out}/state.json").read())
            ray_s.append(st["train_s"] / steps)
            stall.append((st["feed_wait_s"] + st["batch_s"]) / st["train_s"])
            startup.append(wall - st["train_s"])
        p, r = statistics.median(plain), statistics.median(ray_s)
        print(f"{f'{world} worker(s) x {threads} thread(s)':24s} {p:12.3f} {r:11.3f} {r / p - 1:+9.1%} "
              f"{statistics.median(stall):11.1%} {statistics.median(startup):11.1f} s   "
              f"(each run: plain {', '.join(f'{v:.3f}' for v in plain)}; ray {', '.join(f'{v:.3f}' for v in ray_s)})",
              flush=True)
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--pixart-patch", type=int, default=None, help="default: StudentConfig's patch_size")
    ap.add_argument("--ray", action="store_true", help="also time the Ray Train loop against the same plain loop")
    ap.add_argument("--repeats", type=int, default=2, help="--ray: plain/Ray alternations per layout")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = StudentConfig(image_size=args.image_size, vocabulary=WORDS)
    pix = {"arch": "pixart", "image_size": args.image_size, "vocabulary": WORDS}
    if args.pixart_patch:
        pix["patch_size"] = args.pixart_patch
    rows = {"unet (default)": base, "pixart": StudentConfig(**pix)}
    print(f"threads={args.threads} batch={args.batch} image={args.image_size}x{args.image_size} fp32")
    print(f"{'arch':16s} {'params':>8s} {'s/step':>8s} {'img/s':>8s} {'sample 16 img':>14s}")
    for name, cfg in rows.items():
        r = bench(cfg, args.batch, args.steps)
        print(f"{name:16s} {r['params_M']:7.2f}M {r['s_per_step']:8.3f} {r['images_per_s']:8.1f} "
              f"{r['sample16_s']:12.2f} s ({r['sample_steps']} steps)", flush=True)
    if args.ray:
        bench_ray(max(args.steps, 20), args.batch, args.repeats)


if __name__ == "__main__":
    main()
