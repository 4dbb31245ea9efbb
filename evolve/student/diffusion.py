"""Diffusion around the student: the training loss, classifier-free guidance,
sampling and an EMA of the weights.

Images live in [-1, 1] (black background = -1). The forward process is
diffusers' `DDPMScheduler` with the config's beta schedule (cosine by
default); the student predicts `prediction_type` (eps, v or x0). Sampling is
DPM-Solver++ with classifier-free guidance and x0 clipped to [-1, 1] at every
step (`thresholding=True, sample_max_value=1.0`), which in pixel space is what
keeps backgrounds black: without it the x0 implied by an eps/v prediction near
t = T is divided by a tiny alpha and explodes.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evolve.config import SampleConfig, StudentConfig


# -- noise -------------------------------------------------------------------
def make_noise_scheduler(cfg: StudentConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


def make_sample_scheduler(cfg: StudentConfig, steps: int):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type, algorithm_type="dpmsolver++", solver_order=2,
        # x0 clipping is for pixels in [-1, 1]; scaled VAE latents range wider.
        thresholding=cfg.latent_channels is None, sample_max_value=1.0, dynamic_thresholding_ratio=0.995,
        lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    return sched


def sample_timesteps(n: int, num_train_timesteps: int, shift: float = 1.0,
                     generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training timesteps. shift == 1: uniform. shift > 1 moves mass to high
    noise (u -> u^(1/shift)), where the global layout of a scene is decided."""
    u = torch.rand(n, generator=generator, device=device)
    if shift != 1.0:
        u = u ** (1.0 / shift)
    return (u * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)


def drop_mask(n: int, p: float, rng: random.Random) -> list[bool]:
    """Classifier-free guidance training: which of n captions to drop (each with chance p)."""
    return [rng.random() < p for _ in range(n)]


def drop_prompts(prompts: list[str], p: float, rng: random.Random) -> list[str]:
    """Replace each prompt by "" (the null caption) with chance p."""
    return ["" if d else s for s, d in zip(prompts, drop_mask(len(prompts), p, rng))]


def training_loss(student: nn.Module, noise_scheduler, images: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, prediction_type: str, t_shift: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between the student's prediction and its target at random timesteps.

    `student` may be wrapped (DDP): it is only called. images in [-1, 1]."""
    b, dev = images.shape[0], images.device
    if generator is None:  # drawn where the images are: no host round trip on a GPU
        noise = torch.randn(images.shape, dtype=images.dtype, device=dev)
        t = sample_timesteps(b, noise_scheduler.config.num_train_timesteps, t_shift, device=dev)
    else:  # a (CPU) generator: reproducible on any device
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(dev)
        t = sample_timesteps(b, noise_scheduler.config.num_train_timesteps, t_shift, generator).to(dev)
    noisy = noise_scheduler.add_noise(images, noise, t)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(images, noise, t)
    elif prediction_type == "sample":
        target = images
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    pred = student(noisy, t, input_ids, attention_mask)
    return F.mse_loss(pred.float(), target.float())


# -- sampling ----------------------------------------------------------------
def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One independent noise tensor per seed: an image depends only on its own
    prompt and seed, never on the batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sample_shape(scfg, size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """The denoiser's input (C, h, w) for an image of size (height, width)
    pixels (None: the student's square). Other shapes than the square need a
    PixArt student (its patch embedding takes any grid of patches), and sides
    that tile into patches."""
    S = scfg.image_size
    height, width = size or (S, S)
    if (height, width) == (S, S):
        return scfg.in_channels, scfg.sample_size, scfg.sample_size
    if scfg.arch != "pixart":
        raise ValueError(f"a {scfg.arch} student draws {S}x{S} images only, not {height}x{width}")
    f = scfg.vae_scale if scfg.latent_channels else 1
    unit = f * scfg.patch_size
    if height <= 0 or width <= 0 or height % unit or width % unit:
        raise ValueError(f"image size {height}x{width} must be positive multiples of {unit} px "
                         f"(vae_scale x patch_size)")
    return scfg.in_channels, height // f, width // f


@torch.no_grad()
def sample(student, prompts: list[str], seeds: list[int], cfg: SampleConfig | None = None,
           size: tuple[int, int] | None = None) -> np.ndarray:
    """Draw one image per (prompt, seed): uint8 (N, H, W, 3), (H, W) = size,
    by default the student's square. Works for both students: noise shaped
    like the denoiser's input, decoded by the student."""
    cfg = cfg or SampleConfig()
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    shape = sample_shape(student.config, size)
    out = []
    was_training = student.training
    student.eval()
    try:
        for i in range(0, len(prompts), cfg.batch_size):
            ps, ss = list(prompts[i:i + cfg.batch_size]), list(seeds[i:i + cfg.batch_size])
            out.append(_sample_batch(student, ps, ss, cfg, shape))
    finally:
        student.train(was_training)
    if not out:
        H, W = size or (student.config.image_size, student.config.image_size)
        return np.zeros((0, H, W, 3), np.uint8)
    return np.concatenate(out)


def _sample_batch(student, prompts, seeds, cfg: SampleConfig, shape: tuple[int, int, int]) -> np.ndarray:
    n, scfg = len(prompts), student.config
    dev = next(student.parameters()).device  # noise is drawn on the CPU (the same on any device), then moved
    sched = make_sample_scheduler(scfg, cfg.steps)
    x = (initial_noise(seeds, shape) * sched.init_noise_sigma).to(dev)
    ids, mask = student.encode_prompts(prompts)
    guided = cfg.guidance != 1.0
    if guided:
        uids, umask = student.encode_prompts([""] * n)
        ids, mask = torch.cat([ids, uids]), torch.cat([mask, umask])
    ids, mask = ids.to(dev), mask.to(dev)
    for t in sched.timesteps:
        xin = torch.cat([x, x]) if guided else x
        tt = torch.full((xin.shape[0],), int(t), dtype=torch.long, device=dev)
        pred = student(sched.scale_model_input(xin, t), tt, ids, mask)
        if guided:
            cond, uncond = pred.chunk(2)
            pred = uncond + cfg.guidance * (cond - uncond)
        x = sched.step(pred, t, x).prev_sample
    return student.decode(x)


# -- EMA ---------------------------------------------------------------------
class EMA:
    """Exponential moving average of a module's floating-point tensors, with
    the decay warmed up as min(max_decay, (1 + n) / (10 + n)) so that a short
    run does not keep most of the random init."""

    def __init__(self, model: nn.Module, max_decay: float = 0.999):
        self.max_decay = max_decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay(self) -> float:
        n = self.num_updates
        return min(self.max_decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        shadows, values = [], []
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                shadows.append(s)
                values.append(v.detach())
            else:
                s.copy_(v)
        if shadows:  # one fused kernel per group, not one per tensor (~900 in PixArt XL)
            torch._foreach_lerp_(shadows, values, 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def load_state_dict(self, sd: dict[str, torch.Tensor], num_updates: int | None = None) -> None:
        missing = set(self.shadow) ^ set(sd)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for k, v in sd.items():
            self.shadow[k].copy_(v)
        if num_updates is not None:
            self.num_updates = num_updates

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)
