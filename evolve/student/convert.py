"""Start a LatentStudent from pretrained PixArt-alpha weights, as the paper does.

    student = latent_student_from_diffusers("PixArt-alpha/PixArt-XL-2-512x512",
                                            StudentConfig.pixart_alpha_xl2(512), subfolder="transformer")
    student.save_pretrained("checkpoints/pixart-512")   # then: init_checkpoint in the run config

or `evolve import-pixart SRC OUT --resolution 512`. The denoiser is diffusers'
own PixArtTransformer2DModel, so the weights load as they are; the config
check refuses a transformer whose architecture differs from the student's
(another resolution, width, depth, caption width) instead of loading it
partly. With `qk_norm` (the Edgen change) the new per-head LayerNorms start
as identities: the only weights PixArt does not have.
"""

from __future__ import annotations

from pathlib import Path

from evolve.config import StudentConfig
from evolve.student.model import LatentStudent

# Not architecture: bookkeeping, or unused by PixArt's ada_norm_single blocks.
_IGNORED = {"norm_num_groups"}


def _effective(cfg: dict) -> dict:
    """diffusers resolves two None defaults from sample_size; compare what is used."""
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _IGNORED}
    if cfg.get("interpolation_scale") is None:
        cfg["interpolation_scale"] = max(cfg["sample_size"] // 64, 1)
    if cfg.get("use_additional_conditions") is None:
        cfg["use_additional_conditions"] = cfg["sample_size"] == 128
    return cfg


def latent_student_from_diffusers(transformer: str | Path, student_cfg: StudentConfig,
                                  subfolder: str | None = None) -> LatentStudent:
    """A LatentStudent whose denoiser holds a diffusers PixArtTransformer2DModel's
    weights (a folder, or a Hub id when online)."""
    import torch
    from diffusers import PixArtTransformer2DModel

    src = PixArtTransformer2DModel.from_pretrained(str(transformer), subfolder=subfolder, torch_dtype=torch.float32)
    student = LatentStudent(student_cfg)
    ours, theirs = _effective(dict(student.denoiser.config)), _effective(dict(src.config))
    diff = {k: (ours.get(k), v) for k, v in theirs.items() if ours.get(k) != v}
    if diff:
        raise ValueError(f"{transformer} is not the transformer this student config builds "
                         f"(field: (student, pretrained)): {diff}")
    missing, unexpected = student.denoiser.load_state_dict(src.state_dict(), strict=False)
    new = {k for k in missing if student_cfg.qk_norm and (".norm_q." in k or ".norm_k." in k)}
    if unexpected or set(missing) - new:
        raise ValueError(f"weights of {transformer} do not fit: missing {sorted(set(missing) - new)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return student
