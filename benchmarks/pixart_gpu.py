"""PixArt-alpha XL/2 training throughput on one GPU: plain torch + diffusers, no Ray.

    python benchmarks/pixart_gpu.py [--resolution 512] [--batch 32] [--steps 200] \
        [--modes eager,compile] [--grad-ckpt] [--qk-norm] [--out results.jsonl]
    python benchmarks/pixart_gpu.py --tiny --device cpu --steps 3   # the same code, small, on CPU

The model is the project's own: `build_denoiser(StudentConfig.pixart_alpha_xl2(res))`
with random weights, called through `denoise` and trained with `training_loss`,
the functions the shapes-world student uses. The batch is what the trainer
sees once VAE latents and T5 caption embeddings are precomputed (issue: the
trainer never runs the VAE or T5): synthetic SD-VAE latents (4 x res/8 x res/8)
and T5-v1.1-XXL-shaped caption embeddings (120 x 4096, random lengths). The
step is the real one: bf16 autocast, fused AdamW, gradient clipping, EMA.

FLOPs per training step are counted once by torch's FlopCounterMode (matmuls
and attention, forward + backward, no recomputation); MFU = those FLOPs /
measured step time / the GPU's dense bf16 peak (989.4 TFLOP/s for H100/H200
SXM; `--peak-tflops` for other cards). One JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from evolve.config import StudentConfig  # noqa: E402
from evolve.student.diffusion import EMA, make_noise_scheduler, training_loss  # noqa: E402
from evolve.student.model import build_denoiser, denoise  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def config(args) -> StudentConfig:
    if args.tiny:  # same architecture family, a few M parameters
        return StudentConfig.pixart_alpha_xl2(256, image_size=args.resolution or 64, hidden_size=96,
                                              num_layers=2, num_heads=4, caption_channels=64,
                                              max_tokens=16, qk_norm=args.qk_norm)
    return StudentConfig.pixart_alpha_xl2(args.resolution or 512, qk_norm=args.qk_norm)


def synthetic_batch(cfg: StudentConfig, batch: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.sample_size
    latents = torch.randn(batch, cfg.in_channels, s, s, generator=g)
    captions = torch.randn(batch, cfg.max_tokens, cfg.caption_channels, generator=g).to(torch.bfloat16)
    lengths = torch.randint(8, cfg.max_tokens + 1, (batch,), generator=g)
    mask = (torch.arange(cfg.max_tokens)[None] < lengths[:, None]).long()
    return latents.to(device), captions.to(device), mask.to(device)


class Trainer:
    """One model, its optimizer, EMA and a step function (optionally compiled)."""

    def __init__(self, cfg: StudentConfig, device: str, compile_model: bool, grad_ckpt: bool,
                 fuse_qkv: bool = False):
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        with torch.device(device):
            self.model = build_denoiser(cfg)
        if fuse_qkv:
            fuse_projections(self.model)
        self.model.to(device).train()
        if grad_ckpt:
            self.model.enable_gradient_checkpointing()
        self.net = torch.compile(self.model) if compile_model else self.model
        cuda = device.startswith("cuda")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.03,
                                     fused=True if cuda else None)
        self.ema = EMA(self.model, max_decay=0.9999)
        self.noise = make_noise_scheduler(cfg)
        self.amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

    def loss(self, latents, captions, mask, net=None):
        def call(x, t, c, m):
            return denoise(net or self.net, self.cfg, x, t, c, m)
        with self.amp:
            return training_loss(call, self.noise, latents, captions, mask, self.cfg.prediction_type)

    def count_flops(self, batch) -> int:
        """Model FLOPs of one training step (forward + backward) through the
        uncompiled model, without checkpointing's recomputation."""
        from torch.utils.flop_counter import FlopCounterMode

        ckpt = self.model.is_gradient_checkpointing
        if ckpt:
            self.model.disable_gradient_checkpointing()
        with FlopCounterMode(display=False) as fc:
            self.loss(*batch, net=self.model).backward()
        self.opt.zero_grad(set_to_none=True)
        if ckpt:
            self.model.enable_gradient_checkpointing()
        return fc.get_total_flops()

    def step(self, latents, captions, mask) -> torch.Tensor:
        loss = self.loss(latents, captions, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return loss.detach()


def fuse_projections(model) -> None:
    """One matmul for q, k, v (self-attention) and for k, v (cross-attention),
    trained in the fused layout: diffusers' fuse_qkv_projections keeps the
    unfused copies, which would sit in the optimizer and EMA, so drop them."""
    from diffusers.models.attention_processor import Attention

    model.fuse_qkv_projections()
    for m in model.modules():
        if isinstance(m, Attention):
            names = ("to_q", "to_k", "to_v") if getattr(m, "to_qkv", None) is not None else ("to_k", "to_v")
            for n in names:
                delattr(m, n)


def profile_steps(tr: "Trainer", batch, steps: int, path: str | None) -> str:
    """Where a training step's GPU time goes: the top kernels by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tr.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            tr.step(*batch)
        sync(tr.device)
    key = "self_cuda_time_total" if tr.device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
    if path:
        Path(path).write_text(table)
    return table


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_mode(cfg, device, batch, mode, steps, warmup, grad_ckpt, peak, fuse_qkv=False,
               profile=0, profile_path=None) -> dict:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tr = Trainer(cfg, device, compile_model=mode == "compile", grad_ckpt=grad_ckpt, fuse_qkv=fuse_qkv)
    flops = tr.count_flops(batch)
    t0 = time.perf_counter()
    for _ in range(warmup):  # includes compilation
        tr.step(*batch)
    sync(device)
    warm_s = time.perf_counter() - t0
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(tr.step(*batch))
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    n = batch[0].shape[0]
    out = {"mode": mode, "resolution": cfg.image_size, "batch": n, "grad_ckpt": grad_ckpt,
           "qk_norm": cfg.qk_norm, "params_M": round(sum(p.numel() for p in tr.model.parameters()) / 1e6, 1),
           "steps": steps, "warmup_s": round(warm_s, 1), "s_per_step": round(dt, 4),
           "samples_per_s": round(n / dt, 1), "tflop_per_step": round(flops / 1e12, 2),
           "achieved_tflops": round(flops / dt / 1e12, 1),
           "loss_first_last": [round(losses[0].item(), 4), round(losses[-1].item(), 4)]}
    if peak:
        out["mfu"] = round(flops / dt / (peak * 1e12), 3)
    if device.startswith("cuda"):
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    out["fuse_qkv"] = fuse_qkv
    if profile:
        print(profile_steps(tr, batch, profile, profile_path), flush=True)
    del tr
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=None, help="512 (default) or 1024")
    ap.add_argument("--batch", type=int, default=32, help="per GPU; halved on out-of-memory")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--qk-norm", action="store_true")
    ap.add_argument("--fuse-qkv", action="store_true", help="fused q/k/v projections")
    ap.add_argument("--profile", type=int, default=0, help="then profile this many steps (kernel table)")
    ap.add_argument("--tiny", action="store_true", help="a few-M-parameter model of the same family")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    ap.add_argument("--out", default=None, help="append JSON lines here too")
    args = ap.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = config(args)
    peak = args.peak_tflops
    env = {"torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        env["gpu"] = name
        peak = peak or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    env["peak_tflops"] = peak
    print(json.dumps(env), flush=True)

    results, batch_size = [], args.batch
    for mode in args.modes.split(","):
        while True:
            try:
                batch = synthetic_batch(cfg, batch_size, args.device)
                r = bench_mode(cfg, args.device, batch, mode, args.steps, args.warmup, args.grad_ckpt, peak,
                               args.fuse_qkv, args.profile,
                               args.out and f"{Path(args.out).with_suffix('')}-{mode}-profile.txt")
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                print(json.dumps({"mode": mode, "batch": batch_size, "error": "out of memory, halving"}), flush=True)
                batch_size //= 2
        r.update(env)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
