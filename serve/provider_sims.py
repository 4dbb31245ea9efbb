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

Result URLs are served by the same server under /files/ and EXPIRE
`url_ttl_s` after the image was made (403 for the Azure-signed ones of BFL
and OpenAI, 404 elsewhere), as the real CDNs do. Failure injection (see
`SimKnobs`): error_rate, rate_limit_rpm, latency_s, job_s, moderate,
placeholder, corrupt, wrong_size, fail_job_rate, no_credits, poll_429s,
poll_503s. Server-side counters per key (prompt, seed) — charged (one per
billable submit), requests, 429s — let tests prove nobody paid twice.

    sim = ProviderSim("bfl", api_key="k", job_s=0.05)
    base_url = await sim.start(); ...; await sim.stop()
    with ProviderSimThread("fal", api_key="k") as base_url: ...   # for synchronous code

Liberties, all for fast tests: Retry-After may be fractional (`retry_after_s`),
and providers that pick their own resolution draw `native_side` px (1024 like
the real ones by default).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
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
from serve.openai_images import ApiError, bearer_token, images_response
from serve.server_thread import ServerThread

Key = tuple[str, int]

# What a misbehaving CDN might hand back with a 200: an HTML page, not an image.
CORRUPT_BYTES = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"


@dataclass
class SimKnobs:
    """Behaviour of one simulated provider (all off by default: a healthy service)."""

    api_key: str | None = "sim-key"      # None: no auth check
    error_rate: float = 0.0              # share of submits answered 500/503
    rate_limit_rpm: float | None = None  # billable submits per minute before 429 + Retry-After
    rate_window_s: float = 60.0          # sliding window of rate_limit_rpm (same rate, shorter window)
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
    stall_rate: float = 0.0              # openai: share of billed answers held back stall_s (client timeouts)
    stall_s: float = 30.0
    seed: int = 0                        # rng for error_rate / fail_job_rate / stall_rate


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
    outcome: str                 # "ok" | "failed" | "moderated"
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
    """Shared machinery: auth, throttling, error injection, counters, expiring files.
    Subclasses add their routes and their provider's error shape."""

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
        self.replayed = 0                # answers replayed for a repeated Idempotency-Key
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
                              code="rate_limit_exceeded", headers={"Retry-After": self._retry_after(wait)})
        self.accepted.append(now)
        return None

    def _retry_after(self, wait: float) -> str:
        if self.k.retry_after_s is not None:
            return f"{self.k.retry_after_s:g}"
        return str(max(1, math.ceil(wait)))

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
                              headers={"Retry-After": self._retry_after(1.0)})
        if job.polls <= self.k.poll_429s + self.k.poll_503s:
            return self.error(503, "Service temporarily unavailable", code="server_error")
        return None

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

    def new_job(self, prompt: str, seed: int, side: int, **extra: Any) -> _Job:
        now = self.now()
        job = _Job(str(uuid.uuid4()), prompt, seed, side, now, now + self.k.job_s, self.outcome(prompt), extra)
        self.jobs[job.id] = job
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
                "replayed": self.replayed,
                "jobs": len(self.jobs), "statuses": {str(k): v for k, v in sorted(self.statuses.items())}}

    def counts(self, prompt: str, seed: int) -> dict[str, int]:
        key = (prompt, int(seed))
        return {"charged": self.charged[key], "requests": self.requests[key], "429s": self.throttled[key]}


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
    """An OpenAI-Images-compatible server: any square size 16..4096, `seed` honoured.
    gpt-image-* models reject `response_format` and answer base64, as OpenAI's do.
    Like the embedded teachers (serve/teachers.py), it honours `Idempotency-Key`:
    a repeated key gets the first, billed answer back unbilled (422 if reused
    with other parameters)."""

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

    async def generations(self, request: web.Request) -> web.Response:
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
        model = str(body.get("model", "dall-e-2"))
        if not isinstance(prompt, str) or not prompt:
            return self.error(400, "Invalid 'prompt': string too short. Expected a string with minimum length 1.",
                              param="prompt", code="string_below_min_length")
        n = body.get("n", 1)
        if _int_or_none(n) is None or not 1 <= n <= 10:
            return self.error(400, f"Invalid 'n': {n!r}; expected an integer from 1 to 10.", param="n")
        if model.startswith("gpt-image") and "response_format" in body:
            return self.error(400, "Unknown parameter: 'response_format'.", param="response_format",
                              code="unknown_parameter")
        fmt = body.get("response_format", "url")
        if fmt not in ("url", "b64_json"):
            return self.error(400, f"Invalid 'response_format': {fmt!r}.", param="response_format")
        w, _, h = str(body.get("size", "1024x1024")).partition("x")
        if not (w.isdigit() and w == h and 16 <= int(w) <= 4096):
            return self.error(400, f"Invalid size {body.get('size')!r}: this server draws square images "
                              "from 16x16 to 4096x4096.", param="size")
        if _int_or_none(seed) is None or seed < 0:
            return self.error(400, f"Invalid 'seed': {seed!r}; expected a non-negative integer.", param="seed")
        if self.k.no_credits:
            return self.error(429, "You exceeded your current quota, please check your plan and billing details.",
                              code="insufficient_quota")
        if self.moderated(prompt):
            code = "content_policy_violation" if model.startswith("dall-e") else "moderation_blocked"
            return self.error(400, "Your request was rejected as a result of our safety system.", code=code)
        if self.k.fail_job_rate and self.rng.random() < self.k.fail_job_rate:
            return self.error(500, "The server had an error while processing your request. Sorry about that!")
        idem = request.headers.get("Idempotency-Key")
        # A stalled answer: drawn and billed, but the client gives up waiting (a timeout).
        stall = self.k.stall_rate and self.rng.random() < self.k.stall_rate
        if not idem:
            body = await self._draw(key, prompt, seed, n, int(w), fmt)
            if stall:
                await asyncio.sleep(self.k.stall_s)
            return web.json_response(body)
        asked = (model, prompt, seed, n, w, fmt)
        seen = self.idempotent.get(idem)
        if seen is not None:  # the same purchase again (a client restarted): the billed answer, free
            if seen[0] != asked:
                return self.error(422, "This Idempotency-Key was used with other parameters.",
                                  code="idempotency_key_reused")
            self.replayed += 1
            return web.json_response(await asyncio.shield(seen[1]))
        done = asyncio.ensure_future(self._draw(key, prompt, seed, n, int(w), fmt))
        self.idempotent[idem] = (asked, done)
        # Drawn to the end even if this client disconnects: it is billed either way.
        body = await asyncio.shield(done)
        if stall:
            await asyncio.sleep(self.k.stall_s)
        return web.json_response(body)

    async def _draw(self, key: Key, prompt: str, seed: int, n: int, side: int, fmt: str) -> dict[str, Any]:
        await asyncio.sleep(self.k.job_s)
        self.charged[key] += 1
        pngs = [self.image(prompt, seed + i, side)[0] for i in range(n)]
        if fmt == "b64_json":
            return images_response(pngs)
        return {"created": int(time.time()), "data": [
            {"url": self.publish(png, self.now() + self.k.url_ttl_s, query=self.file_query())} for png in pngs]}


# -- Black Forest Labs --------------------------------------------------------------------------------

class BFLSim(_Sim):
    """FLUX API: submit, then poll polling_url; samples are signed URLs that expire."""

    kind = "bfl"

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

    async def submit(self, request: web.Request) -> web.Response:
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
        job = self.new_job(prompt, int(seed or 0), int(side), output_format=body.get("output_format", "jpeg"))
        return web.json_response({"id": job.id, "polling_url": f"{self.origin}/v1/get_result?id={job.id}",
                                  "cost": 4.0})

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
    `moderate` behaves like FLUX's safety checker: a black image with has_nsfw_concepts true."""

    kind = "fal"

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
        return web.json_response({"request_id": job.id, **self._urls(request, job.id), "queue_position": 0})

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
    """Predictions API with `Prefer: wait` (held until done or the wait runs out), then polling."""

    kind = "replicate"

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
            status = "starting" if self.now() < job.created + self.k.job_s / 3 else "processing"
        elif job.outcome == "ok":
            status, output = "succeeded", [job.url]
        elif job.outcome == "moderated":
            status, error = "failed", "NSFW content detected. Try running it again, or try a different prompt."
        else:
            status, error = "failed", job.extra.get("error", "Prediction failed: CUDA out of memory")
        get = f"{self.origin}/v1/predictions/{job.id}"
        return {"id": job.id, "model": job.extra.get("model"), "version": job.extra.get("version"),
                "input": job.extra.get("input"), "logs": "", "output": output, "data_removed": False,
                "error": error, "status": status, "created_at": _now_iso(),
                "urls": {"get": get, "cancel": f"{get}/cancel", "web": f"https://replicate.com/p/{job.id}"}}

    async def create(self, request: web.Request) -> web.Response:
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
        return web.json_response(self._prediction(job), status=201)

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
        if pred["status"] in ("starting", "processing"):
            job.outcome, job.extra["error"] = "failed", "canceled"
            pred["status"] = "canceled"
        return web.json_response(pred)


# -- Stability AI -------------------------------------------------------------------------------------------

_STABILITY_RATIOS = {"16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21"}


class StabilitySim(_Sim):
    """v2beta stable-image generate: multipart in, image bytes (or JSON base64) out."""

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

    async def generate(self, request: web.Request) -> web.Response:
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
            return web.json_response({"image": base64.b64encode(data).decode("ascii"), "finish_reason": reason,
                                      "seed": seed})
        return web.Response(body=data, content_type=ctype, headers={"finish-reason": reason, "seed": str(seed)})


# -- Ideogram ------------------------------------------------------------------------------------------------

class IdeogramSim(_Sim):
    """Ideogram 3.0 generate: multipart in, ephemeral URLs out; unsafe images withheld."""

    kind = "ideogram"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/ideogram-v3/generate", self.generate)

    def error(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
              headers: Mapping[str, str] | None = None) -> web.Response:
        # Ideogram's error body shape is not documented where we looked; FastAPI's {"detail"} is assumed.
        return web.json_response({"detail": message}, status=status, headers=headers)

    async def generate(self, request: web.Request) -> web.Response:
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
        return web.json_response({"created": _now_iso(), "data": [{
            "prompt": prompt, "resolution": f"{side}x{side}", "is_image_safe": safe, "seed": seed,
            "url": url, "style_type": "GENERAL"}]})


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
