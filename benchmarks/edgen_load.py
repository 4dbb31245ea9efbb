"""Edgen endpoint under load: images/s and latency, batching on vs off, in one run.

    python benchmarks/edgen_load.py [--concurrency 1,8,32] [--requests-per-client 3] [--steps 10] \
        [--out benchmarks/results/edgen_load.jsonl]

Starts a local Ray instance and the Serve app (`build_edgen_app`, the shipped
base student, one replica), then for each setting (@serve.batch up to 16
images, or 1 = no batching) and each concurrency c runs c clients that each
send `--requests-per-client` requests (n=1, distinct seeds) over real HTTP to
POST /v1/images/generations. Reports images/s, p50/p99 latency and failed
requests (must be 0). Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evolve.ray_env import free_port, set_ray_env  # noqa: E402

set_ray_env()  # loopback only, before ray is imported


async def load(url: str, clients: int, per_client: int, steps: int) -> dict:
    import aiohttp

    latencies, failures = [], []

    async def client(k: int, session) -> None:
        for j in range(per_client):
            body = {"prompt": "a red circle and a blue square", "seed": 1000 * k + j,
                    "num_inference_steps": steps}
            t = time.perf_counter()
            try:
                async with session.post(url, json=body) as r:
                    data = await r.json()
                    if r.status != 200 or len(data.get("data", [])) != 1:
                        failures.append(f"{r.status}: {str(data)[:200]}")
                        continue
            except Exception as e:  # noqa: BLE001 - counted as a lost request
                failures.append(repr(e))
                continue
            latencies.append(time.perf_counter() - t)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(k, session) for k in range(clients)])
        wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
    return {"concurrency": clients, "requests": clients * per_client, "failed": len(failures),
            "images_per_s": round(len(lat) / wall, 2), "p50_s": round(pct(0.50), 3), "p99_s": round(pct(0.99), 3),
            "wall_s": round(wall, 1), "failures": failures[:3]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps per image")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from evolve.config import EdgenServeConfig
    from serve.edgen import build_edgen_app

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    results = []
    try:
        for batch in (16, 1):
            cfg = EdgenServeConfig(max_batch_size=batch, batch_wait_s=0.02 if batch > 1 else 0.0,
                                   num_cpus=1.0, torch_threads=os.cpu_count() or 2)
            serve.run(build_edgen_app(cfg), name="edgen", route_prefix="/")
            asyncio.run(load(url, 1, 2, args.steps))  # warm-up
            for c in (int(x) for x in args.concurrency.split(",")):
                r = {"batching": batch > 1, "max_batch_size": batch, "steps": args.steps,
                     **asyncio.run(load(url, c, args.requests_per_client, args.steps))}
                results.append(r)
                print(json.dumps(r), flush=True)
            serve.delete("edgen")
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"{'batching':>9} {'conc':>5} {'img/s':>7} {'p50 s':>7} {'p99 s':>7} {'failed':>6}")
    for r in results:
        print(f"{str(r['batching']):>9} {r['concurrency']:>5} {r['images_per_s']:>7.2f} {r['p50_s']:>7.3f} "
              f"{r['p99_s']:>7.3f} {r['failed']:>6}")
    return results


if __name__ == "__main__":
    main()
