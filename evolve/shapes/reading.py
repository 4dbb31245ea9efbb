"""Reading free text as a shapes-world scene.

The grammar (`parse`) is strict: lower case, single spaces, its own words.
People and VLMs write "A photo of a red circle." or "a square to the left of
a triangle". `read` is what the shapes world's own parties (its teachers,
the embedded VLM, its scorer as a reference) understand: it normalises such
text into the grammar and parses that, so a prompt the loop treats as opaque
text is drawn and seen as the scene it describes. What it cannot read is a
PromptError naming the text.

The normalisation, in order:
1. lower case; the digits 1-4 become count words; punctuation becomes space;
2. framing words go: a leading "a photo / picture / image / drawing /
   illustration / rendering of", "there is / there are", "an image showing",
   a trailing "on a black background", "in the image";
3. phrases become the grammar's: "to the left of" / "on the left of" ->
   "left of" (and right), "on top of" / "over" -> "above", "under",
   "underneath", "beneath" -> "below", "together with" / "as well as" /
   "plus" / "with" -> "and", "an" -> "a", "single" -> "one".
A grammar prompt reads as itself.
"""

from __future__ import annotations

import re
from functools import lru_cache

from evolve.shapes.grammar import Prompt, PromptError, parse

_DIGITS = {"1": "one", "2": "two", "3": "three", "4": "four"}
_LEADING = re.compile(
    r"^(?:(?:a|an|the)\s+)?(?:photo|picture|image|drawing|illustration|rendering|painting|render)"
    r"\s+(?:of|showing|with)\s+|^(?:there\s+(?:is|are)|this\s+is|it\s+is|showing)\s+")
_TRAILING = re.compile(r"\s+(?:on|against)\s+(?:a\s+)?(?:plain\s+)?black\s+(?:background|canvas)$"
                       r"|\s+in\s+the\s+(?:image|picture|scene)$")
_PHRASES = [
    (r"\b(?:to|on|at)\s+the\s+left\s+(?:side\s+)?of\b", "left of"),
    (r"\b(?:to|on|at)\s+the\s+right\s+(?:side\s+)?of\b", "right of"),
    (r"\bon\s+top\s+of\b", "above"),
    (r"\bover\b", "above"),
    (r"\b(?:underneath|beneath|under)\b", "below"),
    (r"\b(?:together\s+with|as\s+well\s+as|plus|with)\b", "and"),
    (r"\ban\b", "a"),
    (r"\bsingle\b", "one"),
]


def normalise(text: str) -> str:
    """`text` in the grammar's spelling (see the module doc); may still not parse."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a str, got {type(text).__name__}")
    t = text.lower()
    t = re.sub(r"\b([1-4])\b", lambda m: _DIGITS[m.group(1)], t)
    t = " ".join(re.sub(r"[^a-z\s]", " ", t).split())
    for _ in range(2):  # "a photo of there is ..." and the like: strip framing twice at most
        t = _TRAILING.sub("", _LEADING.sub("", t))
    for pattern, repl in _PHRASES:
        t = re.sub(pattern, repl, t)
    t = " ".join(t.split())
    # "a circle left of a square" is the grammar; "circle left of square" lacks articles
    return t


@lru_cache(maxsize=4096)
def read(text: str) -> Prompt:
    """The scene `text` describes, as a grammar Prompt (its `.text` is the
    grammar's form); PromptError where it describes none."""
    try:
        return parse(text)
    except PromptError:
        pass
    plain = normalise(text)
    try:
        return parse(plain)
    except PromptError as e:
        raise PromptError(f"{text!r} does not read as a shapes-world scene (as {plain!r}: {e})") from None
