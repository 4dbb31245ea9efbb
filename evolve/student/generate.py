"""Images from a student checkpoint (EMA weights), for `evolve generate` and the
loop's student sampling."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from evolve.config import SampleConfig
from evolve.student.diffusion import sample
from evolve.student.model import load_pretrained

BASE_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "base_student"


@lru_cache(maxsize=2)
def _load(path: str, mtime: float, ema: bool):
    return load_pretrained(path, ema=ema).eval()


def load_student(checkpoint_dir: str | Path, ema: bool = True):
    """Load (and cache, keyed by path and weights' mtime) a checkpoint: a
    Student or a LatentStudent, as its config.json says. A URI (a run folder
    on an object store) is fetched into this node's cache first."""
    from evolve.storage import local_folder

    d = local_folder(checkpoint_dir).resolve()
    mtimes = [p.stat().st_mtime for p in d.glob("*.safetensors")]
    if not mtimes:
        raise FileNotFoundError(f"no student checkpoint in {d}")
    return _load(str(d), max(mtimes), ema)


def generate_images(checkpoint_dir: str | Path, prompts: list[str], seeds: list[int] | None = None,
                    sample_cfg: SampleConfig | None = None, threads: int | None = None,
                    size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3), one image per (prompt, seed); seeds default to 0..N-1;
    (H, W) = size, by default the student's square (others: PixArt students).
    Batched by sample_cfg.batch_size; deterministic per (prompt, seed)."""
    prompts = [str(p) for p in prompts]
    seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
    if threads:
        torch.set_num_threads(threads)
    student = load_student(checkpoint_dir)
    return sample(student, prompts, seeds, sample_cfg or SampleConfig(), size)
