"""Typed requests and verdicts for the judge's three duties.

These are the only shapes that cross between the algorithm (`evolve/`) and a
judge backend (`serve/judge.py`: the scene parser here, a VLM later). Images
travel as PNG bytes so a judge on another node needs no shared disk.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_png(data: bytes) -> bytes:
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"not a PNG image (got {len(data)} bytes starting {data[:8]!r})")
    return data


# pydantic names the field (student_image, teacher_images.0.image) in the error.
PngBytes = Annotated[bytes, AfterValidator(_check_png)]


class TeacherImage(_Msg):
    teacher: str
    image: PngBytes


class DiscriminateRequest(_Msg):
    """Compare the student's image with one or more teacher images of one prompt.

    Without a student image the judge only picks the best teacher image (what a
    new prompt's training image is chosen by)."""

    prompt: str
    student_image: PngBytes | None = None
    teacher_images: list[TeacherImage] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_teachers(self) -> "DiscriminateRequest":
        names = [t.teacher for t in self.teacher_images]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique within a request, got {names}")
        if "student" in names:
            raise ValueError("'student' is reserved for the student's image; rename that teacher")
        return self


class Comparison(_Msg):
    """One pairwise question to a VLM judge, as asked and as answered."""

    first: str = Field(description="shown as (A): 'student' or a teacher name")
    second: str = Field(description="shown as (B)")
    answers: list[str] = Field(default_factory=list, description="raw answers, re-asks included")
    winner: str | None = Field(None, description="first or second's name; None = no usable answer")


class DiscriminateVerdict(_Msg):
    """The judge's verdict on one request.

    `decided` False is the typed "no verdict": the judge could not tell (its
    answers never parsed, or the two orders disagreed). The loop leaves such a
    sample as it is and counts it; `best_teacher` is then the best the judge
    could establish (the first teacher listed if nothing was decided)."""

    prompt: str
    best_teacher: str = Field(description="teacher whose image fits the prompt best")
    student_matches: bool = Field(False, description="student is as good as the best teacher image")
    decided: bool = Field(True, description="False: no verdict on the student (or on the teachers "
                          "when no student image was sent)")
    student_score: float | None = Field(None, ge=0, le=1, description="scoring judges only")
    teacher_scores: dict[str, float] = Field(default_factory=dict, description="scoring judges only")
    comparisons: list[Comparison] = Field(default_factory=list, description="pairwise judges: every question asked")
    reason: str = ""


class ExpandRequest(_Msg):
    """A prompt the student failed: write k variants exercising the same skill,
    none a (near-)duplicate of `avoid_prompts` (the current training set)."""

    prompt: str
    k: int = Field(ge=0, le=64)
    seed: int = 0
    avoid_prompts: list[str] = Field(default_factory=list)


class Rejected(_Msg):
    """A generated prompt the judge threw away, and why."""

    prompt: str
    why: str


class _Written(_Msg):
    """What a judge wrote: VLM judges keep their raw answers (re-asks included)
    and the items they threw away, and why."""

    raw: list[str] = Field(default_factory=list, description="VLM judges: raw answers, re-asks included")
    rejected: list[Rejected] = Field(default_factory=list)


class ExpandResult(_Written):
    prompt: str
    variants: list[str]


class MutateRequest(_Msg):
    """Invent n new prompts of a structure other than the given ones."""

    avoid_prompts: list[str] = Field(default_factory=list)
    n: int = Field(ge=0, le=256)
    seed: int = 0


class MutateResult(_Written):
    prompts: list[str]


# --------------------------------------------------------------------------- evaluation
# How the held-out images are scored by a VLM (evolve/evaluation.py): pairwise
# questions in a fixed order, and per-image alignment, as VQAScore (P("Yes")
# from logprobs) or TIFA / DSG-style decomposed yes/no questions.


class CompareRequest(_Msg):
    """One pairwise question, shown in the order given: does `first` (A) or
    `second` (B) fit the prompt better? Answered by a `Comparison` whose
    winner is "first", "second" or None."""

    prompt: str
    first: PngBytes
    second: PngBytes


class QuestionsRequest(_Msg):
    """Write at most n yes/no questions that check an image against the prompt."""

    prompt: str
    n: int = Field(8, ge=1, le=32)


class QuestionsResult(_Written):
    prompt: str
    questions: list[str]


class AlignRequest(_Msg):
    """How well one image shows its prompt. Without `questions`: VQAScore, the
    probability of "Yes" to the judge's `vqa` question. With them: the mean
    probability of "Yes" over those questions (each asked with the `answer`
    template)."""

    prompt: str
    image: PngBytes
    questions: list[str] | None = None


class Answer(_Msg):
    """One yes/no question as asked and answered."""

    question: str
    raw: list[str] = Field(default_factory=list, description="raw answers, re-asks included")
    p_yes: float | None = Field(None, ge=0, le=1, description="from the answer's logprobs where the "
                                "backend returns them, else 1 or 0 from its text; None: no usable answer")
    from_logprobs: bool = False


class AlignResult(_Msg):
    prompt: str
    score: float | None = Field(None, ge=0, le=1, description="None: no verdict (no usable answer)")
    method: str = Field(description="vqascore | questions | scene")
    answers: list[Answer] = Field(default_factory=list)
    logprobs: bool = Field(False, description="every answer's p_yes came from logprobs")


# --------------------------------------------------------------------------- reading VLM answers
# A VLM's answer is untrusted text. These functions read it strictly (JSON is
# parsed, never evaluated), repair what can be repaired without guessing, and
# otherwise say what was wrong, so the judge can re-ask or give "no verdict".

_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"')


def _answer_text(answer: str, key: str) -> str:
    """The answer without code fences, or the string at `key` of a JSON object answer
    (what a structured-output constraint makes the VLM write)."""
    text = _FENCE.sub("", answer.strip())
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get(key), str):
            return obj[key]
    except (json.JSONDecodeError, RecursionError):
        pass
    return text


def parse_choice(answer: str, choice_a: str, choice_b: str) -> tuple[str | None, str | None]:
    """'A', 'B' or None for a two-way choice; the second value says what was wrong.

    Accepted: the answer contains exactly one of the two choice strings (upstream's
    `<(A) is better>` check), a JSON object {"choice": ...} holding one, or, as a
    repair, a lone "A"/"(B)" or "(A) is better" without the brackets."""
    text = _answer_text(answer, "choice")
    has_a, has_b = choice_a in text, choice_b in text
    if has_a != has_b:
        return ("A" if has_a else "B"), None
    if has_a and has_b:
        return None, "the answer names both images"
    letters = {m.upper() for m in re.findall(r"\(?\b([AaBb])\)?\s+is\s+(?:the\s+)?better", text)}
    lone = re.fullmatch(r"\W*(?:image\s+)?\(?([AaBb])\)?\W*", text, flags=re.IGNORECASE)
    if lone:
        letters.add(lone.group(1).upper())
    if len(letters) == 1:
        return letters.pop(), None
    if len(letters) > 1:
        return None, "the answer names both images"
    return None, f"the answer contains neither {choice_a} nor {choice_b}"


def parse_yes_no(answer: str, yes: str = "Yes", no: str = "No") -> tuple[bool | None, str | None]:
    """True / False for an answer that says yes or no (first word, any case,
    punctuation ignored, or a JSON {"answer": ...}); None and the problem otherwise."""
    words = re.findall(r"[a-z]+", _answer_text(answer, "answer").lower())
    first = words[0] if words else ""
    if first == yes.lower():
        return True, None
    if first == no.lower():
        return False, None
    return None, f"the answer starts with neither {yes!r} nor {no!r}"


def parse_prompt_list(answer: str) -> tuple[list, str | None]:
    """The items of a JSON list of prompts (or of {"prompts": [...]}), and a problem note.

    A truncated or otherwise broken list is repaired by keeping its complete
    string literals; anything else yields [] and the reason."""
    text = _FENCE.sub("", answer.strip())
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        obj = None
        start = text.find("[")
        end = text.rfind("]")
        if start >= 0 and end > start:
            try:
                obj = json.loads(text[start:end + 1])
            except (json.JSONDecodeError, RecursionError):
                obj = None
        if obj is None:
            if start < 0:
                return [], "the answer is not a JSON list"
            items = []
            for literal in _STRING_LITERAL.findall(text[start + 1:]):
                try:
                    items.append(json.loads(literal))
                except json.JSONDecodeError:  # raw control characters and the like: not a prompt
                    pass
            return items, f"the answer is not valid JSON; kept its {len(items)} complete strings"
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if "prompts" in obj and isinstance(obj["prompts"], list):
            obj = obj["prompts"]
        elif len(lists) == 1:
            obj = lists[0]
        else:
            return [], "the answer is a JSON object without a list of prompts"
    if isinstance(obj, str):
        obj = [obj]
    if not isinstance(obj, list):
        return [], f"the answer is JSON {type(obj).__name__}, not a list"
    return obj, None


def normalize_prompt(text: str) -> str:
    """The key two prompts share when they are near-duplicates: case, punctuation,
    articles and spacing do not count."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def screen_prompts(
    candidates: list,
    avoid: list[str],
    max_chars: int,
    canonical: Callable[[str], str] | None = None,
) -> tuple[list[str], list[Rejected]]:
    """Keep the usable generated prompts, in order; say why each other one went.

    Rejected: not a string, empty, longer than `max_chars`, refused by
    `canonical` (which raises ValueError; in the shapes world it is the grammar,
    and what it returns is the prompt kept), or a near-duplicate of `avoid` or
    of a prompt kept earlier."""
    seen = {normalize_prompt(p): p for p in avoid}
    kept: list[str] = []
    rejected: list[Rejected] = []
    for item in candidates:
        if not isinstance(item, str):
            rejected.append(Rejected(prompt=json.dumps(item)[:200], why="not a string"))
            continue
        text = " ".join(item.split())
        if not text:
            rejected.append(Rejected(prompt=item, why="empty"))
            continue
        if not text.isprintable():
            rejected.append(Rejected(prompt=text[:200], why="contains control characters"))
            continue
        if len(text) > max_chars:
            rejected.append(Rejected(prompt=text[:200], why=f"longer than {max_chars} characters"))
            continue
        if canonical is not None:
            try:
                text = _canonical(canonical, text)
            except ValueError as e:
                rejected.append(Rejected(prompt=text, why=f"rejected by the grammar: {e}"))
                continue
        key = normalize_prompt(text)
        if not key:
            rejected.append(Rejected(prompt=text, why="no words"))
        elif key in seen:
            rejected.append(Rejected(prompt=text, why=f"duplicate of {seen[key]!r}"))
        else:
            seen[key] = text
            kept.append(text)
    return kept, rejected


def _canonical(canonical: Callable[[str], str], text: str) -> str:
    """`canonical(text)`, or else of its plain form (lower case, no end punctuation):
    VLMs capitalise and punctuate, the grammar does not."""
    try:
        return canonical(text)
    except ValueError:
        plain = text.lower().strip(" .!?;:,")
        if plain == text:
            raise
        return canonical(plain)
