"""Build a tiny random diffusers pipeline folder, offline, for tests and demos.

    .venv/bin/python scripts/build_tiny_pipeline.py /tmp/tiny-sd [--seed 0]

The folder is a `StableDiffusionPipeline` saved with `save_pretrained`, so
`DiffusionPipeline.from_pretrained(folder, local_files_only=True)` loads it
like any Hub checkpoint (model_index.json names every component's class):

- UNet2DConditionModel: channels (16, 32), one cross-attention down/up block,
  latent sample_size 32;
- AutoencoderKL: channels (16, 32), so one 2x down-sampling: a 64 px image is
  a 32x32 latent (height/width must still be multiples of 8, a pipeline rule);
- CLIPTextModel: hidden 32, 2 layers;
- CLIPTokenizer built from a vocabulary made here: the 256 byte symbols (with
  and without the end-of-word mark) plus the two specials and no merges, so
  every word becomes its characters. Nothing is downloaded (with no
  vocabulary, transformers 5's CLIPTokenizer() maps every word to UNK; this
  one tells prompts apart); it is saved as tokenizer.json;
- PNDMScheduler, as Stable Diffusion ships; no safety checker.

Weights are random (seeded): the images are coloured noise, not pictures, but
they depend on the prompt, the seed, the size and the sampling settings, which
is what a server's tests need. About 2 MB; a 64 px image takes ~0.1 s on CPU.
Why Stable Diffusion: its tokenizer is a plain BPE vocabulary that can be
written here, where PixArt's T5 tokenizer would need a sentencepiece or
tokenizer.json model the pipeline's loader accepts (not tried). Serve it with
`torch_threads=1` on a busy 2-core machine: with torch's default threads a
4-step batch of three took ~60 s instead of ~0.6 s (oversubscription).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: each byte as a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (used with no merges): the byte
    symbols, the same with the end-of-word mark, and the two specials."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def build_tiny_pipeline(out: Path, seed: int = 0, max_length: int = 32) -> Path:
    """Write the tiny pipeline to `out` (created); returns `out`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab = clip_vocab()
    # transformers 5: CLIPTokenizer takes the vocabulary itself (a file name
    # here is not read: every word would become UNK).
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    vocab_size = len(vocab)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=64)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write (created)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build_tiny_pipeline(args.out, args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
