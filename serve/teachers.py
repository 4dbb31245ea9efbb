"""Embedded teachers: shapes-world renderers behind the OpenAI Images API.

Each teacher is a real HTTP server on 127.0.0.1, so the gateways meet the
same protocol, throttling and failures as with a paid provider:

    POST /v1/images/generations  {"model", "prompt", "n", "size": "32x32",
                                  "response_format": "b64_json", "seed"}
        -> 200 {"created", "data": [{"b64_json", "flaws"}]}
    GET  /v1/models              -> the one teacher, as a model
    GET  /health                 -> {"status": "ok"}
    GET  /stats                  -> request/status/concurrency counters (for tests and dashboards)

A prompt is read as free text (`evolve.shapes.reading.read`): grammar prompts
("a red circle") and any text that reads as a shapes scene ("A photo of a red
circle.", "a square to the left of a triangle") are drawn; text that does not
is a 400 naming the prompt. The drawing is keyed by the scene's canonical
(grammar) text, not its spelling: "A red circle." draws, with the same seed,
the very image "a red circle" draws (and grammar prompts draw what they
always did).

`seed` (default 0) and the per-image `flaws` list are extensions (OpenAI has
neither), and so is `Idempotency-Key` (as payment APIs have it): a repeated
key gets the first call's billed answer back, unbilled, so a client that died
mid-call and asks again pays once. Other clients' fields (quality, style,
...) are ignored.
Requests, auth and errors are checked and shaped by serve/openai_images.py;
errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}:
400 bad JSON / field / n / size / prompt that reads as no scene, 401 wrong
key, 404 unknown model, 413 body over 64 KiB, 422 reused Idempotency-Key,
429 above `server_rpm` (with Retry-After), 503 at `error_rate`.

Ways to run them: `build_teacher_app` (one aiohttp app), `TeacherServers`
(async, all teachers on free ports), `TeacherServersThread` (the same for
synchronous code), `EmbeddedTeacherHost` (a Ray actor that hosts them, visible
on the dashboard), and `serve_forever` (the `evolve teachers serve` CLI).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

import ray
from aiohttp import web

from evolve.config import TeacherConfig
from evolve.shapes.grammar import Prompt, PromptError
from evolve.shapes.reading import read
from evolve.shapes.render import teacher_render, to_png
from serve.openai_images import (ApiError, ImagesPolicy, check_bearer, images_response, model_list,
                                 parse_images_request, read_body)
from serve.server_thread import ServerThread

log = logging.getLogger(__name__)

MAX_N = 10  # OpenAI's limit on images per request
MAX_BODY_BYTES = 65536  # a request is a prompt and a few fields


class _TeacherState:
    """Per-server counters and limits (one event loop, so no locks)."""

    def __init__(self, cfg: TeacherConfig, size: int, api_key: str | None, rate_window_s: float) -> None:
        self.cfg = cfg
        self.size = size
        self.api_key = api_key
        self.window_s = rate_window_s
        # server_rpm scaled to the window (at least one request per window); a short
        # window lets tests see 429s and Retry-After in under a second.
        self.limit = (max(1, int(cfg.server_rpm * rate_window_s / 60.0))
                      if cfg.server_rpm is not None else None)
        self.accepted: deque[float] = deque()
        self.rng = random.Random(cfg.seed)
        self.statuses: Counter[int] = Counter()
        self.requests = 0
        self.images = 0          # images billed
        self.replayed = 0        # answers replayed for a repeated Idempotency-Key (not billed)
        self.in_flight = 0
        self.max_in_flight = 0
        # Idempotency-Key -> the billed answer (or the task computing it), so a
        # client that crashed mid-call gets its paid image back instead of paying again.
        self.idempotent: dict[str, tuple[tuple, asyncio.Future]] = {}

    def admit(self, now: float) -> float | None:
        """Sliding window: None if the request may go on, else seconds until it could."""
        if self.limit is None:
            return None
        while self.accepted and self.accepted[0] <= now - self.window_s:
            self.accepted.popleft()
        if len(self.accepted) >= self.limit:
            return self.accepted[0] + self.window_s - now
        self.accepted.append(now)
        return None

    def stats(self) -> dict[str, Any]:
        return {"teacher": self.cfg.name, "requests": self.requests, "images": self.images,
                "replayed": self.replayed, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}}


_STATE = web.AppKey("teacher_state", _TeacherState)


def _respond(e: ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers or None)


def _policy(cfg: TeacherConfig) -> ImagesPolicy:
    """OpenAI's limits, `seed` the one extra (any integer: the renderer takes any),
    and other clients' fields (quality, style, ...) ignored, not refused."""
    return ImagesPolicy(cfg.name, aliases=(cfg.model,) if cfg.model else (), max_n=MAX_N,
                        extras=frozenset({"seed"}), unknown_fields="ignore", seed_range=None)


@web.middleware
async def _auth_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    st = request.app[_STATE]
    try:
        if request.path.startswith("/v1/"):
            check_bearer(request.headers.get("Authorization"), st.api_key)
        resp = await handler(request)
    except ApiError as e:
        resp = _respond(e)
    except web.HTTPException as exc:  # aiohttp's own 404/405/413, answered in OpenAI's shape
        resp = _respond(ApiError(exc.status, exc.reason))
    except Exception:
        log.exception("teacher %s: internal error", st.cfg.name)
        resp = _respond(ApiError(500, "The server had an error processing your request.", type="server_error"))
    st.statuses[resp.status] += 1
    return resp


async def _generations(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    st.requests += 1
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        return await _generate(request, st)
    finally:
        st.in_flight -= 1


async def _generate(request: web.Request, st: _TeacherState) -> web.Response:
    """Check (ApiErrors: the middleware answers them), then draw or replay."""
    cfg = st.cfg
    wait = st.admit(asyncio.get_running_loop().time())
    if wait is not None:
        headers = {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(math.ceil(wait * 1000))}
        raise ApiError(429, f"Rate limit reached for {cfg.name}: {cfg.server_rpm:g} requests per minute. "
                       f"Please try again in {wait:.2f}s.", code="rate_limit_exceeded", type="requests",
                       headers=headers)
    req = parse_images_request(await read_body(request.content_length, request.read, MAX_BODY_BYTES), _policy(cfg))
    want = f"{st.size}x{st.size}"
    if req.size not in (None, want):
        raise ApiError(400, f"Invalid size {req.size!r}: {cfg.name} draws {want}.", "size", "invalid_value")
    try:
        scene = read(req.prompt)
    except PromptError as exc:  # its message names the prompt
        raise ApiError(400, f"prompt outside the shapes world: {exc}", "prompt", "invalid_prompt") from None
    seed, n = (req.seed if req.seed is not None else 0), req.n

    if cfg.error_rate and st.rng.random() < cfg.error_rate:
        raise ApiError(503, "The engine is currently overloaded, please try again later.", code="overloaded",
                       type="server_error")
    key = request.headers.get("Idempotency-Key")
    if key:
        asked = (req.prompt, seed, n)
        seen = st.idempotent.get(key)
        if seen is not None:  # the same call again (a client restarted): the billed answer, free
            if seen[0] != asked:
                raise ApiError(422, "This Idempotency-Key was used with other parameters.",
                               code="idempotency_key_reused")
            st.replayed += 1
            return web.json_response(await asyncio.shield(seen[1]))
        done = asyncio.ensure_future(_draw(st, scene, seed, n))
        st.idempotent[key] = (asked, done)
        # Drawn to the end even if this client disconnects: it is billed either way.
        return web.json_response(await asyncio.shield(done))
    return web.json_response(await _draw(st, scene, seed, n))


async def _draw(st: _TeacherState, scene: Prompt, seed: int, n: int) -> dict[str, Any]:
    await asyncio.sleep(st.cfg.latency_s * n)  # drawing takes time, as a real model's would
    pngs, flaws = [], []
    for i in range(n):
        # The scene's canonical text keys the drawing: every spelling of a scene draws the same image.
        arr, fired = teacher_render(scene, seed + i, st.size, st.cfg.flaws, st.cfg.seed)
        pngs.append(to_png(arr))
        flaws.append({"flaws": list(fired)})
    st.images += n
    return images_response(pngs, extra_per_image=flaws)


async def _models(request: web.Request) -> web.Response:
    return web.json_response(model_list(request.app[_STATE].cfg.name, 0))


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "teacher": request.app[_STATE].cfg.name})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].stats())


def build_teacher_app(cfg: TeacherConfig, size: int, *, api_key: str | None = None,
                      rate_window_s: float = 60.0) -> web.Application:
    """One teacher's server. With `api_key`, /v1/* requires `Authorization: Bearer <key>`.
    `rate_window_s` shortens the sliding window of `server_rpm` (same rate) for tests."""
    app = web.Application(middlewares=[_auth_and_errors])
    app[_STATE] = _TeacherState(cfg, size, api_key, rate_window_s)
    app.router.add_post("/v1/images/generations", _generations)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/stats", _stats)
    return app


def api_keys_from_env(configs: Iterable[TeacherConfig]) -> dict[str, str]:
    """The key each teacher's server demands: the one its gateway will send."""
    return {c.name: os.environ[c.api_key_env] for c in configs
            if c.api_key_env and os.environ.get(c.api_key_env)}


def _as_configs(configs: Iterable[TeacherConfig | Mapping[str, Any]]) -> list[TeacherConfig]:
    return [c if isinstance(c, TeacherConfig) else TeacherConfig.model_validate(c) for c in configs]


class TeacherServers:
    """All embedded teachers of a run, each on its own port, in the current event loop."""

    def __init__(self) -> None:
        self._runners: dict[str, web.AppRunner] = {}
        self._apps: dict[str, web.Application] = {}
        self._urls: dict[str, str] = {}

    async def start(self, configs: Iterable[TeacherConfig | Mapping[str, Any]], size: int, *,
                    host: str = "127.0.0.1", port_base: int = 0,
                    api_keys: Mapping[str, str] | None = None,
                    rate_window_s: float = 60.0) -> dict[str, str]:
        """Start a server per embedded teacher (kind 'openai' ones are remote: skipped).
        Port 0 lets the OS choose; else teacher i gets port_base + i.
        `api_keys` None: take each key from the teacher's `api_key_env`; {}: no auth."""
        cfgs = [c for c in _as_configs(configs) if c.kind == "embedded"]
        keys = api_keys_from_env(cfgs) if api_keys is None else dict(api_keys)
        try:
            for i, cfg in enumerate(cfgs):
                app = build_teacher_app(cfg, size, api_key=keys.get(cfg.name), rate_window_s=rate_window_s)
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                self._runners[cfg.name] = runner
                sock = _bind(host, port_base + i if port_base else 0)
                await web.SockSite(runner, sock).start()
                self._apps[cfg.name] = app
                self._urls[cfg.name] = f"http://{host}:{sock.getsockname()[1]}/v1"
        except BaseException:
            await self.stop()
            raise
        return dict(self._urls)

    def urls(self) -> dict[str, str]:
        return dict(self._urls)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: app[_STATE].stats() for name, app in self._apps.items()}

    async def stop(self) -> None:
        runners, self._runners = self._runners, {}
        self._apps, self._urls = {}, {}
        for runner in runners.values():
            await runner.cleanup()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class TeacherServersThread(ServerThread):
    """`TeacherServers` on a background thread's event loop, for synchronous callers.

        with TeacherServersThread(cfgs, 32) as urls: ...
    """

    thread_name = "teacher-servers"

    def __init__(self, configs: Iterable[TeacherConfig | Mapping[str, Any]], size: int, **start_kw: Any) -> None:
        super().__init__()
        self._args = (list(configs), size)
        self._kw = start_kw
        self._servers = TeacherServers()

    async def _start(self) -> dict[str, str]:
        return await self._servers.start(*self._args, **self._kw)

    async def _stop(self) -> None:
        await self._servers.stop()

    def urls(self) -> dict[str, str]:
        return self._servers.urls()

    def stats(self) -> dict[str, dict[str, Any]]:
        return self.read(self._servers.stats)


class TeacherHost:
    """Hosts all embedded teacher servers inside one process (see EmbeddedTeacherHost)."""

    def __init__(self) -> None:
        self._servers = TeacherServers()

    async def start(self, configs: list[TeacherConfig | Mapping[str, Any]], size: int,
                    api_keys: Mapping[str, str] | None = None,
                    rate_window_s: float = 60.0) -> dict[str, str]:
        await self._servers.stop()  # idempotent restart
        return await self._servers.start(configs, size, api_keys=api_keys, rate_window_s=rate_window_s)

    async def urls(self) -> dict[str, str]:
        return self._servers.urls()

    async def stats(self) -> dict[str, dict[str, Any]]:
        return self._servers.stats()

    async def stop(self) -> None:
        await self._servers.stop()


# An async actor: its event loop keeps serving HTTP between method calls.
# Rendering 32x32 shapes is cheap, so a sliver of a CPU is enough.
EmbeddedTeacherHost = ray.remote(num_cpus=0.05, max_concurrency=100)(TeacherHost)


def serve_forever(configs: Iterable[TeacherConfig | Mapping[str, Any]], size: int,
                  host: str = "127.0.0.1", port_base: int = 0,
                  api_keys: Mapping[str, str] | None = None) -> None:
    """Run the teachers until Ctrl-C; prints "<name> <base_url>" per teacher."""
    async def main() -> None:
        servers = TeacherServers()
        urls = await servers.start(configs, size, host=host, port_base=port_base, api_keys=api_keys)
        try:
            for name, url in urls.items():
                print(f"{name} {url}", flush=True)
            await asyncio.Event().wait()
        finally:
            await servers.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
