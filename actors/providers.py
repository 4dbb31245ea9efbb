"""Image providers behind one interface: `submit` pays, `collect` is free.

Every paid text-to-image API splits into the same two steps, whatever its wire
format:

    job = await provider.submit(session, prompt, seed, size)   # the ONE call that may cost money
    images = await provider.collect(session, job, size)        # poll, download, validate: free

Keeping them apart is what lets the gateway never pay twice: once `submit`
has returned, a crash, a timeout while polling or a failed download is
repaired by calling `collect` again with the same job (it can be rebuilt from
a ledger with `ImageJob.from_record`), never by submitting again. A URL result
is downloaded by `collect`, which the caller runs straight after `submit`
because such URLs expire within minutes.

Providers (`make_provider(kind, ...)`):

    openai     OpenAIImagesProvider   any OpenAI-Images-compatible server (inline base64 or URL)
    bfl        BFLProvider            Black Forest Labs FLUX: submit, poll polling_url, download
    fal        FalProvider            fal.ai queue: submit, poll status_url, fetch response_url, download
    replicate  ReplicateProvider      predictions with `Prefer: wait`, poll urls.get, download
    stability  StabilityProvider      Stability v2beta stable-image: multipart in, image bytes out
    ideogram   IdeogramProvider       Ideogram 3.0: multipart in, expiring URL out

Every failure is a `ProviderError` whose `kind` says what happened and whose
`retryable` is True only for transient trouble (429, 5xx, timeouts, lost
connections, jobs still pending at the deadline). It also says what the
failure cost: `uncertain` when the request may have been billed without an
answer coming back (a timeout, a connection lost after sending), `free` when
the provider documents the outcome as not charged (ImageProvider's docstring
has the rules). Refusals that will not
change on a retry (bad prompt, content policy, auth, credits) are typed
outcomes to record with the sample, not crashes. What comes back is checked by
`validate_image`: undecodable bytes, a wrong size and single-colour "safety"
placeholders are caught. The API key never appears in an error, a log or a
repr, and is never sent to a download URL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from PIL import Image

from actors.teacher_http import GeneratedImage, TeacherHTTPError, parse_retry_after
from serve.openai_images import OPENAI_SIZES, openai_family

__all__ = [
    "PROVIDER_KINDS", "ERROR_KINDS", "DEFAULT_BASE_URLS", "ImageJob", "ProviderError", "ImageProvider",
    "OpenAIImagesProvider", "BFLProvider", "FalProvider", "ReplicateProvider", "StabilityProvider",
    "IdeogramProvider", "make_provider", "validate_image",
]

T = TypeVar("T")

ERROR_KINDS = frozenset({"content_policy", "auth", "credits", "bad_request", "invalid_image",
                         "safety_placeholder", "not_found", "expired", "failed", "transient"})

DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "bfl": "https://api.bfl.ai",
    "fal": "https://queue.fal.run",
    "replicate": "https://api.replicate.com",
    "stability": "https://api.stability.ai",
    "ideogram": "https://api.ideogram.ai",
}

# A placeholder is an image whose every channel varies by at most this much
# (JPEG noise on a flat colour stays within it; any drawn shape exceeds it).
PLACEHOLDER_SPREAD = 6

# Error codes and texts that mark a content-policy refusal or an empty account.
# Codes (OpenAI `code`, Stability `name`, fal `type`) may be matched broadly;
# messages only by phrases, since a message can mention "moderation" merely
# because a parameter has that name (gpt-image-1's `moderation`).
_POLICY = re.compile(r"content[_ ]?polic|moderat|nsfw|safety[_ ](system|check|filter)|flagged|unsafe", re.I)
_POLICY_TEXT = re.compile(r"content[_ ]?polic|safety (system|check|filter)|moderation system|flagged|"
                          r"nsfw|moderated", re.I)
_CREDITS = re.compile(r"insufficient[_ ](quota|credit|balance|funds)|exhausted balance|billing|"
                      r"payment[_ ]required|out of credits|not enough credits", re.I)


# -- results and errors ------------------------------------------------------------------

@dataclass(frozen=True)
class ImageJob:
    """What `submit` bought: enough to collect the images later, for free.

    `job_id`/`poll_url` are set for submit-and-poll APIs, `result_url` where the
    result lives at a URL of its own (fal's response_url; the image URL of an
    OpenAI `url` response, an Ideogram result or a finished Replicate
    prediction), `images` where the submit call already returned the bytes."""

    provider: str
    job_id: str | None
    poll_url: str | None
    result_url: str | None
    images: tuple[GeneratedImage, ...] | None

    def __repr__(self) -> str:  # image bytes would drown a log line
        images = None if self.images is None else f"<{len(self.images)} image(s)>"
        return (f"ImageJob(provider={self.provider!r}, job_id={self.job_id!r}, poll_url={self.poll_url!r}, "
                f"result_url={self.result_url!r}, images={images})")

    def to_record(self) -> dict[str, Any]:
        """JSON-safe form for a ledger, without image bytes (those go to the image store)."""
        return {"provider": self.provider, "job_id": self.job_id, "poll_url": self.poll_url,
                "result_url": self.result_url}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "ImageJob":
        return cls(record["provider"], record.get("job_id"), record.get("poll_url"),
                   record.get("result_url"), None)


class ProviderError(TeacherHTTPError):
    """A provider call failed; `kind` says how (see ERROR_KINDS), `provider` where.

    `status` is the HTTP status when one came back (None for timeouts, lost
    connections and checks made here). Only kind "transient" is retryable.

    What the failure cost:
    - `uncertain`: the outcome is unknown. The request may have reached the
      server, which may have billed it (no answer within the timeout, the
      connection lost or reset after sending, a truncated answer body). False
      when nothing was sent (could not connect) or an answer came.
    - `free`: the provider documents that this outcome is not charged (a
      moderated BFL task, an aborted Replicate prediction, a failed fal
      request). False says only that no doc says it was free, not that it was
      charged; an HTTP error answer to a submit is taken as unbilled without
      it (see ImageProvider)."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None,
                 kind: str = "failed", provider: str = "", uncertain: bool = False, free: bool = False) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}; expected one of {sorted(ERROR_KINDS)}")
        super().__init__(status, message, retry_after)
        # All fields, in __init__'s order: picklable (Ray rebuilds it as cls(*args)).
        self.args = (status, message, retry_after, kind, provider, bool(uncertain), bool(free))
        self.kind = kind
        self.provider = provider
        self.uncertain = bool(uncertain)
        self.free = bool(free)

    @property
    def retryable(self) -> bool:
        return self.kind == "transient"

    def record(self) -> dict[str, Any]:
        """The outcome as a ledger field: what to store next to a sample that failed."""
        return {"error_kind": self.kind, "status": self.status, "provider": self.provider,
                "message": self.message, "uncertain": self.uncertain, "free": self.free}

    def __str__(self) -> str:
        where = f"{self.provider}: " if self.provider else ""
        http = f" (HTTP {self.status})" if self.status is not None else ""
        hint = f" (retry after {self.retry_after:g}s)" if self.retry_after is not None else ""
        return f"{where}{self.kind}{http}: {self.message}{hint}"

    def __repr__(self) -> str:
        return (f"ProviderError({self.status!r}, {self.message!r}, retry_after={self.retry_after!r}, "
                f"kind={self.kind!r}, provider={self.provider!r}, uncertain={self.uncertain!r}, "
                f"free={self.free!r})")


# -- validation ------------------------------------------------------------------------------

def validate_image(data: bytes, size: int | None) -> bytes:
    """Check that `data` is a real image (of `size` x `size` when given) and not a
    provider's placeholder; return it as PNG (JPEG/WebP are re-encoded, PNG kept as is).

    Several providers answer moderated output with a flat image (all black,
    or one colour) rather than an error, so a sample that looks fine at the
    HTTP level can still be worthless: it is reported as "safety_placeholder"."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ProviderError(None, "empty response where an image was expected", kind="invalid_image")
    data = bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode fully: a truncated file fails here, not later
            fmt = im.format
            rgb = im.convert("RGB")
    except Exception as exc:  # PIL raises many types for bad input
        raise ProviderError(None, f"not a decodable image ({len(data)} bytes, starts with {data[:12]!r}): "
                            f"{type(exc).__name__}", kind="invalid_image") from None
    width, height = rgb.size
    if size is not None and (width, height) != (size, size):
        raise ProviderError(None, f"expected a {size}x{size} image, got {width}x{height}", kind="invalid_image")
    arr = np.asarray(rgb)
    spread = int((arr.max(axis=(0, 1)).astype(int) - arr.min(axis=(0, 1))).max())
    if spread <= PLACEHOLDER_SPREAD:
        colour = tuple(int(c) for c in arr[0, 0])
        what = "all black" if max(colour) <= PLACEHOLDER_SPREAD else f"a single colour {colour}"
        raise ProviderError(None, f"{width}x{height} image is {what}: a provider's safety placeholder, "
                            "not a picture", kind="safety_placeholder")
    if fmt == "PNG":
        return data
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


# -- the interface ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class ImageProvider(ABC):
    """One provider's protocol. Subclasses implement `submit` and `collect`;
    the HTTP plumbing, error typing, polling and downloading live here.

    `extra` holds provider options: "params" (a dict merged into the request
    body, e.g. {"quality": "low"}), "free_retries" (how often a poll or a
    download is retried on transient errors before giving up; default 5) and
    the provider-specific ones named in each class.

    What a failed `submit` cost, as the ProviderError says it:
    - an HTTP error answer (4xx, 5xx, 429): taken as NOT charged. This is an
      assumption: no provider here documents charging one, a few say so
      outright (Stability's moderation 403: "you were not charged"; fal:
      "never charged for server errors"), the others bill generations, which
      an error answer did not start, and say nothing either way. The flag
      `free` is not set for these: the caller treats an HTTP error answer at
      submit as unbilled by this rule.
    - no answer, or a broken one (`uncertain`): timed out, the connection lost
      or reset after the request went out, a truncated body. The server may
      have billed it; the outcome is unknown.
    - could not connect: nothing was sent, nothing billed (`uncertain` False).
    - a 2xx answer whose content is unusable: billed.
    A job that ends badly is billed unless its provider documents that end as
    free (`free`: BFL moderated, Replicate aborted, fal failed)."""

    kind: ClassVar[str]
    # Whether the provider draws exactly the pixel size asked for; only then is
    # the size checked. The others take an aspect ratio and pick their own
    # resolution (often 1024 px): their images are kept at the size they come
    # in, never resized here, and checked only for being a real picture.
    exact_size: ClassVar[bool] = True
    # The `extra` options this provider reads (besides "params" and "free_retries"):
    # any other is a typo or a request field outside "params", and would be ignored.
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, base_url: str | None, model: str, api_key: str | None, *, timeout_s: float = 60,
                 poll_interval_s: float = 1.0, max_poll_s: float = 600,
                 extra: Mapping[str, Any] | None = None) -> None:
        self.base_url = (base_url or DEFAULT_BASE_URLS[self.kind]).rstrip("/")
        self.model = model
        self._api_key = api_key or None  # private: never logged, never in a message or repr
        self.timeout_s = float(timeout_s)
        self.poll_interval_s = float(poll_interval_s)
        self.max_poll_s = float(max_poll_s)
        self.extra: dict[str, Any] = dict(extra or {})
        unknown = sorted(set(self.extra) - self.options - {"params", "free_retries"})
        if unknown:  # checked before anything is bought
            raise ValueError(f"{self.kind} provider options {unknown} are not read by this provider; it reads "
                             f"{sorted(self.options | {'params', 'free_retries'})} (request fields go under "
                             "'params', e.g. params: {quality: standard})")
        self._params: dict[str, Any] = dict(self.extra.get("params") or {})
        self._free_retries = int(self.extra.get("free_retries", 5))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    # -- public ------------------------------------------------------------------------------
    @abstractmethod
    async def submit(self, session: aiohttp.ClientSession, prompt: str, seed: int, size: int, *,
                     idempotency_key: str | None = None) -> ImageJob:
        """Ask for one image of `prompt`; the only call that may cost money.

        `idempotency_key` goes out as the `Idempotency-Key` header: this
        project's own servers (the embedded and diffusers teachers) answer a
        repeated key with the first, already billed result. None of the public
        APIs here documents it for image generation (OpenAI included): they
        bill a repeated call again, and so do their simulators (the OpenAI one
        honours the key only with its `idempotency=True` knob, standing in for
        our servers)."""

    @abstractmethod
    async def collect(self, session: aiohttp.ClientSession, job: ImageJob, size: int) -> list[GeneratedImage]:
        """The validated images of `job`: polls, downloads and checks, all free,
        so it may be called again with the same job after any failure."""

    async def generate(self, session: aiohttp.ClientSession, prompt: str, seed: int, size: int, *,
                       idempotency_key: str | None = None) -> list[GeneratedImage]:
        """submit + collect, for callers that keep no ledger of jobs."""
        job = await self.submit(session, prompt, seed, size, idempotency_key=idempotency_key)
        return await self.collect(session, job, size)

    def requested_side(self, size: int) -> int:
        """The square side asked of the provider for a teacher image of `size` px."""
        return size

    def expected_side(self, size: int) -> int | None:
        """The side `collect` insists on; None where the provider picks its own resolution."""
        return self.requested_side(size) if self.exact_size else None

    # -- plumbing for subclasses ---------------------------------------------------------------
    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    @staticmethod
    def _idem(idempotency_key: str | None, **headers: str) -> dict[str, str]:
        return {**headers, "Idempotency-Key": idempotency_key} if idempotency_key else headers

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _error(self, kind: str, status: int | None, message: str, retry_after: float | None = None, *,
               uncertain: bool = False, free: bool = False) -> ProviderError:
        return ProviderError(status, self._redact(message), retry_after, kind, self.kind, uncertain, free)

    def _check_job(self, job: ImageJob) -> None:
        if job.provider != self.kind:
            raise ValueError(f"{type(self).__name__} cannot collect a job from provider {job.provider!r}")

    async def _send(self, session: aiohttp.ClientSession, method: str, url: str, *, auth: bool = True,
                    headers: Mapping[str, str] | None = None, json_body: Any = None, data: Any = None,
                    ok: tuple[int, ...] = (200,), download: bool = False) -> _Reply:
        """One HTTP exchange; any status outside `ok` becomes a typed ProviderError."""
        hdrs = self._auth_headers() if auth else {}
        hdrs.update(headers or {})
        try:
            # Authenticated calls do not follow redirects, so a key never travels
            # to another host; downloads carry no key and may follow a CDN's redirect.
            async with session.request(method, url, json=json_body, data=data, headers=hdrs,
                                       allow_redirects=not auth,
                                       timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                reply = _Reply(resp.status, resp.headers.copy(), await resp.read())
        # `from None` below: aiohttp's exceptions carry the request, headers included.
        except _NOT_SENT as exc:
            # Could not connect (refused, DNS, TLS handshake, connect timeout): nothing was sent.
            # ClientConnectorError subclasses ClientOSError, so it is caught before the catch-alls below.
            raise self._error("transient", None, f"{method} {_where(url)}: could not connect (nothing was "
                              f"sent): {type(exc).__name__}: {exc}") from None
        except asyncio.TimeoutError:
            raise self._error("transient", None, f"{method} {_where(url)}: no answer within {self.timeout_s:g}s "
                              "(the request may have reached the server: outcome unknown)",
                              uncertain=True) from None
        except aiohttp.ClientError as exc:
            # Lost after connecting: a reset or closed connection, a truncated answer body.
            raise self._error("transient", None, f"{method} {_where(url)}: {type(exc).__name__}: {exc} (the request "
                              "may have reached the server: outcome unknown)", uncertain=True) from None
        if reply.status not in ok:
            raise self._http_error(method, url, reply, download)
        return reply

    def _http_error(self, method: str, url: str, reply: _Reply, download: bool) -> ProviderError:
        status = reply.status
        retry_after = parse_retry_after(reply.headers)
        if download and status in (401, 403, 404, 410):
            return self._error("expired", status, f"result URL {_where(url)} is gone (HTTP {status}): "
                               "provider URLs expire within minutes, so collect right after submit")
        message, code = _error_text(reply.body)
        return self._error(self._classify(status, message, code), status,
                           f"{method} {_where(url)}: {message}", retry_after)

    def _classify(self, status: int, message: str, code: str) -> str:
        """The error kind of an HTTP error answer, from its status and the provider's
        code and message (`_error_text` reads every supported provider's error body)."""
        if 400 <= status < 500 and (_CREDITS.search(code) or _CREDITS.search(message)):
            return "credits"  # before 429: OpenAI's empty account is a 429 "insufficient_quota"
        if status in (400, 403, 422, 451) and (_POLICY.search(code) or _POLICY_TEXT.search(message)):
            return "content_policy"
        if status in (401, 403):
            return "auth"
        if status == 402:
            return "credits"
        if status == 404:
            return "not_found"
        if status == 410:
            return "expired"
        if status in (408, 409, 425, 429) or status >= 500:
            return "transient"
        if 400 <= status < 500:
            return "bad_request"
        return "failed"

    def _json(self, reply: _Reply, what: str) -> Any:
        try:
            return json.loads(reply.body)
        except ValueError:
            raise self._error("failed", reply.status, f"{what}: response is not JSON "
                              f"({reply.body[:80]!r})") from None

    async def _free(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a free call (a poll, a download), retrying transient failures: nothing
        is paid, so it is always safe, and it honours the server's Retry-After."""
        failures = 0
        while True:
            try:
                return await call()
            except ProviderError as exc:
                if not exc.retryable or failures >= self._free_retries:
                    raise
                failures += 1
                backoff = min(self.poll_interval_s * 2 ** (failures - 1), 30.0)
                await asyncio.sleep(exc.retry_after if exc.retry_after is not None else backoff)

    async def _poll(self, session: aiohttp.ClientSession, url: str,
                    done: Callable[[Any], T | None], *, ok: tuple[int, ...] = (200,)) -> T:
        """GET `url` every poll_interval_s until `done(json)` returns a result (it raises
        for failure states, returns None while pending); at most max_poll_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_poll_s
        while True:
            reply = await self._free(lambda: self._send(session, "GET", url, ok=ok))
            result = done(self._json(reply, f"GET {_where(url)}"))
            if result is not None:
                return result
            if loop.time() >= deadline:
                raise self._error("transient", None, f"job at {_where(url)} still pending after "
                                  f"{self.max_poll_s:g}s; collect it again later (free)")
            await asyncio.sleep(self.poll_interval_s)

    async def _download(self, session: aiohttp.ClientSession, url: str) -> bytes:
        """The bytes behind a result URL, fetched without credentials (`data:` URIs decoded)."""
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except (IndexError, ValueError, binascii.Error):
                raise self._error("invalid_image", None, "malformed data: URI in the result") from None
        reply = await self._free(lambda: self._send(session, "GET", url, auth=False, download=True))
        return reply.body

    def _validated(self, images: list[GeneratedImage], size: int) -> list[GeneratedImage]:
        side = self.expected_side(size)
        out = []
        for img in images:
            try:
                png = validate_image(img.png, side)
            except ProviderError as exc:
                raise self._error(exc.kind, exc.status, exc.message) from None
            out.append(GeneratedImage(png, list(img.flaws)))
        return out


# Failures before anything was sent. A connect timeout (aiohttp >= 3.10) is a TimeoutError too, so it
# is named here, before the generic timeout; a plain total timeout cannot tell when it struck: uncertain.
_NOT_SENT: tuple[type[BaseException], ...] = tuple(
    cls for cls in (aiohttp.ClientConnectorError, getattr(aiohttp, "ConnectionTimeoutError", None),
                    aiohttp.InvalidURL) if cls is not None)


def _where(url: str) -> str:
    """A URL's path only: hosts are noise and query strings may hold signatures."""
    parts = urlsplit(url)
    return parts.path or url[:40]


def _error_text(body: bytes) -> tuple[str, str]:
    """(message, code) from the error bodies of all supported providers:
    OpenAI {"error": {"message", "code", "type"}}, FastAPI/fal/BFL {"detail": str | [{"msg", "type"}]},
    Replicate problem+json {"title", "detail"}, Stability {"name", "errors": [...]},
    plain {"error": str} / {"message": str}; else the start of the body."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body[:300].decode("utf-8", "replace").strip()
        return (text or "(empty body)"), ""
    if isinstance(data, list):  # a bare list of validation items (some fal models)
        data = {"detail": data}
    if not isinstance(data, dict):
        return str(data)[:300], ""
    code = ""
    err = data.get("error")
    if isinstance(err, dict):
        code = str(err.get("code") or err.get("type") or "")
        message = str(err.get("message") or err)
    elif isinstance(err, str) and err:
        message = err
    elif isinstance(data.get("detail"), list) and data["detail"]:
        items = [d for d in data["detail"] if isinstance(d, dict)]
        code = ",".join(str(d.get("type", "")) for d in items)
        message = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', d)}" for d in items)
    elif data.get("errors"):
        code = str(data.get("name") or "")
        errors = data["errors"]
        message = "; ".join(str(e) for e in errors) if isinstance(errors, list) else str(errors)
    else:
        message = str(data.get("detail") or data.get("message") or data.get("title") or data)
        code = str(data.get("error_type") or data.get("name") or "")
    return message[:500], code


def _square_ratio(extra: Mapping[str, Any], default: str) -> str:
    return str(extra.get("aspect_ratio", default))


# -- OpenAI Images (and any compatible server) --------------------------------------------------

OPENAI_SIDE = 1024  # every one of OpenAI's own models draws 1024x1024 (serve/openai_images.py)


class OpenAIImagesProvider(ImageProvider):
    """`POST {base_url}/images/generations` with `Authorization: Bearer`, JSON
    {"model", "prompt", "n": 1, "size": "WxH", "response_format"?, "seed"?}
    -> 200 {"created", "data": [{"b64_json"} | {"url"}]}.

    OpenAI's own models (gpt-image-*, dall-e-*) are sent what images/create
    documents for them: no `seed` (there is none: OpenAI answers 400
    unknown_parameter), no `response_format` to gpt-image-* (they always
    answer base64; others get "b64_json" unless extra["response_format"] is
    "url"; DALL-E URLs expire after an hour), and a size the model draws:
    extra["size"] if set (checked against OPENAI_SIZES when the model is made),
    else "1024x1024", which every one of them draws; the caller scales that
    down to its teacher size. A misconfigured model (a size it does not draw,
    a seed in extra["params"] or extra["send_seed"]) raises ValueError at
    construction, before any money is spent.

    Any other model name is an OpenAI-compatible server (the embedded teachers,
    edgen, ...): it is asked for the teacher's own size (or extra["size"]) and
    sent `seed`, our extension, which those servers honour.

    Refusals: 400 code "moderation_blocked" / "content_policy_violation";
    an empty account is 429 "insufficient_quota" (not retryable).
    Docs: platform.openai.com/docs/api-reference/images/create."""

    kind = "openai"
    options = frozenset({"size", "response_format", "send_seed"})

    def __init__(self, base_url: str | None, model: str, api_key: str | None, **kw: Any) -> None:
        super().__init__(base_url, model, api_key, **kw)
        if not self._official():
            return
        if "seed" in self._params or self.extra.get("send_seed"):
            raise ValueError(f"OpenAI model {self.model!r} takes no 'seed' (images/create documents none; "
                             "OpenAI answers 400 unknown_parameter): drop it from extra['params'] / "
                             "extra['send_seed']")
        family = openai_family(self.model)
        fixed = self._fixed_size()
        if family is not None and fixed is not None and fixed not in OPENAI_SIZES[family]:
            raise ValueError(f"OpenAI model {self.model!r} does not draw size {fixed!r}; it draws "
                             f"{', '.join(OPENAI_SIZES[family])} (images/create `size`)")

    def _official(self) -> bool:
        return self.model.startswith(("gpt-image", "dall-e"))

    def _fixed_size(self) -> str | None:
        """The size configured for every request (extra["params"]["size"] wins, as it is sent last)."""
        fixed = self._params.get("size") or self.extra.get("size")
        return str(fixed) if fixed else None

    def _size(self, size: int) -> str:
        """The `size` sent for a teacher image of `size` px."""
        fixed = self._fixed_size()
        if fixed:
            return fixed
        return f"{OPENAI_SIDE}x{OPENAI_SIDE}" if self._official() else f"{size}x{size}"

    def requested_side(self, size: int) -> int:
        w, _, h = self._size(size).partition("x")
        if w == h and w.isdigit():
            return int(w)
        return OPENAI_SIDE if self._official() else size  # "auto" or a non-square OpenAI size: 1024 across

    def expected_side(self, size: int) -> int | None:
        w, _, h = self._size(size).partition("x")
        return int(w) if w == h and w.isdigit() else None  # "auto" and non-square sizes are not checked

    async def submit(self, session: aiohttp.ClientSession, prompt: str, seed: int, size: int, *,
                     idempotency_key: str | None = None) -> ImageJob:
        url = f"{self.base_url}/images/generations"
        payload: dict[str, Any] = {"model": self.model, "prompt": prompt, "n": 1, "size": self._size(size)}
        if not self.model.startswith("gpt-image"):
            payload["response_format"] = self.extra.get("response_format", "b64_json")
        if self.extra.get("send_seed", not self._official()):
            payload["seed"] = int(seed)
        payload.update(self._params)
        reply = await self._send(session, "POST", url, json_body=payload, headers=self._idem(idempotency_key))
        data = self._json(reply, "POST /images/generations")
        try:
            item = data["data"][0]
        except (KeyError, IndexError, TypeError):
            # Billed already: "failed", not retryable, so it is not paid for again.
            raise self._error("failed", reply.status, f"no image in the response ({str(data)[:200]})") from None
        flaws = list(item.get("flaws") or [])  # the embedded teachers' extension
        if item.get("b64_json"):
            try:
                png = base64.b64decode(item["b64_json"], validate=True)
            except (ValueError, binascii.Error):
                raise self._error("invalid_image", reply.status, "b64_json is not valid base64") from None
            return ImageJob(self.kind, None, None, None, (GeneratedImage(png, flaws),))
        if item.get("url"):
            return ImageJob(self.kind, None, None, str(item["url"]), None)
        raise self._error("failed", reply.status, "response item has neither b64_json nor url")

    async def collect(self, session: aiohttp.ClientSession, job: ImageJob, size: int) -> list[GeneratedImage]:
        self._check_job(job)
        if job.images is not None:
            return self._validated(list(job.images), size)
        if not job.result_url:
            raise self._error("not_found", None, "job has neither images nor a result URL")
        return self._validated([GeneratedImage(await self._download(session, job.result_url))], size)


# -- Black Forest Labs -------------------------------------------------------------------------

class BFLProvider(ImageProvider):
    """`POST {base_url}/v1/{model}` (e.g. flux-pro-1.1, flux-dev) with header
    `x-key`, JSON {"prompt", "width", "height", "seed", "output_format": "png"}
    -> 200 {"id", "polling_url"}. `GET polling_url` (with x-key) -> {"id",
    "status", "result", "progress", "details"}; status Pending, Ready (result
    {"sample": url}, signed and valid ~10 minutes), Error, Request Moderated,
    Content Moderated, Task not found. A moderated task is content_policy and
    free (help.bfl.ai: not charged); an Error task is taken as charged. HTTP
    errors: 402 credits, 403 key, 422 invalid body (FastAPI {"detail": [...]}),
    429 too many active tasks (24 in flight, 6 on flux-kontext-max; no
    Retry-After documented). Width/height must be multiples of 32 within [256, 1440], so a 32 px
    teacher size is asked for as 256 px (returned as drawn, not resized); the
    size is checked against what was asked.
    Docs: docs.bfl.ai (api_integration/errors, api-reference/utility/get-result)."""

    kind = "bfl"
    MIN_SIDE, MAX_SIDE, MULTIPLE = 256, 1440, 32

    def _auth_headers(self) -> dict[str, str]:
        return {"x-key": self._api_key} if self._api_key else {}

    def requested_side(self, size: int) -> int:
        side = self.MULTIPLE * math.ceil(size / self.MULTIPLE)
        return max(self.MIN_SIDE, min(self.MAX_SIDE, side))

    async def submit(self, session: aiohttp.ClientSession, prompt: str, seed: int, size: int, *,
                     idempotency_key: str | None = None) -> ImageJob:
        side = self.requested_side(size)
        payload = {"prompt": prompt, "width": side, "height": side, "seed": int(seed),
                   "output_format": "png", **self._params}
        reply = await self._send(session, "POST", f"{self.base_url}/v1/{self.model}", json_body=payload,
                                 headers=self._idem(idempotency_key))
        data = self._json(reply, f"POST /v1/{self.model}")
        task_id = data.get("id") if isinstance(data, dict) else None
        if not task_id:
            raise self._error("failed", reply.status, f"no task id in the response ({str(data)[:200]})")
        # polling_url may point at a regional host; the global get_result is the fallback.
        poll = data.get("polling_url") or f"{self.base_url}/v1/get_result?id={task_id}"
        return ImageJob(self.kind, str(task_id), str(poll), None, None)

    async def collect(self, session: aiohttp.ClientSession, job: ImageJob, size: int) -> list[GeneratedImage]:
        self._check_job(job)
        if not job.poll_url:
            raise self._error("not_found", None, "BFL job has no polling URL")

        def done(data: Any) -> str | None:
            status = str(data.get("status", "")) if isinstance(data, dict) else ""
            if status == "Ready":
                sample = (data.get("result") or {}).get("sample")
                if not sample:
                    raise self._error("failed", 200, f"task {job.job_id} is Ready without a sample URL")
                return str(sample)
            if status == "Pending":
                return None
            details = f" ({json.dumps(data.get('details'))[:200]})" if data.get("details") else ""
            if status in ("Request Moderated", "Content Moderated"):
                # help.bfl.ai "Why is my prompt getting moderated?": not charged for a moderated status.
                raise self._error("content_policy", 200, f"task {job.job_id}: {status} (not charged){details}",
                                  free=True)
            if status == "Task not found":
                raise self._error("not_found", 200,
                                  f"task {job.job_id} not found (unknown, or its result expired)")
            if status == "Error":  # not documented as free: taken as charged (see serve/provider_sims.py BFLSim)
                raise self._error("failed", 200, f"task {job.job_id} failed{details}")
            raise self._error("failed", 200, f"task {job.job_id}: unexpected status {status!r}")

        sample = await self._poll(session, job.poll_url, done)
        return self._validated([GeneratedImage(await self._download(session, sample))], size)


# -- fal.ai queue --------------------------------------------------------------------------------

class FalProvider(ImageProvider):
    """`POST {base_url}/{model_id}` (e.g. fal-ai/flux/dev) with
    `Authorization: Key <key>`, JSON {"prompt", "seed", "image_size": {"width",
    "height"}, "num_images": 1, "output_format": "png", "enable_safety_checker"}
    -> {"request_id", "status_url", "response_url", "cancel_url"}.
    `GET status_url` -> 202 {"status": "IN_QUEUE", "queue_position"} /
    {"status": "IN_PROGRESS"}, then 200 {"status": "COMPLETED"} (with "error"
    and "error_type" when the run failed); `GET response_url` -> the model output
    {"images": [{"url", "width", "height", "content_type"}], "seed",
    "has_nsfw_concepts": [bool]} or the model's error (422 "detail" items of
    type content_policy_violation). A flagged image comes back black with
    has_nsfw_concepts true: a "safety_placeholder". An exhausted balance is a
    403 "Exhausted balance" (credits). fal keeps a result an hour (6 minutes
    past 10 KB); image URLs are on its CDN. Custom image_size is honoured, so
    sizes are checked. Docs: fal.ai/docs inference-api/queue, model-apis/errors,
    model-apis/request-errors."""

    kind = "fal"

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self._api_key}"} if self._api_key else {}

    async def submit(self, session: aiohttp.ClientSession, prompt: str, seed: int, size: int, *,
                     idempotency_key: str | None = None) -> ImageJob:
        side = self.requested_side(size)
        payload = {"prompt": prompt, "seed": int(seed), "image_size": {"width": side, "height": side},
                   "num_images": 1, "output_format": "png", "enable_safety_checker": True, **self._params}
        reply = await self._send(session, "POST", f"{self.base_url}/{self.model}", json_body=payload,
                                 headers=self._idem(idempotency_key))
        data = self._json(reply, f"POST /{self.model}")
        rid = data.get("request_id") if isinstance(data, dict) else None
        if not rid:
            raise self._error("failed", reply.status, f"no request_id in the response ({str(data)[:200]})")
        # Status and result live under owner/app only, never the endpoint subpath.
        app = "/".join(self.model.split("/")[:2])
        base = f"{self.base_url}/{app}/requests/{rid}"
        return ImageJob(self.kind, str(rid), str(data.get("status_url") or f"{base}/status"),
                        str(data.get("response_url") or base), None)

    async def collect(self, session: aiohttp.ClientSession, job: ImageJob, size: int) -> list[GeneratedImage]:
        self._check_job(job)
        if not (job.poll_url and job.result_url):
            raise self._error("not_found", None, "fal job lacks its status_url or response_url")

        def done(data: Any) -> bool | None:
            status = str(data.get("status", "")) if isinstance(data, dict) else ""
            if status in ("IN_QUEUE", "IN_PROGRESS"):
                return None
            if status == "COMPLETED":
                if data.get("error"):
                    etype = str(data.get("error_type") or "")
                    kind = "content_policy" if _POLICY.search(etype) else "failed"
                    # docs.fal.ai model-apis/pricing: "You pay only for successful outputs"; failed requests
                    # (5xx) are not billed (model-endpoints/reliability).
                    raise self._error(kind, 200, f"request {job.job_id} failed: {data['error']} "
                                      f"({etype or 'no type'}; not charged)", free=True)
                return True
            raise self._error("failed", 200, f"request {job.job_id}: unexpected status {status!r}")

        await self._poll(session, job.poll_url, done, ok=(200, 202))
        reply = await self._free(lambda: self._send(session, "GET", str(job.result_url)))
        out = self._json(reply, "GET response_url")
        try:
            item = out["images"][0]
            url = str(item["url"])
        except (KeyError, IndexError, TypeError):
            raise self._error("failed", reply.status, f"no image in the result ({str(out)[:200]})") from None
        nsfw = out.get("has_nsfw_concepts") or []
        if nsfw and nsfw[0]:
            raise self._error("safety_placeholder", reply.status,
                              f"request {job.job_id}: fal's safety checker flagged the image (has_nsfw_concepts)")
        return self._validated([GeneratedImage(await self._download(session, url))], size)


# -- Replicate -------------------------------------------------------------------------------------

class ReplicateProvider(ImageProvider):
    """Official models: `POST {base_url}/v1/models/{owner}/{name}/predictions`;
    a pinned version ("owner/name:version"): `POST /v1/predictions` with
    {"version"}. `Authorization: Bearer`, `Prefer: wait=N` (sync mode: the
    answer holds up to N <= 60 s and arrives finished if the model was quick),
    JSON {"input": {"prompt", "seed", "aspect_ratio": "1:1", "output_format":
    "png", "num_outputs": 1}} -> 201 prediction {"id", "status", "output",
    "error", "urls": {"get", "cancel"}}. `GET urls.get` until status is
    succeeded / failed / canceled / aborted (starting, processing before;
    docs topics/predictions/lifecycle). Canceled predictions are billed for
    the time they ran, aborted ones (never started) are free. Output is a
    URL or list of URLs (replicate.delivery, removed after an hour).
    Errors are problem+json {"title", "detail", "status"}: 401, 402
    insufficient credit, 404, 422 invalid input, 429 throttled. A flagged
    prediction fails with an "NSFW content detected" error: content_policy.
    FLUX models take an aspect ratio, not pixels, so sizes are not checked.
    extra["input"] adds model inputs. Docs: replicate.com/docs
    (topics/predictions/create-a-prediction, reference/http)."""

    kind = "replicate"
    options = frozenset({"wait_s", "input", "aspect_ratio"})
    exact_size = False

    def _wait_s(self) -> int:
        # Hold the request for less than our own timeout, and within Replicate's 1..60 s.
        return int(self.extra.get("wait_s", max(1, min(60, int(self.timeout_s * 0.8)))))

    async def submit(self, session: aiohttp.ClientSession, prompt: str, seed: int, size: int, *,
                     idempotency_key: str | None = None) -> ImageJob:
        inputs = {"prompt": prompt, "seed": int(seed), "aspect_ratio": _square_ratio(self.extra, "1:1"),
                  "output_format": "png", "num_outputs": 1, **dict(self.extra.get("input") or {})}
        if ":" in self.model:
            url = f"{self.base_url}/v1/predictions"
            body = {"version": self.model.split(":", 1)[1], "input": inputs}
        else:
            url, body = f"{self.base_url}/v1/models/{self.model}/predictions", {"input": inputs}
        body.update(self._params)
        reply = await self._send(session, "POST", url, json_body=body, ok=(200, 201, 202),
                                 headers=self._idem(idempotency_key, Prefer=f"wait={self._wait_s()}"))
        pred = self._json(reply, "POST predictions")
        pid = pred.get("id") if isinstance(pred, dict) else None
        if not pid:
            raise self._error("failed", reply.status, f"no prediction id in the response ({str(pred)[:200]})")
        get = str((pred.get("urls") or {}).get("get") or f"{self.base_url}/v1/predictions/{pid}")
        # A quick model is done already (sync mode). Any other end state is left for
        # `collect` to report, so the caller holds the job id of every paid prediction.
        output = self._finished(pred) if pred.get("status") == "succeeded" else None
        return ImageJob(self.kind, str(pid), get, output, None)

    def _finished(self, pred: Mapping[str, Any]) -> str | None:
        """The first output URL of a succeeded prediction; None while it runs; raises if it ended badly."""
        status = str(pred.get("status", ""))
        if status in ("starting", "processing"):
            return None
        if status == "succeeded":
            out = pred.get("output")
            first = out[0] if isinstance(out, list) and out else out
            if not isinstance(first, str) or not first:
                raise self._error("failed", 200, f"prediction {pred.get('id')} succeeded without an output URL")
            return first
        error = str(pred.get("error") or "")
        if status == "failed":
            kind = "content_policy" if _POLICY_TEXT.search(error) else "failed"
            raise self._error(kind, 200, f"prediction {pred.get('id')} failed: {error or 'no error given'}")
        if status == "canceled":  # billed for the time it ran (replicate.com/docs/billing)
            raise self._error("failed", 200, f"prediction {pred.get('id')} was canceled")
        if status == "aborted":
            # replicate.com/docs/topics/predictions/lifecycle: "exceeded its deadline before it could start
            # running"; changelog 2025-10-16-prediction-deadlines: not charged for aborted ones.
            raise self._error("failed", 200, f"prediction {pred.get('id')} was aborted: its deadline passed "
                              "before it started running (not charged)", free=True)
        raise self._error("failed", 200, f"prediction {pred.get('id')}: unexpected status {status!r}")

    async def collect(self, session: aiohttp.ClientSession, job: ImageJob, size: int) -> list[GeneratedImage]:
        self._check_job(job)
        url = job.result_url
        if url is None:
            if not job.poll_url:
                raise self._error("not_found", None, "Replicate job has no urls.get")
            url = await self._poll(session, job.poll_url,
                                   lambda p: self._finished(p) if isinstance(p, dict) else None)
        return self._validated([GeneratedImage(await self._download(session, url))], size)


# -- Stability AI -------------------------------------------------------------------------------------

class StabilityProvider(ImageProvider):
    """`POST {base_url}/v2beta/stable-image/generate/{core|ultra|sd3}` with
    `Authorization: Bearer` and `Accept: image/*`, a multipart/form-data body
    (prompt, aspect_ratio "1:1", seed, output_format "png"; sd3.x models also
    "model") -> 200 with the image bytes and headers `finish-reason` (SUCCESS
    or CONTENT_FILTERED: the image is a placeholder) and `seed`. Errors
    {"id", "name", "errors": [...]}: 400, 401, 402 (credits; not in the docs
    we found, assumed), 403 "content_moderation", 413, 422, 429, 500.
    Synchronous: `submit` returns the image. Aspect ratio, not pixels: sizes
    are not checked. Docs: platform.stability.ai/docs/api-reference
    (generate core/ultra/sd3), schema GenerateImageResponse."""

    kind = "stability"
    options = frozenset({"aspect_ratio"})
    exact_size = False

    def _path(self) -> tuple[str, dict[str, str]]:
        if self.model in ("core", "ultra", "sd3"):
            return self.model, {}
        if self.model.startswith("sd3"):
            return "sd3", {"model": self.model}
        return self.model, {}

    async def submit(self, session: aiohttp.ClientSession, prompt: str, seed: int, size: int, *,
                     idempotency_key: str | None = None) -> ImageJob:
        path, model_field = self._path()
        form = aiohttp.FormData(default_to_multipart=True)  # the API takes multipart only
        fields = {"prompt": prompt, "aspect_ratio": _square_ratio(self.extra, "1:1"), "seed": str(int(seed)),
                  "output_format": "png", **model_field, **{k: str(v) for k, v in self._params.items()}}
        for name, value in fields.items():
            form.add_field(name, value)
        url = f"{self.base_url}/v2beta/stable-image/generate/{path}"
        reply = await self._send(session, "POST", url, data=form,
                                 headers=self._idem(idempotency_key, Accept="image/*"))
        reason = reply.headers.get("finish-reason", "SUCCESS")
        if reason == "CONTENT_FILTERED":
            raise self._error("safety_placeholder", reply.status,
                              "finish-reason CONTENT_FILTERED: the returned image is a moderation placeholder")
        if reason != "SUCCESS":
            raise self._error("failed", reply.status, f"unexpected finish-reason {reason!r}")
        return ImageJob(self.kind, None, None, None, (GeneratedImage(reply.body),))

    async def collect(self, session: aiohttp.ClientSession, job: ImageJob, size: int) -> list[GeneratedImage]:
        self._check_job(job)
        if job.images is None:
            raise self._error("not_found", None, "Stability answers synchronously; this job holds no images "
                              "(they are not kept in a ledger record)")
        return self._validated(list(job.images), size)


# -- Ideogram ----------------------------------------------------------------------------------------

class IdeogramProvider(ImageProvider):
    """`POST {base_url}/v1/ideogram-v3/generate` with header `Api-Key`, a
    multipart/form-data body (prompt, seed, aspect_ratio "1x1",
    rendering_speed TURBO|DEFAULT|QUALITY, num_images 1) -> 200 {"created",
    "data": [{"url", "prompt", "resolution", "seed", "is_image_safe",
    "style_type"}]}. URLs are ephemeral: downloaded by `collect` right away.
    An unsafe result has is_image_safe false and no URL: content_policy.
    Errors: 400, 401, 422 (e.g. a prompt that failed the safety check), 429;
    their body shape is not documented where we looked, so messages are read
    leniently. Aspect ratio, not pixels: sizes are not checked.
    extra["rendering_speed"] defaults to TURBO (the cheapest).
    Docs: developer.ideogram.ai (api-reference, quickstart)."""

    kind = "ideogram"
    options = frozenset({"rendering_speed", "path", "aspect_ratio"})
    exact_size = False

    def _auth_headers(self) -> dict[str, str]:
        return {"Api-Key": self._api_key} if self._api_key else {}

    async def submit(self, session: aiohttp.ClientSession, prompt: str, seed: int, size: int, *,
                     idempotency_key: str | None = None) -> ImageJob:
        form = aiohttp.FormData(default_to_multipart=True)
        fields = {"prompt": prompt, "seed": str(int(seed)), "aspect_ratio": _square_ratio(self.extra, "1x1"),
                  "rendering_speed": str(self.extra.get("rendering_speed", "TURBO")), "num_images": "1",
                  **{k: str(v) for k, v in self._params.items()}}
        for name, value in fields.items():
            form.add_field(name, value)
        path = str(self.extra.get("path", "/v1/ideogram-v3/generate"))
        reply = await self._send(session, "POST", f"{self.base_url}{path}", data=form,
                                 headers=self._idem(idempotency_key))
        data = self._json(reply, f"POST {path}")
        try:
            item = data["data"][0]
        except (KeyError, IndexError, TypeError):
            raise self._error("failed", reply.status, f"no image in the response ({str(data)[:200]})") from None
        if item.get("is_image_safe") is False or not item.get("url"):
            raise self._error("content_policy", reply.status,
                              "Ideogram marked the image unsafe (is_image_safe false) and withheld its URL")
        return ImageJob(self.kind, None, None, str(item["url"]), None)

    async def collect(self, session: aiohttp.ClientSession, job: ImageJob, size: int) -> list[GeneratedImage]:
        self._check_job(job)
        if not job.result_url:
            raise self._error("not_found", None, "Ideogram job has no result URL")
        return self._validated([GeneratedImage(await self._download(session, job.result_url))], size)


# -- selection -------------------------------------------------------------------------------------

PROVIDERS: dict[str, type[ImageProvider]] = {
    cls.kind: cls for cls in (OpenAIImagesProvider, BFLProvider, FalProvider, ReplicateProvider,
                              StabilityProvider, IdeogramProvider)
}
PROVIDER_KINDS = tuple(PROVIDERS)


def make_provider(kind: str, base_url: str | None, model: str, api_key: str | None, **kw: Any) -> ImageProvider:
    """The client for provider `kind` (see PROVIDER_KINDS). `base_url` None or ""
    means the provider's public API; `kw` are ImageProvider's keyword options."""
    try:
        cls = PROVIDERS[kind]
    except KeyError:
        raise ValueError(f"unknown image provider kind {kind!r}; "
                         f"allowed kinds: {', '.join(PROVIDER_KINDS)}") from None
    return cls(base_url, model, api_key, **kw)
