"""Local simulators of paid image APIs, one aiohttp app per provider.

Each speaks its provider's protocol as `actors/providers.py` expects it from
the real service (paths, auth headers, job states, polling, error bodies in
the provider's shape) and renders real pictures: prompts that read as a
shapes-world scene (`evolve.shapes.reading.read`: the grammar, and free text
such as "A photo of a red circle.") are drawn with `evolve.shapes.render`,
anything else becomes deterministic noise. The OpenAI simulator's error body,
bearer token and answer come from serve/openai_images.py; what it accepts is
its own (what OpenAI accepts, not what this project's servers do).

    kind       base_url       submit                                    then
    openai     <origin>/v1    POST /v1/images/generations               b64_json inline, or an expiring URL
    bfl        <origin>       POST /v1/{model}                          GET /v1/get_result?id= ; sample URL
    fal        <origin>       POST /{owner}/{app}[/{path}]              GET .../requests/{id}/status, then
                                                                        GET .../requests/{id}; image URL
    replicate  <origin>       POST /v1/models/{owner}/{name}/predictions GET /v1/predictions/{id} (Prefer: wait)
    stability  <origin>       POST /v2beta/stable-image/generate/{model} image bytes in the answer
    ideogram   <origin>       POST /v1/ideogram-v3/generate             an expiring URL

A simulator follows its provider's documented behaviour, not what would make
our client look good: none of these services documents idempotency for image
generation, so none honours `Idempotency-Key` (a repeated call is billed
again), except the OpenAI simulator with `idempotency=True`, which stands in
for this project's own OpenAI-compatible servers (the embedded and diffusers
teachers), which do honour it. The OpenAI simulator applies OpenAI's per-model
rules (sizes, no `seed`, dall-e-3's n=1) to OpenAI's model names and is an
OpenAI-compatible server (any square size, `seed` honoured) for any other name.

What is charged (the `charged` counter, per key (prompt, seed): the
simulator's own billing count, the truth a fault campaign checks the gateway's
books against) follows each provider's billing docs, cited where it is coded:

    openai     every image drawn (an HTTP error answer is not charged)
    bfl        a task that ends Ready or Error; not "Request/Content Moderated"
    fal        a request that delivered an output (a blanked NSFW image too); not a failed one
    replicate  succeeded, failed and canceled predictions; not aborted ones
    stability  every image answered (CONTENT_FILTERED placeholders too); not the 403 moderation refusal
    ideogram   every generation answered (is_image_safe false too)

Async jobs are charged when created (their outcome is decided then), HTTP
error answers never.

Result URLs are served by the same server under /files/ and EXPIRE
`url_ttl_s` after the image was made (403 for the Azure-signed ones of BFL
and OpenAI, 404 elsewhere), as the real CDNs do. Failure injection (see
`SimKnobs`): error_rate, rate_limit_rpm (+ retry_after), latency_s, job_s,
moderate, placeholder, corrupt, wrong_size, fail_job_rate, no_credits,
poll_429s, poll_503s, and for every provider's billable submit, after it was
billed (or its job created): stall_rate (the answer held back: the client
times out) and reset_rate (the connection dropped with no HTTP answer: the
client never learns the job id). BFL also answers 429 while
`max_active_tasks` tasks are pending; Replicate predictions can end aborted
(`abort_rate`) or canceled (`cancel_rate`). Server-side counters per key
(prompt, seed) — charged, requests, 429s — let tests prove nobody paid twice;
`stats()` adds totals (stalled, resets, replayed, ...).

    sim = ProviderSim("bfl", api_key="k", job_s=0.05)
    base_url = await sim.start(); ...; await sim.stop()
    with ProviderSimThread("fal", api_key="k") as base_url: ...   # for synchronous code

Liberties, all for fast tests: Retry-After may be fractional (`retry_after_s`),
providers that pick their own resolution draw `native_side` px (1024 like
the real ones by default), and a stalled answer is given up on as soon as the
client has hung up.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import hmac
import io
import json
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, ClassVar

import numpy as np
from aiohttp import web
from PIL import Image

from evolve.shapes.grammar import PromptError
from evolve.shapes.reading import read
from evolve.shapes.render import render, to_png
from serve.openai_images import OPENAI_SIZES, ApiError, bearer_token, images_response, openai_family
from serve.server_thread import ServerThread

Key = tuple[str, int]

# What a misbehaving CDN might hand back with a 200: an HTML page, not an image.
CORRUPT_BYTES = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"


@dataclass
class SimKnobs:
    """Behaviour of one simulated provider (all off by default: a healthy service)."""

    api_key: str | None = "sim-key"      # None: no auth check
    error_rate: float = 0.0              # share of submits answered 500/503
    rate_limit_rpm: float | None = None  # billable submits per minute before 429 (an extra; off by default)
    rate_window_s: float = 60.0          # sliding window of rate_limit_rpm (same rate, shorter window)
    retry_after: bool = True             # whether 429s carry Retry-After (False: a bare 429)
    retry_after_s: float | None = None   # Retry-After sent with 429s (default: the window's wait, whole seconds)
    latency_s: float = 0.0               # added to every API answer
    job_s: float = 0.0                   # how long drawing one image takes
    moderate: str | None = None          # prompts containing this word get the provider's moderation outcome
    placeholder: bool = False            # draw an all-black image
    corrupt: bool = False                # answer bytes that are not an image
    wrong_size: bool = False             # draw twice the size asked for
    fail_job_rate: float = 0.0           # share of jobs that end in the provider's failure state
    no_credits: bool = False             # the account is empty
    url_ttl_s: float = 600.0             # life of a result URL from the moment the image is made
    native_side: int = 1024              # side drawn by providers that take an aspect ratio
    poll_429s: int = 0                   # the first N polls of each job answer 429
    poll_503s: int = 0                   # the next N polls of each job answer 503
    sync_wait_cap_s: float = 60.0        # Replicate: longest a `Prefer: wait` request is held
    echo_key: bool = True                # put the presented key in auth errors (OpenAI echoes a masked one),
                                         # so tests prove clients scrub it
    # Faults of a billable submit, every provider, after the server billed it (or created its job):
    stall_rate: float = 0.0              # share of answers held back stall_s (the client times out)
    stall_s: float = 30.0
    reset_rate: float = 0.0              # share whose connection is reset: no HTTP answer at all
    # One provider each:
    idempotency: bool = False            # openai: honour Idempotency-Key, as this project's servers do
                                         # (OpenAI documents none: off, a repeated call is billed again)
    max_active_tasks: int | None = 24    # bfl: Pending tasks at once before a submit gets 429 (None: no cap)
    abort_rate: float = 0.0              # replicate: share of predictions that end "aborted" (not charged)
    cancel_rate: float = 0.0             # replicate: share that end "canceled" after starting (charged)
    seed: int = 0                        # rng for the *_rate knobs


def draw_image(prompt: str, seed: int, side: int) -> bytes:
    """A real picture of `prompt` where it reads as a shapes-world scene (free text
    too, as `read` takes it: drawn as its canonical grammar text), else
    deterministic blocky noise."""
    try:
        return to_png(render(read(prompt), seed, side))
    except PromptError:
        digest = hashlib.sha256(f"{prompt}|{seed}|{side}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        cells = max(1, side // 8)
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        big = np.repeat(np.repeat(small, math.ceil(side / cells), 0), math.ceil(side / cells), 1)
        return to_png(np.ascontiguousarray(big[:side, :side]))


def _black_png(side: int) -> bytes:
    return to_png(np.zeros((side, side, 3), np.uint8))


def _stretched(png: bytes, width: int, height: int) -> bytes:
    """A square picture stretched to width x height (how the OpenAI sim draws a non-square size)."""
    if png == CORRUPT_BYTES:
        return png
    with Image.open(io.BytesIO(png)) as im:
        if im.size == (width, height):
            return png
        out = im.convert("RGB").resize((width, height), Image.BICUBIC)
    return to_png(np.asarray(out))


def _as_format(png: bytes, fmt: str) -> tuple[bytes, str]:
    """Re-encode a PNG as the requested output format; returns (bytes, content type)."""
    fmt = {"jpg": "jpeg"}.get(fmt, fmt)
    if fmt == "png" or png == CORRUPT_BYTES:
        return png, "image/png"
    with Image.open(io.BytesIO(png)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format=fmt.upper())
    return buf.getvalue(), f"image/{fmt}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class _Job:
    """One async job: done at `done_at`; its outcome was decided at submit."""

    id: str
    prompt: str
    seed: int
    side: int
    created: float
    done_at: float
    outcome: str                 # "ok" | "failed" | "moderated" (replicate also "aborted" | "canceled")
    extra: dict[str, Any] = field(default_factory=dict)
    polls: int = 0
    url: str | None = None       # published when first seen done
    image_side: int = 0

    @property
    def key(self) -> Key:
        return (self.prompt, self.seed)


@dataclass
class _File:
    data: bytes
    content_type: str
    expires_at: float


class _Sim:
    """Shared machinery: auth, throttling, error injection, the faults of a billed
    submit (`answer`), counters, expiring files. Subclasses add their routes, their
    provider's error shape and its billing rule (`billable`)."""

    kind: ClassVar[str]
    api_prefix: ClassVar[str] = ""   # what follows the origin in base_url

    def __init__(self, knobs: SimKnobs) -> None:
        self.k = knobs
        self.rng = random.Random(knobs.seed)
        self.origin = ""
        self.jobs: dict[str, _Job] = {}
        self.files: dict[str, _File] = {}
        self.accepted: deque[float] = deque()
        self.limit = (max(1, int(knobs.rate_limit_rpm * knobs.rate_window_s / 60.0))
                      if knobs.rate_limit_rpm is not None else None)
        # Counters, per key (prompt, seed) and in total.
        self.charged: Counter[Key] = Counter()
        self.requests: Counter[Key] = Counter()
        self.throttled: Counter[Key] = Counter()
        self.routes: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.polls = 0
        self.downloads = 0
        self.expired_downloads = 0
        self.auth_on_downloads = 0
        self.replayed = 0                # answers replayed for a repeated Idempotency-Key (openai, idempotency)
        self.stalled = 0                 # billed answers held back (stall_rate)
        self.resets = 0                  # billed submits whose connection was dropped unanswered (reset_rate)
        self.prefer_headers: list[str] = []

    # -- to implement ----------------------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
        raise NotImplementedError

    # -- app -------------------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/files/{token}", self._file)
        self.add_routes(app)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resource = request.match_info.route.resource
        self.routes[f"{request.method} {resource.canonical if resource else request.path}"] += 1
        if self.k.latency_s and not request.path.startswith("/files/"):
            await asyncio.sleep(self.k.latency_s)
        try:
            resp = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405, in the provider's shape
            resp = self.error(exc.status, exc.reason)
        except Exception as exc:  # a sim bug must still answer like a server
            resp = self.error(500, f"internal error: {type(exc).__name__}: {exc}")
        if not _gone(request):  # a reset connection (or a client that gave up) got no status at all
            self.statuses[resp.status] += 1
        return resp

    # -- shared steps ------------------------------------------------------------------------------
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def key_ok(self, given: str | None) -> bool:
        if self.k.api_key is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self.k.api_key.encode())

    def key_text(self, given: str | None) -> str:
        return f" ({given!r})" if self.k.echo_key and given else ""

    def throttle(self, key: Key) -> web.Response | None:
        """Sliding-window limit on billable submits: None if admitted, else the 429 to send."""
        if self.limit is None:
            return None
        now = self.now()
        while self.accepted and self.accepted[0] <= now - self.k.rate_window_s:
            self.accepted.popleft()
        if len(self.accepted) >= self.limit:
            wait = self.accepted[0] + self.k.rate_window_s - now
            self.throttled[key] += 1
            return self.error(429, f"rate limit of {self.k.rate_limit_rpm:g} requests per minute reached",
                              code="rate_limit_exceeded", headers=self.retry_headers(wait))
        self.accepted.append(now)
        return None

    def retry_headers(self, wait: float) -> dict[str, str] | None:
        """The Retry-After header of a 429 (None with retry_after=False: a bare 429)."""
        if not self.k.retry_after:
            return None
        if self.k.retry_after_s is not None:
            return {"Retry-After": f"{self.k.retry_after_s:g}"}
        return {"Retry-After": str(max(1, math.ceil(wait)))}

    def inject_error(self) -> web.Response | None:
        if self.k.error_rate and self.rng.random() < self.k.error_rate:
            status = self.rng.choice((500, 503))
            return self.error(status, "The server is overloaded or had an error; please try again later.",
                              code="server_error")
        return None

    def poll_trouble(self, job: _Job) -> web.Response | None:
        """The scripted 429s, then 503s, that a job's first polls get."""
        self.polls += 1
        self.requests[job.key] += 1
        job.polls += 1
        if job.polls <= self.k.poll_429s:
            self.throttled[job.key] += 1
            return self.error(429, "too many status requests", code="rate_limit_exceeded",
                              headers=self.retry_headers(1.0))
        if job.polls <= self.k.poll_429s + self.k.poll_503s:
            return self.error(503, "Service temporarily unavailable", code="server_error")
        return None

    async def answer(self, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """Send the answer to a billable submit that was billed (or whose job was
        created), after the faults every provider shares: with reset_rate the
        connection is dropped and no HTTP answer goes out (the client sees a
        disconnect and never learns a job id); with stall_rate the answer is held
        back stall_s, so the client times out on a purchase that was made."""
        if self.k.reset_rate and self.rng.random() < self.k.reset_rate:
            self.resets += 1
            if request.transport is not None:
                request.transport.abort()  # no answer: `resp` is written nowhere
            return resp
        if self.k.stall_rate and self.rng.random() < self.k.stall_rate:
            self.stalled += 1
            await self._hold(request, self.k.stall_s)
        return resp

    async def _hold(self, request: web.Request, seconds: float) -> None:
        """Sleep `seconds`, or less once the client has hung up (tests stop fast)."""
        end = self.now() + seconds
        while (left := end - self.now()) > 0 and not _gone(request):
            await asyncio.sleep(min(left, 0.05))

    def moderated(self, prompt: str) -> bool:
        return bool(self.k.moderate) and self.k.moderate.lower() in prompt.lower()

    def outcome(self, prompt: str) -> str:
        if self.moderated(prompt):
            return "moderated"
        if self.k.fail_job_rate and self.rng.random() < self.k.fail_job_rate:
            return "failed"
        return "ok"

    def image(self, prompt: str, seed: int, side: int) -> tuple[bytes, int]:
        """The bytes to hand back for one image, after the placeholder/corrupt/wrong_size knobs."""
        if self.k.corrupt:
            return CORRUPT_BYTES, side
        drawn = side * 2 if self.k.wrong_size else side
        if self.k.placeholder:
            return _black_png(drawn), drawn
        return draw_image(prompt, seed, drawn), drawn

    def publish(self, data: bytes, expires_at: float, content_type: str = "image/png",
                suffix: str = ".png", query: str = "") -> str:
        token = uuid.uuid4().hex
        self.files[token + suffix] = _File(data, content_type, expires_at)
        return f"{self.origin}/files/{token}{suffix}{query}"

    def billable(self, outcome: str) -> bool:
        """Whether the provider charges a job that ends in `outcome` (decided at
        submit, as the outcome is). Default: every job; subclasses cite their docs."""
        return True

    def new_job(self, prompt: str, seed: int, side: int, **extra: Any) -> _Job:
        now = self.now()
        job = _Job(str(uuid.uuid4()), prompt, seed, side, now, now + self.k.job_s, self.outcome(prompt), extra)
        self.jobs[job.id] = job
        if self.billable(job.outcome):
            self.charged[job.key] += 1
        return job

    def finish(self, job: _Job) -> bool:
        """Whether the job is done; on first sight of a finished good job, publish its image.
        The URL's life counts from when the image was made, not from when it is seen."""
        if self.now() < job.done_at:
            return False
        if job.url is None and job.outcome == "ok":
            png, job.image_side = self.image(job.prompt, job.seed, job.side)
            data, ctype = _as_format(png, str(job.extra.get("output_format", "png")))
            suffix = "." + ctype.split("/")[1].replace("jpeg", "jpg")
            job.url = self.publish(data, job.done_at + self.k.url_ttl_s, ctype, suffix, self.file_query())
        return True

    def file_query(self) -> str:
        return ""

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.downloads += 1
        if any(h in request.headers for h in ("Authorization", "x-key", "Api-Key")):
            self.auth_on_downloads += 1  # a client leaking its key to the CDN
        f = self.files.get(request.match_info["token"])
        if f is None:
            return web.Response(status=404, text="Not Found")
        if self.now() >= f.expires_at:
            self.expired_downloads += 1
            return self.expired_file()
        return web.Response(body=f.data, content_type=f.content_type)

    def expired_file(self) -> web.Response:
        return web.Response(status=404, text="Not Found")

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "charged": sum(self.charged.values()), "requests": sum(self.requests.values()),
                "429s": sum(self.throttled.values()), "polls": self.polls, "downloads": self.downloads,
                "expired_downloads": self.expired_downloads, "auth_on_downloads": self.auth_on_downloads,
                "replayed": self.replayed, "stalled": self.stalled, "resets": self.resets,
                "jobs": len(self.jobs), "statuses": {str(k): v for k, v in sorted(self.statuses.items())}}

    def counts(self, prompt: str, seed: int) -> dict[str, int]:
        key = (prompt, int(seed))
        return {"charged": self.charged[key], "requests": self.requests[key], "429s": self.throttled[key]}


def _gone(request: web.Request) -> bool:
    """Whether the request's connection is closed (reset by us, or the client hung up)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


# -- OpenAI Images ----------------------------------------------------------------------------------

class OpenAISim(_Sim):
    """POST /v1/images/generations, in two modes chosen by the model name.

    OpenAI's own models (dall-e-2, dall-e-3, gpt-image-*) get OpenAI's rules
    (platform.openai.com/docs/api-reference/images/create): only the sizes in
    OPENAI_SIZES (non-square ones are drawn as the square scene stretched to
    width x height; gpt-image "auto" is 1024x1024), no `seed` (400 "Unknown
    parameter: 'seed'.", code unknown_parameter, as OpenAI answers any field it
    does not know), dall-e-3 only n=1, gpt-image-* reject `response_format` and
    always answer base64, the DALL-E models default to a URL.

    Any other model name is an OpenAI-compatible server (this project's own
    teachers, edgen, ...), not OpenAI: any square size 16..4096, `seed` honoured.

    `Idempotency-Key` is ignored by default: OpenAI documents none for images,
    so a repeated call is drawn and billed again. `idempotency=True` stands in
    for this project's servers (serve/teachers.py, serve/diffusers_teacher.py),
    which honour it: a repeated key gets the first, billed answer back unbilled
    (`replayed`; 422 if reused with other parameters)."""

    kind = "openai"
    api_prefix = "/v1"

    def __init__(self, knobs: SimKnobs) -> None:
        super().__init__(knobs)
        self.idempotent: dict[str, tuple[tuple[Any, ...], asyncio.Future[dict[str, Any]]]] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/images/generations", self.generations)

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
        type_ = {401: "invalid_request_error", 429: "requests"}.get(status, "invalid_request_error"
                                                                   if status < 500 else "server_error")
        return web.json_response(ApiError(status, message, param, code, type_).body(), status=status,
                                 headers=headers)

    def expired_file(self) -> web.Response:
        # DALL-E URLs are Azure blob SAS links: an expired one is a 403 with an XML body.
        return web.Response(status=403, content_type="application/xml",
                            text="<?xml version=\"1.0\"?><Error><Code>AuthenticationFailed</Code><Message>"
                                 "Signed expiry time has passed.</Message></Error>")

    def file_query(self) -> str:
        return "?se=expiry&sig=signature"

    async def generations(self, request: web.Request) -> web.StreamResponse:
        given = bearer_token(request.headers.get("Authorization"))
        if not self.key_ok(given):
            return self.error(401, f"Incorrect API key provided{self.key_text(given)}. You can find your API key "
                              "at https://platform.openai.com/account/api-keys.", code="invalid_api_key")
        body = await _json_body(request)
        if not isinstance(body, dict):
            return self.error(400, "We could not parse the JSON body of your request.", code="invalid_json")
        prompt, seed = body.get("prompt"), body.get("seed", 0)
        key = (str(prompt), seed if isinstance(seed, int) else 0)
        self.requests[key] += 1
        if (r := self.throttle(key)) or (r := self.inject_error()):
            return r
        # images/create: `model` defaults to dall-e-2.
        model = str(body.get("model", "dall-e-2"))
        family = openai_family(model)
        if not isinstance(prompt, str) or not prompt:
            return self.error(400, "Invalid 'prompt': string too short. Expected a string with minimum length 1.",
                              param="prompt", code="string_below_min_length")
        n = body.get("n", 1)
        if _int_or_none(n) is None or not 1 <= n <= 10:
            return self.error(400, f"Invalid 'n': {n!r}; expected an integer from 1 to 10.", param="n")
        if family == "dall-e-3" and n != 1:  # images/create `n`: "For dall-e-3, only n=1 is supported."
            return self.error(400, "You must provide n=1 for this model.", param="n", code="invalid_value")
        if family == "gpt-image" and "response_format" in body:  # images/create: not supported for GPT image models
            return self.error(400, "Unknown parameter: 'response_format'.", param="response_format",
                              code="unknown_parameter")
        if family and "seed" in body:  # images/create documents no `seed`: an unknown parameter to OpenAI
            return self.error(400, "Unknown parameter: 'seed'.", param="seed", code="unknown_parameter")
        # GPT image models always return base64; DALL-E defaults to a URL (images/create `response_format`).
        fmt = "b64_json" if family == "gpt-image" else body.get("response_format", "url")
        if fmt not in ("url", "b64_json"):
            return self.error(400, f"Invalid 'response_format': {fmt!r}.", param="response_format")
        size = body.get("size", "auto" if family == "gpt-image" else "1024x1024")
        if family:
            allowed = OPENAI_SIZES[family]
            if size not in allowed:
                listed = ", ".join(f"'{s}'" for s in allowed)
                return self.error(400, f"Invalid value: {size!r}. Supported values are: {listed}.",
                                  param="size", code="invalid_value")
            w, _, h = ("1024x1024" if size == "auto" else size).partition("x")
        else:  # an OpenAI-compatible server: this project's teachers draw any square
            w, _, h = str(size).partition("x")
            if not (w.isdigit() and w == h and 16 <= int(w) <= 4096):
                return self.error(400, f"Invalid size {size!r}: this server draws square images "
                                  "from 16x16 to 4096x4096.", param="size")
            if _int_or_none(seed) is None or seed < 0:
                return self.error(400, f"Invalid 'seed': {seed!r}; expected a non-negative integer.",
                                  param="seed")
        if self.k.no_credits:
            return self.error(429, "You exceeded your current quota, please check your plan and billing details.",
                              code="insufficient_quota")
        if self.moderated(prompt):
            code = "content_policy_violation" if model.startswith("dall-e") else "moderation_blocked"
            return self.error(400, "Your request was rejected as a result of our safety system.", code=code)
        if self.k.fail_job_rate and self.rng.random() < self.k.fail_job_rate:
            return self.error(500, "The server had an error while processing your request. Sorry about that!")
        seed = int(seed) if family is None else 0
        draw = (key, prompt, seed, n, int(w), int(h), fmt)
        idem = request.headers.get("Idempotency-Key") if self.k.idempotency else None
        if not idem:
            # Drawn to the end even if this client disconnects: it is billed either way.
            answer = await asyncio.shield(asyncio.ensure_future(self._draw(*draw)))
            return await self.answer(request, web.json_response(answer))
        asked = (model, prompt, seed, n, size, fmt)
        seen = self.idempotent.get(idem)
        if seen is not None:  # the same purchase again (a client restarted): the billed answer, free
            if seen[0] != asked:
                return self.error(422, "This Idempotency-Key was used with other parameters.",
                                  code="idempotency_key_reused")
            self.replayed += 1
            return web.json_response(await asyncio.shield(seen[1]))
        done = asyncio.ensure_future(self._draw(*draw))
        self.idempotent[idem] = (asked, done)
        return await self.answer(request, web.json_response(await asyncio.shield(done)))

    async def _draw(self, key: Key, prompt: str, seed: int, n: int, width: int, height: int,
                    fmt: str) -> dict[str, Any]:
        await asyncio.sleep(self.k.job_s)
        self.charged[key] += 1
        side = max(width, height)
        pngs = []
        for i in range(n):
            png, drawn = self.image(prompt, seed + i, side)
            pngs.append(_stretched(png, width * drawn // side, height * drawn // side))
        if fmt == "b64_json":
            return images_response(pngs)
        return {"created": int(time.time()), "data": [
            {"url": self.publish(png, self.now() + self.k.url_ttl_s, query=self.file_query())} for png in pngs]}


# -- Black Forest Labs --------------------------------------------------------------------------------

class BFLSim(_Sim):
    """FLUX API: submit, then poll polling_url; samples are signed URLs that expire.

    The 429 is about tasks in flight, not a rate: a submit while
    `max_active_tasks` tasks are Pending (24; 6 for flux-kontext-max) answers
    429 {"detail"}, with no Retry-After, and succeeds again once some finish.
    A moderated task is not charged; a task that ends "Error" is."""

    kind = "bfl"

    def __init__(self, knobs: SimKnobs) -> None:
        super().__init__(knobs)
        self.pending: list[float] = []   # done_at of every task created, a heap: the Pending ones are ahead

    def billable(self, outcome: str) -> bool:
        # help.bfl.ai "Why is my prompt getting moderated?": "You are not charged for requests that return a
        # moderated status" (Request or Content Moderated). The same page says "Only successful generations
        # (status: Ready) consume credits", but nothing on BFL's error pages says an "Error" task is free:
        # until one does, an Error task is charged (the conservative reading for our accounting).
        return outcome != "moderated"

    def active_cap(self, model: str) -> int | None:
        """How many tasks may be Pending at once. BFL: 24 concurrent (in flight) tasks on most endpoints,
        6 on FLUX.1 Kontext [max] (black-forest-labs/skills bfl-api references/rate-limiting.md; docs.bfl.ai
        api_integration/errors: "429 - Too Many Requests: You've exceeded the rate limits for your account")."""
        if self.k.max_active_tasks is None:
            return None
        return min(self.k.max_active_tasks, 6) if model == "flux-kontext-max" else self.k.max_active_tasks

    def too_many_active(self, key: Key, model: str) -> web.Response | None:
        cap = self.active_cap(model)
        if cap is None:
            return None
        now = self.now()
        while self.pending and self.pending[0] <= now:
            heapq.heappop(self.pending)
        if len(self.pending) < cap:
            return None
        self.throttled[key] += 1
        # No Retry-After: BFL documents none for this 429 (its skills' example has a `retry_after` body
        # field, not a header); the body is FastAPI's {"detail"} as BFL's other errors.
        return self.error(429, f"You have exceeded the number of active tasks ({cap}). Wait for some of your "
                          "tasks to finish before submitting new ones.")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/get_result", self.get_result)
        app.router.add_post("/v1/{model}", self.submit)

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
        if status == 422 and param:  # FastAPI validation errors
            body: Any = {"detail": [{"loc": ["body", param], "msg": message, "type": code or "value_error"}]}
        else:
            body = {"detail": message}
        return web.json_response(body, status=status, headers=headers)

    def expired_file(self) -> web.Response:
        return web.Response(status=403, content_type="application/xml",
                            text="<?xml version=\"1.0\"?><Error><Code>AuthenticationFailed</Code><Message>"
                                 "Signature not valid in the specified time frame.</Message></Error>")

    def file_query(self) -> str:
        return "?se=expiry&sp=r&sig=signature"

    def _auth(self, request: web.Request) -> web.Response | None:
        given = request.headers.get("x-key")
        if not self.key_ok(given):
            return self.error(403, f"Not authenticated - Invalid Authentication{self.key_text(given)}")
        return None

    async def submit(self, request: web.Request) -> web.StreamResponse:
        if r := self._auth(request):
            return r
        body = await _json_body(request)
        if not isinstance(body, dict):
            return self.error(422, "Input should be a valid dictionary", param="body", code="dict_type")
        prompt, seed = body.get("prompt"), body.get("seed", 0)
        key = (str(prompt), seed if isinstance(seed, int) else 0)
        self.requests[key] += 1
        if (r := self.throttle(key)) or (r := self.inject_error()):
            return r
        if not isinstance(prompt, str) or not prompt.strip():
            return self.error(422, "prompt must be a non-empty string", param="prompt", code="string_too_short")
        side = body.get("width", 1024)
        for name in ("width", "height"):
            v = body.get(name, 1024 if name == "width" else 768)
            if _int_or_none(v) is None or v % 32 or not 256 <= v <= 1440:
                return self.error(422, f"{name} must be a multiple of 32 between 256 and 1440, got {v!r}",
                                  param=name, code="value_error")
        if body.get("width", 1024) != body.get("height", 768):
            return self.error(422, "this simulator draws square images only", param="height")
        if seed is not None and (_int_or_none(seed) is None or seed < 0):
            return self.error(422, f"seed must be a non-negative integer, got {seed!r}", param="seed")
        if body.get("output_format", "jpeg") not in ("jpeg", "png"):
            return self.error(422, "output_format must be 'jpeg' or 'png'", param="output_format")
        if self.k.no_credits:
            return self.error(402, "Insufficient credits. Add credits at https://dashboard.bfl.ai.")
        if r := self.too_many_active(key, request.match_info["model"]):
            return r
        job = self.new_job(prompt, int(seed or 0), int(side), output_format=body.get("output_format", "jpeg"))
        heapq.heappush(self.pending, job.done_at)
        return await self.answer(request, web.json_response(
            {"id": job.id, "polling_url": f"{self.origin}/v1/get_result?id={job.id}", "cost": 4.0}))

    async def get_result(self, request: web.Request) -> web.Response:
        if r := self._auth(request):
            return r
        job = self.jobs.get(request.query.get("id", ""))
        if job is None:
            return web.json_response({"id": request.query.get("id"), "status": "Task not found", "result": None,
                                      "progress": None, "details": None, "preview": None})
        if r := self.poll_trouble(job):
            return r
        base: dict[str, Any] = {"id": job.id, "result": None, "progress": None, "details": None, "preview": None}
        if not self.finish(job):
            elapsed = (self.now() - job.created) / max(self.k.job_s, 1e-9)
            return web.json_response({**base, "status": "Pending", "progress": round(min(elapsed, 0.99), 2)})
        if job.outcome == "moderated":
            return web.json_response({**base, "status": "Request Moderated",
                                      "details": {"Moderation Reasons": ["Content policy"]}})
        if job.outcome == "failed":
            return web.json_response({**base, "status": "Error", "details": {"error": "Generation failed"}})
        return web.json_response({**base, "status": "Ready", "progress": 1.0, "result": {
            "sample": job.url, "prompt": job.prompt, "seed": job.seed, "start_time": job.created,
            "end_time": job.done_at, "duration": job.done_at - job.created}})


# -- fal.ai queue ----------------------------------------------------------------------------------------

_FAL_PRESETS = {"square_hd": 1024, "square": 512}


class FalSim(_Sim):
    """fal queue: submit; status 202 IN_QUEUE / IN_PROGRESS, 200 COMPLETED; result at response_url.
    `moderate` behaves like FLUX's safety checker: a black image with has_nsfw_concepts true.
    A failed request is not charged; a blanked (NSFW) image is."""

    kind = "fal"

    def billable(self, outcome: str) -> bool:
        # docs.fal.ai model-apis/pricing: "You pay only for successful outputs, and you are never charged for
        # server errors"; model-endpoints/reliability: "Failed requests that return 5xx status codes are not
        # billed". A safety-checked image is an output that was delivered (black, has_nsfw_concepts): the
        # docs do not call it free, so it is charged.
        return outcome != "failed"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/{owner}/{app}/requests/{rid}/status", self.status)
        app.router.add_get("/{owner}/{app}/requests/{rid}", self.result)
        app.router.add_put("/{owner}/{app}/requests/{rid}/cancel", self.cancel)
        app.router.add_post("/{owner}/{app}", self.submit)
        app.router.add_post("/{owner}/{app}/{path:.+}", self.submit)

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
        if status == 422:  # model validation errors: a list of typed items
            body: Any = {"detail": [{"loc": ["body", param or "body"], "msg": message,
                                     "type": code or "value_error"}]}
        else:
            body = {"detail": message}
            if code and status >= 500:
                body["error_type"] = code
        return web.json_response(body, status=status, headers=headers)

    def _auth(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        given = auth[4:] if auth.startswith("Key ") else None
        if not self.key_ok(given):
            return self.error(401, f"Authentication is required to access this application{self.key_text(given)}.")
        return None

    def _urls(self, request: web.Request, rid: str) -> dict[str, str]:
        base = f"{self.origin}/{request.match_info['owner']}/{request.match_info['app']}/requests/{rid}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    async def submit(self, request: web.Request) -> web.Response:
        if r := self._auth(request):
            return r
        body = await _json_body(request)
        if not isinstance(body, dict):
            return self.error(422, "Input should be a valid dictionary", code="dict_type")
        prompt, seed = body.get("prompt"), body.get("seed", 0)
        key = (str(prompt), seed if isinstance(seed, int) else 0)
        self.requests[key] += 1
        if (r := self.throttle(key)) or (r := self.inject_error()):
            return r
        if not isinstance(prompt, str) or not prompt:
            return self.error(422, "String should have at least 1 character", param="prompt",
                              code="string_too_short")
        size = body.get("image_size", "square_hd")
        if isinstance(size, str) and size in _FAL_PRESETS:
            side = _FAL_PRESETS[size]
        elif (isinstance(size, dict) and _int_or_none(size.get("width"))
              and size.get("width") == size.get("height") and 16 <= size["width"] <= 14142):
            side = int(size["width"])
        else:
            return self.error(422, f"image_size must be a square preset or equal width and height in 16..14142, "
                              f"got {size!r}", param="image_size")
        if seed is not None and _int_or_none(seed) is None:
            return self.error(422, "Input should be a valid integer", param="seed", code="int_type")
        if not 1 <= (_int_or_none(body.get("num_images", 1)) or 0) <= 4:
            return self.error(422, "num_images must be between 1 and 4", param="num_images")
        if self.k.no_credits:
            return self.error(403, "User is locked. Reason: Exhausted balance. Top up your balance at "
                              "fal.ai/dashboard/billing.")
        job = self.new_job(prompt, int(seed or 0), side)
        return await self.answer(request, web.json_response(
            {"request_id": job.id, **self._urls(request, job.id), "queue_position": 0}))

    def _job(self, request: web.Request) -> _Job | web.Response:
        job = self.jobs.get(request.match_info["rid"])
        return job if job is not None else self.error(404, "Request not found")

    async def status(self, request: web.Request) -> web.Response:
        if r := self._auth(request):
            return r
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if r := self.poll_trouble(job):
            return r
        urls = self._urls(request, job.id)
        if not self.finish(job):
            if self.now() < job.created + self.k.job_s / 2:
                return web.json_response({"status": "IN_QUEUE", "queue_position": 0, **urls}, status=202)
            return web.json_response({"status": "IN_PROGRESS", "logs": None, **urls}, status=202)
        body: dict[str, Any] = {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": self.k.job_s},
                                **urls}
        if job.outcome == "failed":
            # Assumed shape: the docs give `error_type` for failed requests; we add it to the status too.
            body.update(error="Internal error during inference", error_type="runner_server_error")
        return web.json_response(body)

    async def result(self, request: web.Request) -> web.Response:
        if r := self._auth(request):
            return r
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if not self.finish(job):
            return self.error(400, "Request is still in progress")
        if job.outcome == "failed":
            return self.error(500, "Internal error during inference", code="runner_server_error")
        moderated = job.outcome == "moderated"
        if moderated:  # the safety checker blanks the image and says so
            data, side = _black_png(job.side), job.side
            url = self.publish(data, job.done_at + self.k.url_ttl_s)
        else:
            url, side = str(job.url), job.image_side
        return web.json_response({"images": [{"url": url, "width": side, "height": side,
                                              "content_type": "image/png"}],
                                  "timings": {"inference": self.k.job_s}, "seed": job.seed,
                                  "has_nsfw_concepts": [moderated], "prompt": job.prompt})

    async def cancel(self, request: web.Request) -> web.Response:
        if r := self._auth(request):
            return r
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if self.finish(job):
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        job.outcome = "failed"
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)


# -- Replicate -------------------------------------------------------------------------------------------

_REPLICATE_RATIOS = {"1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"}


class ReplicateSim(_Sim):
    """Predictions API with `Prefer: wait` (held until done or the wait runs out), then polling.
    Statuses (replicate.com/docs/topics/predictions/lifecycle): starting, processing, succeeded,
    failed, canceled, aborted. `abort_rate` predictions end aborted (never ran: not charged),
    `cancel_rate` ones canceled after starting (charged)."""

    kind = "replicate"

    def outcome(self, prompt: str) -> str:
        # lifecycle: "aborted: the prediction exceeded its deadline before it could start running";
        # "canceled: ... exceeded its deadline after starting".
        if self.k.abort_rate and self.rng.random() < self.k.abort_rate:
            return "aborted"
        out = super().outcome(prompt)
        if out == "ok" and self.k.cancel_rate and self.rng.random() < self.k.cancel_rate:
            return "canceled"
        return out

    def billable(self, outcome: str) -> bool:
        # replicate.com/changelog/2025-10-16-prediction-deadlines: "For public models, you're only charged for
        # predictions with a canceled status, not for aborted ones"; replicate.com/docs/billing: billed for the
        # compute time used, so failed (and NSFW-flagged) predictions, which ran, are charged.
        return outcome != "aborted"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/models/{owner}/{name}/predictions", self.create)
        app.router.add_post("/v1/predictions", self.create)
        app.router.add_get("/v1/predictions/{pid}", self.get)
        app.router.add_post("/v1/predictions/{pid}/cancel", self.cancel)

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
        titles = {401: "Unauthenticated", 402: "Insufficient credit", 404: "Not found",
                  422: "Input validation failed", 429: "Request was throttled."}
        title = titles.get(status, "Internal server error" if status >= 500 else "Bad request")
        body: dict[str, Any] = {"title": title, "detail": message, "status": status}
        if status == 422 and param:
            body["invalid_fields"] = [{"type": code or "invalid", "field": param, "description": message}]
        return web.json_response(body, status=status, headers=headers, content_type="application/problem+json")

    def _auth(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else None
        if not self.key_ok(given):
            return self.error(401, f"You did not pass a valid authentication token{self.key_text(given)}")
        return None

    def _prediction(self, job: _Job) -> dict[str, Any]:
        done = self.finish(job)
        status, output, error = "processing", None, None
        if not done:
            started = job.outcome != "aborted" and self.now() >= job.created + self.k.job_s / 3
            status = "processing" if started else "starting"
        elif job.outcome == "ok":
            status, output = "succeeded", [job.url]
        elif job.outcome in ("aborted", "canceled"):
            status = job.outcome
        elif job.outcome == "moderated":
            status, error = "failed", "NSFW content detected. Try running it again, or try a different prompt."
        else:
            status, error = "failed", job.extra.get("error", "Prediction failed: CUDA out of memory")
        get = f"{self.origin}/v1/predictions/{job.id}"
        return {"id": job.id, "model": job.extra.get("model"), "version": job.extra.get("version"),
                "input": job.extra.get("input"), "logs": "", "output": output, "data_removed": False,
                "error": error, "status": status, "created_at": _now_iso(),
                "urls": {"get": get, "cancel": f"{get}/cancel", "web": f"https://replicate.com/p/{job.id}"}}

    async def create(self, request: web.Request) -> web.StreamResponse:
        if r := self._auth(request):
            return r
        body = await _json_body(request)
        inputs = body.get("input") if isinstance(body, dict) else None
        if not isinstance(inputs, dict):
            return self.error(422, "- (root): input is required", param="input", code="required")
        prompt, seed = inputs.get("prompt"), inputs.get("seed", 0)
        key = (str(prompt), seed if isinstance(seed, int) else 0)
        self.requests[key] += 1
        if (r := self.throttle(key)) or (r := self.inject_error()):
            return r
        if not isinstance(prompt, str) or not prompt:
            return self.error(422, "- input.prompt: String length must be greater than or equal to 1",
                              param="input.prompt", code="min_length")
        if inputs.get("aspect_ratio", "1:1") not in _REPLICATE_RATIOS:
            return self.error(422, f"- input.aspect_ratio: must be one of {sorted(_REPLICATE_RATIOS)}",
                              param="input.aspect_ratio", code="enum")
        if inputs.get("output_format", "webp") not in ("webp", "jpg", "png"):
            return self.error(422, "- input.output_format: must be one of webp, jpg, png",
                              param="input.output_format", code="enum")
        if seed is not None and _int_or_none(seed) is None:
            return self.error(422, "- input.seed: Invalid type. Expected: integer", param="input.seed",
                              code="type")
        if self.k.no_credits:
            return self.error(402, "You have insufficient credit to run this model. Go to "
                              "https://replicate.com/account/billing#billing to purchase credit.")
        owner, name = request.match_info.get("owner"), request.match_info.get("name")
        job = self.new_job(prompt, int(seed or 0), self.k.native_side, input=inputs,
                           model=f"{owner}/{name}" if owner else None, version=body.get("version"),
                           output_format=inputs.get("output_format", "webp"))
        prefer = request.headers.get("Prefer", "")
        self.prefer_headers.append(prefer)
        wait = self._wait(prefer)
        if wait:
            await asyncio.sleep(max(0.0, min(wait, job.done_at - self.now())))
        return await self.answer(request, web.json_response(self._prediction(job), status=201))

    def _wait(self, prefer: str) -> float:
        """Seconds to hold a create: `Prefer: wait` (60) or `wait=N` (1..60), capped by the knob."""
        for part in prefer.split(","):
            name, _, value = part.strip().partition("=")
            if name == "wait":
                asked = float(value) if value.strip().isdigit() else 60.0
                return min(asked, 60.0, self.k.sync_wait_cap_s)
        return 0.0

    async def get(self, request: web.Request) -> web.Response:
        if r := self._auth(request):
            return r
        job = self.jobs.get(request.match_info["pid"])
        if job is None:
            return self.error(404, "The requested resource could not be found.")
        if r := self.poll_trouble(job):
            return r
        return web.json_response(self._prediction(job))

    async def cancel(self, request: web.Request) -> web.Response:
        if r := self._auth(request):
            return r
        job = self.jobs.get(request.match_info["pid"])
        if job is None:
            return self.error(404, "The requested resource could not be found.")
        pred = self._prediction(job)
        if pred["status"] in ("starting", "processing"):  # charged still: it was created (and may have run)
            job.outcome, job.done_at = "canceled", self.now()
            pred = self._prediction(job)
        return web.json_response(pred)


# -- Stability AI -------------------------------------------------------------------------------------------

_STABILITY_RATIOS = {"16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21"}


class StabilitySim(_Sim):
    """v2beta stable-image generate: multipart in, image bytes (or JSON base64) out.
    A moderated prompt is a 403 and not charged (Stability's own error text says so);
    a CONTENT_FILTERED image is answered and charged (the docs do not call it free)."""

    kind = "stability"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v2beta/stable-image/generate/{model}", self.generate)

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
        names = {400: "bad_request", 401: "unauthorized", 402: "payment_required", 403: "content_moderation",
                 404: "not_found", 413: "payload_too_large", 422: "invalid_language", 429: "rate_limit_exceeded"}
        name = code if code and code != "server_error" else names.get(status, "internal_error")
        return web.json_response({"id": uuid.uuid4().hex, "name": name, "errors": [message]},
                                 status=status, headers=headers)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else None
        if not self.key_ok(given):
            return self.error(401, f"authorization: invalid or missing api key{self.key_text(given)}",
                              code="unauthorized")
        if request.match_info["model"] not in ("core", "ultra", "sd3"):
            return self.error(404, f"unknown model path {request.match_info['model']!r}")
        if request.content_type != "multipart/form-data":
            return self.error(400, "content-type: must be multipart/form-data", code="bad_request")
        accept = request.headers.get("Accept", "image/*")
        if accept not in ("image/*", "application/json"):
            return self.error(400, "accept: must be image/* or application/json", code="bad_request")
        form = await request.post()
        prompt, seed = str(form.get("prompt", "")), _int_or_none(form.get("seed", "0"))
        key = (prompt, seed if seed is not None else 0)
        self.requests[key] += 1
        if (r := self.throttle(key)) or (r := self.inject_error()):
            return r
        if not 1 <= len(prompt) <= 10000:
            return self.error(400, "prompt: cannot be empty", code="bad_request")
        if form.get("aspect_ratio", "1:1") not in _STABILITY_RATIOS:
            return self.error(400, f"aspect_ratio: must be one of {sorted(_STABILITY_RATIOS)}", code="bad_request")
        if seed is None or not 0 <= seed <= 4294967294:
            return self.error(400, "seed: must be an integer from 0 to 4294967294", code="bad_request")
        fmt = str(form.get("output_format", "png"))
        if fmt not in ("png", "jpeg", "webp"):
            return self.error(400, "output_format: must be png, jpeg or webp", code="bad_request")
        if self.k.no_credits:
            return self.error(402, "You lack sufficient credits to make this request. Please purchase more "
                              "credits and try again.", code="payment_required")
        if self.moderated(prompt):
            # Stability's own 403 content_moderation text (API reference, generate core/ultra/sd3; the page
            # was not in our doc search, the text is as this sim and the brief quote it): "... your request
            # was denied and you were not charged." So nothing is charged: the charge comes only below.
            return self.error(403, "Your request was flagged by our content moderation system, as a result your "
                              "request was denied and you were not charged.", code="content_moderation")
        if self.k.fail_job_rate and self.rng.random() < self.k.fail_job_rate:
            return self.error(500, "An unexpected server error has occurred, please try again later.")
        await asyncio.sleep(self.k.job_s)
        self.charged[key] += 1
        png, _ = self.image(prompt, seed, self.k.native_side)
        data, ctype = _as_format(png, fmt)
        reason = "CONTENT_FILTERED" if self.k.placeholder else "SUCCESS"
        if accept == "application/json":
            return await self.answer(request, web.json_response(
                {"image": base64.b64encode(data).decode("ascii"), "finish_reason": reason, "seed": seed}))
        return await self.answer(request, web.Response(body=data, content_type=ctype,
                                                       headers={"finish-reason": reason, "seed": str(seed)}))


# -- Ideogram ------------------------------------------------------------------------------------------------

class IdeogramSim(_Sim):
    """Ideogram 3.0 generate: multipart in, ephemeral URLs out; unsafe images withheld.
    Every answered generation is charged, an unsafe one too: we found nothing in
    developer.ideogram.ai on charges for is_image_safe false, so the conservative choice is made."""

    kind = "ideogram"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/ideogram-v3/generate", self.generate)

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
        # Ideogram's error body shape is not documented where we looked; FastAPI's {"detail"} is assumed.
        return web.json_response({"detail": message}, status=status, headers=headers)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Api-Key")
        if not self.key_ok(given):
            return self.error(401, f"Invalid API key{self.key_text(given)}")
        if request.content_type != "multipart/form-data":
            return self.error(400, "Request body must be multipart/form-data")
        form = await request.post()
        prompt, seed = str(form.get("prompt", "")), _int_or_none(form.get("seed", "0"))
        key = (prompt, seed if seed is not None else 0)
        self.requests[key] += 1
        if (r := self.throttle(key)) or (r := self.inject_error()):
            return r
        if not prompt:
            return self.error(400, "prompt: field required")
        if seed is None or not 0 <= seed <= 2147483647:
            return self.error(400, "seed: must be an integer from 0 to 2147483647")
        if form.get("rendering_speed", "DEFAULT") not in ("FLASH", "TURBO", "DEFAULT", "QUALITY"):
            return self.error(400, "rendering_speed: must be FLASH, TURBO, DEFAULT or QUALITY")
        if self.k.no_credits:
            return self.error(402, "Insufficient balance; add credits to your API account.")
        if self.k.fail_job_rate and self.rng.random() < self.k.fail_job_rate:
            return self.error(500, "Internal server error")
        await asyncio.sleep(self.k.job_s)
        self.charged[key] += 1
        side = self.k.native_side
        safe = not self.moderated(prompt)
        url = None
        if safe:
            png, side = self.image(prompt, seed, side)
            url = self.publish(png, self.now() + self.k.url_ttl_s)
        return await self.answer(request, web.json_response({"created": _now_iso(), "data": [{
            "prompt": prompt, "resolution": f"{side}x{side}", "is_image_safe": safe, "seed": seed,
            "url": url, "style_type": "GENERAL"}]}))


# -- running them ---------------------------------------------------------------------------------------------

SIMS: dict[str, type[_Sim]] = {cls.kind: cls for cls in (OpenAISim, BFLSim, FalSim, ReplicateSim, StabilitySim,
                                                          IdeogramSim)}
SIM_KINDS = tuple(SIMS)


def build_sim_app(kind: str, **knobs: Any) -> tuple[web.Application, _Sim]:
    """One provider's app and its state (counters, jobs); knobs as in SimKnobs."""
    try:
        cls = SIMS[kind]
    except KeyError:
        raise ValueError(f"no simulator for provider kind {kind!r}; "
                         f"simulated kinds: {', '.join(SIM_KINDS)}") from None
    names = {f.name for f in fields(SimKnobs)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise TypeError(f"unknown simulator knob(s) {unknown}; known: {sorted(names)}")
    sim = cls(SimKnobs(**knobs))
    return sim.build_app(), sim


class ProviderSim:
    """One simulated provider on 127.0.0.1 (a free port), in the current event loop."""

    def __init__(self, kind: str, **knobs: Any) -> None:
        self.kind = kind
        self.app, self.state = build_sim_app(kind, **knobs)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    @property
    def knobs(self) -> SimKnobs:
        return self.state.k

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve; returns the base_url a client of this provider kind takes."""
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        self.state.origin = f"http://{bound_host}:{bound_port}"
        self.base_url = self.state.origin + self.state.api_prefix
        return self.base_url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def counts(self, prompt: str, seed: int) -> dict[str, int]:
        """Server-side counters for one key: charged, requests, 429s."""
        return self.state.counts(prompt, seed)

    def knob_dict(self) -> dict[str, Any]:
        return asdict(self.state.k)

    async def __aenter__(self) -> "ProviderSim":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ProviderSimThread(ServerThread):
    """`ProviderSim` on a background thread's event loop, for synchronous callers.

        with ProviderSimThread("bfl", api_key="k") as base_url: ...
    """

    def __init__(self, kind: str, **knobs: Any) -> None:
        super().__init__()
        self.sim = ProviderSim(kind, **knobs)
        self.thread_name = f"sim-{kind}"

    async def _start(self) -> str:
        return await self.sim.start()

    async def _stop(self) -> None:
        await self.sim.stop()

    def stats(self) -> dict[str, Any]:
        return self.read(self.sim.stats)

    def counts(self, prompt: str, seed: int) -> dict[str, int]:
        return self.read(lambda: self.sim.counts(prompt, seed))
