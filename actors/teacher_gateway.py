"""One gateway per teacher: the only way the system pays for an image.

A gateway keeps its teacher's client-side limits (`rpm` paced by a leaky
bucket, `max_in_flight` by a semaphore), retries what can be retried (429,
5xx, timeouts; exponential backoff with full jitter, or the server's
Retry-After), never spends past `budget`, and never pays twice for one key
(teacher, prompt, seed, size) that it knows it bought: the ledger
(`evolve/ledger.py`) remembers every purchase across restarts, and concurrent
requests for the same key share one call.

Every paid call is a row in the ledger before it goes out (`sending`: counted
as spent, uncertain), and its answer settles it: `unbilled` (an HTTP error
answer), `open` (a billed job to collect), `bought`, `failed` or `refused`.
A call whose outcome stays unknown (timed out, connection lost after the
request went out, the gateway killed while it was in flight) stays counted as
`uncertain` spend. Where the server honours Idempotency-Key (this project's
own servers) it is simply asked again; elsewhere (every public API) the image
is not bought again unless the teacher says `on_uncertain: rebuy`, which
counts the second charge too. Budgets count certain + uncertain spend.

    gw = TeacherGateway(cfg, base_url, store_root, ledger_path, size)   # plain, in one event loop
    handle = start_gateway(cfg, base_url, store_root, ledger_path, size)  # Ray actor "teacher:<name>"
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import ray
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from actors.teacher_http import GeneratedImage, TeacherHTTPError
from actors.providers import ImageJob, ProviderError, make_provider
from evolve.config import TeacherConfig
from evolve.ledger import Ledger, Totals
from evolve.store import ImageStore

log = logging.getLogger(__name__)

_EPS = 1e-9  # float slack when comparing spend with budget


class BudgetExceeded(RuntimeError):
    """Paying for one more image would take the teacher past its budget
    (certain spend plus uncertain: calls in flight or of unknown outcome)."""

    def __init__(self, teacher: str, spent: float, budget: float, uncertain: float = 0.0) -> None:
        super().__init__(teacher, spent, budget, uncertain)  # args make it picklable (Ray)
        self.teacher, self.spent, self.budget, self.uncertain = teacher, spent, budget, uncertain

    def __str__(self) -> str:
        extra = f" + {self.uncertain:.4f} uncertain" if self.uncertain else ""
        return f"teacher {self.teacher}: budget {self.budget:.4f} reached (spent {self.spent:.4f}{extra})"


class TeacherGatewayError(RuntimeError):
    """A purchase failed for good: a permanent error, or retries ran out.
    `kind` types it (ProviderError kinds: content_policy, bad_request, auth,
    credits, invalid_image, safety_placeholder, expired, failed, transient...)."""

    def __init__(self, teacher: str, prompt: str, seed: int, attempts: int,
                 status: int | None, cause: str, permanent: bool, kind: str = "failed") -> None:
        super().__init__(teacher, prompt, seed, attempts, status, cause, permanent, kind)
        self.teacher, self.prompt, self.seed = teacher, prompt, seed
        self.attempts, self.status, self.cause, self.permanent = attempts, status, cause, permanent
        self.kind = kind

    def __str__(self) -> str:
        how = "permanent error" if self.permanent else f"gave up after {self.attempts} attempts"
        return f"teacher {self.teacher}: {self.prompt!r} seed {self.seed}: {how}: {self.cause}"


class GatewayMetrics:
    """Per-teacher metrics for the Ray dashboard / Prometheus (`ray.util.metrics`;
    outside a Ray worker they cost nothing and go nowhere)."""

    def __init__(self, teacher: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"teacher": teacher}
        keys = ("teacher",)
        self.requests = Counter("evolve_teacher_requests", "HTTP calls to the teacher, by outcome",
                                tag_keys=("teacher", "outcome"))
        self.retries = Counter("evolve_teacher_retries", "calls retried", tag_keys=keys)
        self.throttled = Counter("evolve_teacher_throttled", "429 answers", tag_keys=keys)
        self.bought = Counter("evolve_teacher_images_bought", "images paid for", tag_keys=keys)
        self.cache_hits = Counter("evolve_teacher_cache_hits", "images served from the ledger", tag_keys=keys)
        self.spend = Gauge("evolve_teacher_spend_usd", "money spent on this teacher (certain + uncertain)",
                           tag_keys=keys)
        self.uncertain = Gauge("evolve_teacher_spend_uncertain_usd",
                               "of which calls in flight or of unknown outcome", tag_keys=keys)
        self.latency = Histogram("evolve_teacher_latency_s", "seconds per teacher call",
                                 boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
                                 tag_keys=keys)

    def spent(self, totals: Totals) -> None:
        self.spend.set(totals.spent, tags=self.tags)
        self.uncertain.set(totals.uncertain, tags=self.tags)

    def call(self, seconds: float, outcome: str) -> None:
        self.requests.inc(1, tags={**self.tags, "outcome": outcome})
        self.latency.observe(seconds, tags=self.tags)


def _is_uncertain(exc: BaseException) -> bool:
    """A paid call that may have been billed: sent, but no answer came (timed out,
    connection lost after sending)."""
    return bool(getattr(exc, "uncertain", False))


_UNKNOWN_SKIPPED = ("an earlier paid call for this image may have been billed (its outcome is unknown); "
                    "not bought again (on_uncertain: skip)")


def _kind(exc: TeacherHTTPError) -> str:
    return exc.kind if isinstance(exc, ProviderError) else ("transient" if exc.retryable else "failed")


# Refusals of the prompt itself: never sent again. A safety placeholder (a blank
# image where the provider's filter flagged the result) is one too. (auth,
# credits, not_found are about the account or the config, not the prompt.)
_PROMPT_REFUSALS = ("content_policy", "bad_request", "safety_placeholder")


class TeacherGateway:
    def __init__(self, cfg: TeacherConfig | Mapping[str, Any], base_url: str, store_root: str | Path,
                 ledger_path: str | Path, size: int, *, max_attempts: int | None = None,
                 timeout_s: float | None = None, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0) -> None:
        self.cfg = cfg if isinstance(cfg, TeacherConfig) else TeacherConfig.model_validate(cfg)
        self.name = self.cfg.name
        self.base_url = base_url
        self.size = int(size)
        self.model = self.cfg.model or self.cfg.name
        # The teacher's own settings; the keywords override them (tests, benchmarks).
        self.max_attempts = max_attempts or self.cfg.max_attempts
        self.timeout_s = timeout_s or self.cfg.timeout_s
        self.idempotent = self.cfg.honours_idempotency
        # A call of unknown outcome is asked again only where that cannot pay twice
        # (an idempotent server) or where the teacher says so (on_uncertain: rebuy).
        self.asks_unknown_again = self.idempotent or self.cfg.on_uncertain == "rebuy"
        self._backoff = wait_random_exponential(multiplier=backoff_base_s, max=backoff_max_s)
        # Read once, kept private: never logged, never part of a message or repr.
        self._api_key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        self._store = ImageStore(store_root)
        self._ledger = Ledger(ledger_path)
        # Calls that were going out when an earlier gateway of this teacher died:
        # nobody knows whether they were billed.
        for call in self._ledger.calls_in(self.name, ("sending",)):
            self._ledger.mark(call["id"], "uncertain", why="the gateway stopped while this call was in flight")
        self._provider = make_provider("openai" if self.cfg.kind == "embedded" else self.cfg.kind,
                                       base_url, self.model, self._api_key, timeout_s=self.timeout_s,
                                       poll_interval_s=self.cfg.poll_interval_s, max_poll_s=self.cfg.max_poll_s,
                                       extra=self.cfg.provider_options)
        self._no_credits: str | None = None  # set when the provider says the account is empty
        self._inflight: dict[tuple[str, str, int, int], asyncio.Task[dict[str, Any]]] = {}
        # One request per 60/rpm seconds, no burst: providers enforce RPM over
        # sub-minute windows, so a minute's quota sent at once would be throttled.
        self._limiter = AsyncLimiter(1, 60.0 / self.cfg.rpm)
        self._slots = asyncio.Semaphore(self.cfg.max_in_flight)
        self._pause_until = 0.0  # after a 429 with Retry-After, hold back every request
        self._session: aiohttp.ClientSession | None = None
        self._counts = {"paid_calls": 0, "cache_hits": 0, "retries": 0, "throttled_429": 0,
                        "errors": 0, "budget_refusals": 0, "resumed_jobs": 0, "refused": 0,
                        "uncertain_now": 0, "rebought": 0, "skipped_uncertain": 0,
                        "failed_before": 0}
        self._metrics = GatewayMetrics(self.name)
        self._metrics.spent(self._totals())

    # -- public --------------------------------------------------------------
    async def render(self, prompt: str, seed: int) -> dict[str, Any]:
        """The image for (prompt, seed): from the ledger if already bought, else bought once.
        `price` is what the image cost when bought; `cached` says this call paid nothing."""
        seed = int(seed)
        key = (self.name, prompt, seed, self.size)
        entry = self._ledger.lookup(*key)
        if entry is not None:
            if self._store.has(entry["ref"]):
                self._counts["cache_hits"] += 1
                self._metrics.cache_hits.inc(1, tags=self._metrics.tags)
                return self._result(entry, cached=True)
            log.warning("teacher %s: image %s for %r seed %d is in the ledger but not the store; "
                        "buying it again", self.name, entry["ref"], prompt, seed)
        task = self._inflight.get(key)
        if task is not None:  # someone is paying for this key right now: share their call
            self._counts["cache_hits"] += 1
            return self._result(await asyncio.shield(task), cached=True)
        task = asyncio.ensure_future(self._buy(prompt, seed, lost=entry is not None))
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._settled(key, t))
        # shield: a cancelled caller must not cancel a call others share or that is paid.
        return self._result(await asyncio.shield(task), cached=False)

    async def render_many(self, items: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
        """Render all items concurrently; a failed item yields {"error": ...} in its place."""
        async def one(prompt: str, seed: int) -> dict[str, Any]:
            try:
                return await self.render(prompt, seed)
            except (BudgetExceeded, TeacherGatewayError) as exc:
                return {"teacher": self.name, "prompt": prompt, "seed": int(seed),
                        "error": str(exc), "error_type": type(exc).__name__,
                        "kind": getattr(exc, "kind", "budget")}
        return list(await asyncio.gather(*(one(p, s) for p, s in items)))

    def idempotency_key(self, prompt: str, seed: int) -> str:
        """One key per purchase (teacher, model, prompt, seed, size), the same after
        a restart: a server that honours it never bills a repeated call twice."""
        ident = json.dumps([self.name, self.model, prompt, int(seed), self.size])
        return "evolve-" + hashlib.sha256(ident.encode()).hexdigest()[:32]

    def stats(self) -> dict[str, Any]:
        """Spend is certain + uncertain (what budgets count); `uncertain` is the
        part whose calls may or may not have been billed."""
        totals = self._totals()
        return {"teacher": self.name, "spent": totals.spent, "certain": totals.certain,
                "uncertain": totals.uncertain, "uncertain_calls": totals.uncertain_calls,
                "budget": self.cfg.budget, "images": totals.images, "in_flight": len(self._inflight),
                "open_jobs": len(self._ledger.calls_in(self.name, ("open",))), **self._counts}

    def pid(self) -> int:
        """The process this gateway runs in (operators and the kill test signal it)."""
        return os.getpid()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- buying --------------------------------------------------------------
    def _settled(self, key: tuple[str, str, int, int], task: asyncio.Task[dict[str, Any]]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported as lost

    def _totals(self) -> Totals:
        return self._ledger.totals(self.name)

    async def _buy(self, prompt: str, seed: int, lost: bool = False) -> dict[str, Any]:
        key = (self.name, prompt, seed, self.size)
        earlier = [] if lost else self._ledger.calls(*key)
        for call in earlier:
            if call["state"] == "refused":
                self._counts["refused"] += 1
                raise TeacherGatewayError(self.name, prompt, seed, 0, call.get("status"),
                                          f"refused earlier: {call.get('why', '')}", True, call.get("kind", "refused"))
            if call["state"] == "failed" and call["price"] > 0:
                # Billed once for nothing (a failed job, an expired URL): not paid for again.
                self._counts["failed_before"] += 1
                raise TeacherGatewayError(self.name, prompt, seed, 0, call.get("status"),
                                          f"failed earlier, billed without an image; not bought again: "
                                          f"{call.get('why', '')}", True, call.get("kind", "failed"))
        opened = next((c for c in reversed(earlier) if c["state"] == "open"), None)
        if opened is not None:
            # Paid before a restart, never collected: collect it now, free.
            self._counts["resumed_jobs"] += 1
            job = ImageJob.from_record(opened["job"])
            return self._keep(prompt, seed, await self._collect(prompt, seed, job, opened), opened)
        unknown = next((c for c in reversed(earlier) if c["state"] == "uncertain"), None)
        if self._no_credits:
            raise TeacherGatewayError(self.name, prompt, seed, 0, None, self._no_credits, True, "credits")
        if unknown is not None and not self.asks_unknown_again:
            self._counts["skipped_uncertain"] += 1
            raise TeacherGatewayError(self.name, prompt, seed, 0, None, _UNKNOWN_SKIPPED, True, "uncertain")
        if unknown is not None and not self.idempotent:
            self._counts["rebought"] += 1
            unknown = None  # that charge stays counted; this is a new purchase
        # An idempotent server is asked again under the same key: it bills it at most once.
        job, call = await self._submit_with_retries(prompt, seed, unknown)
        if job.images is None:
            # An image not in hand yet (a job to poll, a URL to fetch) is logged
            # before collecting: a restart then collects it instead of paying again.
            self._ledger.mark(call, "open", job=job.to_record())
        row = self._ledger.call(call)
        return self._keep(prompt, seed, await self._collect(prompt, seed, job, row), row)

    def _reserve(self, prompt: str, seed: int, call: dict[str, Any] | None) -> int:
        """The ledger row of the next paid call, written (as `sending`, counted as
        spent) before the call goes out; refused if the budget cannot take it."""
        price = self.cfg.price_per_image
        already = call is not None and call["state"] in ("sending", "uncertain")  # counted already
        totals = self._totals()
        if not already and totals.spent + price > self.cfg.budget + _EPS:
            self._counts["budget_refusals"] += 1
            raise BudgetExceeded(self.name, totals.certain, self.cfg.budget, totals.uncertain)
        if call is None:
            return self._ledger.begin(self.name, prompt, seed, self.size, price)
        self._ledger.mark(call["id"], "sending", price=price)
        return call["id"]

    async def _submit_with_retries(self, prompt: str, seed: int,
                                   call: dict[str, Any] | None) -> tuple[ImageJob, int]:
        """The paid call, retried while retrying can help and cannot pay twice for
        nothing; returns the job and its ledger row. A prompt refused for good is
        recorded so it is never sent again."""
        attempts, unknown_before = 0, False

        async def once() -> tuple[ImageJob, int]:
            nonlocal attempts, call, unknown_before
            attempts += 1
            if unknown_before and call is None:
                self._counts["rebought"] += 1  # the last call may have been billed: this one pays again
            row: list[int] = []  # the ledger row, once the call is about to go out
            try:
                return await self._attempt(prompt, seed, call, row), row[0]
            except TeacherHTTPError as exc:
                if row:
                    call = self._settle_failed_call(row[0], exc)
                    unknown_before = _is_uncertain(exc)
                raise

        retrying = AsyncRetrying(stop=stop_after_attempt(self.max_attempts), wait=self._wait,
                                 retry=retry_if_exception(self._retryable), before_sleep=self._before_retry,
                                 reraise=True)
        try:
            return await retrying(once)
        except TeacherHTTPError as exc:
            self._counts["errors"] += 1
            kind = _kind(exc)
            if _is_uncertain(exc) and not self.asks_unknown_again:
                raise TeacherGatewayError(self.name, prompt, seed, attempts, exc.status,
                                          f"{exc}; {_UNKNOWN_SKIPPED}", True, "uncertain") from None
            if kind == "credits":
                self._no_credits = str(exc)[:500]
            raise TeacherGatewayError(self.name, prompt, seed, attempts, exc.status, str(exc),
                                      permanent=not exc.retryable, kind=kind) from None

    def _settle_failed_call(self, row: int, exc: TeacherHTTPError) -> dict[str, Any] | None:
        """Record what a failed paid call cost; returns the row the next attempt
        may reuse (None: the next attempt is a new purchase)."""
        kind = _kind(exc)
        detail = {"kind": kind, "status": exc.status, "why": str(exc)[:500]}
        if _is_uncertain(exc):
            self._counts["uncertain_now"] += 1
            self._ledger.mark(row, "uncertain", **detail)
            log.warning("teacher %s: a paid call's outcome is unknown (%s); counted as spent", self.name, exc)
            if self.idempotent:
                return self._ledger.call(row)  # asked again under the same key: billed at most once
            return None  # asked again (on_uncertain: rebuy) only as a new purchase
        # A 2xx answer was billed even if what came with it is unusable; an HTTP
        # error answer (429, 5xx, 4xx) is not billed (ImageProvider's docstring).
        billed = exc.status is not None and 200 <= exc.status < 300
        if kind in _PROMPT_REFUSALS:
            self._ledger.mark(row, "refused", price=self.cfg.price_per_image if billed else 0.0, **detail)
        elif billed:
            self._ledger.mark(row, "failed", **detail)
        else:
            self._ledger.mark(row, "unbilled", price=0.0, **detail)
            return self._ledger.call(row)
        return None

    def _retryable(self, exc: BaseException) -> bool:
        if not (isinstance(exc, TeacherHTTPError) and exc.retryable):
            return False
        return not _is_uncertain(exc) or self.asks_unknown_again

    async def _collect(self, prompt: str, seed: int, job: ImageJob, call: dict[str, Any]) -> GeneratedImage:
        """Poll, download and check a paid job (free, repeatable). A job that can
        still finish stays open for the next call; one that cannot is recorded as
        money spent for nothing (unless the provider documents it as free)."""
        try:
            images = await self._provider.collect(self._client(), job, self.size)
        except ProviderError as exc:
            self._counts["errors"] += 1
            if not exc.retryable:
                # A moderated job is a refusal of the prompt (never sent again); any
                # other dead job is bought again only if it was free.
                state = "refused" if exc.kind in _PROMPT_REFUSALS else "failed"
                price = 0.0 if getattr(exc, "free", False) else call["price"]
                self._ledger.mark(call["id"], state, price=price, kind=exc.kind, status=exc.status,
                                  why=str(exc)[:500], job=job.to_record())
            raise TeacherGatewayError(self.name, prompt, seed, 1, exc.status, str(exc),
                                      permanent=not exc.retryable, kind=exc.kind) from None
        return images[0]

    def _keep(self, prompt: str, seed: int, image: GeneratedImage, call: dict[str, Any]) -> dict[str, Any]:
        # Store first, then ledger: a ledger entry always points at a stored image.
        png, native = _to_size(image.png, self.size)
        ref = self._store.put(png)
        entry = {"teacher": self.name, "prompt": prompt, "seed": seed, "size": self.size,
                 "ref": ref, "price": call["price"], "ts": time.time(), "call": call["id"]}
        if image.flaws:
            entry["flaws"] = image.flaws
        if native != self.size:
            entry["native_size"] = native
        entry = self._ledger.record(entry)
        self._counts["paid_calls"] += 1
        self._metrics.bought.inc(1, tags=self._metrics.tags)
        self._metrics.spent(self._totals())
        return entry

    async def _attempt(self, prompt: str, seed: int, call: dict[str, Any] | None, row: list[int]) -> ImageJob:
        """One paid call, when the limits let it go out. Its ledger row is written
        (into `row`) only then, after every wait: a call still queued here when
        the process dies was never sent, and is not counted."""
        async with self._slots:
            loop = asyncio.get_running_loop()
            while (delay := self._pause_until - loop.time()) > 0:
                await asyncio.sleep(delay)
            await self._limiter.acquire()
            row.append(self._reserve(prompt, seed, call))  # no await between the budget check and the row
            t0 = time.perf_counter()
            try:
                job = await self._provider.submit(self._client(), prompt, seed, self.size,
                                                  idempotency_key=self.idempotency_key(prompt, seed))
            except TeacherHTTPError as exc:
                self._metrics.call(time.perf_counter() - t0, "retryable" if exc.retryable else "permanent")
                if exc.status == 429 and exc.retryable:
                    self._counts["throttled_429"] += 1
                    self._metrics.throttled.inc(1, tags=self._metrics.tags)
                    if exc.retry_after:
                        self._pause_until = max(self._pause_until, loop.time() + exc.retry_after)
                raise
            self._metrics.call(time.perf_counter() - t0, "ok")
            return job

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TeacherHTTPError) and exc.retry_after is not None:
            # The server knows when it will take us again; a little jitter spreads the herd.
            return exc.retry_after + random.uniform(0, 0.05 + 0.1 * exc.retry_after)
        return self._backoff(state)

    def _before_retry(self, state: RetryCallState) -> None:
        self._counts["retries"] += 1
        self._metrics.retries.inc(1, tags=self._metrics.tags)
        exc = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        log.info("teacher %s: attempt %d failed (%s); retrying in %.2fs",
                 self.name, state.attempt_number, exc, sleep)

    def _client(self) -> aiohttp.ClientSession:
        # Made lazily: a session belongs to the event loop it is first used in.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cfg.max_in_flight), trust_env=False)
        return self._session

    def _result(self, entry: Mapping[str, Any], cached: bool) -> dict[str, Any]:
        out = {k: entry[k] for k in ("teacher", "prompt", "seed", "size", "ref", "price")}
        out["flaws"] = list(entry.get("flaws", []))
        out["cached"] = cached
        return out


def _to_size(png: bytes, size: int) -> tuple[bytes, int]:
    """A teacher image as the run's size x size PNG (providers that pick their
    own resolution send ~1024 px): centre-cropped to a square, then downscaled.
    Returns the PNG and the side it came in at."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        w, h = im.size
        if (w, h) == (size, size):
            return png, size
        side = min(w, h)
        im = im.convert("RGB").crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        buf = io.BytesIO()
        im.resize((size, size), Image.Resampling.LANCZOS).save(buf, format="PNG")
    return buf.getvalue(), max(w, h)


# The actor runs every render on one event loop; many may wait on the limiter at once.
# A gateway killed (its node lost, kill -9) is started again and the calls it was
# running are asked again: the ledger makes that safe (what was bought is
# answered from it, what was in flight is counted as uncertain).
RemoteTeacherGateway = ray.remote(num_cpus=0.05, max_concurrency=1000, max_restarts=-1,
                                  max_task_retries=-1)(TeacherGateway)


def start_gateway(cfg: TeacherConfig, base_url: str, store_root: str | Path, ledger_path: str | Path,
                  size: int, **options: Any) -> Any:
    """Create the named Ray actor `teacher:<name>` for one teacher; returns its handle.
    Its limits, timeout and policies come from `cfg`; `options` override the
    gateway's keywords (max_attempts, timeout_s, backoff_base_s, backoff_max_s).

    It runs on the caller's node (the driver's): every process that writes the
    ledger is then on one host, which SQLite's WAL needs (it shares memory
    between them), even when the run folder is a network mount."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return RemoteTeacherGateway.options(name=f"teacher:{cfg.name}", scheduling_strategy=here).remote(
        cfg, base_url, str(store_root), str(ledger_path), size, **options)
