"""Opt-in: the judge's in-cluster path (backend "vllm") for real, on CPU.

Runs with the vLLM environment's python (scripts/vllm_cpu_env with WITH_RAY=1,
plus scipy for the shapes world), with this checkout on PYTHONPATH:

    PYTHONPATH=. /work/vllm-env/bin/python scripts/vllm_cpu_in_cluster.py [--model-dir /work/tiny-vlm]

`serve.judge.deploy_judge` deploys Ray Serve LLM's OpenAI app (`ray.serve.llm`,
vLLM engine, app "vlm" at /vlm/v1) on a CPU-only placement group, then the
Judge deployment pointed at it through the Serve proxy; requests go through
the judge's DeploymentHandle, as in `evolve run`. Prints one JSON line
(start-up time, verdicts, throughput) and exits 0 when every verdict was usable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/work/tiny-vlm")
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()

    import ray
    from ray import serve

    from evolve.config import JudgeConfig
    from evolve.shapes.judge_pairs import make_pairs
    from evolve.judging import DiscriminateRequest, ExpandRequest, TeacherImage
    from evolve.ray_env import free_port
    from serve.judge import deploy_judge

    if not Path(args.model_dir, "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from build_tiny_vlm import build

        build(Path(args.model_dir))
    os.environ.update(VLLM_ENV)
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": VLLM_ENV})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = JudgeConfig(
        backend="vllm", structured="vllm", temperature=1.0, max_tokens=64, max_concurrency=16,
        grammar_check=False,
        llm={
            "model_loading_config": {"model_id": "tiny-vlm", "model_source": args.model_dir},
            "placement_group_config": {"bundles": [{"CPU": 1}]},  # CPU-only: no accelerator
            "engine_kwargs": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True,
                              "max_num_seqs": 16, "limit_mm_per_prompt": {"image": 2}},
        })
    out: dict = {"model_dir": args.model_dir}
    t0 = time.perf_counter()
    try:
        handle = deploy_judge(cfg, port)
        out["deploy_s"] = round(time.perf_counter() - t0, 1)
        pairs = make_pairs(args.requests, seed=0)
        reqs = [DiscriminateRequest(prompt=p.prompt, student_image=p.right,
                                    teacher_images=[TeacherImage(teacher="t0", image=p.wrong),
                                                    TeacherImage(teacher="t1", image=p.right)])
                for p in pairs]
        t = time.perf_counter()
        verdicts = [r.result(timeout_s=300) for r in [handle.discriminate.remote(q) for q in reqs]]
        s = time.perf_counter() - t
        out.update(verdicts=len(verdicts), decided=sum(v.decided for v in verdicts),
                   verdicts_per_s=round(len(verdicts) / s, 2),
                   questions=sum(len(c.answers) for v in verdicts for c in v.comparisons),
                   sample_answers=[c.answers for c in verdicts[0].comparisons])
        exp = handle.expand.remote(ExpandRequest(prompt="a red circle", k=2)).result(timeout_s=300)
        out["expand_raw"] = [r[:80] for r in exp.raw]
        out["judge_stats"] = handle.stats.remote().result(timeout_s=60)
    finally:
        print(json.dumps(out), flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0 if out.get("decided") == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
