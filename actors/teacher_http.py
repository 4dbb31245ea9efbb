"""What every teacher client shares: the HTTP error type, the image type, Retry-After.

The clients themselves (OpenAI Images, BFL, fal, Replicate, Stability,
Ideogram) are in `actors/providers.py`. Every failure is a `TeacherHTTPError`
whose `retryable` says whether trying again can help; the API key never
appears in an error, log or repr.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass, field
from typing import Any

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
