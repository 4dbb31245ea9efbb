"""Build a tiny random Qwen2-VL checkpoint offline, loadable by `vllm serve`.

Run with the vLLM env's python (see scripts/vllm_cpu_env):

    /work/vllm-env/bin/python scripts/build_tiny_vlm.py [OUT_DIR]   # default /work/tiny-qwen2-vl

No model hub is needed: the config is written by hand, weights are random and
the tokenizer is a byte-level BPE trained here on a few sentences (so any text,
including JSON and "<(A) is better>", is encodable), wrapped in
PreTrainedTokenizerFast with the special tokens Qwen2-VL's chat template and
processor use. Sizes respect vLLM's CPU attention backend (head size >= 32).
Images: patch 14, merge 2, max_pixels 64*64, so a 64x64 PNG becomes a 56x56
grid of 4x4 patches = 4 image tokens.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template (images/videos as content parts, string content ok).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Which image is better? (A) is better. (B) is better.",
    "<(A) is better> <(B) is better>",
    '{"prompts": ["a red circle on a blue background", "two green squares"]}',
    "a small yellow triangle left of a large purple square",
    "You are a helpful assistant. Compare the two images and answer.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]

VIDEO_PROCESSOR_CODE = '''"""Video-less stand-in for Qwen2VLVideoProcessor (which needs torchvision)."""
import transformers
from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin

# Without torchvision, transformers exports VideoProcessorMixin only as a dummy,
# and ProcessorMixin's type check of `video_processor` then fails. Export it.
if not isinstance(getattr(transformers, "VideoProcessorMixin", None), type) or \
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

MAX_PIXELS = 64 * 64
MIN_PIXELS = 28 * 28


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def build(out: Path) -> Path:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tok) + 63) // 64) * 64
    hidden, heads, kv_heads = 64, 2, 1  # head_dim 32: smallest vLLM CPU head size
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [4, 6, 6]},  # sums to head_dim/2
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], use_sliding_window=False,
        ),
        vision_config=dict(
            depth=2, embed_dim=64, hidden_size=hidden, mlp_ratio=2, num_heads=2,
            in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.float32).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # Processor files written by hand: AutoImageProcessor picks the PIL backend
    # when torchvision is absent (it is removed from the vLLM env).
    image_proc = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(image_proc, indent=2))
    # Qwen2VLProcessor always loads a video processor, and transformers' only
    # Qwen2-VL video processor needs torchvision, which does not load beside
    # torch 2.13.0+cpu. A stub video processor shipped as remote code (needs
    # `--trust-remote-code`) stands in; videos stay disabled (limit 0).
    (out / "tiny_video_processor.py").write_text(VIDEO_PROCESSOR_CODE)
    video_proc = {k: image_proc[k] for k in ("min_pixels", "max_pixels", "size", "patch_size",
                                             "temporal_patch_size", "merge_size")}
    video_proc["auto_map"] = {"AutoVideoProcessor": "tiny_video_processor.TinyVideoProcessor"}
    video_proc["processor_class"] = "Qwen2VLProcessor"
    (out / "video_preprocessor_config.json").write_text(json.dumps(video_proc, indent=2))
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(out), "params": n, "vocab": vocab, "tokens": len(tok),
                      "special_ids": ids}))
    return out


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/tiny-qwen2-vl"))
