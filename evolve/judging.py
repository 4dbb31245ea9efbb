"""Typed requests and verdicts for the judge's three duties.

These are the only shapes that cross between the algorithm (`evolve/`) and a
judge backend (`serve/judge.py`: the scene parser here, a VLM later). Images
travel as PNG bytes so a judge on another node needs no shared disk.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_png(data: bytes, what: str) -> bytes:
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"{what} is not a PNG image (got {len(data)} bytes starting {data[:8]!r})")
    return data


class TeacherImage(_Msg):
    teacher: str
    image: bytes

    @field_validator("image")
    @classmethod
    def _png(cls, v: bytes) -> bytes:
        return _check_png(v, "teacher image")


class DiscriminateRequest(_Msg):
    """Compare the student's image with one or more teacher images of one prompt."""

    prompt: str
    student_image: bytes
    teacher_images: list[TeacherImage] = Field(min_length=1)

    @field_validator("student_image")
    @classmethod
    def _png(cls, v: bytes) -> bytes:
        return _check_png(v, "student image")


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
