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

from evolve.config import RunConfig
from evolve.ray_env import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head` of its own; yields (env, dashboard address, metrics
    URL, GCS address), shared by this module's tests."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    dash, metrics, gcs = free_port(), free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
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
        yield env, address, f"http://127.0.0.1:{metrics}/metrics", f"127.0.0.1:{gcs}"
    finally:
        # `ray start --block` takes ~30 s to wind down on SIGTERM (measured): a test
        # head's state is thrown away anyway, so after a short grace its whole
        # process group (raylet, GCS, workers: none leaves it) is killed.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        log.close()
        # `ray start` wrote its address here and only `ray stop` (which would stop the
        # session's shared instance too) removes it: a stale one misleads later drivers.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip() == f"127.0.0.1:{gcs}":
            current.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline folder, built offline."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_pipeline", ROOT / "scripts" / "build_tiny_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.mark.integration
def test_ray_job_submit_runs_the_real_architecture_on_any_prompts(ray_head, tiny_pipeline, tmp_path):
    """`configs/latent-free-text.yaml` as a job: the latent student (PixArt's set-up
    at tiny size), a diffusers pipeline the run serves itself as the teacher,
    prompts of any kind (PartiPrompts' layout), the embedded VLM as judge and
    evaluator, watched on Prometheus while it runs."""
    env, address, metrics_url, _ = ray_head
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    teacher = RunConfig.load(ROOT / "configs" / "latent-free-text.yaml").teachers[0].model_dump(mode="json")
    teacher["pipeline"]["pipeline"] = str(tiny_pipeline)
    config.write_text(yaml.safe_dump({"extends": str(ROOT / "configs" / "latent-free-text.yaml"),
                                      "teachers": [teacher]}))
    entry = f"evolve run --config {config} --run-dir {run_dir} --rounds 1 --serve-port {free_port()}"
    from ray.job_submission import JobStatus, JobSubmissionClient

    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", "evolve-test",
         "--no-wait", "--", *entry.split()],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # Watch it as a dashboard would: the loop's gauges (dataset size, held-out
    # score) live while the driver does, so Prometheus is read during the run.
    jobs = JobSubmissionClient(address)
    loop_metrics = ("ray_evolve_dataset_size", "ray_evolve_heldout_accuracy", "ray_evolve_judge_latency_s_count")
    seen: set[str] = set()
    deadline = time.time() + 600
    while (status := jobs.get_job_status("evolve-test")) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish in 10 minutes"
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        seen |= {m for m in loop_metrics for ln in text.splitlines() if ln.startswith(m) and 'run="run"' in ln}
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, jobs.get_job_logs("evolve-test")[-4000:]
    assert seen == set(loop_metrics), seen
    # The gateway's custom metrics reached Ray's Prometheus endpoint (the dashboard's source).
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    bought = [ln for ln in text.splitlines() if ln.startswith("ray_evolve_teacher_images_bought")]
    assert any('teacher="tinysd"' in ln for ln in bought), text[-2000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, "evolve-test"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()

    report = json.loads((run_dir / "report.json").read_text())
    assert report["rounds"][0]["round"] == 0 and report["rounds"][0]["trainer_step"] > 0
    assert report["student"]["final"]["metric"] == "vlm" and "tinysd" in report["student"]["final"]["win_rate"]
    # Any prompt: the teacher drew every one (no refusal), the loop kept them as written.
    from evolve.dataset import DatasetVersions
    from evolve.student.encoders import FeatureStore
    from evolve.student.model import LatentStudent, load_pretrained

    v0 = DatasetVersions(run_dir / "datasets").read(0)
    assert len(v0) == 12 and {r.teacher for r in v0} == {"tinysd"}
    assert any(r.prompt.startswith("A red panda eating bamboo") and r.category == "Animals" for r in v0)
    # The features were precomputed once, beside the images, for every record
    # trained on, with the null caption; the checkpoint is a LatentStudent's.
    store = FeatureStore(run_dir / "features")
    assert all(store.has_latent(r.image_ref) and store.has_text(r.prompt) for r in v0)
    assert store.has_text("") and store.get_latent(v0[0].image_ref).shape == (4, 16, 16)
    assert isinstance(load_pretrained(run_dir / "checkpoints" / "round_000"), LatentStudent)


@pytest.mark.integration
def test_driver_killed_mid_round_resumes_and_pays_nothing_twice(ray_head, tmp_path):
    """SIGTERM to the driver in the middle of round 0 (what `ray job stop` sends):
    it stops with a report. `kill -9` of the driver in the middle of round 1
    (the student judged, the new prompts not yet all bought). Then
    `evolve run --resume`: the run finishes from where it stopped, consistent, and the
    ledger accounts for every image the teachers' servers billed (bought, or a call
    the kill left uncertain). The teachers
    run here, outside the cluster, so their counts outlive the driver."""
    from run_checks import assert_consistent

    from evolve.ledger import Ledger
    from serve.teachers import TeacherServersThread

    env, _, _, gcs = ray_head
    # The free-text path: prompt files, the embedded VLM judging and scoring over HTTP.
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    prompts = ROOT / "configs" / "prompts"
    cfg.update(rounds=2, world={"kind": "prompts", "seed": {"path": str(prompts / "free-text-seed.jsonl"), "limit": 6},
                                "heldout": {"path": str(prompts / "free-text-heldout.jsonl"), "limit": 6}},
               judge={"backend": "embedded_vlm"}, evaluation={"metric": "vlm"})
    cfg["student"]["vocab_size"] = 64  # a from-scratch student's words are its prompt files'
    servers = TeacherServersThread(cfg["teachers"], 32)
    with servers as urls:
        cfg["teachers"] = [{**t, "kind": "openai", "base_url": urls[t["name"]], "model": t["name"]}
                           for t in cfg["teachers"]]
        config = tmp_path / "tiny-remote.yaml"
        config.write_text(yaml.safe_dump(cfg))
        run_dir = tmp_path / "run"
        cmd = [str(BIN / "evolve"), "run", "--config", str(config), "--run-dir", str(run_dir),
               "--from-scratch", "--serve-port", str(free_port())]
        driver_env = {**env, "RAY_ADDRESS": gcs}

        def start_and_signal(rnd: int, sig: int) -> int:
            """Start the driver; send `sig` once round `rnd` has been judged; its exit code."""
            with open(tmp_path / f"driver_{rnd}.log", "wb") as log:
                driver = subprocess.Popen(cmd, env=driver_env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
                judged = run_dir / "verdicts" / f"judge_{rnd:03d}.json"
                deadline = time.time() + 400
                while not judged.exists():
                    assert driver.poll() is None, (tmp_path / f"driver_{rnd}.log").read_text()[-3000:]
                    assert time.time() < deadline, f"round {rnd} was never judged"
                    time.sleep(0.2)
                if sig == signal.SIGKILL:
                    os.killpg(driver.pid, sig)
                else:
                    os.kill(driver.pid, sig)
                return driver.wait(timeout=180)

        assert start_and_signal(0, signal.SIGTERM) == 130
        report = json.loads((run_dir / "report.json").read_text())
        assert report["stopped"] == "interrupted" and report["rounds"] == [] and report["teachers"] == {}
        assert start_and_signal(1, signal.SIGKILL) == -signal.SIGKILL
        assert not (run_dir / "rounds" / "round_001.json").exists()  # killed inside round 1

        # `--resume` takes the folder's own config.json.
        done = subprocess.run([str(BIN / "evolve"), "run", "--resume", str(run_dir), "--serve-port", str(free_port())],
                              env=driver_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        billed = sum(s["images"] for s in servers.stats().values())
    assert_consistent(run_dir)
    # A call in flight when the driver was killed is `uncertain` in the ledger: its row
    # went in before the request went out, and whether the server billed it nobody knows
    # (these APIs have no idempotency). It is counted in the spend and, on_uncertain
    # "skip", never sent again; every other image billed is a bought row, once.
    totals = Ledger(run_dir / "ledger.sqlite").totals()
    assert totals.images <= billed <= totals.images + totals.uncertain_calls, (billed, totals)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["stopped"] == "rounds" and [r["round"] for r in report["rounds"]] == [0, 1]
    final = report["student"]["final"]
    assert final["metric"] == "vlm" and set(final["win_rate"]) == {"aurora", "brush"}
    assert sum(w["wins"] + w["losses"] + w["no_verdict"] for w in final["win_rate"].values()) == 12
