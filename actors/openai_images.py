"""Client for the OpenAI Images API (`POST {base_url}/images/generations`).

Speaks to OpenAI itself, any compatible provider, and the embedded teachers
in `serve/teachers.py`. `seed` is our extension (OpenAI ignores unknown
fields). Every failure is a `TeacherHTTPError` whose `retryable` says whether
trying again can help; the API key never appears in an error, log or repr
(providers sometimes echo it, so server messages are scrubbed too).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Statuses worth retrying (as the OpenAI SDK does): timeout, conflict, rate limit, server errors.
_RETRYABLE = {408, 409, 429}


class TeacherHTTPError(Exception):
    """A teacher call failed. `status` is None when no HTTP answer came (timeout,
    connection refused); `retry_after` is the server's hint in seconds."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, message, retry_after)  # args make it picklable (Ray)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in _RETRYABLE or self.status >= 500

    def __str__(self) -> str:
        what = f"HTTP {self.status}" if self.status is not None else "no response"
        hint = f" (retry after {self.retry_after:g}s)" if self.retry_after is not None else ""
        return f"{what}: {self.message}{hint}"

    def __repr__(self) -> str:
        return f"TeacherHTTPError({self.status!r}, {self.message!r}, retry_after={self.retry_after!r})"


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    # Embedded teachers report which flaws they drew (an extension field); others give [].
    flaws: list[str] = field(default_factory=list)


def _redact(text: str, api_key: str | None) -> str:
    return text.replace(api_key, "***") if api_key else text


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait, from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        return str(err.get("message") or err)
    except Exception:
        return body[:300].decode("utf-8", "replace") or "(empty body)"


async def generate_images(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    prompt: str,
    seed: int,
    size: int,
    api_key: str | None,
    timeout_s: float,
    n: int = 1,
    idempotency_key: str | None = None,
) -> list[GeneratedImage]:
    """Generate `n` images (seeds seed..seed+n-1 on teachers that honour seeds).

    `idempotency_key` goes out as the `Idempotency-Key` header: servers that
    honour it (the embedded teachers, payment-style APIs) answer a repeated
    key with the first, already billed result; others ignore it."""
    url = base_url.rstrip("/") + "/images/generations"
    payload = {"model": model, "prompt": prompt, "n": n, "size": f"{size}x{size}",
               "response_format": "b64_json", "seed": seed}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    try:
        async with session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise TeacherHTTPError(resp.status, _redact(_error_message(body), api_key),
                                       parse_retry_after(resp.headers))
    except TeacherHTTPError:
        raise
    except asyncio.TimeoutError:
        raise TeacherHTTPError(None, f"no answer from {url} within {timeout_s:g}s") from None
    except aiohttp.ClientError as exc:
        # `from None`: aiohttp's exceptions carry the request, headers included.
        raise TeacherHTTPError(None, _redact(f"{type(exc).__name__}: {exc}", api_key)) from None
    return _decode(body, n, resp.status)


def _decode(body: bytes, n: int, status: int) -> list[GeneratedImage]:
    # A malformed 200 was still billed: not retryable, so it is not paid again.
    try:
        items = json.loads(body)["data"]
        images = [GeneratedImage(base64.b64decode(it["b64_json"], validate=True),
                                 list(it.get("flaws") or [])) for it in items]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise TeacherHTTPError(status, f"malformed response ({type(exc).__name__}: {exc})") from None
    if len(images) != n:
        raise TeacherHTTPError(status, f"asked for {n} images, got {len(images)}")
    for img in images:
        if not img.png.startswith(PNG_MAGIC):
            raise TeacherHTTPError(status, f"response image is not a PNG ({len(img.png)} bytes)")
    return images
