"""The student: a denoiser, conditioned on the prompt, in one of two set-ups.

    Student(cfg)(x_t, t, input_ids, attention_mask) -> prediction (B, 3, S, S)
    LatentStudent(cfg)(z_t, t, captions, caption_mask) -> prediction (B, C, h, w)

`Student`: pixel space with its own small text encoder (the shapes world).
`LatentStudent`: PixArt-alpha's set-up, VAE latents and frozen T5 captions
(`config.encoders`); `build_student(cfg)` picks the one a config describes.
Both have `encode_prompts` (what `forward` is conditioned on) and `decode`
(what sampling ends with: uint8 images).

Two denoisers, both built from config with random weights (no hub):

- arch="unet" (default): diffusers `UNet2DConditionModel`. The image is first
  folded 2x2 into channels (pixel-unshuffle, `unet_patch`), so a 32x32x3 image
  is a 16x16x12 tensor and every conv runs on a quarter of the pixels; flat
  shapes of radius >= 3 px lose nothing. Cross-attention to the prompt tokens
  in the lower `attn_levels` levels and the mid block; the pooled prompt ([BOS]
  state) is also added to the timestep embedding (`class_embed_type=
  "projection"`), which carries the global facts (how many, which shape) to
  every resnet.
- arch="pixart": diffusers `PixArtTransformer2DModel` on `patch_size` patches,
  cross-attending to the prompt tokens.

Checkpoint layout (`save_pretrained`): config.json (StudentConfig),
tokenizer.json (Student only), model.safetensors (raw weights) and
ema.safetensors (EMA weights, when an EMA is given). `from_pretrained(dir)`
loads EMA by default; `load_pretrained(dir)` loads whichever student it holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from evolve.config import StudentConfig
from evolve.student.text import TextEncoder, build_tokenizer, load_tokenizer, tokenize

CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"


def _build_unet(cfg: StudentConfig):
    from diffusers import UNet2DConditionModel

    p = cfg.unet_patch
    n = len(cfg.block_channels)
    attn = [i >= n - cfg.attn_levels for i in range(n)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DConditionModel(
        sample_size=cfg.image_size // p,
        in_channels=3 * p * p,
        out_channels=3 * p * p,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.attn_levels > 0 else None,
        block_out_channels=tuple(cfg.block_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=cfg.attention_head_dim,
        class_embed_type="projection" if cfg.pooled_text else None,
        projection_class_embeddings_input_dim=cfg.text_dim if cfg.pooled_text else None,
    )


def _build_pixart(cfg: StudentConfig):
    from diffusers import PixArtTransformer2DModel

    captions = cfg.caption_channels is not None
    model = PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels * (2 if cfg.learn_sigma else 1),
        num_layers=cfg.num_layers,
        # Precomputed captions (T5) are projected to the model width first, as in
        # PixArt-alpha; the own small encoder is attended to at its own width.
        cross_attention_dim=cfg.hidden_size if captions else cfg.text_dim,
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        norm_num_groups=1,
        use_additional_conditions=cfg.micro_conditions,
        caption_channels=cfg.caption_channels,
    )
    if cfg.qk_norm:
        add_qk_norm(model)
    return model


def add_qk_norm(model: nn.Module) -> nn.Module:
    """LayerNorm over each head's queries and keys in every attention layer
    (diffusers' `qk_norm="layer_norm"`, which PixArt's blocks do not expose).
    It keeps attention logits bounded in bf16 at large scale."""
    from diffusers.models.attention_processor import Attention

    for m in model.modules():
        if isinstance(m, Attention) and m.norm_q is None:
            m.norm_q = nn.LayerNorm(m.inner_dim // m.heads, eps=1e-6)
            m.norm_k = nn.LayerNorm(m.inner_kv_dim // m.heads, eps=1e-6)
    return model


def build_denoiser(cfg: StudentConfig) -> nn.Module:
    """The denoiser alone, random weights: what tiny and XL configs share."""
    if cfg.arch == "unet":
        return _build_unet(cfg)
    if cfg.arch == "pixart":
        return _build_pixart(cfg)
    raise ValueError(f"unknown arch {cfg.arch!r}")  # pragma: no cover - pydantic rejects it first


def denoise(denoiser: nn.Module, cfg: StudentConfig, x: torch.Tensor, t: torch.Tensor,
            text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """One denoiser call: x (B, C, S, S) at timesteps t, attending to text
    states (B, L, D) where text_mask is 1. Returns the prediction, shaped like x
    (a learned variance, if any, is dropped: training and sampling use the mean)."""
    if cfg.arch == "unet":
        p = cfg.unet_patch
        xs = F.pixel_unshuffle(x, p) if p > 1 else x
        out = denoiser(xs, t, encoder_hidden_states=text, encoder_attention_mask=text_mask,
                       class_labels=text[:, 0] if cfg.pooled_text else None).sample
        return F.pixel_shuffle(out, p) if p > 1 else out
    cond = {"resolution": None, "aspect_ratio": None}
    if cfg.micro_conditions:
        # The image's own size (aspect buckets: not always a square), as the
        # diffusers PixArt pipeline passes it: (height, width) and height / width.
        b, f = x.shape[0], cfg.vae_scale if cfg.latent_channels else 1
        h, w = x.shape[-2] * f, x.shape[-1] * f
        cond = {"resolution": torch.tensor([[h, w]], device=x.device, dtype=x.dtype).repeat(b, 1),
                "aspect_ratio": torch.full((b, 1), h / w, device=x.device, dtype=x.dtype)}
    out = denoiser(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=text_mask,
                   added_cond_kwargs=cond).sample
    return out[:, :cfg.in_channels] if cfg.learn_sigma else out


class _Pretrained(nn.Module):
    """save_pretrained / from_pretrained shared by both students: config.json,
    model.safetensors (raw weights), ema.safetensors (EMA, when given)."""

    config: StudentConfig

    def _save_extra(self, d: Path) -> None:
        """Files beside the weights (the tokenizer)."""

    @classmethod
    def _from_folder(cls, config: StudentConfig, d: Path) -> "_Pretrained":
        return cls(config)

    def save_pretrained(self, directory: str | Path, ema: "nn.Module | dict | None" = None,
                        weights: dict | None = None) -> Path:
        """Write config.json, model.safetensors (`weights`, by default this
        module's) and, if `ema` (an EMA object, a module or a state dict) is
        given, ema.safetensors; plus `_save_extra`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(self.config.model_dump_json(indent=2))
        self._save_extra(d)
        save_file(_contiguous(self.state_dict() if weights is None else weights), str(d / WEIGHTS_NAME))
        if ema is not None:
            sd = ema if isinstance(ema, dict) else ema.state_dict()
            save_file(_contiguous(sd), str(d / EMA_NAME))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, ema: bool = True) -> "_Pretrained":
        """Load a checkpoint directory; EMA weights when present and `ema`."""
        d = Path(directory)
        config = StudentConfig.model_validate(json.loads((d / CONFIG_NAME).read_text()))
        if cls is _Pretrained:  # whichever student the folder holds
            return student_class(config).from_pretrained(d, ema)
        student = cls._from_folder(config, d)
        path = d / EMA_NAME if ema and (d / EMA_NAME).exists() else d / WEIGHTS_NAME
        student.load_state_dict(load_file(str(path)))
        return student

    @classmethod
    def from_config(cls, config: StudentConfig | dict) -> "_Pretrained":
        if isinstance(config, dict):
            config = StudentConfig.model_validate(config)
        return cls(config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Student(_Pretrained):
    """Pixel space, with its own small text encoder (tokenizer.json in the checkpoint)."""

    def __init__(self, config: StudentConfig, tokenizer=None):
        super().__init__()
        self.config = config
        if config.caption_channels is not None or config.latent_channels is not None:
            raise ValueError("Student runs pixel-space configs with its own text encoder; a config with "
                             "latent_channels / caption_channels is a LatentStudent's")
        if tokenizer is None:
            if config.vocabulary is None:
                raise ValueError("a pixel-space Student builds its tokenizer from StudentConfig.vocabulary "
                                 "(a run fills it from its world); give the words, or a checkpoint's tokenizer")
            tokenizer = build_tokenizer(config.vocabulary, max_length=config.max_tokens)
        self.tokenizer = tokenizer
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens, config.vocab_size is {config.vocab_size}")
        self.text = TextEncoder(config.vocab_size, config.text_dim, config.text_layers,
                                config.text_heads, config.max_tokens)
        self.denoiser = build_denoiser(config)

    @classmethod
    def from_config(cls, config: StudentConfig | dict, tokenizer=None) -> "Student":
        if isinstance(config, dict):
            config = StudentConfig.model_validate(config)
        return cls(config, tokenizer)

    def _save_extra(self, d: Path) -> None:
        self.tokenizer.backend_tokenizer.save(str(d / TOKENIZER_NAME))

    @classmethod
    def _from_folder(cls, config: StudentConfig, d: Path) -> "Student":
        tok = load_tokenizer(d / TOKENIZER_NAME, config.max_tokens) if (d / TOKENIZER_NAME).exists() else None
        return cls(config, tok)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (token ids, attention mask): the conditioning `forward` takes."""
        return tokenize(self.tokenizer, prompts, self.config.max_tokens)

    def forward(self, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        h, mask = self.text(input_ids, attention_mask)
        return denoise(self.denoiser, self.config, x, t, h, mask)

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Denoised pixels in [-1, 1] (N, 3, S, S) -> uint8 images (N, S, S, 3)."""
        img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class LatentStudent(_Pretrained):
    """PixArt-alpha's set-up: the denoiser works on VAE latents and attends to
    caption embeddings of a frozen T5, both encoders named by `config.encoders`.

    The encoders are not part of the module (not in its state dict, its EMA or
    its checkpoints: T5-XXL alone is 4.7B parameters). Training reads latents
    and embeddings precomputed into a FeatureStore; `encode_prompts` and
    `decode` (sampling) load the encoders on first use."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        if not config.is_latent:
            raise ValueError("LatentStudent needs a config with latent_channels, caption_channels and encoders")
        self.config = config
        self.denoiser = build_denoiser(config)
        self._frozen = None  # FrozenEncoders; a plain object, so never registered as a submodule

    def encoders(self):
        """The frozen encoders, loaded (once per process) on first use and
        checked against what the denoiser was built for."""
        if self._frozen is None:
            from evolve.student.encoders import load_encoders

            enc, cfg = load_encoders(self.config.encoders), self.config
            got = {"latent_channels": enc.latent_channels, "vae_scale": enc.vae_scale_factor,
                   "caption_channels": enc.text_dim}
            wrong = {k: (getattr(cfg, k), v) for k, v in got.items() if getattr(cfg, k) != v}
            if wrong:
                raise ValueError(f"the encoders do not fit this student (field: (student, encoders)): {wrong}")
            self._frozen = enc
        return self._frozen

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (caption embeddings (N, L, D) float32, mask (N, L) bool), from the frozen T5."""
        emb, mask = self.encoders().encode_prompts(list(prompts))
        return torch.from_numpy(emb).float(), torch.from_numpy(mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, captions: torch.Tensor,
                caption_mask: torch.Tensor) -> torch.Tensor:
        return denoise(self.denoiser, self.config, x, t, captions.to(x.dtype), caption_mask)

    def decode(self, x: torch.Tensor) -> np.ndarray:
        """Denoised latents (N, C, h, w) -> uint8 images (N, h*f, w*f, 3), by the frozen VAE."""
        return self.encoders().decode_latents(x.float().cpu().numpy().astype(np.float32))


def student_class(config: StudentConfig) -> type[_Pretrained]:
    return LatentStudent if config.is_latent else Student


def build_student(config: StudentConfig | dict) -> _Pretrained:
    """The student a config describes, random weights: Student or LatentStudent."""
    if isinstance(config, dict):
        config = StudentConfig.model_validate(config)
    return student_class(config).from_config(config)


def load_pretrained(directory: str | Path, ema: bool = True) -> _Pretrained:
    """Whichever student a checkpoint folder holds (its config.json says)."""
    return _Pretrained.from_pretrained(directory, ema)


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}
