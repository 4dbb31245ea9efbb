"""Frozen VAE + T5 encoders, and features precomputed once per sample.

PixArt-alpha denoises SD-VAE latents (4 channels, 1/8 of the image side) and
cross-attends to T5-v1.1-XXL token embeddings (4096 wide, 120 tokens). Both
encoders are frozen, so, as upstream PixArt does, every image's latent and
every prompt's embedding is computed once and kept on disk; trainer steps then
read arrays and never run the VAE or T5.

    cfg = EncoderConfig(vae="stabilityai/sd-vae-ft-ema", text_encoder="google/t5-v1_1-xxl",
                        dtype="bfloat16")
    precompute_features(version_ds, store_root, images_root, cfg, num_gpus=1.0)

With `vae=None` / `text_encoder=None` the encoders are tiny random models built
from config (tests, CPU runs); nothing is ever downloaded for those.

Layout under a FeatureStore root ("beside the images"):

    encoders.json                       which encoders wrote these features
    latents/<image_ref>.npy             (C, H/f, W/f), store_dtype
    text/<sha256(prompt)[:24]>.npz      emb (max_tokens, D) store_dtype, mask (max_tokens,) bool, prompt

Image refs are content hashes, so a latent names its image forever; a rerun
(after a crash, or for a new dataset version) encodes only what is missing.
"""

from __future__ import annotations

import hashlib
import io
import math
from functools import lru_cache
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from evolve.config import EncoderConfig
from evolve.store import ImageStore

if TYPE_CHECKING:
    from evolve.storage import Storage

# T5's own special-token ids (pad 0, eos 1, unk 2), kept by the tiny tokenizer
# so the tiny and real text paths agree on what padding looks like.
TINY_PAD, TINY_EOS, TINY_UNK = "<pad>", "</s>", "<unk>"

# What ImageStore accepts as a ref; refs become file names here too.
_IMAGE_REF = re.compile(r"^[0-9a-f]{64}$")

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _subfolder(name: str | None) -> dict[str, str]:
    # transformers wants "" rather than None for "no subfolder": pass it only when set.
    return {"subfolder": name} if name else {}


def build_tiny_tokenizer(max_tokens: int = 120, words: tuple[str, ...] | list[str] | None = None):
    """The tiny T5's tokenizer, built offline. With `words`: T5-like word-level,
    <pad>=0, </s>=1, <unk>=2, then the words; every sequence ends in </s>.
    Without: ByT5's byte-level tokenizer (the same three specials, then bytes):
    any text, no vocabulary needed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

    if words is None:
        return ByT5Tokenizer(extra_ids=0, model_max_length=max_tokens)
    specials = [TINY_PAD, TINY_EOS, TINY_UNK]
    words = sorted(set(words) - set(specials))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=TINY_UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single=f"$A {TINY_EOS}", special_tokens=[(TINY_EOS, vocab[TINY_EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=TINY_PAD, eos_token=TINY_EOS, unk_token=TINY_UNK,
        model_max_length=max_tokens, padding_side="right")


def _tiny_vae(cfg: EncoderConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.tiny_vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.tiny_vae_channels, layers_per_block=1,
        latent_channels=cfg.tiny_latent_channels, norm_num_groups=min(cfg.tiny_vae_channels))


def _tiny_t5(cfg: EncoderConfig, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    d = cfg.tiny_text_dim
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d, d_kv=max(1, d // cfg.tiny_text_heads), d_ff=2 * d,
        num_layers=cfg.tiny_text_layers, num_heads=cfg.tiny_text_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,  # gated-gelu: as in T5-v1.1
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


class FrozenEncoders:
    """The VAE and the T5 encoder, frozen, in eval mode, on one device."""

    def __init__(self, cfg: EncoderConfig, vae, tokenizer, text_encoder) -> None:
        self.cfg = cfg
        self.device = _resolve_device(cfg.device)
        self.dtype = _TORCH_DTYPES[cfg.dtype]
        self.vae, self.tokenizer, self.text_encoder = vae, tokenizer, text_encoder
        for model in (vae, text_encoder):
            if next(model.parameters()).dtype != self.dtype:  # a no-op cast only makes diffusers warn
                model.to(dtype=self.dtype)
            model.to(device=self.device).eval().requires_grad_(False)

    @classmethod
    def load(cls, cfg: EncoderConfig) -> "FrozenEncoders":
        dtype = _TORCH_DTYPES[cfg.dtype]
        # fork_rng: seeding the tiny weights must not reset the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny_seed)
            if cfg.vae is None:
                vae = _tiny_vae(cfg)
            else:
                from diffusers import AutoencoderKL

                vae = AutoencoderKL.from_pretrained(cfg.vae, subfolder=cfg.vae_subfolder, dtype=dtype)
            if cfg.text_encoder is None:
                tokenizer = build_tiny_tokenizer(cfg.max_tokens, cfg.tiny_vocabulary)
                text_encoder = _tiny_t5(cfg, len(tokenizer))
            else:
                from transformers import AutoTokenizer, T5EncoderModel

                tokenizer = AutoTokenizer.from_pretrained(cfg.text_encoder, **_subfolder(cfg.tokenizer_subfolder))
                text_encoder = T5EncoderModel.from_pretrained(cfg.text_encoder, dtype=dtype,
                                                              **_subfolder(cfg.text_subfolder))
        return cls(cfg, vae, tokenizer, text_encoder)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD-VAE): one halving per level after the first."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        # None for SD-VAE; set for VAEs (SD3, Flux) whose latents are also re-centred.
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def text_dim(self) -> int:
        return int(self.text_encoder.config.d_model)

    def _store(self, x: torch.Tensor) -> np.ndarray:
        return x.float().cpu().numpy().astype(self.cfg.store_dtype)

    @torch.no_grad()
    def encode_images(self, images_u8: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, C, H/f, W/f) latents in store_dtype, scaled
        as the denoiser sees them."""
        images_u8 = np.asarray(images_u8)
        f = self.vae_scale_factor
        if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[3] != 3:
            raise ValueError(f"expected (N, H, W, 3) uint8 images, got {images_u8.shape} {images_u8.dtype}")
        if images_u8.shape[1] % f or images_u8.shape[2] % f:
            raise ValueError(f"image side {images_u8.shape[1]}x{images_u8.shape[2]} does not divide by "
                             f"the VAE's scale factor {f}")
        out = []
        for i in range(0, len(images_u8), self.cfg.batch_size):
            x = torch.from_numpy(images_u8[i:i + self.cfg.batch_size]).to(self.device)
            x = x.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
            # The posterior's mean, not a sample: a stored latent must be the
            # same however often it is computed (PixArt samples per step
            # instead; with the VAE's tiny posterior std the difference is noise).
            z = self.vae.encode(x).latent_dist.mean
            out.append(self._store((z - self.shift_factor) * self.scaling_factor))
        return np.concatenate(out) if out else np.zeros((0, self.latent_channels, images_u8.shape[1] // f,
                                                         images_u8.shape[2] // f), self.cfg.store_dtype)

    @torch.no_grad()
    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """The inverse of encode_images: (N, C, h, w) -> (N, h*f, w*f, 3) uint8."""
        latents = np.asarray(latents)
        out = []
        for i in range(0, len(latents), self.cfg.batch_size):
            z = torch.from_numpy(latents[i:i + self.cfg.batch_size]).to(self.device, self.dtype)
            x = self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(x.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (embeddings (N, max_tokens, D) store_dtype, mask (N, max_tokens) bool).
        Padded positions are zero, so a stored row does not depend on how the
        encoder happens to fill padding."""
        embs, masks = [], []
        for i in range(0, len(prompts), self.cfg.batch_size):
            enc = self.tokenizer(list(prompts[i:i + self.cfg.batch_size]), padding="max_length",
                                 truncation=True, max_length=self.cfg.max_tokens, return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden = hidden * mask[..., None].to(hidden.dtype)
            embs.append(self._store(hidden))
            masks.append(mask.bool().cpu().numpy())
        if not embs:
            return (np.zeros((0, self.cfg.max_tokens, self.text_dim), self.cfg.store_dtype),
                    np.zeros((0, self.cfg.max_tokens), bool))
        return np.concatenate(embs), np.concatenate(masks)


@lru_cache(maxsize=2)
def _load_encoders(cfg_json: str) -> FrozenEncoders:
    return FrozenEncoders.load(EncoderConfig.model_validate_json(cfg_json))


def load_encoders(cfg: EncoderConfig) -> FrozenEncoders:
    """FrozenEncoders.load, once per process and config (a sampler asks for
    them on every call; T5-XXL takes a minute to load)."""
    return _load_encoders(cfg.model_dump_json())


# -- storage -----------------------------------------------------------------------------

def prompt_key(prompt: str) -> str:
    """A prompt's file name: 96 bits of its sha256, so any text is a safe name."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:24]


class FeatureStore:
    """Precomputed latents (by image ref) and prompt embeddings (by prompt),
    under `root`: a local folder (a shared mount is one) or a folder of an
    object store (an `s3://` URI or a `Storage`), read and written by Ray
    Data's tasks on any node. Each file is written whole (a renamed temp file;
    one PUT) and never changes: a ref or a prompt names its features forever."""

    META = "encoders.json"

    def __init__(self, root: Path | str | Storage) -> None:
        from evolve.storage import open_root

        self.storage, self.root, self._local = open_root(root)

    @staticmethod
    def latent_rel(ref: str) -> str:
        # Refs become file names: only ImageStore's digests, so no "/" or "..".
        if not isinstance(ref, str) or not _IMAGE_REF.match(ref):
            raise ValueError(f"not an image ref (64 lower-case hex digits), refusing it as a file name: {ref!r}")
        return f"latents/{ref}.npy"

    @staticmethod
    def text_rel(prompt: str) -> str:
        return f"text/{prompt_key(prompt)}.npz"

    def _name(self, rel: str) -> Path | str:
        return self.root / rel if self._local else self.storage.uri(rel)

    def latent_path(self, ref: str) -> Path | str:
        """Where image `ref`'s latent is: a local path, or its URI on an object store."""
        return self._name(self.latent_rel(ref))

    def text_path(self, prompt: str) -> Path | str:
        return self._name(self.text_rel(prompt))

    def has_latent(self, ref: str) -> bool:
        return self.storage.exists(self.latent_rel(ref))

    def has_text(self, prompt: str) -> bool:
        return self.storage.exists(self.text_rel(prompt))

    def _put(self, rel: str, save) -> None:
        if not self.storage.exists(rel):  # a ref names its image forever: the features never change
            buf = io.BytesIO()
            save(buf)
            self.storage.write_atomic(rel, buf.getvalue())

    def put_latent(self, ref: str, latent: np.ndarray) -> Path | str:
        self._put(self.latent_rel(ref), lambda f: np.save(f, np.asarray(latent), allow_pickle=False))
        return self.latent_path(ref)

    def _read(self, rel: str, what: str) -> io.BytesIO:
        try:
            return io.BytesIO(self.storage.read(rel))
        except FileNotFoundError:
            raise KeyError(f"no {what} in {self.root}") from None

    def get_latent(self, ref: str) -> np.ndarray:
        return np.load(self._read(self.latent_rel(ref), f"latent for image {ref}"), allow_pickle=False)

    def latent_shape(self, ref: str) -> tuple[int, ...]:
        """A stored latent's shape, from its .npy header alone."""
        rel = self.latent_rel(ref)
        with self.storage.filesystem.open_input_file(self.storage.path(rel)) as f:
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, _, _ = read_header(f)
        return tuple(shape)

    def put_text(self, prompt: str, emb: np.ndarray, mask: np.ndarray) -> Path | str:
        self._put(self.text_rel(prompt), lambda f: np.savez(f, emb=np.asarray(emb), mask=np.asarray(mask, bool),
                                                             prompt=np.array(prompt)))
        return self.text_path(prompt)

    def get_text(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """-> (emb (max_tokens, D), mask (max_tokens,) bool)."""
        with np.load(self._read(self.text_rel(prompt), f"text embedding for {prompt!r}"), allow_pickle=False) as z:
            if str(z["prompt"]) != prompt:  # a 96-bit collision: never expected, never silent
                raise ValueError(f"{self.text_path(prompt)} holds {str(z['prompt'])!r}, not {prompt!r}")
            return z["emb"], z["mask"]

    def claim(self, cfg: EncoderConfig) -> None:
        """Record which encoders write here, or refuse if others already did:
        latents of two VAEs in one store would train a student on a mixture."""
        ident = cfg.identity()
        if self.storage.exists(self.META):
            have = json.loads(self.storage.read(self.META))
            if have != ident:
                diff = {k: (have.get(k), v) for k, v in ident.items() if have.get(k) != v}
                raise ValueError(f"features in {self.root} were made by other encoders "
                                 f"(field: (stored, this config)): {diff}")
            return
        # Concurrent claimants write the same text, so the last write is harmless.
        self.storage.write_atomic(self.META, json.dumps(ident, indent=2, sort_keys=True).encode())


# -- image sizes -------------------------------------------------------------------------
@lru_cache(maxsize=8)
def aspect_buckets(image_size: int) -> tuple[tuple[int, int], ...]:
    """PixArt-alpha's aspect-ratio buckets for image_size: (height, width)
    pairs of about image_size**2 pixels, heights / widths from 1/4 to 4.
    diffusers' 1024-px bin scaled to image_size, sides rounded to
    bucket_multiple (this gives diffusers' own 512 and 256 bins exactly)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN

    from evolve.config import bucket_multiple

    m = bucket_multiple(image_size)
    scaled = {(max(m, round(h * image_size / 1024 / m) * m), max(m, round(w * image_size / 1024 / m) * m))
              for h, w in ASPECT_RATIO_1024_BIN.values()}
    return tuple(sorted(scaled, key=lambda hw: hw[0] / hw[1]))


def target_size(height: int, width: int, cfg: EncoderConfig) -> tuple[int, int]:
    """(height, width) an image of this size is encoded at: unchanged without
    cfg.image_size, else a square of it, or with aspect buckets the bucket
    whose aspect ratio is nearest (in log ratio, so 2:1 and 1:2 are as far from 1:1)."""
    if cfg.image_size is None:
        return height, width
    if not cfg.aspect_buckets:
        return cfg.image_size, cfg.image_size
    ratio = math.log(height / width)
    return min(aspect_buckets(cfg.image_size), key=lambda hw: abs(math.log(hw[0] / hw[1]) - ratio))


def fit_image(image_u8: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (bicubic) to cover height x width, then crop the centre: the
    picture keeps its proportions; what overhangs is cut, as PixArt does."""
    if image_u8.shape[:2] == (height, width):
        return image_u8
    from PIL import Image, ImageOps

    img = ImageOps.fit(Image.fromarray(image_u8), (width, height), method=Image.Resampling.BICUBIC)
    return np.asarray(img.convert("RGB"))


# -- precompute ----------------------------------------------------------------------------

def put_null_caption(store: FeatureStore, encoders: FrozenEncoders) -> None:
    """Encode "" once: the caption a student trains with when its prompt is
    dropped (classifier-free guidance), and samples with unconditionally."""
    if not store.has_text(""):
        emb, mask = encoders.encode_prompts([""])
        store.put_text("", emb[0], mask[0])


def encode_missing(batch: dict[str, np.ndarray], store: FeatureStore, images: ImageStore,
                   encoders: FrozenEncoders) -> dict[str, np.ndarray]:
    """One batch of {"prompt", "image_ref"} columns -> the same rows with
    "latent_path", "text_path", "bucket" (the latent's "HxW") and "encoded"
    (False: both files were already there). Encodes each missing image (at
    target_size) and prompt once, however often it repeats."""
    from evolve.images import from_png

    prompts = [str(p) for p in batch["prompt"]]
    refs = [str(r) for r in batch["image_ref"]]
    new_refs = list(dict.fromkeys(r for r in refs if not store.has_latent(r)))
    new_prompts = list(dict.fromkeys(p for p in prompts if not store.has_text(p)))

    # Images of one size are encoded together; a batch may mix sizes.
    by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # each ref's latent (h, w): the row's bucket
    for ref in new_refs:
        img = from_png(images.get(ref))
        img = fit_image(img, *target_size(img.shape[0], img.shape[1], encoders.cfg))
        by_shape.setdefault(img.shape, []).append((ref, img))
    for group in by_shape.values():
        latents = encoders.encode_images(np.stack([img for _, img in group]))
        for (ref, _), z in zip(group, latents):
            store.put_latent(ref, z)
            shapes[ref] = z.shape[-2:]

    if new_prompts:
        embs, masks = encoders.encode_prompts(new_prompts)
        for p, e, m in zip(new_prompts, embs, masks):
            store.put_text(p, e, m)

    new_r, new_p = set(new_refs), set(new_prompts)
    for r in set(refs) - shapes.keys():  # stored before: its .npy header says (mmap reads nothing else)
        shapes[r] = store.latent_shape(r)[-2:]
    return {
        "prompt": np.array(prompts, dtype=object),
        "image_ref": np.array(refs, dtype=object),
        "latent_path": np.array([str(store.latent_path(r)) for r in refs], dtype=object),
        "text_path": np.array([str(store.text_path(p)) for p in prompts], dtype=object),
        "bucket": np.array([f"{shapes[r][0]}x{shapes[r][1]}" for r in refs], dtype=object),
        "encoded": np.array([r in new_r or p in new_p for r, p in zip(refs, prompts)], dtype=bool),
    }


def precompute_local(rows: Iterable[dict], store_root: str | Path, images_root: str | Path,
                     encoders: FrozenEncoders) -> list[dict]:
    """precompute_features without Ray: rows of {"prompt", "image_ref"} -> rows
    with "latent_path", "text_path", "encoded"."""
    rows = list(rows)
    store, images = FeatureStore(store_root), ImageStore(images_root)
    store.claim(encoders.cfg)
    put_null_caption(store, encoders)
    out: list[dict] = []
    n = encoders.cfg.batch_size
    for i in range(0, len(rows), n):
        chunk = rows[i:i + n]
        cols = encode_missing({"prompt": [r["prompt"] for r in chunk],
                               "image_ref": [r["image_ref"] for r in chunk]}, store, images, encoders)
        out += [{k: (v[j].item() if k == "encoded" else v[j]) for k, v in cols.items()} for j in range(len(chunk))]
    return out


class EncodeBatch:
    """Ray Data callable class: each actor loads the encoders once, then
    encodes the missing features of every batch it is handed."""

    def __init__(self, store_root: str, images_root: str, cfg: dict) -> None:
        self.cfg = EncoderConfig.model_validate(cfg)
        self.encoders = FrozenEncoders.load(self.cfg)
        self.store, self.images = FeatureStore(store_root), ImageStore(images_root)
        self.store.claim(self.cfg)
        put_null_caption(self.store, self.encoders)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return encode_missing(batch, self.store, self.images, self.encoders)


def precompute_features(ds, store_root: str, images_root: str, cfg: EncoderConfig,
                        concurrency: int = 1, num_gpus: float | None = None, num_cpus: float = 0.25,
                        whole_blocks: bool = False):
    """Encode every {"prompt", "image_ref"} row of a Ray Dataset that is not in
    the FeatureStore yet; -> a Dataset of the rows with "latent_path",
    "text_path", "encoded". Lazy, like any Dataset: consume it (materialize,
    iter_rows, write_*) to run it.

    `concurrency` actors, each holding its own encoders (one per GPU with
    num_gpus=1; default: cfg.num_gpus). Each also makes sure the null caption
    ("") is in the store. Rows are encoded cfg.batch_size at a time, or a
    block at a time with `whole_blocks` (the output then keeps the input's
    blocks, which `Dataset.split` hands out whole). The default quarter CPU matches evolve.student.data's: on a small
    machine a 1-CPU actor could wait forever behind the trainers."""
    from ray.data import ActorPoolStrategy

    # Refuse a store written by other encoders here, before any actor starts.
    FeatureStore(store_root).claim(cfg)
    return ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"store_root": str(store_root), "images_root": str(images_root),
                               "cfg": cfg.model_dump(mode="json")},
        batch_size=None if whole_blocks else cfg.batch_size,
        # A fixed pool: Ray 2.60 deprecates map_batches(concurrency=) for compute=.
        compute=ActorPoolStrategy(size=concurrency),
        num_gpus=cfg.num_gpus if num_gpus is None else num_gpus, num_cpus=num_cpus, batch_format="numpy")


def load_features(batch: dict[str, np.ndarray], store_root: str) -> dict[str, np.ndarray]:
    """Rows {"prompt", "image_ref"} whose features are in the store -> the
    arrays a LatentStudent trains on: "latent" (C, h, w), "caption" (L, D),
    "caption_mask" (L,). Reads through FeatureStore, so a prompt-key
    collision or a missing feature is an error that names it."""
    store = FeatureStore(store_root)
    texts = [store.get_text(str(p)) for p in batch["prompt"]]
    return {"prompt": batch["prompt"],
            "latent": np.stack([store.get_latent(str(r)) for r in batch["image_ref"]]),
            "caption": np.stack([emb for emb, _ in texts]),
            "caption_mask": np.stack([mask for _, mask in texts])}


def latent_dataset(rows: list[dict], store_root: str, images_root: str, cfg: EncoderConfig,
                   min_blocks: int = 1, num_cpus: float = 0.25, in_memory: bool = True):
    """`latent_rows` of rows {"prompt", "image_ref"} held in memory, in blocks
    of about cfg.batch_size rows (one encoder batch each), at least `min_blocks`."""
    import ray

    blocks = max(min_blocks, math.ceil(len(rows) / cfg.batch_size), 1)
    ds = ray.data.from_items(rows, override_num_blocks=min(blocks, max(len(rows), 1)))
    return latent_rows(ds, store_root, images_root, cfg, num_cpus=num_cpus, in_memory=in_memory)


def latent_rows(ds, store_root: str, images_root: str, cfg: EncoderConfig, num_cpus: float = 0.25,
                in_memory: bool = True):
    """A Ray Dataset of rows {"prompt", "image_ref"} -> what a LatentStudent
    trains on: {"prompt", "latent", "caption", "caption_mask"}; missing
    features are encoded first (precompute_features), the rest read from the
    store. With `in_memory` off, the rows stay {"prompt", "image_ref",
    "bucket"} (their features encoded, not read): the trainer reads each
    batch's from the store, and neither the object store nor a worker holds
    them all. Encoded cfg.batch_size rows at a time (a Parquet block can be a
    whole version)."""
    ds = precompute_features(ds, store_root, images_root, cfg, num_cpus=num_cpus)
    if not in_memory:
        return ds.select_columns(["prompt", "image_ref", "bucket"], num_cpus=num_cpus)
    return ds.map_batches(load_features, fn_kwargs={"store_root": str(store_root)}, batch_format="numpy",
                          batch_size=None, num_cpus=num_cpus)
