"""Run configuration: plain pydantic models that round-trip through JSON/YAML.

Everything a run does is decided here, so a run folder's `config.json` is
enough to reproduce or resume it. Defaults are the shapes-world run that
finishes in under 10 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


def _path_text(v):
    """A folder field's value as text: a path as given, a URI kept whole (a
    Path field would fold `s3://bucket` into `s3:/bucket`)."""
    return str(v) if isinstance(v, os.PathLike) else v


class _Strict(BaseModel):
    # A misspelled key in a config file is an error, not a silent default.
    model_config = ConfigDict(extra="forbid")

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: Path | str):
        """From a YAML (.yaml/.yml) or JSON file. A top-level `extends: other.yaml`
        (relative to the file) starts from that file; the keys given here
        replace its keys, nested mappings key by key. The files a run reads
        (`init_checkpoint`, prompt files) are relative to the file naming them."""
        return cls.model_validate(_read_config(Path(path)))


def _read_config(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config files extend each other in a circle: {' -> '.join(map(str, seen + (path,)))}")
    text = path.read_text()
    data = (yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping, not {type(data).__name__}")
    _files_from(data, path.parent)
    base = data.pop("extends", None)
    return _merge(_read_config(path.parent / base, seen + (path,)), data) if base else data


def _files_from(data: dict, here: Path) -> None:
    """A run config's input files (`init_checkpoint`, the prompt files of its
    `world`) are named relative to the config file that names them: made
    absolute here, before files that extend each other are merged."""
    if data.get("init_checkpoint") and "://" not in str(data["init_checkpoint"]) \
            and not Path(data["init_checkpoint"]).is_absolute():
        data["init_checkpoint"] = str((here / data["init_checkpoint"]).resolve())
    world = data.get("world")
    if isinstance(world, dict):
        for key in ("seed", "heldout"):
            src = world.get(key)
            if isinstance(src, (str, Path)):
                src = {"path": src}
            if isinstance(src, dict) and "path" in src and not Path(src["path"]).is_absolute():
                world[key] = {**src, "path": str((here / src["path"]).resolve())}


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings key by key; a mapping of another `kind`
    (another world, say) replaces the base's whole."""
    out = dict(base)
    for k, v in over.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and v.get("kind") == out[k].get("kind")
        out[k] = _merge(out[k], v) if nested else v
    return out


# --------------------------------------------------------------------------- worlds
# A world says where prompts come from and how images are judged against them
# (evolve/world.py). The run's `world` section picks one by `kind`.


class ShapesWorldConfig(_Strict):
    """The embedded shapes world (shared/specs/shapes-world.md): prompts from its
    grammar, held-out images scored exactly by its scene parser."""

    kind: Literal["shapes"] = "shapes"
    seed_prompts: int = Field(48, ge=1, description="size of the seed prompt set, drawn from the grammar")
    seed_categories: tuple[str, ...] | None = Field(None, description="draw seeds from these categories only")
    heldout_per_category: int = Field(16, ge=1, description="held-out images per category")


class PromptSource(_Strict):
    """One prompt file: JSONL, CSV, TSV, plain text (one prompt a line) or Parquet.

    Columns are found by name when not given: the prompt in `prompt`, `Prompt`,
    `Prompts`, `text` or `caption`; the category in `category`, `Category`,
    `tag` or `skill`; the id in `id`. PartiPrompts' TSV, DrawBench's CSV and
    GenEval's evaluation_metadata.jsonl load as they are published."""

    path: Path
    format: Literal["auto", "jsonl", "csv", "tsv", "txt", "parquet"] = "auto"
    prompt_column: str | None = None
    category_column: str | None = None
    id_column: str | None = None
    limit: int | None = Field(None, ge=1, description="only the first `limit` prompts")

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, data):
        return {"path": data} if isinstance(data, (str, Path)) else data


class PromptsWorldConfig(_Strict):
    """Free text: seed and held-out prompts from files the user brings; held-out
    images scored by the VLM judge (pairwise win rates, alignment)."""

    kind: Literal["prompts"] = "prompts"
    seed: PromptSource = Field(description="the seed prompt set")
    heldout: PromptSource = Field(description="held-out prompts; none may be among the seeds")
    max_prompt_chars: int = Field(1000, ge=1, description="a longer prompt in a file is an error")
    heldout_images_per_prompt: int = Field(1, ge=1, le=16, description="images (seeds) per held-out prompt")


def _world_kind(v) -> str:
    return v.get("kind", "shapes") if isinstance(v, dict) else getattr(v, "kind", "shapes")


# `kind` picks the world; without one it is the shapes world.
WorldConfig = Annotated[Annotated[ShapesWorldConfig, Tag("shapes")] | Annotated[PromptsWorldConfig, Tag("prompts")],
                        Discriminator(_world_kind)]


class EvaluationConfig(_Strict):
    """How students and teachers are scored on the held-out prompts (evolve/evaluation.py).

    metric "auto": the world's own exact scorer where it has one (the shapes
    world's scene parser), else the VLM. "vlm": the judge, as the paper scores
    Edgen: the student's pairwise win rate against each teacher (both orders
    asked, agreeing answers only) and a per-image alignment score."""

    metric: Literal["auto", "scene", "vlm"] = "auto"
    alignment: Literal["auto", "vqascore", "questions", "none"] = Field(
        "auto", description="vqascore: P('Yes') to 'does this image show {prompt}?' from the answer's "
        "logprobs; questions: the VLM writes yes/no questions per prompt once (cached), then answers "
        "them per image (TIFA / DSG); auto: vqascore where the backend returns logprobs")
    win_rate: bool = Field(True, description="vlm: the student against each teacher, both orders")
    reference: Literal["shapes"] | None = Field(
        None, description="also score with this world's exact scorer, to check the VLM against it "
        "(shapes: prompts its reader understands)")
    max_questions: int = Field(8, ge=1, le=32, description="most yes/no questions per prompt")


class FlawProfile(_Strict):
    """Probabilities that an embedded teacher draws a prompt wrongly.

    Each flaw applies to the prompts whose skill it touches: `count` to counting
    prompts, `color` to prompts that name colours, `relation` to position
    prompts, `shape` to any prompt.
    """

    count: float = Field(0.0, ge=0, le=1, description="count off by one")
    color: float = Field(0.0, ge=0, le=1, description="a named colour swapped or replaced")
    relation: float = Field(0.0, ge=0, le=1, description="relation flipped")
    shape: float = Field(0.0, ge=0, le=1, description="one object drawn as another shape")


class TeacherConfig(_Strict):
    """One teacher: who it is, what it costs, how fast and how often it may be called."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    # embedded: a shapes-world teacher served here. openai: any OpenAI-Images API
    # (OpenAI itself, a self-hosted open model, an Edgen endpoint). bfl, fal,
    # replicate, stability, ideogram: those providers' own APIs (actors/providers.py).
    # diffusers: an open-weights pipeline the run serves itself on Ray Serve
    # (serve/diffusers_teacher.py, `pipeline`), bought from over HTTP as openai.
    kind: Literal["embedded", "openai", "bfl", "fal", "replicate", "stability", "ideogram", "diffusers"] = "embedded"
    pipeline: dict | None = Field(None, description="kind diffusers: DiffusersTeacherConfig fields (pipeline: "
                                  "a diffusers folder or Hub id, model_name, sizes, num_gpus, ...)")
    # For a provider: its base URL (None: the provider's public API) and model;
    # the key comes from the environment variable named here, never from a file.
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    provider_options: dict = Field(default_factory=dict, description="provider-specific request fields "
                                   "(e.g. openai: {'size': '1024x1024'}; replicate: {'version': ...})")
    poll_interval_s: float = Field(1.0, gt=0, description="submit-and-poll providers: seconds between polls")
    max_poll_s: float = Field(600.0, gt=0, description="give up collecting a job after this long")
    timeout_s: float = Field(60.0, gt=0, description="one HTTP call: longer and the call's outcome is unknown")
    max_attempts: int = Field(6, ge=1, description="paid calls tried per image (429, 5xx, lost calls)")
    # A paid call whose outcome is unknown (timed out, connection lost after the
    # request went out, the gateway killed mid-call) is counted as spent at once.
    # skip: that image is not bought again (a typed failure, kind "uncertain");
    # rebuy: it is bought again, and both charges are counted.
    on_uncertain: Literal["skip", "rebuy"] = "skip"
    # Whether the server honours `Idempotency-Key` (a repeated key is answered
    # with the first, billed result, unbilled): then an unknown outcome is simply
    # asked again. None: true for this project's own servers (embedded, diffusers),
    # false for the public APIs, none of which documents it for image generation.
    idempotency: bool | None = None
    price_per_image: float = Field(0.01, ge=0)
    latency_s: float = Field(0.02, ge=0, description="embedded server: seconds per image")
    rpm: float = Field(6000, gt=0, description="client-side requests per minute")
    max_in_flight: int = Field(8, ge=1)
    # Embedded server behaviour: how it throttles and fails, so that the
    # gateway's limits and retries meet real 429s and 5xx.
    server_rpm: float | None = Field(None, gt=0, description="embedded server rejects above this with 429")
    error_rate: float = Field(0.0, ge=0, le=1, description="embedded server answers 503 this often")
    budget: float = Field(20.0, ge=0, description="most this teacher may be paid in one run")
    seed: int = 0
    flaws: FlawProfile = FlawProfile()

    @property
    def honours_idempotency(self) -> bool:
        """Whether a repeated paid call with the same Idempotency-Key is billed once."""
        return self.idempotency if self.idempotency is not None else self.kind in ("embedded", "diffusers")

    @model_validator(mode="after")
    def _remote_needs_model(self) -> "TeacherConfig":
        if self.kind == "diffusers":
            if not (self.pipeline or {}).get("pipeline"):
                raise ValueError(f"teacher {self.name!r}: kind 'diffusers' needs pipeline.pipeline (a diffusers "
                                 "folder or Hub id)")
            if self.base_url is not None:
                raise ValueError(f"teacher {self.name!r}: a diffusers teacher is served by the run; drop base_url")
        elif self.pipeline is not None:
            raise ValueError(f"teacher {self.name!r}: `pipeline` is for kind 'diffusers', not {self.kind!r}")
        elif self.kind != "embedded" and not self.model:
            raise ValueError(f"teacher {self.name!r}: kind {self.kind!r} needs a model")
        return self


def default_teachers() -> list[TeacherConfig]:
    """Three complementary teachers: each is weak at different skills, so the
    best image among them beats any single one."""
    return [
        TeacherConfig(name="aurora", price_per_image=0.04, latency_s=0.03, seed=11,
                      flaws=FlawProfile(count=0.6, relation=0.05, color=0.05, shape=0.03)),
        TeacherConfig(name="brush", price_per_image=0.02, latency_s=0.02, seed=22,
                      flaws=FlawProfile(color=0.6, count=0.05, relation=0.05, shape=0.03)),
        TeacherConfig(name="canvas", price_per_image=0.03, latency_s=0.025, seed=33,
                      flaws=FlawProfile(relation=0.6, shape=0.15, count=0.05, color=0.05)),
    ]


def bucket_multiple(image_size: int) -> int:
    """Aspect-ratio buckets' sides are multiples of this: image_size / 16, as
    PixArt-alpha's bins (64 px at 1024, 32 at 512, 16 at 256), and at least 16."""
    return max(image_size // 16, 16)


class EncoderConfig(_Strict):
    """Which frozen encoders make the student's inputs, and how they run."""

    vae: str | None = Field(None, description="diffusers AutoencoderKL folder or Hub id; None: tiny random VAE")
    vae_subfolder: str | None = None
    text_encoder: str | None = Field(None, description="folder or Hub id with a T5 encoder and its tokenizer; "
                                     "None: tiny random T5 and an offline word-level tokenizer")
    text_subfolder: str | None = Field(None, description="e.g. 'text_encoder' in a PixArt pipeline repo")
    tokenizer_subfolder: str | None = Field(None, description="e.g. 'tokenizer' in a PixArt pipeline repo")
    max_tokens: int = Field(120, ge=1, description="PixArt-alpha's caption length")
    # T5-v1.1 overflows in float16; on a GPU use bfloat16.
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="encoder weights")
    device: str = Field("auto", description="'auto': cuda if available, else cpu")
    batch_size: int = Field(32, ge=1, description="images / prompts per encoder forward")
    num_gpus: float = Field(0.0, ge=0, description="each precompute actor's share of a GPU")
    store_dtype: Literal["float16", "float32"] = Field("float16", description="what is written to disk")
    image_size: int | None = Field(None, ge=16, description="side images are resized to (cover, then centre "
                                   "crop) before encoding; None: as they come. A latent student sets its own")
    aspect_buckets: bool = Field(False, description="resize each image to the nearest of PixArt-alpha's 33 "
                                 "aspect-ratio buckets of image_size's area instead of a square (multi-aspect "
                                 "training; needs train.features_in_memory off)")
    # Tiny random encoders (vae / text_encoder None). Seeded so that every
    # process (each Ray actor) builds the same weights and features agree.
    tiny_seed: int = 0
    tiny_latent_channels: int = Field(4, ge=1)
    tiny_vae_channels: tuple[int, ...] = Field((8, 16, 16, 16), description="one entry per level: /8 like SD-VAE")
    tiny_text_dim: int = Field(32, ge=1)
    tiny_text_layers: int = Field(2, ge=1)
    tiny_text_heads: int = Field(4, ge=1)
    tiny_vocabulary: tuple[str, ...] | None = Field(
        None, description="the tiny T5's words (a word-level tokenizer); None: the run's world fills it in")

    def identity(self) -> dict:
        """The fields that decide what the features are (not where or how fast
        they are computed): features from two configs mix only if these agree."""
        return self.model_dump(mode="json", exclude={"device", "batch_size", "num_gpus"})

    @classmethod
    def pixart_alpha(cls, repo: str = "PixArt-alpha/PixArt-XL-2-512x512", **overrides) -> "EncoderConfig":
        """PixArt-alpha's own frozen encoders, from its diffusers pipeline repo
        (or a local copy of it): SD-VAE and T5-v1.1-XXL, in bfloat16."""
        return cls(**{**dict(vae=repo, vae_subfolder="vae", text_encoder=repo, text_subfolder="text_encoder",
                             tokenizer_subfolder="tokenizer", dtype="bfloat16"), **overrides})


class StudentConfig(_Strict):
    """The student denoiser and its text encoder (built from config, no hub)."""

    arch: Literal["unet", "pixart"] = "unet"
    image_size: int = Field(32, ge=16)
    # UNet (pixel space; the image is folded unet_patch x unet_patch into channels)
    block_channels: tuple[int, ...] = (32, 64, 96)
    layers_per_block: int = 1
    unet_patch: int = Field(2, ge=1, description="pixel-unshuffle factor before the UNet")
    attn_levels: int = Field(2, ge=0, description="lowest-resolution levels with cross-attention")
    attention_head_dim: int = Field(16, ge=1)
    norm_groups: int = Field(16, ge=1)
    pooled_text: bool = Field(True, description="add the pooled prompt to the timestep embedding")
    # PixArt (patchified; pixel space, or VAE latents when latent_channels is set)
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 4
    patch_size: int = 4
    qk_norm: bool = Field(False, description="LayerNorm on each head's queries and keys (the Edgen change)")
    learn_sigma: bool = Field(False, description="also predict the variance (PixArt-alpha's 8 output channels)")
    latent_channels: int | None = Field(None, ge=1, description="None: RGB pixels; else VAE latent channels")
    vae_scale: int = Field(8, ge=1, description="image pixels per latent pixel")
    caption_channels: int | None = Field(
        None, ge=1, description="width of precomputed text embeddings (4096: T5-v1.1-XXL); None: own encoder")
    encoders: EncoderConfig | None = Field(
        None, description="the frozen VAE + text encoder of a latent student (latent_channels set)")
    # The pixel student's own text encoder, over a word-level vocabulary
    vocabulary: tuple[str, ...] | None = Field(
        None, description="the tokenizer's words; None: the run's world fills it in (a checkpoint "
        "carries its own tokenizer.json)")
    vocab_size: int = Field(32, ge=4, description="embedding rows; >= words + 3 specials")
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 12
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "sample", description="x0: learns global structure fastest in pixel space here")
    num_train_timesteps: int = 1000
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"

    @model_validator(mode="after")
    def _pixart_only(self) -> "StudentConfig":
        if self.arch != "pixart":
            for name in ("latent_channels", "caption_channels"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs arch 'pixart', not {self.arch!r}")
            if self.qk_norm or self.learn_sigma:
                raise ValueError(f"qk_norm and learn_sigma need arch 'pixart', not {self.arch!r}")
        elif self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not divide by num_heads {self.num_heads}")
        if self.arch == "pixart" and self.micro_conditions and self.hidden_size % 3:
            raise ValueError(f"at 1024 px PixArt embeds resolution and aspect ratio in thirds of the width: "
                             f"hidden_size {self.hidden_size} must divide by 3")
        if self.sample_size % self.patch_size and self.arch == "pixart":
            raise ValueError(f"denoiser input {self.sample_size}px does not divide by patch_size {self.patch_size}")
        return self

    @model_validator(mode="after")
    def _vocabulary_fits(self) -> "StudentConfig":
        if self.vocabulary is not None and len(set(self.vocabulary)) + 3 > self.vocab_size:
            raise ValueError(f"student.vocab_size {self.vocab_size} is too small for its vocabulary of "
                             f"{len(set(self.vocabulary))} words and 3 special tokens: set vocab_size >= "
                             f"{len(set(self.vocabulary)) + 3}")
        return self

    @model_validator(mode="after")
    def _latent_needs_encoders(self) -> "StudentConfig":
        # A latent student is PixArt's setup: VAE latents in, T5 captions attended
        # to, both from frozen encoders named here (LatentStudent).
        if self.encoders is None:
            if self.latent_channels is not None and self.caption_channels is not None:
                raise ValueError("a latent student (latent_channels, caption_channels) needs `encoders`: "
                                 "EncoderConfig() for tiny ones, EncoderConfig.pixart_alpha() for PixArt's")
            return self
        if self.latent_channels is None or self.caption_channels is None:
            raise ValueError("`encoders` are for latent students: set latent_channels and caption_channels too")
        enc = self.encoders
        want = {"max_tokens": enc.max_tokens}
        if enc.vae is None:  # the tiny VAE's shape is known here; a real one's when it loads
            want |= {"latent_channels": enc.tiny_latent_channels, "vae_scale": 2 ** (len(enc.tiny_vae_channels) - 1)}
        if enc.text_encoder is None:
            want["caption_channels"] = enc.tiny_text_dim
        wrong = {k: (getattr(self, k), v) for k, v in want.items() if getattr(self, k) != v}
        if enc.image_size is not None and enc.image_size != self.image_size:
            wrong["image_size"] = (self.image_size, enc.image_size)
        if wrong:
            raise ValueError(f"student and its encoders disagree (field: (student, encoders)): {wrong}")
        if enc.image_size is None:  # images are encoded at the size the student trains at
            self.encoders = enc.model_copy(update={"image_size": self.image_size})
        if enc.aspect_buckets and bucket_multiple(self.image_size) % (self.vae_scale * self.patch_size):
            raise ValueError(f"aspect buckets at {self.image_size} px are multiples of "
                             f"{bucket_multiple(self.image_size)} px, which do not divide by vae_scale x "
                             f"patch_size = {self.vae_scale * self.patch_size}")
        return self

    @property
    def is_latent(self) -> bool:
        """Trained on precomputed VAE latents and caption embeddings (LatentStudent)."""
        return self.encoders is not None

    @property
    def in_channels(self) -> int:
        """Channels of what the denoiser sees: RGB or VAE latents."""
        return self.latent_channels or 3

    @property
    def sample_size(self) -> int:
        """Side of what the denoiser sees, in its own pixels."""
        return self.image_size // self.vae_scale if self.latent_channels else self.image_size

    @property
    def micro_conditions(self) -> bool:
        """PixArt-alpha at 1024 px (128x128 latents) is also conditioned on
        resolution and aspect ratio."""
        return self.latent_channels is not None and self.sample_size == 128

    @classmethod
    def pixart_alpha_xl2(cls, resolution: int = 512, **overrides) -> "StudentConfig":
        """PixArt-alpha XL/2, the paper's student: 28 blocks of width 1152 (16
        heads), patch 2 on SD-VAE latents (4 channels, /8), T5-v1.1-XXL caption
        embeddings (4096 wide, 120 tokens), epsilon + learned variance, linear
        betas. 512 or 1024 px; 1024 adds resolution/aspect-ratio conditioning."""
        if resolution not in (256, 512, 1024):
            raise ValueError(f"PixArt-alpha XL/2 comes at 256, 512 or 1024 px, not {resolution}")
        base = dict(arch="pixart", image_size=resolution, latent_channels=4, vae_scale=8,
                    hidden_size=1152, num_layers=28, num_heads=16, patch_size=2, learn_sigma=True,
                    caption_channels=4096, max_tokens=120, prediction_type="epsilon",
                    beta_schedule="linear")
        base["encoders"] = EncoderConfig.pixart_alpha(max_tokens=overrides.get("max_tokens", 120))
        return cls(**{**base, **overrides})


class TrainConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional: leave CPUs for Ray Data")
    use_gpu: bool = Field(False, description="one GPU per worker, DDP over NCCL (gloo on CPUs)")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="custom resources per "
                                               "worker, e.g. {train: 1} to land on cluster.yaml's training nodes")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="autocast of the forward pass: auto = bf16 on GPU workers, none on CPU; fp16 "
        "(with loss scaling) needs GPUs; bf16 on a CPU works but is slow (tests)")
    batch_size: int = Field(32, ge=1, description="global batch, split across workers")
    # Fine-tuning rate: the loop starts from the shipped base; 1e-3 (the base's
    # pretraining rate) made held-out accuracy swing by +-5 points a round.
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = 0.0
    warmup_steps: int = Field(50, ge=0, description="linear lr warm-up over the student's first steps")
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 = off")
    t_shift: float = Field(1.0, gt=0, description="training timesteps u^(1/t_shift): >1 favours high noise")
    steps_per_round: int = Field(120, ge=1, description="steps on a dataset version before it is evaluated")
    ema_max_decay: float = Field(0.995, ge=0, lt=1, description="decay warms up as (1+n)/(10+n) to this")
    cond_drop: float = Field(0.1, ge=0, le=1, description="text dropped for classifier-free guidance")
    replay_fraction: float = Field(0.25, ge=0, lt=1, description="share of each batch replaying the base "
                                   "curriculum (exact renders, no teacher images): keeps deleted skills")
    replay_per_prompt: int = Field(8, ge=1, description="renders per base-curriculum prompt in the replay pool")
    torch_threads: int = Field(1, ge=1)
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: every worker holds the whole student; "
                                             "fsdp: each holds a shard of its weights, gradients, optimizer "
                                             "state and EMA (torch FSDP2; for students too big to replicate)")
    gradient_checkpointing: bool = Field(False, description="recompute each block's activations in the backward "
                                         "pass: less memory (bigger batches, 1024 px), ~30% more compute")
    features_in_memory: bool = Field(True, description="latent students: hold the shard's latents and captions "
                                     "in worker memory (fastest; ~1 MB a PixArt caption), or read each batch's "
                                     "from the run's FeatureStore, one batch ahead (memory stays flat)")
    report_every: int = Field(10, ge=1, description="steps between metric reports")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    # How training meets the loop. "continuous": one Ray Train run for the
    # whole job; the loop evaluates EMA snapshots while it trains, and new
    # dataset versions reach the workers at a step boundary (no restart).
    # "rounds": train steps_per_round, stop, evaluate, repeat (one fit() per
    # round: simpler and exactly repeatable, for controlled experiments).
    schedule: Literal["continuous", "rounds"] = "continuous"
    poll_every: int = Field(10, ge=1, description="continuous: steps between asking the loop for news "
                            "(a new dataset version, a snapshot wanted, stop)")
    lockstep: bool = Field(False, description="continuous: after steps_per_round on a version, snapshot and "
                           "wait for the next one, so every version gets exactly steps_per_round steps "
                           "(controlled experiments; the trainer then waits on the loop)")
    keep_snapshots: int = Field(3, ge=1, description="continuous: EMA snapshots kept on disk")
    max_failures: int = Field(2, ge=0, description="dead workers replaced before the training run fails")
    worker_nice: int = Field(10, ge=0, le=19, description="niceness training workers add to the 15 Ray starts "
                             "every worker at (19 at most): on shared CPUs the loop's sampling and judging "
                             "go first, training uses what is left")
    seed: int = 0

    @model_validator(mode="after")
    def _fp16_needs_gpu(self) -> "TrainConfig":
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ValueError("train.mixed_precision fp16 needs use_gpu (CPU autocast has no fp16 loss "
                             "scaling); use bf16 or no")
        return self

    @model_validator(mode="after")
    def _lockstep_on_poll_steps(self) -> "TrainConfig":
        # The trainer meets the feed only at poll steps: a version could not end on time.
        if self.lockstep and self.steps_per_round % self.poll_every:
            raise ValueError(f"train.lockstep needs steps_per_round ({self.steps_per_round}) to be a "
                             f"multiple of poll_every ({self.poll_every})")
        return self


class SampleConfig(_Strict):
    steps: int = Field(20, ge=1)
    guidance: float = Field(2.0, ge=0)
    batch_size: int = Field(64, ge=1)
    num_gpus: float = Field(0.0, ge=0, description="the loop's student sampling (held-out scoring, judged "
                            "prompts) on a GPU: the Ray task's share of one")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources of the sampling "
                                        "task, e.g. {sampling: 1} to land on cluster.yaml's sampling nodes")


class JudgeTemplates(_Strict):
    """What the judge asks a VLM: versioned configuration, not code.

    The default wording is upstream EvolveDirector's (its LLaVA-NeXT queries);
    `{prompt}`, `{k}`, `{n}`, `{examples}`, `{style}` and `{question}` are
    filled in. Change `version` with the wording, so a verdict log says which
    questions it answers. The evaluation questions are VQAScore's (`vqa`: the
    probability of "Yes") and, for backends without logprobs, TIFA / DSG-style
    decomposed yes/no questions (`questions`, then `answer` for each).
    """

    version: str = "evolvedirector-v1+eval-v1"
    system: str | None = None
    discriminate: str = (
        'In these two images (A) and (B), which one aligns better with the text description '
        '"{prompt}"? You have two options: <(A) is better>, <(B) is better>. '
        'Simply state your choice, no need for a detailed explanation.')
    choice_a: str = "<(A) is better>"
    choice_b: str = "<(B) is better>"
    expand: str = (
        'Replace the nouns in the text description: "{prompt}" with other kinds of objects, '
        'characters, backgrounds, names, colors, or styles to generate {k} more diverse text '
        'descriptions. Arrange them in the format of a list ["Text description 1", '
        '"Text description 2", ...].')
    mutate: str = (
        'Here are some text descriptions of images: {examples}. Now, exercise your imagination to '
        'generate {n} new text descriptions for visual content that is completely unrelated to them. '
        'They should have a completely different structure from the previous descriptions. {style} '
        'Arrange them in the format of a list just like ["xxxxx"].')
    mutate_styles: tuple[str, ...] = (
        "It should be rough and short.",
        "It should contain less than 30 words and be highly detailed.",
        "It should contain over 30 words with different granular levels of detail.",
        "It should contain over 50 words with a lot of details.",
    )
    reask: str = ("Your previous answer could not be used ({problem}). "
                  "Answer again, exactly in the format asked.")
    # -- evaluation
    vqa: str = 'Does this figure show "{prompt}"? Please answer yes or no.'
    questions: str = (
        'Write at most {n} yes/no questions that together check whether an image shows exactly '
        '"{prompt}": one question for each object, each attribute (colour, count) and each relation '
        'the description names, each answerable from the image alone. Arrange them in the format of '
        'a list ["Question 1", "Question 2", ...].')
    answer: str = "{question} Please answer yes or no."
    yes: str = "Yes"
    no: str = "No"

    @model_validator(mode="after")
    def _fields_present(self) -> "JudgeTemplates":
        need = {"discriminate": ["{prompt}"], "expand": ["{prompt}", "{k}"], "mutate": ["{n}"],
                "vqa": ["{prompt}"], "questions": ["{prompt}", "{n}"], "answer": ["{question}"]}
        for name, keys in need.items():
            missing = [k for k in keys if k not in getattr(self, name)]
            if missing:
                raise ValueError(f"judge template {name!r} must contain {missing}")
        if self.choice_a == self.choice_b or not self.choice_a or not self.choice_b:
            raise ValueError("choice_a and choice_b must be two different, non-empty answers")
        return self


class EmbeddedVLMConfig(_Strict):
    """The embedded VLM (serve/embedded_vlm.py): an OpenAI-compatible chat server
    whose eyes are the shapes world's scene parser. It answers the judge's
    templates and the evaluation questions from the pixels it is sent."""

    logprobs: bool = Field(True, description="answer `logprobs` / `top_logprobs` requests (as vLLM and "
                           "OpenAI do); off: as a server without them")
    noise: float = Field(0.0, ge=0, le=0.5, description="chance of a wrong answer to any question (a "
                         "fallible VLM); seeded by the request")
    latency_s: float = Field(0.0, ge=0, description="seconds per answer")
    seed: int = 0


class JudgeConfig(_Strict):
    """The judge: the embedded scene parser, any OpenAI-compatible VLM, or vLLM in the cluster.

    backend "scene": exact verdicts from the shapes-world scene parser (default).
    backend "openai": a chat-completions endpoint with image inputs at `base_url`
        (a separate `vllm serve`, SGLang, a hosted VLM); key from `api_key_env`.
    backend "vllm": Ray Serve hosts the VLM (`ray.serve.llm`, `llm` holds its
        LLMConfig: model, engine kwargs, accelerator, autoscaling); the judge then
        talks to it as backend "openai" through the cluster's Serve proxy.
    backend "embedded_vlm": the run starts the embedded VLM (`embedded_vlm`) on
        127.0.0.1 and the judge talks to it as backend "openai", over HTTP.
    """

    backend: Literal["scene", "openai", "vllm", "embedded_vlm"] = "scene"
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = Field(None, description="env var holding the endpoint's key; never a file")
    llm: dict | None = Field(None, description="backend vllm: ray.serve.llm LLMConfig fields")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources of each judge "
                                        "replica and, backend vllm, of each vLLM engine's GPU bundle, e.g. "
                                        "{judge: 1} to land on cluster.yaml's judge nodes")
    embedded_vlm: EmbeddedVLMConfig = EmbeddedVLMConfig()
    max_batch_size: int = Field(32, ge=1)
    batch_wait_s: float = Field(0.05, ge=0)
    seed: int = 0
    # -- VLM backends: how to ask and how to read the answers
    templates: JudgeTemplates = JudgeTemplates()
    order: Literal["random", "both"] = Field(
        "random", description="random: which image is shown first is drawn per comparison (as upstream); "
        "both: ask both orders, count only verdicts that agree")
    structured: Literal["json_schema", "vllm", "none"] = Field(
        "json_schema", description="constrain answers: response_format json_schema (OpenAI, vLLM, "
        "SGLang), vLLM's own structured_outputs (choice / JSON), or none (strict parsing only)")
    image_layout: Literal["separate", "side_by_side"] = Field(
        "separate", description="two image inputs, or one (A)|(B) composite as upstream (one-image VLMs)")
    max_pixels: int = Field(512 * 512, ge=64, description="images larger than this are downscaled first")
    max_reasks: int = Field(2, ge=0, description="re-asks after an unusable answer, then 'no verdict'")
    max_concurrency: int = Field(16, ge=1, description="requests in flight to the VLM per judge replica")
    timeout_s: float = Field(120.0, gt=0)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)
    max_prompt_chars: int = Field(300, ge=1, description="longer generated prompts are rejected")
    grammar_check: bool | None = Field(None, description="generated prompts must parse in the shapes "
                                       "grammar; None: as the run's world (on in the shapes world)")
    mutate_examples: int = Field(8, ge=0, description="training prompts shown when asking for new ones")
    logprobs: bool = Field(True, description="ask for the answer's logprobs on yes/no questions "
                           "(VQAScore); a backend that returns none falls back to decomposed questions")
    top_logprobs: int = Field(20, ge=1, le=20)

    @model_validator(mode="after")
    def _backend_needs(self) -> "JudgeConfig":
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ValueError("judge backend 'openai' needs base_url and model")
        if self.backend == "vllm":
            mlc = (self.llm or {}).get("model_loading_config") or {}
            if not mlc.get("model_id"):
                raise ValueError("judge backend 'vllm' needs llm.model_loading_config.model_id "
                                 "(ray.serve.llm LLMConfig fields)")
        return self


class EdgenServeConfig(_Strict):
    """Edgen inference: the student behind the OpenAI Images API (serve/edgen.py)."""

    checkpoint: str | None = Field(None, description="student checkpoint folder (a path, or the s3:// URI of one "
                                   "a run shared); None = shipped base")
    model_name: str = Field("edgen", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    max_n: int = Field(8, ge=1, le=128, description="most images per request")
    max_prompt_chars: int = Field(300, ge=1)
    max_body_bytes: int = Field(16384, ge=256, description="larger request bodies get 413")
    max_steps: int = Field(100, ge=1)
    max_guidance: float = Field(20.0, ge=1)
    default_steps: int = Field(20, ge=1)
    default_guidance: float = Field(2.0, ge=1)
    grammar_check: bool | None = Field(None, description="prompts outside the shapes grammar are a 400; "
                                       "None: as the world the student was trained in (on for shapes)")
    max_batch_size: int = Field(16, ge=1, description="@serve.batch: images sampled together")
    batch_wait_s: float = Field(0.02, ge=0)
    num_replicas: int | Literal["auto"] = 1
    autoscaling_config: dict | None = Field(None, description="Serve autoscaling (with num_replicas 'auto')")
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0, description="a GPU per replica on clusters")
    torch_threads: int = Field(2, ge=1)
    api_key_env: str | None = Field(None, description="env var holding the bearer token; None = no auth")
    # Hot reload: watch a folder of checkpoints (a run's checkpoints/live or
    # checkpoints/) and switch to the newest complete one; off = pinned.
    watch_dir: str | None = Field(None, description="folder (a path or s3://...) whose newest checkpoint "
                                  "subfolder is served")
    watch_every_s: float = Field(5.0, gt=0)

    _paths_as_text = field_validator("checkpoint", "watch_dir", mode="before")(classmethod(
        lambda cls, v: _path_text(v)))


class EvolutionConfig(_Strict):
    strategy: Literal["evolve", "random"] = Field(
        "evolve", description="evolve: EvolveDirector; random: the paper's baseline: the seed set is "
        "prompts sampled uniformly from the grammar, one teacher image each, no judge, never changed")
    delete: bool = Field(True, description="ablation switch: drop prompts the student already matches")
    select: Literal["judge", "random"] = Field(
        "judge", description="a new prompt trains on the judge's best teacher image, or (ablation) "
        "on a teacher's image picked at random")
    expand_k: int = Field(3, ge=0, description="variants per prompt where the teacher wins")
    reseed: bool = Field(True, description="expansion short of expand_k new variants (the prompt's "
                         "neighbourhood is all in the set) renders the prompt itself again with new seeds")
    mutate_prob: float = Field(0.2, ge=0, le=1, description="chance per round of mutation")
    mutate_n: int = Field(4, ge=0, description="new prompts per mutation")
    eval_fraction: float = Field(0.5, gt=0, le=1, description="share of training prompts the student is judged on")
    max_eval: int = Field(48, ge=1)
    max_dataset: int = Field(2000, ge=1)


class RunConfig(_Strict):
    run_dir: str = Field("runs/default", description="the run folder: a path (a shared mount on a cluster) or "
                         "an object-store folder, s3://bucket/prefix")
    seed: int = 0
    rounds: int = Field(3, ge=1)
    world: WorldConfig = Field(default_factory=ShapesWorldConfig, description="where prompts come from "
                               "and how images are scored against them")
    evaluation: EvaluationConfig = EvaluationConfig()
    teachers: list[TeacherConfig] = Field(default_factory=default_teachers)
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    judge: JudgeConfig = JudgeConfig()
    evolution: EvolutionConfig = EvolutionConfig()
    # The run's caps are on training data. The held-out images bought to score the
    # teachers (held-out prompts x teachers) come on top and are reported apart;
    # each teacher's own `budget`, kept by its gateway, caps everything it is paid.
    max_images: int | None = Field(None, ge=1, description="most training images the run may buy, every "
                                   "teacher's image of a prompt counted (the science benchmarks' budget)")
    budget: float | None = Field(None, ge=0, description="most the run may pay all teachers together for "
                                 "training images; None = no total cap")
    serve_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port, bound on 127.0.0.1")
    serve_edgen: bool = Field(False, description="serve the student at /edgen/v1 during the run, "
                              "switching to each new round's checkpoint")
    serve_proxies: Literal["auto", "HeadOnly", "EveryNode"] = Field(
        "auto", description="where Serve's HTTP proxies run (on loopback, at serve_port): auto = every node "
        "when the judge reaches an in-cluster vLLM over HTTP from its own node, else the head only")
    init_checkpoint: str | None = Field(None, description="student to start from (a folder, or the s3:// URI of "
                                        "one a run shared); None = shipped base")
    from_scratch: bool = False
    # When to stop before `rounds` (checked after each round; the report is written every time).
    max_wall_s: float | None = Field(None, gt=0, description="stop after the round that ends past this "
                                     "many seconds of this invocation")
    target_heldout: float | None = Field(None, gt=0, le=1, description="stop once the student's held-out "
                                         "accuracy reaches this")
    stop_when_spent: bool = Field(True, description="stop once `budget` or `max_images` leaves nothing to buy "
                                  "(off: keep training and judging on the data bought)")

    _paths_as_text = field_validator("run_dir", "init_checkpoint", mode="before")(classmethod(
        lambda cls, v: _path_text(v)))

    @model_validator(mode="after")
    def _unique_teachers(self) -> "RunConfig":
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        if not names:
            raise ValueError("at least one teacher is needed")
        return self

    @model_validator(mode="after")
    def _world_fits(self) -> "RunConfig":
        if self.world.kind != "shapes":
            if self.judge.backend == "scene":
                raise ValueError(f"judge backend 'scene' reads shapes-world prompts only; the {self.world.kind} "
                                 "world needs a VLM judge: backend openai, vllm or embedded_vlm")
            if self.evaluation.metric == "scene":
                raise ValueError(f"evaluation.metric 'scene' is the shapes world's scorer; the "
                                 f"{self.world.kind} world is scored by the VLM (metric vlm or auto)")
            if self.judge.grammar_check:
                raise ValueError(f"judge.grammar_check screens generated prompts with the shapes grammar; "
                                 f"the {self.world.kind} world takes free text: leave it unset")
        return self

    @model_validator(mode="after")
    def _buckets_stream(self) -> "RunConfig":
        # A worker's in-memory shard is one array per column: one latent shape.
        enc = self.student.encoders
        if enc is not None and enc.aspect_buckets and self.train.features_in_memory:
            raise ValueError("student.encoders.aspect_buckets makes latents of several shapes; they train "
                             "from streamed features: set train.features_in_memory: false")
        return self


