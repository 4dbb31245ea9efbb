"""The judge: scene backend (no Ray) and one Serve integration test."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from pydantic import ValidationError

from evolve import shapes
from evolve.config import JudgeConfig
from evolve.judging import (
    AlignRequest,
    CompareRequest,
    DiscriminateRequest,
    ExpandRequest,
    MutateRequest,
    QuestionsRequest,
    TeacherImage,
)
from evolve.ray_env import free_port
from serve.judge_backends import JudgeBackend, SceneJudgeBackend, make_backend

# (prompt, a wrong prompt of the same category: same words, one skill broken)
CASES = [
    ("a triangle", "a circle"),
    ("a cyan circle", "a red circle"),
    ("a circle and a square", "a circle and a triangle"),
    ("three triangles", "two triangles"),
    ("a square left of a circle", "a square right of a circle"),
    ("a red square and a blue triangle", "a blue square and a red triangle"),
]


def draw(text: str, seed: int = 0) -> bytes:
    return shapes.to_png(shapes.render(text, seed=seed))


def request(prompt: str, student: bytes, teachers: dict[str, bytes]) -> DiscriminateRequest:
    return DiscriminateRequest(
        prompt=prompt, student_image=student,
        teacher_images=[TeacherImage(teacher=n, image=b) for n, b in teachers.items()])


@pytest.fixture(scope="module")
def judge() -> SceneJudgeBackend:
    return SceneJudgeBackend(seed=0)


# -- schemas and selection ------------------------------------------------------------
def test_schemas_reject_non_png_and_extra_fields():
    good = draw("a circle")
    with pytest.raises(ValidationError, match="not a PNG"):
        request("a circle", b"GIF89a....", {"t": good})
    with pytest.raises(ValidationError, match="not a PNG"):
        TeacherImage(teacher="t", image=b"\xff\xd8\xff jpeg")
    with pytest.raises(ValidationError, match="extra"):
        ExpandRequest(prompt="a circle", k=2, colour="red")
    with pytest.raises(ValidationError):
        DiscriminateRequest(prompt="a circle", student_image=good, teacher_images=[])


def test_make_backend():
    assert isinstance(make_backend(JudgeConfig()), SceneJudgeBackend)
    assert isinstance(make_backend(JudgeConfig()), JudgeBackend)
    vlm = make_backend(JudgeConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m"))
    assert isinstance(vlm, JudgeBackend) and type(vlm).__name__ == "OpenAIJudgeBackend"


def test_selection_only_and_compare(judge):
    right, wrong = draw("three triangles", 1), draw("two triangles", 2)
    v = judge.discriminate([DiscriminateRequest(prompt="three triangles", teacher_images=[
        TeacherImage(teacher="a", image=wrong), TeacherImage(teacher="b", image=right)])])[0]
    assert v.best_teacher == "b" and v.decided and v.student_score is None and not v.student_matches
    assert judge.compare("three triangles", right, wrong).winner == "first"
    assert judge.compare("three triangles", wrong, right).winner == "second"
    assert judge.compare("three triangles", right, right).winner is None  # a tie is no verdict
    with pytest.raises(ValueError, match="reserved"):
        DiscriminateRequest(prompt="a circle", teacher_images=[TeacherImage(teacher="student", image=right)])


# -- discriminate ---------------------------------------------------------------------
@pytest.mark.parametrize("prompt,wrong", CASES)
def test_discriminate_picks_correct_teacher(judge, prompt, wrong):
    right_img, wrong_img = draw(prompt, seed=1), draw(wrong, seed=2)
    teachers = {"aurora": draw(wrong, seed=3), "brush": draw(prompt, seed=4), "canvas": wrong_img}
    good, bad = judge.discriminate([request(prompt, right_img, teachers),
                                    request(prompt, wrong_img, teachers)])
    assert good.best_teacher == bad.best_teacher == "brush"
    assert good.teacher_scores["brush"] > max(good.teacher_scores["aurora"], good.teacher_scores["canvas"])
    assert good.student_matches and good.student_score == pytest.approx(good.teacher_scores["brush"])
    assert not bad.student_matches and bad.student_score < good.student_score
    assert "student ok" in good.reason and "student failed" in bad.reason
    assert good.prompt == prompt


def test_discriminate_ties_go_to_first_teacher(judge):
    img = draw("a circle")
    v = judge.discriminate([request("a circle", img, {"zed": img, "abe": draw("a circle", seed=5)})])[0]
    assert v.best_teacher == "zed" and v.student_matches


def test_discriminate_bad_input(judge):
    img = draw("a circle")
    with pytest.raises(ValueError, match="hexagon"):
        judge.discriminate([request("a hexagon", img, {"t": img})])
    with pytest.raises(ValueError, match="unique"):
        judge.discriminate([DiscriminateRequest(
            prompt="a circle", student_image=img,
            teacher_images=[TeacherImage(teacher="t", image=img)] * 2)])
    with pytest.raises(ValueError, match="decode"):
        judge.discriminate([request("a circle", img[:40], {"t": img})])


# -- expand -----------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [p for p, _ in CASES])
def test_expand(judge, prompt):
    category = shapes.parse(prompt).category
    out = judge.expand(ExpandRequest(prompt=prompt, k=5, seed=3)).variants
    assert len(out) == min(5, len(list(shapes.all_prompts(category))) - 1)
    assert len(set(out)) == len(out) and prompt not in out
    assert all(shapes.parse(v).category == category for v in out)
    assert judge.expand(ExpandRequest(prompt=prompt, k=5, seed=3)).variants == out


def test_expand_avoids_the_training_set(judge):
    full = set(judge.expand(ExpandRequest(prompt="a red circle", k=64)).variants)
    avoid = sorted(full)[:5] + ["not a grammar prompt"]
    out = judge.expand(ExpandRequest(prompt="a red circle", k=64, avoid_prompts=avoid)).variants
    assert set(out) == full - set(avoid)


def test_expand_small_category_and_seeds(judge):
    out = judge.expand(ExpandRequest(prompt="a circle", k=10)).variants
    assert sorted(out) == ["a square", "a triangle"]
    seeds = {tuple(judge.expand(ExpandRequest(prompt="a red square and a blue circle", k=4, seed=s)).variants)
             for s in range(4)}
    assert len(seeds) > 1
    assert judge.expand(ExpandRequest(prompt="a circle", k=0)).variants == []
    with pytest.raises(ValueError, match="hexagon"):
        judge.expand(ExpandRequest(prompt="a hexagon", k=2))


# -- mutate -----------------------------------------------------------------------------
def test_mutate_avoids_categories(judge):
    avoid = ["a red circle", "two squares", "a circle above a triangle"]
    out = judge.mutate(MutateRequest(avoid_prompts=avoid, n=9, seed=1)).prompts
    assert len(out) == 9 and len(set(out)) == 9
    cats = [shapes.parse(p).category for p in out]
    assert not set(cats) & {"colors", "counting", "position"}
    assert set(cats) == {"single_object", "two_object", "color_attr"}  # spread round-robin
    assert judge.mutate(MutateRequest(avoid_prompts=avoid, n=9, seed=1)).prompts == out
    assert judge.mutate(MutateRequest(avoid_prompts=avoid, n=9, seed=2)).prompts != out


def test_mutate_falls_back_when_everything_is_avoided(judge):
    avoid = [p for p, _ in CASES]
    out = judge.mutate(MutateRequest(avoid_prompts=avoid, n=20, seed=0)).prompts
    assert len(out) == len(set(out)) == 20 and not set(out) & set(avoid)
    # only single_object is free, and it has 3 prompts: the rest comes from avoided categories
    out = judge.mutate(MutateRequest(avoid_prompts=avoid[1:], n=5)).prompts
    assert [shapes.parse(p).category for p in out[:3]] == ["single_object"] * 3
    assert len(out) == 5
    with pytest.raises(ValueError, match="hexagon"):
        judge.mutate(MutateRequest(avoid_prompts=["a hexagon"], n=1))


# -- evaluation -----------------------------------------------------------------------
@pytest.mark.parametrize("prompt,wrong", CASES)
def test_align_and_questions(judge, prompt, wrong):
    right, flawed = draw(prompt, 1), draw(wrong, 2)
    a = judge.align(AlignRequest(prompt=prompt, image=right))
    b = judge.align(AlignRequest(prompt=prompt, image=flawed))
    assert (a.score, a.method, a.logprobs) == (1.0, "scene", False) and b.score < 1.0
    qs = judge.questions(QuestionsRequest(prompt=prompt, n=8)).questions
    assert qs and all(q.endswith("?") for q in qs)
    a = judge.align(AlignRequest(prompt=prompt, image=right, questions=qs))
    b = judge.align(AlignRequest(prompt=prompt, image=flawed, questions=qs))
    assert a.method == "questions" and a.score == 1.0 and b.score < 1.0


def test_align_free_text_and_unknown_questions(judge):
    img = draw("three triangles")
    assert judge.align(AlignRequest(prompt="A photo of 3 triangles.", image=img)).score == 1.0
    out = judge.align(AlignRequest(prompt="three triangles", image=img, questions=["Is it sunny?"]))
    assert out.score is None and out.answers[0].p_yes is None
    assert judge.questions(QuestionsRequest(prompt="a fox", n=3)).questions == ['Does the image show "a fox"?']
    with pytest.raises(ValueError, match="does not read"):
        judge.align(AlignRequest(prompt="a fox", image=img))
    with pytest.raises(ValueError, match="decode"):
        judge.align(AlignRequest(prompt="a circle", image=img[:40]))


# -- Ray Serve ------------------------------------------------------------------------
def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.integration
def test_judge_serve(ray_local):
    from ray import serve

    from serve.judge import build_judge_app

    with pytest.raises(ValueError, match="JUDGE_KEY_NOT_SET"):  # fails in the driver, before any deploy
        build_judge_app({"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                         "api_key_env": "JUDGE_KEY_NOT_SET"})
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(build_judge_app(JudgeConfig(max_batch_size=16, batch_wait_s=0.3)),
                       name="judge", route_prefix="/judge")
    try:
        reqs, expected = [], []
        for i in range(16):
            prompt, wrong = CASES[i % len(CASES)]
            ok = i % 2 == 0
            reqs.append(request(prompt, draw(prompt if ok else wrong, seed=i),
                                {"bad": draw(wrong, seed=100 + i), "good": draw(prompt, seed=200 + i)}))
            expected.append(ok)
        responses = [handle.discriminate.remote(r) for r in reqs]
        verdicts = [r.result(timeout_s=60) for r in responses]
        assert [v.best_teacher for v in verdicts] == ["good"] * 16
        assert [v.student_matches for v in verdicts] == expected
        stats = handle.stats.remote().result(timeout_s=30)
        print("judge stats:", stats)
        assert stats["requests"] == 16 and stats["max_batch_seen"] > 1, stats

        with pytest.raises(ValueError, match="hexagon"):  # a bad request fails alone
            handle.discriminate.remote(request("a hexagon", reqs[0].student_image,
                                               {"t": reqs[0].student_image})).result(timeout_s=30)
        out = handle.expand.remote(ExpandRequest(prompt="three circles", k=3)).result(timeout_s=30)
        assert len(out.variants) == 3

        from ray.serve.context import _get_global_client
        url = f"http://127.0.0.1:{_get_global_client().http_config.port}/judge"
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        r0 = reqs[0]
        status, body = _post(url, {"op": "discriminate", "prompt": r0.prompt,
                                   "student_image": b64(r0.student_image),
                                   "teacher_images": [{"teacher": t.teacher, "image": b64(t.image)}
                                                      for t in r0.teacher_images]})
        assert status == 200 and body["best_teacher"] == "good" and body["student_matches"], body
        status, body = _post(url, {"op": "mutate", "avoid_prompts": ["a circle"], "n": 2})
        assert status == 200 and len(body["prompts"]) == 2
        status, body = _post(url, {"op": "discriminate", "prompt": "a circle",
                                   "student_image": b64(b"not a png"), "teacher_images": []})
        assert status == 400 and "not a PNG" in body["error"]
        status, body = _post(url, {"op": "paint"})
        assert status == 400 and "unknown op" in body["error"]

        # evaluation ops: batched like discriminate, a bad request fails alone
        right, wrong = draw("three triangles", 1), draw("two triangles", 2)
        comps = [handle.compare.remote(CompareRequest(prompt="three triangles", first=a, second=b))
                 for a, b in [(right, wrong), (wrong, right)] * 4]
        assert [c.result(timeout_s=60).winner for c in comps] == ["first", "second"] * 4
        aligns = [handle.align.remote(AlignRequest(prompt="three triangles", image=img)) for img in (right, wrong) * 4]
        assert [a.result(timeout_s=60).score == 1.0 for a in aligns] == [True, False] * 4
        with pytest.raises(ValueError, match="hexagon"):
            handle.align.remote(AlignRequest(prompt="a hexagon", image=right)).result(timeout_s=30)
        qs = handle.questions.remote(QuestionsRequest(prompt="three triangles", n=4)).result(timeout_s=30)
        assert qs.questions == ["Are there exactly three triangles?", "Are there exactly three objects?"]
        status, body = _post(url, {"op": "compare", "prompt": "three triangles", "first": b64(wrong),
                                   "second": b64(right)})
        assert status == 200 and body["winner"] == "second", body
        status, body = _post(url, {"op": "align", "prompt": "three triangles", "image": b64(right),
                                   "questions": qs.questions})
        assert status == 200 and body["score"] == 1.0 and body["method"] == "questions", body
        status, body = _post(url, {"op": "questions", "prompt": "a circle", "n": 2})
        assert status == 200 and body["questions"] == ["Is there a circle?", "Is there exactly one object?"]
        status, body = _post(url, {"op": "align", "prompt": "a circle", "image": "***"})
        assert status == 400 and "base64" in body["error"]
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["compare_requests"] == 9 and stats["align_requests"] == 10, stats
    finally:
        serve.delete("judge")


@pytest.mark.integration
def test_vlm_judge_behind_serve(ray_local):
    """The VLM backend in the same deployment: batched requests fan out to a
    chat-completions server concurrently; garbage answers are counted, not raised."""
    from ray import serve

    from chat_server import ChatServer
    from serve.judge import build_judge_app

    with ChatServer(latency_s=0.05) as vlm:
        cfg = JudgeConfig(backend="openai", base_url=vlm.url, model="tiny-vlm", max_batch_size=16,
                          batch_wait_s=0.3, max_concurrency=8)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handle = serve.run(build_judge_app(cfg), name="judge-vlm", route_prefix="/judge-vlm")
        try:
            reqs, expected = [], []
            for i in range(16):
                prompt, wrong = CASES[i % len(CASES)]
                ok = i % 2 == 0
                student, teacher = (prompt, wrong) if ok else (wrong, prompt)
                reqs.append(request(prompt, draw(student, seed=i), {"t": draw(teacher, seed=100 + i)}))
                expected.append(ok)
            verdicts = [r.result(timeout_s=60) for r in [handle.discriminate.remote(q) for q in reqs]]
            assert [v.student_matches for v in verdicts] == expected
            assert all(v.decided and v.comparisons for v in verdicts)
            out = handle.expand.remote(ExpandRequest(prompt="three circles", k=2)).result(timeout_s=30)
            assert len(out.variants) == 2 and out.raw
            vlm.mode = "script"
            vlm.script.extend(["I'd rather not say."] * 3)
            v = handle.discriminate.remote(reqs[0]).result(timeout_s=60)
            assert not v.decided
            stats = handle.stats.remote().result(timeout_s=30)
            print("vlm judge stats:", stats)
            assert stats["max_batch_seen"] > 1 and stats["no_verdict"] == 1 and stats["reasks"] == 2
        finally:
            serve.delete("judge-vlm")


@pytest.mark.integration
def test_evaluation_behind_serve_with_embedded_vlm(ray_local):
    """compare / align / questions through the Judge deployment to the embedded VLM over
    HTTP: batched requests fan out concurrently; VQAScore comes from logprobs."""
    from ray import serve

    from serve.embedded_vlm import MODEL, EmbeddedVLMThread
    from serve.judge import build_judge_app

    vlm = EmbeddedVLMThread()
    url = vlm.start()
    cfg = JudgeConfig(backend="openai", base_url=url, model=MODEL, max_batch_size=16, batch_wait_s=0.3,
                      max_concurrency=8)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(build_judge_app(cfg), name="judge-eval", route_prefix="/judge-eval")
    try:
        prompt, wrong = CASES[4]
        right, flawed = draw(prompt, 1), draw(wrong, 2)
        aligns = [handle.align.remote(AlignRequest(prompt=prompt, image=img)) for img in (right, flawed) * 6]
        out = [a.result(timeout_s=60) for a in aligns]
        assert all(o.logprobs and o.method == "vqascore" for o in out)
        assert [o.score > 0.9 for o in out] == [True, False] * 6
        comps = [handle.compare.remote(CompareRequest(prompt=prompt, first=a, second=b))
                 for a, b in [(right, flawed), (flawed, right)] * 3]
        assert [c.result(timeout_s=60).winner for c in comps] == ["first", "second"] * 3
        qs = handle.questions.remote(QuestionsRequest(prompt=prompt, n=8)).result(timeout_s=30)
        a = handle.align.remote(AlignRequest(prompt=prompt, image=flawed, questions=qs.questions)).result(timeout_s=60)
        assert len(qs.questions) == 4 and a.method == "questions" and 0 < a.score < 0.9
        stats = handle.stats.remote().result(timeout_s=30)
        print("evaluation judge stats:", stats, "vlm:", vlm.stats())
        assert stats["align_requests"] == 13 and stats["compare_requests"] == 6
        assert vlm.stats()["max_in_flight"] > 1  # a batch's questions reached the VLM together
    finally:
        serve.delete("judge-eval")
        vlm.stop()
