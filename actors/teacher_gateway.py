"""One gateway per teacher: the only way the system pays for an image.

A gateway keeps its teacher's client-side limits (`rpm` paced by a leaky
bucket, `max_in_flight` by a semaphore), retries what can be retried (429,
5xx, timeouts; exponential backoff with full jitter, or the server's
Retry-After), never spends past `budget` (in-flight calls reserve their price
before they go out), and never pays twice for one key (teacher, prompt, seed,
size): the ledger remembers every purchase across restarts, and concurrent
requests for the same key share one call. Images go to the content-addressed
store, then the ledger, as soon as they arrive.

    gw = TeacherGateway(cfg, base_url, store_root, ledger_path, size)   # plain, in one event loop
    handle = start_gateway(cfg, base_url, store_root, ledger_path, size)  # Ray actor "teacher:<name>"
"""

from __future__ import annotations

import asyncio
import hashlib
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

from actors.openai_images import GeneratedImage, TeacherHTTPError, generate_images
from evolve.config import TeacherConfig
from evolve.ledger import Ledger
from evolve.store import ImageStore

log = logging.getLogger(__name__)

_EPS = 1e-9  # float slack when comparing spend with budget


class BudgetExceeded(RuntimeError):
    """Paying for one more image would take the teacher past its budget."""

    def __init__(self, teacher: str, spent: float, budget: float, reserved: float = 0.0) -> None:
        super().__init__(teacher, spent, budget, reserved)  # args make it picklable (Ray)
        self.teacher, self.spent, self.budget, self.reserved = teacher, spent, budget, reserved

    def __str__(self) -> str:
        extra = f" + {self.reserved:.4f} in flight" if self.reserved else ""
        return f"teacher {self.teacher}: budget {self.budget:.4f} reached (spent {self.spent:.4f}{extra})"


class TeacherGatewayError(RuntimeError):
    """A purchase failed for good: a permanent error, or retries ran out."""

    def __init__(self, teacher: str, prompt: str, seed: int, attempts: int,
                 status: int | None, cause: str, permanent: bool) -> None:
        super().__init__(teacher, prompt, seed, attempts, status, cause, permanent)
        self.teacher, self.prompt, self.seed = teacher, prompt, seed
        self.attempts, self.status, self.cause, self.permanent = attempts, status, cause, permanent

    def __str__(self) -> str:
        how = "permanent error" if self.permanent else f"gave up after {self.attempts} attempts"
        return f"teacher {self.teacher}: {self.prompt!r} seed {self.seed}: {how}: {self.cause}"


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, TeacherHTTPError) and exc.retryable


class TeacherGateway:
    def __init__(self, cfg: TeacherConfig | Mapping[str, Any], base_url: str, store_root: str | Path,
                 ledger_path: str | Path, size: int, *, max_attempts: int = 6, timeout_s: float = 60.0,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0) -> None:
        self.cfg = cfg if isinstance(cfg, TeacherConfig) else TeacherConfig.model_validate(cfg)
        self.name = self.cfg.name
        self.base_url = base_url
        self.size = int(size)
        self.model = self.cfg.model or self.cfg.name
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self._backoff = wait_random_exponential(multiplier=backoff_base_s, max=backoff_max_s)
        # Read once, kept private: never logged, never part of a message or repr.
        self._api_key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        self._store = ImageStore(store_root)
        self._ledger = Ledger(ledger_path)
        self._spent = self._ledger.spent(self.name)
        self._reserved_calls = 0
        self._inflight: dict[tuple[str, str, int, int], asyncio.Task[dict[str, Any]]] = {}
        # One request per 60/rpm seconds, no burst: providers enforce RPM over
        # sub-minute windows, so a minute's quota sent at once would be throttled.
        self._limiter = AsyncLimiter(1, 60.0 / self.cfg.rpm)
        self._slots = asyncio.Semaphore(self.cfg.max_in_flight)
        self._pause_until = 0.0  # after a 429 with Retry-After, hold back every request
        self._session: aiohttp.ClientSession | None = None
        self._counts = {"paid_calls": 0, "cache_hits": 0, "retries": 0, "throttled_429": 0,
                        "errors": 0, "budget_refusals": 0}

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
                return self._result(entry, cached=True)
            log.warning("teacher %s: image %s for %r seed %d is in the ledger but not the store; "
                        "buying it again", self.name, entry["ref"], prompt, seed)
        task = self._inflight.get(key)
        if task is not None:  # someone is paying for this key right now: share their call
            self._counts["cache_hits"] += 1
            return self._result(await asyncio.shield(task), cached=True)
        task = asyncio.ensure_future(self._buy(prompt, seed))
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
                        "error": str(exc), "error_type": type(exc).__name__}
        return list(await asyncio.gather(*(one(p, s) for p, s in items)))

    def idempotency_key(self, prompt: str, seed: int) -> str:
        """One key per purchase (teacher, model, prompt, seed, size), the same after
        a restart: a server that honours it never bills a repeated call twice."""
        ident = json.dumps([self.name, self.model, prompt, int(seed), self.size])
        return "evolve-" + hashlib.sha256(ident.encode()).hexdigest()[:32]

    def stats(self) -> dict[str, Any]:
        return {"teacher": self.name, "spent": self._spent, "budget": self.cfg.budget,
                "reserved": self._reserved_calls * self.cfg.price_per_image,
                "in_flight": len(self._inflight), **self._counts}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- buying --------------------------------------------------------------
    def _settled(self, key: tuple[str, str, int, int], task: asyncio.Task[dict[str, Any]]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported as lost

    async def _buy(self, prompt: str, seed: int) -> dict[str, Any]:
        price = self.cfg.price_per_image
        reserved = self._reserved_calls * price
        if self._spent + reserved + price > self.cfg.budget + _EPS:
            self._counts["budget_refusals"] += 1
            raise BudgetExceeded(self.name, self._spent, self.cfg.budget, reserved)
        self._reserved_calls += 1  # no await between the check and the reservation
        try:
            image = await self._call_with_retries(prompt, seed)
            # Store first, then ledger: a ledger entry always points at a stored image.
            ref = self._store.put(image.png)
            entry = {"teacher": self.name, "prompt": prompt, "seed": seed, "size": self.size,
                     "ref": ref, "price": price, "ts": time.time()}
            if image.flaws:
                entry["flaws"] = image.flaws
            entry = self._ledger.record(entry)
            self._spent += price
            self._counts["paid_calls"] += 1
            return entry
        finally:
            self._reserved_calls -= 1

    async def _call_with_retries(self, prompt: str, seed: int) -> GeneratedImage:
        attempts = 0

        async def once() -> GeneratedImage:
            nonlocal attempts
            attempts += 1
            return await self._attempt(prompt, seed)

        retrying = AsyncRetrying(stop=stop_after_attempt(self.max_attempts), wait=self._wait,
                                 retry=retry_if_exception(_retryable), before_sleep=self._before_retry,
                                 reraise=True)
        try:
            return await retrying(once)
        except TeacherHTTPError as exc:
            self._counts["errors"] += 1
            raise TeacherGatewayError(self.name, prompt, seed, attempts, exc.status, str(exc),
                                      permanent=not exc.retryable) from None

    async def _attempt(self, prompt: str, seed: int) -> GeneratedImage:
        async with self._slots:
            loop = asyncio.get_running_loop()
            while (delay := self._pause_until - loop.time()) > 0:
                await asyncio.sleep(delay)
            await self._limiter.acquire()
            try:
                images = await generate_images(self._client(), self.base_url, self.model, prompt, seed,
                                               self.size, self._api_key, self.timeout_s,
                                               idempotency_key=self.idempotency_key(prompt, seed))
            except TeacherHTTPError as exc:
                if exc.status == 429:
                    self._counts["throttled_429"] += 1
                    if exc.retry_after:
                        self._pause_until = max(self._pause_until, loop.time() + exc.retry_after)
                raise
            return images[0]

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TeacherHTTPError) and exc.retry_after is not None:
            # The server knows when it will take us again; a little jitter spreads the herd.
            return exc.retry_after + random.uniform(0, 0.05 + 0.1 * exc.retry_after)
        return self._backoff(state)

    def _before_retry(self, state: RetryCallState) -> None:
        self._counts["retries"] += 1
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


# The actor runs every render on one event loop; many may wait on the limiter at once.
RemoteTeacherGateway = ray.remote(num_cpus=0.05, max_concurrency=1000)(TeacherGateway)


def start_gateway(cfg: TeacherConfig, base_url: str, store_root: str | Path, ledger_path: str | Path,
                  size: int, **options: Any) -> Any:
    """Create the named Ray actor `teacher:<name>` for one teacher; returns its handle."""
    return RemoteTeacherGateway.options(name=f"teacher:{cfg.name}").remote(
        cfg, base_url, str(store_root), str(ledger_path), size, **options)
