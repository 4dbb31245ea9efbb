"""The teacher gateway against a local provider (the OpenAI-Images simulator, real HTTP).

    python benchmarks/teacher_gateway.py [--out benchmarks/results/teacher_gateway.jsonl]

Two measurements, one run (faults, kills and spend: benchmarks/spend_campaign.py):

rate      the server allows R requests/min (sliding window) and answers in L s;
          1, 4 and 16 caller actors share one gateway actor (the teacher's only
          way out, so its limits hold cluster-wide). Reported: images/min / R
          over the whole call (first request to last answer, ramp included)
          and in steady state (first to last purchase in the ledger; goal
          >= 0.95), and the server's 429 count (goal 0).
overhead  sequential calls, no latency: the provider client alone, the gateway
          in-process (ledger, store, limiter, retries), and the gateway actor
          (one Ray call per image); ms per call, interleaved in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402
import ray  # noqa: E402

from actors.providers import make_provider  # noqa: E402
from actors.teacher_gateway import TeacherGateway, start_gateway  # noqa: E402
from evolve.config import TeacherConfig  # noqa: E402
from evolve.shapes import all_prompts  # noqa: E402
from serve.provider_sims import ProviderSimThread  # noqa: E402

SIZE = 32
PROMPTS = [p.text for p in all_prompts()]


@contextlib.contextmanager
def simulator(**knobs):
    """The OpenAI-Images simulator on a background thread: (its handle, its base URL)."""
    thread = ProviderSimThread("openai", **knobs)
    with thread as url:
        yield thread, url


def items(n: int, offset: int = 0) -> list[tuple[str, int]]:
    return [(PROMPTS[(offset + i) % len(PROMPTS)], offset + i) for i in range(n)]


@ray.remote(num_cpus=0.01)
class Caller:
    """One of many callers in the cluster, buying through the shared gateway."""

    def ready(self) -> bool:
        return True

    def buy(self, gateway, todo: list[tuple[str, int]]) -> list[dict]:
        return ray.get(gateway.render_many.remote(todo))


def teacher(**kw) -> TeacherConfig:
    return TeacherConfig(name="bench", kind="openai", model="teacher-x", price_per_image=0.01,
                         budget=1e9, max_in_flight=32, **kw)


def rate(rpm: float, latency: float, callers: int, n: int, window_s: float) -> dict:
    with simulator(api_key=None, rate_limit_rpm=rpm, rate_window_s=window_s,
                   latency_s=latency) as (sim, url), tempfile.TemporaryDirectory() as d:
        # A hair under the server's rate: the gateway paces evenly, the server counts a window.
        cfg = teacher(rpm=rpm * 0.97)
        gw = start_gateway(cfg, url, f"{d}/img", f"{d}/ledger.sqlite", SIZE, timeout_s=10)
        actors = [Caller.remote() for _ in range(callers)]
        ray.get([a.ready.remote() for a in actors] + [gw.stats.remote()])  # processes up before timing
        todo = items(n)
        shares = [todo[i::callers] for i in range(callers)]
        t0 = time.perf_counter()
        results = ray.get([a.buy.remote(gw, s) for a, s in zip(actors, shares)])
        seconds = time.perf_counter() - t0
        ok = sum("ref" in r for res in results for r in res)
        st = sim.stats()
        from evolve.ledger import Ledger

        stamps = sorted(e["ts"] for e in Ledger(f"{d}/ledger.sqlite").entries())
        ray.kill(gw)
        for a in actors:
            ray.kill(a)
    per_min = ok / seconds * 60
    # Steady state: purchases per minute between the first and the last one recorded.
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60 if len(stamps) > 1 else 0.0
    return {"bench": "rate", "callers": callers, "rpm_limit": rpm, "latency_s": latency, "images": ok,
            "seconds": round(seconds, 2), "images_per_min": round(per_min, 1),
            "throughput_over_limit": round(per_min / rpm, 3),
            "steady_over_limit": round(steady / rpm, 3), "server_429s": st["429s"]}


def overhead(n: int, rounds: int) -> dict:
    with simulator(api_key=None) as (sim, url), tempfile.TemporaryDirectory() as d:
        cfg = teacher(rpm=1e7)
        provider = make_provider("openai", url, "teacher-x", None)
        actor = start_gateway(cfg, url, f"{d}/actor-img", f"{d}/actor-ledger.sqlite", SIZE)
        times: dict[str, list[float]] = {"direct": [], "gateway": [], "gateway_actor": []}

        async def direct(todo):
            async with aiohttp.ClientSession() as s:
                for p, seed in todo:
                    await provider.generate(s, p, seed, SIZE)

        async def gateway(todo, k):
            gw = TeacherGateway(cfg, url, f"{d}/img{k}", f"{d}/ledger{k}.sqlite", SIZE)
            try:
                for p, seed in todo:
                    await gw.render(p, seed)
            finally:
                await gw.close()

        for r in range(rounds):  # interleaved, so drift on a shared machine hits all three
            base = 10_000 * (r + 1)
            t = time.perf_counter()
            asyncio.run(direct(items(n, base)))
            times["direct"].append((time.perf_counter() - t) / n)
            t = time.perf_counter()
            asyncio.run(gateway(items(n, base + 1000), r))
            times["gateway"].append((time.perf_counter() - t) / n)
            t = time.perf_counter()
            for p, seed in items(n, base + 2000):
                ray.get(actor.render.remote(p, seed))
            times["gateway_actor"].append((time.perf_counter() - t) / n)
        ray.kill(actor)
    ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    return {"bench": "overhead", "calls_per_round": n, "rounds": rounds, "ms_per_call_median": ms,
            "gateway_minus_direct_ms": round(ms["gateway"] - ms["direct"], 2),
            "actor_minus_direct_ms": round(ms["gateway_actor"] - ms["direct"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rpm", type=float, default=600.0, help="server limit R, requests per minute")
    ap.add_argument("--latency", type=float, default=0.2, help="server latency L, seconds")
    ap.add_argument("--window", type=float, default=6.0,
                    help="server's sliding window, R scaled to it (real providers: 60 s)")
    ap.add_argument("--rate-images", type=int, default=150)
    ap.add_argument("--overhead-calls", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [rate(args.rpm, args.latency, c, args.rate_images, args.window) for c in (1, 4, 16)]
    rows.append(overhead(args.overhead_calls, rounds=3))
    ray.shutdown()
    stamp = time.strftime("%Y-%m-%d")
    for row in rows:
        row["date"] = stamp
        print(json.dumps(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
