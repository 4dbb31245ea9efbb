"""An async server on a background thread's event loop, for synchronous callers.

The embedded teachers and the provider simulators are aiohttp servers; tests,
benchmarks and the `evolve teachers serve` command drive them from plain
synchronous code through a subclass of `ServerThread`:

    with TeacherServersThread(cfgs, 32) as urls: ...
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Coroutine


class ServerThread:
    """Subclasses give `_start` (returns what `start` and `with` return) and `_stop`."""

    thread_name = "server"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _start(self) -> Any:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def start(self, timeout_s: float = 30.0) -> Any:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.thread_name, daemon=True)
        self._thread.start()
        try:
            return self.run(self._start(), timeout_s)
        except BaseException:
            self.stop()
            raise

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 10.0) -> Any:
        """Run `coro` on the server's loop and wait for its result."""
        assert self._loop is not None, "not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def read(self, fn: Callable[[], Any]) -> Any:
        """Call `fn` on the server's loop, so counters are never read half-updated."""
        async def call() -> Any:
            return fn()
        return self.run(call())

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), loop).result(timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_s)
            loop.close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
