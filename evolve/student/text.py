"""Text side of the pixel student: a word-level tokenizer and a small transformer encoder.

A small world has a closed vocabulary of a few dozen words (the shapes world's
grammar, or the words of a user's prompt files), so the tokenizer is built
offline from the words the world gives (`StudentConfig.vocabulary`; no hub):
one id per word plus [PAD] (0), [UNK] (1) and [BOS] (2). Text is lower-cased
and split on anything but letters, digits and apostrophes before lookup, so
"A red circle." and "a red circle" are the same tokens. Every sequence starts
with [BOS]; its hidden state doubles as the pooled prompt embedding.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

PAD, UNK, BOS = "[PAD]", "[UNK]", "[BOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS)


def words_of(text: str) -> list[str]:
    """The words a word-level tokenizer looks up: lower case, runs of [a-z0-9']."""
    return re.findall(r"[a-z0-9']+", text.lower())


def build_tokenizer(words: Iterable[str], max_length: int = 12):
    """A `PreTrainedTokenizerFast` with one id per word (sorted, so ids are
    stable across processes and machines)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(words) - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, unk_token=UNK, bos_token=BOS,
        model_max_length=max_length, padding_side="right")


def checkpoint_words(path: str | Path) -> tuple[str, ...]:
    """The words of a checkpoint's tokenizer.json (built by `build_tokenizer`),
    so a student built fresh from them gets the same token ids."""
    import json

    vocab = json.loads(Path(path).read_text())["model"]["vocab"]
    words = tuple(sorted(w for w in vocab if w not in SPECIAL_TOKENS))
    if build_tokenizer(words).get_vocab() != vocab:
        raise ValueError(f"{path}: the tokenizer's ids are not build_tokenizer's for its words")
    return words


def load_tokenizer(path: str | Path, max_length: int = 12):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), pad_token=PAD, unk_token=UNK, bos_token=BOS,
        model_max_length=max_length, padding_side="right")


def tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max_length) int64, padded right."""
    # The word-level vocabulary is lower case without punctuation (see words_of).
    enc = tokenizer([" ".join(words_of(p)) for p in prompts], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class TextEncoder(nn.Module):
    """Token + position embeddings and a few pre-norm transformer layers.

    forward(ids, mask) -> (hidden (B, T, dim), mask (B, T)); hidden[:, 0] is the
    [BOS] state, used as the pooled prompt embedding.
    """

    def __init__(self, vocab_size: int, dim: int = 64, layers: int = 2,
                 heads: int = 4, max_tokens: int = 12):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_tokens, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.tok(ids) + self.pos(pos)[None]
        h = self.layers(h, src_key_padding_mask=mask == 0)
        return self.norm(h), mask
