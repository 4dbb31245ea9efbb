"""Typed requests and verdicts for the judge's three duties.

These are the only shapes that cross between the algorithm (`evolve/`) and a
judge backend (`serve/judge.py`: the scene parser here, a VLM later). Images
travel as PNG bytes so a judge on another node needs no shared disk.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

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
    """Compare the student's image with one or more teacher images of one prompt."""

    prompt: str
    student_image: PngBytes
    teacher_images: list[TeacherImage] = Field(min_length=1)


class DiscriminateVerdict(_Msg):
    prompt: str
    best_teacher: str = Field(description="teacher whose image fits the prompt best")
    student_matches: bool = Field(description="student is as good as the best teacher image")
    student_score: float = Field(ge=0, le=1)
    teacher_scores: dict[str, float]
    reason: str = ""


class ExpandRequest(_Msg):
    """A prompt the student failed: write k variants exercising the same skill."""

    prompt: str
    k: int = Field(ge=0, le=64)
    seed: int = 0


class ExpandResult(_Msg):
    prompt: str
    variants: list[str]


class MutateRequest(_Msg):
    """Invent n new prompts of a structure other than the given ones."""

    avoid_prompts: list[str] = Field(default_factory=list)
    n: int = Field(ge=0, le=256)
    seed: int = 0


class MutateResult(_Msg):
    prompts: list[str]
