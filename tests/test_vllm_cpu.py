"""Opt-in: the VLM judge against a real vLLM server on CPU (a tiny random Idefics3).

Skipped unless EVOLVE_VLLM_PYTHON names the python of the separate vLLM
environment (scripts/vllm_cpu_env builds it; it cannot share .venv):

    scripts/vllm_cpu_env /work/vllm-env
    EVOLVE_VLLM_PYTHON=/work/vllm-env/bin/python pytest -s tests/test_vllm_cpu.py

The model has random weights, so its verdicts are coin flips; what is tested
is the protocol: two image inputs per question, vLLM's structured outputs
(choice and JSON schema) through the judge's own client, every answer usable,
and the throughput the judge gets from vLLM (printed as one JSON line).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from evolve.config import JudgeConfig
from evolve.judge_eval import judge_eval
from evolve.shapes.judge_pairs import make_pairs
from evolve.judging import ExpandRequest
from serve.judge_backends import make_backend

VLLM_PYTHON = os.environ.get("EVOLVE_VLLM_PYTHON")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="set EVOLVE_VLLM_PYTHON to a vllm-cpu env (opt-in)")


def _smoke_module():
    spec = importlib.util.spec_from_file_location("vllm_cpu_smoke", SCRIPTS / "vllm_cpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    smoke = _smoke_module()
    model_dir = Path(os.environ.get("EVOLVE_TINY_VLM", tmp_path_factory.mktemp("vlm") / "tiny-vlm"))
    if not (model_dir / "config.json").exists():
        subprocess.run([VLLM_PYTHON, str(SCRIPTS / "build_tiny_vlm.py"), str(model_dir)], check=True)
    port = smoke.free_port()
    cmd = [VLLM_PYTHON, *smoke.server_cmd(str(model_dir), port, 16)[1:]]
    log = tmp_path_factory.mktemp("vlm-log") / "server.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=smoke.server_env(),
                                start_new_session=True)
    try:
        smoke.wait_health(f"http://127.0.0.1:{port}", proc, 600)
        print(json.dumps({"vllm_startup_s": round(time.perf_counter() - t0, 1)}))
        yield f"http://127.0.0.1:{port}/v1", str(model_dir)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def test_judge_speaks_to_real_vllm(vllm_server):
    base_url, model = vllm_server
    # temperature 1: random weights at temperature 0 can loop on whitespace inside JSON.
    cfg = JudgeConfig(backend="openai", base_url=base_url, model=model, structured="vllm",
                      temperature=1.0, max_tokens=128, max_concurrency=16)
    judge = make_backend(cfg)
    report = judge_eval(judge, make_pairs(32, seed=0), concurrency=16, throughput_requests=64, batch=32)
    print(json.dumps({"vllm_cpu_judge": report}))
    assert report["no_answer"] == 0.0 and report["verdicts_decided"] == 64  # choice-constrained: always usable
    assert judge.stats()["reasks"] == 0 and judge.stats()["api_errors"] == 0

    free = make_backend(cfg.model_copy(update={"grammar_check": False, "max_reasks": 1}))
    out = free.expand(ExpandRequest(prompt="a red circle", k=2))
    for raw in out.raw:  # schema-constrained JSON, or cut off at max_tokens
        assert raw.startswith("{")
    print(json.dumps({"vllm_cpu_expand": out.model_dump()})[:2000])

    both = make_backend(cfg.model_copy(update={"structured": "json_schema", "order": "both"}))
    report = judge_eval(both, make_pairs(8, seed=1), concurrency=8, throughput_requests=0)
    assert report["no_answer"] == 0.0  # response_format json_schema: {"choice": ...} every time


def test_in_cluster_vllm_judge():
    """backend "vllm": Ray Serve LLM hosts the model in the cluster (CPU placement
    group here) and the Judge deployment reaches it through the Serve proxy.
    Needs ray and scipy in the vLLM env (WITH_RAY=1 scripts/vllm_cpu_env)."""
    root = SCRIPTS.parent
    model_dir = os.environ.get("EVOLVE_TINY_VLM", "/tmp/evolve-tiny-vlm")
    proc = subprocess.run([VLLM_PYTHON, str(SCRIPTS / "vllm_cpu_in_cluster.py"), "--model-dir", model_dir,
                           "--requests", "16"], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=900)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"model_dir"')]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(json.dumps({"vllm_cpu_in_cluster": lines[-1]})[:3000])
    assert proc.returncode == 0 and lines[-1]["decided"] == 16
