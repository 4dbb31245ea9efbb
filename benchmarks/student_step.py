"""Student speed on this machine: training s/step and images/s, and sampling
time, for the default UNet and the PixArt alternative side by side.

    python benchmarks/student_step.py [--threads 2] [--batch 32] [--steps 8] [--pixart-patch 4]
    python benchmarks/student_step.py --ray [--steps 60]   # also the Ray Train loop (2 DDP workers)

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
from evolve.student.diffusion import EMA, make_noise_scheduler, sample, training_loss
from evolve.student.model import Student

PROMPTS = ["a red circle and a blue square", "three triangles", "a square left of a circle", "a cyan triangle"]


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


def bench_ray(steps: int, batch: int, plain_s_per_step: float | None = None) -> None:
    """The real loop: fit_student on 256 reference renders, in two layouts of
    this machine's 2 cores: one worker with 2 torch threads (the same as the
    plain loop above, so the difference is Ray Train's cost), and the default
    2 DDP workers x 1 thread over gloo. Replay is off so that both loops train
    the same batches; `data_wait_s / train_s` is the data-loader stall fraction."""
    import json
    import os
    import tempfile

    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(k, v)
    import numpy as np
    import ray

    from evolve.config import TrainConfig
    from evolve.shapes.grammar import sample_prompt
    from evolve.shapes.render import render, to_png
    from evolve.student.train import fit_student

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rng = np.random.default_rng(0)
    prompts = [sample_prompt(rng).text for _ in range(256)]
    ds = ray.data.from_items([{"prompt": p, "image": to_png(render(p, i, 32))} for i, p in enumerate(prompts)])
    layouts = [dict(num_workers=1, cpus_per_worker=1.0, torch_threads=2),
               dict(num_workers=2, cpus_per_worker=0.5, torch_threads=1)]
    for layout in layouts:
        tcfg = TrainConfig(batch_size=batch, replay_fraction=0.0, worker_nice=0, **layout)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = fit_student(ds, student_cfg=StudentConfig(), train_cfg=tcfg, steps=steps, storage_path=tmp,
                              name="bench", out_dir=f"{tmp}/ckpt")
            wall = time.perf_counter() - t0
            st = json.loads(open(f"{out}/state.json").read())
        per_step = st["train_s"] / steps
        vs = "" if plain_s_per_step is None else f", {per_step / plain_s_per_step - 1:+.1%} vs the plain loop"
        print(f"ray fit: {tcfg.num_workers} worker(s) x {tcfg.torch_threads} thread(s), batch {batch}, "
              f"{steps} steps: train loop {st['train_s']:.1f} s ({per_step:.3f} s/step, "
              f"{batch * steps / st['train_s']:.1f} img/s{vs}), data stall "
              f"{(st['feed_wait_s'] + st['batch_s']) / st['train_s']:.1%}, fit() wall {wall:.1f} s "
              f"(start-up and checkpoint {wall - st['train_s']:.1f} s)", flush=True)
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--pixart-patch", type=int, default=None, help="default: StudentConfig's patch_size")
    ap.add_argument("--ray", action="store_true", help="also time the Ray Train loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = StudentConfig(image_size=args.image_size)
    pix = {"arch": "pixart", "image_size": args.image_size}
    if args.pixart_patch:
        pix["patch_size"] = args.pixart_patch
    rows = {"unet (default)": base, "pixart": StudentConfig(**pix)}
    print(f"threads={args.threads} batch={args.batch} image={args.image_size}x{args.image_size} fp32")
    print(f"{'arch':16s} {'params':>8s} {'s/step':>8s} {'img/s':>8s} {'sample 16 img':>14s}")
    plain = None
    for name, cfg in rows.items():
        r = bench(cfg, args.batch, args.steps)
        plain = plain or r["s_per_step"]  # the default (UNet) student's, for the Ray comparison
        print(f"{name:16s} {r['params_M']:7.2f}M {r['s_per_step']:8.3f} {r['images_per_s']:8.1f} "
              f"{r['sample16_s']:12.2f} s ({r['sample_steps']} steps)", flush=True)
    if args.ray:
        bench_ray(max(args.steps, 20), args.batch, plain if args.threads == 2 else None)


if __name__ == "__main__":
    main()
