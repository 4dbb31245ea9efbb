"""The OpenAI Images API, framework-free: what every server here that speaks it shares.

Edgen (serve/edgen.py) and the diffusers teacher (serve/diffusers_teacher.py)
on FastAPI, the embedded teachers (serve/teachers.py) and the OpenAI
simulator (serve/provider_sims.py) on aiohttp: each keeps a few lines of its
framework's glue (an `ApiError` to a JSON response, headers in) and takes
the rest from here:

- `ApiError`: an error with OpenAI's body, `{"error": {"message", "type",
  "param", "code"}}` (`.body()`), its HTTP status and any headers (Retry-After);
- `ImagesPolicy` + `parse_images_request(body, policy)`: a generations request
  checked (JSON object, known fields, prompt, model, n, response_format, seed)
  as one server's policy says; what differs between servers (extras, formats,
  limits, unknown fields) is the policy's, not a copy of the checks;
- `check_bearer`: `Authorization: Bearer <key>` (401; the key is never echoed);
- `read_body` / `check_body_size`: 413 above a server's body limit;
- `images_response`, `model_list`: the answers' shapes; `image_seeds`: seed + i.

Sizes and sampling limits (steps, guidance) stay each server's: what they
may be depends on what draws the images.
"""

from __future__ import annotations

import base64
import hmac
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

class ApiError(Exception):
    """An OpenAI-shaped error. `type` is OpenAI's: invalid_request_error,
    authentication_error, server_error, rate_limit_error (or "requests", as
    OpenAI's own 429s say), ...; `param` the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImagesRequest(BaseModel):
    """An Images generation request: OpenAI's fields this project's servers read,
    plus the extras some of them take (`ImagesPolicy.extras` says which)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    # Integers are strict: JSON numbers, not "2" or true (pydantic's lax mode takes both).
    n: int = Field(1, strict=True)
    size: str | None = None
    response_format: str | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's
    seed: int | None = Field(None, strict=True)  # extra: image i uses seed + i
    num_inference_steps: int | None = Field(None, strict=True)  # extra
    guidance_scale: float | None = None  # extra


STANDARD_FIELDS = frozenset({"prompt", "model", "n", "size", "response_format", "user"})
EXTRAS = frozenset({"seed", "num_inference_steps", "guidance_scale"})


@dataclass(frozen=True)
class ImagesPolicy:
    """What one server accepts. `model`: the served name (others named in a
    request are a 404, except `aliases`; no model named is fine);
    `unknown_fields`: "error" (400 unknown_parameter) or "ignore" (as
    OpenAI-compatible servers that tolerate other clients' fields);
    `extras`: which of EXTRAS are fields here (others count as unknown);
    `seed_range`: [low, high) of a seed, None for any integer;
    `max_prompt_chars`: None for no limit."""

    model: str
    aliases: tuple[str, ...] = ()
    max_n: int = 10  # OpenAI's limit per request
    max_prompt_chars: int | None = 4000  # OpenAI's dall-e-3 limit
    response_formats: tuple[str, ...] = ("b64_json",)
    extras: frozenset[str] = EXTRAS
    unknown_fields: Literal["error", "ignore"] = "error"
    seed_range: tuple[int, int] | None = (0, 2**31)


def _first_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    param = ".".join(str(x) for x in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}", param, "unknown_parameter")
    code = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
    return ApiError(400, f"{param}: {err['msg']}", param, code)


def parse_images_request(body: bytes, policy: ImagesPolicy) -> ImagesRequest:
    """A generations request body checked as `policy` says: a JSON object, known
    fields of the right types, a non-empty prompt (stripped) within
    max_prompt_chars, the served model (or none named), 1 <= n <= max_n, a
    served response_format, a seed in range. Errors are `ApiError`s naming
    the field (`param`); the returned request has the prompt stripped."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    known = STANDARD_FIELDS | (policy.extras & EXTRAS)
    if policy.unknown_fields == "ignore":
        data = {k: v for k, v in data.items() if k in known}
    else:
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}", unknown[0], "unknown_parameter")
    try:
        req = ImagesRequest.model_validate(data)
    except ValidationError as e:
        raise _first_error(e) from None
    prompt = req.prompt.strip()
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt", "empty_prompt")
    if policy.max_prompt_chars is not None and len(prompt) > policy.max_prompt_chars:
        raise ApiError(400, f"prompt is {len(prompt)} characters, over {policy.max_prompt_chars}", "prompt",
                       "prompt_too_long")
    if req.model not in (None, policy.model, *policy.aliases):
        raise ApiError(404, f"model {req.model!r} is not served here (this is {policy.model!r})",
                       "model", "model_not_found")
    if not 1 <= req.n <= policy.max_n:
        raise ApiError(400, f"n must be 1 to {policy.max_n}, not {req.n}", "n", "invalid_value")
    if req.response_format is not None and req.response_format not in policy.response_formats:
        why = "" if "url" in policy.response_formats else " (this server keeps no image URLs)"
        raise ApiError(400, f"response_format must be {' or '.join(map(repr, policy.response_formats))}, "
                       f"not {req.response_format!r}{why}", "response_format", "invalid_value")
    if req.seed is not None and policy.seed_range is not None:
        lo, hi = policy.seed_range
        if not lo <= req.seed < hi:
            raise ApiError(400, f"seed must be {lo} to {hi - 1}, not {req.seed}", "seed", "invalid_value")
    return req.model_copy(update={"prompt": prompt})


def image_seeds(req: ImagesRequest, default: int | None = None) -> list[int]:
    """Image i's seed: seed + i; without a seed, `default`, or a random one when None."""
    base = req.seed if req.seed is not None else default
    if base is None:
        base = random.randrange(2**31 - req.n)
    return [base + i for i in range(req.n)]


def bearer_token(header_value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None for any other."""
    if header_value and header_value.startswith("Bearer "):
        return header_value[len("Bearer "):]
    return None


def check_bearer(header_value: str | None, expected_key: str | None) -> None:
    """401 unless the Authorization header carries `expected_key` (None: this
    server takes no key; "": one is meant but not configured, a 500). Compared
    in constant time; no message names either key."""
    if expected_key is None:
        return
    if not expected_key:
        raise ApiError(500, "the server's API key is not configured", type="server_error")
    given = bearer_token(header_value) or ""
    if not hmac.compare_digest(given.encode(), expected_key.encode()):
        raise ApiError(401, "Incorrect API key provided: a missing or wrong bearer token.",
                       code="invalid_api_key", type="authentication_error")


def check_body_size(size: int | str | None, limit: int) -> None:
    """413 when `size` (a body's length, or a Content-Length header as sent) is over `limit` bytes."""
    if isinstance(size, str):
        size = int(size) if size.isdigit() else None
    if size is not None and size > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")


async def read_body(content_length: int | str | None, read: Callable[[], Awaitable[bytes]], limit: int) -> bytes:
    """A request body by `read` (the framework's), refused (413) by its declared
    length before reading, and by its real one after (a body may lie or stream)."""
    check_body_size(content_length, limit)
    body = await read()
    check_body_size(len(body), limit)
    return body


def images_response(pngs: Sequence[bytes], created: int | None = None,
                    extra_per_image: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The generations answer: {"created", "data": [{"b64_json", **extra}]}, one entry per image."""
    extras = extra_per_image or [{}] * len(pngs)
    if len(extras) != len(pngs):
        raise ValueError(f"{len(pngs)} images but {len(extras)} extras")
    return {"created": int(time.time()) if created is None else created,
            "data": [{"b64_json": base64.b64encode(p).decode("ascii"), **x} for p, x in zip(pngs, extras)]}


def model_list(model_id: str, created: int, owned_by: str = "evolve-director") -> dict[str, Any]:
    """The `GET /v1/models` answer of a server of one model."""
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": owned_by}]}


# -- OpenAI's own image models ---------------------------------------------------------------

# The sizes each of OpenAI's own image models draws (platform.openai.com/docs/api-reference/images/create,
# `size`): dall-e-2 three squares; dall-e-3 a square and two 7:4s; the GPT image models (gpt-image-1,
# gpt-image-1-mini and newer gpt-image-*) a square, two 3:2s and "auto". Every one draws 1024x1024.
# None of them takes a `seed`. The client checks a teacher's config against this before anything is
# bought; the simulator answers as OpenAI does.
OPENAI_SIZES: dict[str, tuple[str, ...]] = {
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
    "gpt-image": ("1024x1024", "1536x1024", "1024x1536", "auto"),
}


def openai_family(model: str) -> str | None:
    """Which of OpenAI's own image models `model` names (a key of OPENAI_SIZES),
    or None: any other name is an OpenAI-compatible server's model."""
    if model.startswith("gpt-image"):
        return "gpt-image"
    for family in ("dall-e-2", "dall-e-3"):
        if model == family or model.startswith(family + "-"):
            return family
    return None
