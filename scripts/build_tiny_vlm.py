"""Build a tiny random vision-language model offline, loadable by vLLM on CPU.

Run with the vLLM env's python (see scripts/vllm_cpu_env):

    /work/vllm-env/bin/python scripts/build_tiny_vlm.py [OUT_DIR] [--arch idefics3|qwen2_vl]

Default: --arch idefics3, OUT_DIR /work/tiny-vlm. Then e.g.

    VLLM_CPU_KVCACHE_SPACE=1 /work/vllm-env/bin/python -m vllm.entrypoints.openai.api_server \
        --model /work/tiny-vlm --host 127.0.0.1 --port 8000 --dtype float32 \
        --max-model-len 1024 --limit-mm-per-prompt '{"image": 2}' --enforce-eager

No model hub is needed: configs are written by hand, weights are random and the
tokenizer is a byte-level BPE trained here on a few sentences (so any text,
including JSON and "<(A) is better>", is encodable), wrapped in
PreTrainedTokenizerFast with the special tokens the chat template and the HF
processor use. Text head size is 32, the smallest vLLM's CPU attention takes.

Architectures:
- idefics3 (Idefics3ForConditionalGeneration: SigLIP-style vision tower +
  pixel-shuffle connector + Llama): works with vllm-cpu 0.32.0. Vision tower
  image 32x32, patch 8, scale factor 2 -> 4 <image> tokens per tile; the image
  processor resizes the longest edge to 64 and splits into 32x32 tiles, so a
  64x64 PNG becomes 2x2 tiles + 1 global view = 20 image tokens.
- qwen2_vl (Qwen2VLForConditionalGeneration): loads and generates in
  transformers, but vllm-cpu 0.32.0 cannot serve it without a working
  torchvision: vllm/model_executor/models/qwen2_vl.py imports
  transformers.models.qwen2_vl.image_processing_qwen2_vl, which imports
  torchvision at module level (ModuleNotFoundError), and PyPI's torchvision
  (0.28.0 / 0.29.x, CUDA builds) fails beside torch 2.13.0+cpu
  ("operator torchvision::nms does not exist"). Qwen2.5-VL, LLaVA and Gemma3
  fail the same way. Kept for an environment with a CPU torchvision; it also
  needs `--trust-remote-code` (a video-less stand-in video processor).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

CORPUS = [
    "Which image is better? (A) is better. (B) is better.",
    "<(A) is better> <(B) is better>",
    '{"prompts": ["a red circle on a blue background", "two green squares"]}',
    "a small yellow triangle left of a large purple square",
    "You are a helpful assistant. Compare the two images and answer.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "User: Assistant: system user assistant",
]


def build_tokenizer(special_tokens, *, eos, pad, bos=None, chat_template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400 + len(special_tokens), special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    others = [t for t in special_tokens if t not in (eos, pad, bos)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos,
        unk_token=None, additional_special_tokens=others)
    fast.chat_template = chat_template
    fast.model_max_length = 4096
    return fast


def _ids(tok, tokens):
    return {t: tok.convert_tokens_to_ids(t) for t in tokens}


def _write(out: Path, name: str, obj) -> None:
    (out / name).write_text(json.dumps(obj, indent=2) + "\n")


def _vocab(tok) -> int:
    return ((len(tok) + 63) // 64) * 64


# ---------------------------------------------------------------- Idefics3

IDEFICS3_SPECIAL = (
    ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
     "<image>", "<global-img>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
)

# Idefics3's template, plus plain-string content.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_idefics3(out: Path) -> dict:
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tok = build_tokenizer(IDEFICS3_SPECIAL, eos="<end_of_utterance>", pad="<|endoftext|>",
                          bos="<|im_start|>", chat_template=IDEFICS3_CHAT_TEMPLATE)
    ids = _ids(tok, IDEFICS3_SPECIAL[:6])
    image_size, patch, scale = 32, 8, 2
    image_seq_len = (image_size // patch) ** 2 // scale**2  # 4
    cfg = Idefics3Config(
        text_config=dict(
            model_type="llama", vocab_size=_vocab(tok), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=patch),
        scale_factor=scale, image_token_id=ids["<image>"], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(cfg).to(torch.float32).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write(out, "preprocessor_config.json", {
        "image_processor_type": "Idefics3ImageProcessor", "processor_class": "Idefics3Processor",
        "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": 2 * image_size},
        "resample": 1, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
        "do_image_splitting": True, "max_image_size": {"longest_edge": image_size},
    })
    _write(out, "processor_config.json",
           {"processor_class": "Idefics3Processor", "image_seq_len": image_seq_len})
    _write(out, "generation_config.json", {
        "bos_token_id": ids["<|im_start|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<end_of_utterance>"], ids["<|endoftext|>"]]})
    return {"arch": "idefics3", "params": sum(p.numel() for p in model.parameters()),
            "vocab": cfg.text_config.vocab_size, "tokens": len(tok), "special_ids": ids}


# ---------------------------------------------------------------- Qwen2-VL

QWEN2VL_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2VL_VIDEO_PROCESSOR_CODE = '''"""Video-less stand-in for Qwen2VLVideoProcessor (which needs torchvision)."""
import transformers
from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin

# Without torchvision, transformers exports VideoProcessorMixin only as a dummy,
# and ProcessorMixin's type check of `video_processor` then fails. Export it.
if not isinstance(getattr(transformers, "VideoProcessorMixin", None), type) or \\
        not issubclass(transformers.VideoProcessorMixin, VideoProcessorMixin):
    setattr(transformers, "VideoProcessorMixin", VideoProcessorMixin)


class TinyVideoProcessor(BaseVideoProcessor):
    patch_size = 14
    temporal_patch_size = 2
    merge_size = 2
    min_pixels = 28 * 28
    max_pixels = 64 * 64
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def _preprocess(self, videos, **kwargs):
        raise NotImplementedError("videos are not supported by this tiny test model")
'''


def build_qwen2_vl(out: Path) -> dict:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = build_tokenizer(QWEN2VL_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>",
                          chat_template=QWEN2VL_CHAT_TEMPLATE)
    ids = _ids(tok, QWEN2VL_SPECIAL)
    min_pixels, max_pixels = 28 * 28, 64 * 64  # 64x64 -> 56x56 -> 4 image tokens
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=_vocab(tok), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [4, 6, 6]},  # sums to head_dim/2
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], use_sliding_window=False,
        ),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=2,
                           in_channels=3, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.float32).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_proc = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }
    _write(out, "preprocessor_config.json", image_proc)
    # Qwen2VLProcessor always loads a video processor, and the only one in
    # transformers needs torchvision: ship a stand-in as remote code.
    (out / "tiny_video_processor.py").write_text(QWEN2VL_VIDEO_PROCESSOR_CODE)
    video_proc = {k: image_proc[k] for k in ("min_pixels", "max_pixels", "size", "patch_size",
                                             "temporal_patch_size", "merge_size")}
    video_proc["auto_map"] = {"AutoVideoProcessor": "tiny_video_processor.TinyVideoProcessor"}
    video_proc["processor_class"] = "Qwen2VLProcessor"
    _write(out, "video_preprocessor_config.json", video_proc)
    _write(out, "processor_config.json", {"processor_class": "Qwen2VLProcessor"})
    _write(out, "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
    return {"arch": "qwen2_vl", "params": sum(p.numel() for p in model.parameters()),
            "vocab": cfg.text_config.vocab_size, "tokens": len(tok), "special_ids": ids}


BUILDERS = {"idefics3": build_idefics3, "qwen2_vl": build_qwen2_vl}


def build(out: Path, arch: str = "idefics3") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    info = BUILDERS[arch](out)
    info["out"] = str(out)
    info["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="/work/tiny-vlm")
    ap.add_argument("--arch", choices=sorted(BUILDERS), default="idefics3")
    args = ap.parse_args()
    print(json.dumps(build(Path(args.out), args.arch)))


if __name__ == "__main__":
    main()
