"""The free-text world: seed and held-out prompts from files the user brings
(JSONL, CSV, TSV, plain text, Parquet), scored by the VLM judge."""

from evolve.prompts.files import FilePrompt, PromptFileError, load_prompts
from evolve.prompts.world import PromptsWorld

__all__ = ["FilePrompt", "PromptFileError", "PromptsWorld", "load_prompts"]
