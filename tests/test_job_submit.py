"""The main job submitted with `ray job submit` to a local `ray start --head`.

This starts its own head (the shared test instance is a private one), on
loopback only, with the project's venv on PATH so the entrypoint finds `evolve`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from evolve.ray_env import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    dash, metrics = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--metrics-export-port={metrics}", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    # --block keeps the head in one process group that we stop ourselves:
    # `ray stop` would also kill the test session's shared Ray instance.
    log = open(tmp_path / "ray_head.log", "wb")
    head = subprocess.Popen(cmd + ["--block"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start: {(tmp_path / 'ray_head.log').read_text()[-2000:]}")
                time.sleep(1)
        yield env, address, f"http://127.0.0.1:{metrics}/metrics"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


@pytest.mark.integration
def test_ray_job_submit_runs_main_job(ray_head, tmp_path):
    env, address, metrics_url = ray_head
    run_dir = tmp_path / "run"
    # The "rounds" schedule here (one fit() per round); the other end-to-end
    # tests run the default "continuous" one.
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["train"]["schedule"] = "rounds"
    config = tmp_path / "tiny-rounds.yaml"
    config.write_text(yaml.safe_dump(cfg))
    entry = (f"evolve run --config {config} --run-dir {run_dir} "
             f"--rounds 1 --from-scratch --serve-port {free_port()}")
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "evolve-test",
         "--", *entry.split()],
        env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rounds"][0]["round"] == 0 and "train_s" in report["rounds"][0]
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, "evolve-test"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    # The gateways' custom metrics reached Ray's Prometheus endpoint (the dashboard's source).
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    bought = [ln for ln in text.splitlines() if ln.startswith("ray_evolve_teacher_images_bought")]
    assert any('teacher="aurora"' in ln for ln in bought), text[-2000:]
