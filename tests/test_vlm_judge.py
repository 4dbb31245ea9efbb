"""The OpenAI-compatible VLM judge against local chat-completions servers (no Ray, no GPU).

Two servers: tests/chat_server.py reads images with the scene parser or answers
from a script of malformed replies (the failure tests); the embedded VLM
(serve/embedded_vlm.py) answers every template, logprobs included, from the
pixels in free-text phrasing (the evaluation and free-text tests).
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from evolve import shapes
from evolve.config import EmbeddedVLMConfig, FlawProfile, JudgeConfig, JudgeTemplates
from evolve.judging import (
    AlignRequest,
    DiscriminateRequest,
    ExpandRequest,
    MutateRequest,
    QuestionsRequest,
    TeacherImage,
    normalize_prompt,
    parse_choice,
    parse_prompt_list,
    screen_prompts,
)
from serve.judge_backends import make_backend
from serve.embedded_vlm import MODEL, EmbeddedVLMThread
from serve.vlm_judge import OpenAIJudgeBackend, fit_image, p_yes_from_logprobs, side_by_side
from chat_server import A, B, ChatServer

PROMPT, WRONG = "a square left of a circle", "a square right of a circle"


def draw(text: str, seed: int = 0, size: int = 32) -> bytes:
    return shapes.to_png(shapes.render(text, seed=seed, size=size))


def backend(server: ChatServer, **kw) -> OpenAIJudgeBackend:
    cfg = JudgeConfig(backend="openai", base_url=server.url, model="tiny-vlm", **kw)
    return make_backend(cfg)


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


# -- pure readers ------------------------------------------------------------------------
@pytest.mark.parametrize("answer,letter", [
    (A, "A"), (B, "B"), (f"I think {B}.", "B"), ('{"choice": "<(A) is better>"}', "A"),
    ("```json\n{\"choice\": \"<(B) is better>\"}\n```", "B"),
    ("(A) is better", "A"), ("b", "B"), ("Image (A)", "A"),
    (f"{A} {B}", None), ("(A) is better. No, (B) is better", None),
    ("I'm sorry, I can't compare images.", None), ("", None), ('{"choice": 3}', None),
    ("[[[[[[[[[[" * 2000, None),
])
def test_parse_choice(answer, letter):
    got, problem = parse_choice(answer, A, B)
    assert got == letter
    assert (problem is None) == (letter is not None)


@pytest.mark.parametrize("answer,items,ok", [
    ('["a circle", "two squares"]', ["a circle", "two squares"], True),
    ('{"prompts": ["a circle"]}', ["a circle"], True),
    ('Sure! Here they are: ["a circle", "a square"] Hope this helps.', ["a circle", "a square"], True),
    ('["a circle", "two squ', ["a circle"], False),                 # truncated: complete strings kept
    ('{"prompts": ["a circle", "a tri', ["a circle"], False),
    ("I cannot do that.", [], False),
    ('{"answer": 3}', [], False),
    ('"a circle"', ["a circle"], True),
    ("[1, null, \"a circle\"]", [1, None, "a circle"], True),      # screening drops the non-strings
    ("__import__('os').system('echo pwned')", [], False),          # never evaluated
    ('{"prompts": ["a circle", "\x10q{pro<( square,', ["a circle"], False),  # raw control character
])
def test_parse_prompt_list(answer, items, ok):
    got, problem = parse_prompt_list(answer)
    assert got == items and (problem is None) == ok


def test_screen_prompts():
    kept, rejected = screen_prompts(
        ["a circle", "A  Circle!", "two squares", "", "x" * 400, 7, "a hexagon", "a red circle",
         "The red circle", "a \x10 circle"],
        avoid=["two squares"], max_chars=300, canonical=lambda t: shapes.parse(t).text
        if _parses(t) else _raise(t))
    assert kept == ["a circle", "a red circle"]
    whys = [r.why for r in rejected]
    assert any("duplicate of 'a circle'" in w for w in whys)
    assert any("duplicate of 'two squares'" in w for w in whys)
    assert "empty" in whys and "not a string" in whys and "contains control characters" in whys
    assert any("longer than 300" in w for w in whys) and any("grammar" in w for w in whys)
    assert normalize_prompt("The  RED circle.") == normalize_prompt("a red circle")


def _parses(t: str) -> bool:
    try:
        shapes.parse(t)
        return True
    except shapes.PromptError:
        return False


def _raise(t: str):
    raise ValueError(f"not in the grammar: {t!r}")


def test_images_downscaled_and_composed():
    big = shapes.to_png(shapes.render("a circle", seed=0, size=256))
    img = fit_image(big, 64 * 64, "x")
    assert img.size == (64, 64)
    assert fit_image(draw("a circle"), 64 * 64, "x").size == (32, 32)  # never upscaled
    both = side_by_side(img, img)
    assert both.width > 128 and both.height > 64
    with pytest.raises(ValueError, match="cannot decode"):
        fit_image(b"\x89PNG\r\n\x1a\nbroken", 100, "student image")


def test_config_validation():
    with pytest.raises(ValueError, match="needs base_url and model"):
        JudgeConfig(backend="openai")
    with pytest.raises(ValueError, match="model_id"):
        JudgeConfig(backend="vllm", llm={})
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        JudgeTemplates(discriminate="which is better?")
    with pytest.raises(ValueError, match="is an in-cluster deployment"):
        make_backend(JudgeConfig(backend="vllm", llm={"model_loading_config": {"model_id": "m"}}))
    with pytest.raises(ValueError, match="embedded_vlm' is a server the run starts"):
        make_backend(JudgeConfig(backend="embedded_vlm"))
    with pytest.raises(ValueError, match="JUDGE_TEST_KEY_UNSET"):
        make_backend(JudgeConfig(backend="openai", base_url="http://127.0.0.1:9/v1", model="m",
                                 api_key_env="JUDGE_TEST_KEY_UNSET"))


def test_vlm_client_config_points_at_serve_proxy():
    from serve.judge import vlm_client_config

    cfg = JudgeConfig(backend="vllm", llm={"model_loading_config": {"model_id": "qwen-vl"}}, order="both")
    out = vlm_client_config(cfg, 8123)
    assert (out.backend, out.model, out.base_url, out.order) == (
        "openai", "qwen-vl", "http://127.0.0.1:8123/vlm/v1", "both")


# -- discriminate against the server -------------------------------------------------------------
def request(student: bytes | None, teachers: dict[str, bytes], prompt: str = PROMPT) -> DiscriminateRequest:
    return DiscriminateRequest(prompt=prompt, student_image=student,
                               teacher_images=[TeacherImage(teacher=n, image=b) for n, b in teachers.items()])


def test_discriminate_reads_images_and_randomises_order(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-secret")
    server.api_key = "sk-test-secret"
    judge = backend(server, api_key_env="JUDGE_TEST_KEY")
    reqs = []
    for i in range(12):
        if i % 2 == 0:  # a wrong student; one right teacher
            reqs.append(request(draw(WRONG, seed=i), {"aurora": draw(WRONG, 50 + i), "brush": draw(PROMPT, 80 + i),
                                                      "canvas": draw(WRONG, 90 + i)}))
        else:           # a right student; wrong teachers
            reqs.append(request(draw(PROMPT, seed=i), {"aurora": draw(WRONG, 50 + i), "canvas": draw(WRONG, 90 + i)}))
    verdicts = judge.discriminate(reqs)
    assert [v.best_teacher for v in verdicts[::2]] == ["brush"] * 6
    assert [v.student_matches for v in verdicts] == [i % 2 == 1 for i in range(12)]
    assert all(v.decided and len(v.comparisons) == len(r.teacher_images) for v, r in zip(verdicts, reqs))
    assert all(c.answers == [A] or c.answers == [B] for v in verdicts for c in v.comparisons)
    student_first = [v.comparisons[-1].first == "student" for v in verdicts]
    assert 0 < sum(student_first) < 12  # position drawn per comparison
    assert judge.discriminate(reqs) == verdicts  # ...and the same on a rerun
    body = server.requests[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["choice"]["enum"] == [A, B]
    stats = judge.stats()
    assert stats["questions"] == 2 * 30 and stats["no_verdict"] == 0 and stats["api_errors"] == 0


def _png(part) -> bytes:
    import base64

    return base64.b64decode(part["image_url"]["url"].split(",", 1)[1])


def test_selection_without_student_and_vllm_choice(server):
    judge = backend(server, structured="vllm", image_layout="side_by_side", max_pixels=24 * 24)
    server.mode = "script"
    server.script.extend([B, A])  # two knockout duels, answered whatever the images
    v = judge.discriminate([request(None, {"t1": draw(PROMPT), "t2": draw(PROMPT, 1), "t3": draw(PROMPT, 2)})])[0]
    assert v.decided and not v.student_matches and len(v.comparisons) == 2
    assert v.best_teacher in {"t1", "t2", "t3"}
    body = server.requests[0]
    assert body["structured_outputs"]["choice"] == [A, B]
    images = [p for p in body["messages"][0]["content"] if "image_url" in p]
    assert len(images) == 1  # one (A)|(B) composite of two images downscaled to max_pixels
    w, h = Image.open(io.BytesIO(_png(images[0]))).size
    assert 48 < w < 64 and 24 < h <= 44  # 24 px images, a border and the labels
    # One teacher and no student: nothing to ask.
    n = len(server.requests)
    v = judge.discriminate([request(None, {"only": draw(PROMPT)})])[0]
    assert v.best_teacher == "only" and v.decided and len(server.requests) == n


GARBAGE = ["I'm sorry, but I can't help with comparing these images.", "", '{"choice": "<(A) is bet',
           "Both are fine.", f"{A} or maybe {B}", "\x00\x01 binary junk", "null", "[" * 5000]


@pytest.mark.parametrize("order", ["random", "both"])
def test_malformed_answers_become_no_verdict(server, order):
    judge = backend(server, max_reasks=2, order=order)
    server.mode = "script"
    server.script.extend(GARBAGE * 4)
    v = judge.discriminate([request(draw(PROMPT), {"t": draw(PROMPT, 1)})])[0]
    assert not v.decided and not v.student_matches and "no verdict" in v.reason
    assert [len(c.answers) for c in v.comparisons] == [3] * (2 if order == "both" else 1)  # 1 + 2 re-asks
    assert all(c.winner is None for c in v.comparisons)
    reask = server.requests[1]["messages"]
    assert [m["role"] for m in reask] == ["user", "assistant", "user"]
    assert "could not be used" in reask[-1]["content"]
    assert judge.stats()["reasks"] == 2 * len(v.comparisons)


def test_reask_recovers_and_both_orders_must_agree(server):
    judge = backend(server, order="both")
    server.mode = "script"
    # Order 1: garbage, then A (student shown first wins); order 2: A again (now the teacher).
    server.script.extend(["no idea", A, A])
    v = judge.discriminate([request(draw(PROMPT), {"t": draw(PROMPT, 1)})])[0]
    assert not v.decided, "a position-biased pair of answers must not count"
    assert [c.winner for c in v.comparisons] == ["student", "t"]
    server.script.extend([A, B])  # student first: A; teacher first: B = student. Agree.
    v = judge.discriminate([request(draw(PROMPT), {"t": draw(PROMPT, 1)})])[0]
    assert v.decided and v.student_matches


def test_api_errors_are_no_verdict_and_hide_the_key(server, monkeypatch, caplog):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-very-secret-value")
    server.api_key = "a-different-key"  # every call: 401
    judge = backend(server, api_key_env="JUDGE_TEST_KEY")
    v = judge.discriminate([request(draw(PROMPT), {"t": draw(PROMPT, 1)})])[0]
    assert not v.decided and "HTTP 401" in v.comparisons[0].answers[0]
    assert "sk-very-secret-value" not in v.model_dump_json() + caplog.text
    server.api_key = None
    server.mode = "script"
    server.script.extend([("http", 500), ("http", 503), A])  # the client retries 5xx
    v = judge.discriminate([request(draw(PROMPT), {"t": draw(PROMPT, 1)})])[0]
    assert v.decided


def test_bad_image_is_bad_input(server):
    judge = backend(server)
    with pytest.raises(ValueError, match="student image: cannot decode"):
        judge.discriminate([request(b"\x89PNG\r\n\x1a\n" + b"0" * 20, {"t": draw(PROMPT)})])


# -- expand / mutate --------------------------------------------------------------------------------
def test_expand_screens_and_reasks_when_short(server):
    judge = backend(server, grammar_check=True)
    out = judge.expand(ExpandRequest(prompt="three circles", k=3, avoid_prompts=["two circles"]))
    assert len(out.variants) == 3 and len(set(out.variants)) == 3
    assert "three circles" not in out.variants and "two circles" not in out.variants
    assert all(shapes.parse(p).category == "counting" for p in out.variants)
    whys = " ".join(r.why for r in out.rejected)
    assert "duplicate of 'three circles'" in whys and "grammar" in whys
    schema = server.requests[-1]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["prompts"]["maxItems"] == 3

    server.mode = "script"
    server.script.extend(['["four circles", "four circles", "a hexagon"]',   # 1 usable of 3
                          '["two circles", "four circles"',                  # truncated: 1 more
                          '{"prompts": ["a red circle"]}'])                  # and the last
    out = judge.expand(ExpandRequest(prompt="three circles", k=3))
    assert out.variants == ["four circles", "two circles", "a red circle"]
    assert len(out.raw) == 3 and "give 2 more" in server.requests[-2]["messages"][-1]["content"]

    server.script.extend(["I refuse."] * 3)
    out = judge.expand(ExpandRequest(prompt="three circles", k=2))
    assert out.variants == [] and len(out.raw) == 3  # bounded, then given up
    with pytest.raises(ValueError, match="hexagon"):
        judge.expand(ExpandRequest(prompt="a hexagon", k=2))


def test_mutate(server):
    judge = backend(server, mutate_examples=2)
    out = judge.mutate(MutateRequest(avoid_prompts=["a circle", "two squares", "three circles"], n=4))
    assert len(out.prompts) == 4 and "two squares" not in out.prompts and "three circles" not in out.prompts
    text = server.requests[-1]["messages"][0]["content"][0]["text"]
    assert "generate 4 new" in text and text.count('", "') <= 1  # two examples shown


def test_grammar_check_off_keeps_free_text(server):
    judge = backend(server, grammar_check=False)
    server.mode = "script"
    server.script.append('["a watercolor fox in the snow", "A watercolor fox in the snow.", "a city at night"]')
    out = judge.expand(ExpandRequest(prompt="a red fox", k=2))
    assert out.variants == ["a watercolor fox in the snow", "a city at night"]


# -- judge-eval harness ------------------------------------------------------------------------
def test_judge_eval_scene_backend_is_exact():
    from evolve.judge_eval import judge_eval
    from evolve.shapes.judge_pairs import make_pairs

    pairs = make_pairs(60, seed=3)
    assert len(pairs) == 60 and {p.category for p in pairs} == set(shapes.CATEGORIES)
    report = judge_eval(make_backend(JudgeConfig()), pairs, throughput_requests=8)
    assert report["accuracy"] >= 0.99 and report["position_bias"] == 0.0 and report["no_answer"] == 0.0
    assert report["verdicts"] == 8 and report["verdicts_per_s"] > 0


def test_judge_eval_measures_a_biased_vlm(server):
    from evolve.judge_eval import judge_eval
    from evolve.shapes.judge_pairs import make_pairs

    pairs = make_pairs(12, seed=1)
    truthful = judge_eval(backend(server), pairs, throughput_requests=0)
    assert truthful["accuracy"] == 1.0 and truthful["position_bias"] == 0.0
    server.mode = "first"  # always (A): right half the time, and every pair flips with the order
    biased = judge_eval(backend(server), pairs, throughput_requests=4)
    assert biased["accuracy"] == 0.5 and biased["position_bias"] == 1.0 and biased["first_rate"] == 1.0
    both = judge_eval(backend(server, order="both"), pairs, throughput_requests=4)
    assert both["verdicts_decided"] == 0  # asking both orders exposes every biased verdict



@pytest.mark.parametrize("name", ["judge-vllm.yaml", "judge-remote.yaml", "all-open.yaml"])
def test_example_judge_configs_load(name):
    from pathlib import Path

    from evolve.config import RunConfig
    from serve.judge import vlm_client_config

    cfg = RunConfig.load(Path(__file__).resolve().parents[1] / "configs" / name).judge
    client = vlm_client_config(cfg, 8000)
    assert client.backend == "openai" and client.base_url and client.model and client.order == "both"


# -- evaluation: align and questions against the embedded VLM ---------------------------------
@pytest.fixture(scope="module")
def vlm():
    server = EmbeddedVLMThread(JudgeTemplates(), EmbeddedVLMConfig())
    server.start()
    yield server
    server.stop()


def embedded(url: str, **kw) -> OpenAIJudgeBackend:
    return make_backend(JudgeConfig(backend="openai", base_url=url, model=MODEL, **kw))


def test_p_yes_from_logprobs():
    lp = lambda t, p: {"token": t, "logprob": math.log(p)}  # noqa: E731
    first = {"token": "Yes", "logprob": math.log(0.6), "top_logprobs": [lp("Yes", 0.6), lp(" no", 0.2), lp("yes", 0.1),
                                                                       lp("The", 0.05)]}
    assert p_yes_from_logprobs([first], "Yes", "No") == pytest.approx(0.7 / 0.9)
    assert p_yes_from_logprobs([{"token": "{", "logprob": 0.0, "top_logprobs": [lp("{", 1.0)]}], "Yes", "No") is None
    assert p_yes_from_logprobs([{"token": "No", "logprob": -0.1, "top_logprobs": []}], "Yes", "No") == 0.0
    assert p_yes_from_logprobs(None, "Yes", "No") is None and p_yes_from_logprobs([], "Yes", "No") is None


def test_align_vqascore_from_logprobs(vlm):
    judge = embedded(vlm.url)
    right = judge.align(AlignRequest(prompt=PROMPT, image=draw(PROMPT, 3)))
    wrong = judge.align(AlignRequest(prompt=PROMPT, image=draw(WRONG, 3)))
    assert right.method == "vqascore" and right.logprobs and right.answers[0].from_logprobs
    assert right.score == pytest.approx(0.97) and wrong.score < 0.35 and wrong.logprobs
    # a short top list misses some no-tokens: the estimate is a little off, still from logprobs
    short = embedded(vlm.url, top_logprobs=5).align(AlignRequest(prompt=PROMPT, image=draw(PROMPT, 3)))
    assert short.logprobs and 0.97 < short.score < 0.98
    assert right.answers[0].raw == ["Yes"] and wrong.answers[0].raw == ["No"]
    stats = judge.stats()
    assert stats["questions"] == 2 and stats["reasks"] == 0 and stats["api_errors"] == 0
    with pytest.raises(ValueError, match="cannot decode"):
        judge.align(AlignRequest(prompt=PROMPT, image=b"\x89PNG\r\n\x1a\n" + b"0" * 20))


@pytest.mark.parametrize("structured", ["json_schema", "vllm", "none"])
def test_align_without_logprobs(vlm, structured):
    # Not asked for (cfg.logprobs off): the answer is constrained and read from its text.
    judge = embedded(vlm.url, logprobs=False, structured=structured)
    right = judge.align(AlignRequest(prompt=PROMPT, image=draw(PROMPT, 3)))
    wrong = judge.align(AlignRequest(prompt=PROMPT, image=draw(WRONG, 3)))
    assert (right.score, wrong.score) == (1.0, 0.0) and not right.logprobs and not right.answers[0].from_logprobs
    if structured == "json_schema":
        assert right.answers[0].raw == ['{"answer": "Yes"}']


def test_align_server_without_logprobs():
    # Asked for, but the server sends none (logprobs: null): p_yes from the text.
    with EmbeddedVLMThread(JudgeTemplates(), EmbeddedVLMConfig(logprobs=False)) as url:
        out = embedded(url).align(AlignRequest(prompt=PROMPT, image=draw(PROMPT, 3)))
    assert out.score == 1.0 and out.logprobs is False and out.answers[0].from_logprobs is False


def test_questions_then_align(vlm):
    judge = embedded(vlm.url)
    qs = judge.questions(QuestionsRequest(prompt="A red square and a blue triangle.", n=8))
    assert qs.questions == make_backend(JudgeConfig()).questions(
        QuestionsRequest(prompt="a red square and a blue triangle", n=8)).questions
    assert len(qs.questions) == 5 and not qs.rejected and len(qs.raw) == 1
    good, bad = draw("a red square and a blue triangle", 1), draw("a blue square and a red triangle", 1)
    a = judge.align(AlignRequest(prompt="a red square and a blue triangle", image=good, questions=qs.questions))
    b = judge.align(AlignRequest(prompt="a red square and a blue triangle", image=bad, questions=qs.questions))
    assert a.method == "questions" and a.logprobs and len(a.answers) == 5
    assert a.score == pytest.approx(0.97) and b.score < a.score - 0.3
    assert [x.raw[0] for x in b.answers].count("No") == 2
    scene = make_backend(JudgeConfig()).align(AlignRequest(prompt="a red square and a blue triangle", image=bad,
                                                           questions=qs.questions))
    assert scene.method == "questions" and [x.p_yes == 1.0 for x in scene.answers] == \
        [x.raw[0] == "Yes" for x in b.answers]
    assert judge.questions(QuestionsRequest(prompt="three circles", n=1)).questions == \
        ["Are there exactly three circles?"]


def test_align_and_questions_from_a_fallible_server(server):
    judge = backend(server, max_reasks=2)
    server.mode = "script"
    server.script.extend(["Maybe.", "I can't tell", "Hard to say."])  # three unusable answers: no verdict
    out = judge.align(AlignRequest(prompt=PROMPT, image=draw(PROMPT)))
    assert out.score is None and out.answers[0].p_yes is None and len(out.answers[0].raw) == 3
    assert "could not be used" in server.requests[-1]["messages"][-1]["content"]
    server.script.extend(["Sure: yes.", "Yes, it does."])  # re-asked once, then usable
    out = judge.align(AlignRequest(prompt=PROMPT, image=draw(PROMPT)))
    assert out.score == 1.0 and not out.logprobs and out.answers[0].raw == ["Sure: yes.", "Yes, it does."]
    assert server.requests[-1]["logprobs"] is True and server.requests[-1]["max_tokens"] <= 16
    assert "response_format" not in server.requests[-1]  # no constraint beside logprobs
    server.script.extend(["Yes", ("http", 401)])  # one answered, one API error: the mean of one
    out = judge.align(AlignRequest(prompt=PROMPT, image=draw(PROMPT), questions=["Is there a square?", "Q2?"]))
    assert out.score == 1.0 and sorted(a.p_yes is None for a in out.answers) == [False, True]
    assert judge.stats()["api_errors"] == 1

    server.script.extend(['["Is there a square", "A red circle.", 7, "Is there a square?"',  # truncated
                          '{"questions": ["Is the square left of the circle?", "Is there a square"]}'])
    qs = judge.questions(QuestionsRequest(prompt=PROMPT, n=3))
    assert qs.questions == ["Is there a square?", "Is the square left of the circle?"] and len(qs.raw) == 2
    whys = " ".join(r.why for r in qs.rejected)
    assert "not a yes/no question" in whys and "duplicate" in whys
    schema = server.requests[-1]["response_format"]["json_schema"]["schema"]["properties"]["questions"]
    assert (schema["minItems"], schema["maxItems"]) == (1, 3)
    server.script.extend(["I refuse."] * 3)
    assert judge.questions(QuestionsRequest(prompt=PROMPT, n=3)).questions == []


# -- the loop's duties in free text, against the embedded VLM ------------------------------------
def test_discriminate_expand_mutate_free_text(vlm):
    judge = embedded(vlm.url, grammar_check=False, order="both")
    reqs = [request(draw(WRONG, i), {"aurora": draw(WRONG, 50 + i), "brush": draw(PROMPT, 80 + i)}) for i in range(4)]
    reqs += [request(draw(PROMPT, i), {"aurora": draw(WRONG, 60 + i)}) for i in range(4)]
    verdicts = judge.discriminate(reqs)
    assert all(v.decided for v in verdicts)  # both orders agree: the VLM is not position-biased
    assert [v.best_teacher for v in verdicts[:4]] == ["brush"] * 4
    assert [v.student_matches for v in verdicts] == [False] * 4 + [True] * 4

    out = judge.expand(ExpandRequest(prompt="A photo of three circles.", k=3, avoid_prompts=["two circles"]))
    assert len(out.variants) == 3 and not any(shapes.read(v).text == "two circles" for v in out.variants)
    assert {shapes.read(v).category for v in out.variants} == {"counting"}
    assert any(shapes.read(v).text != v for v in out.variants)  # kept as written: free text

    out = judge.mutate(MutateRequest(avoid_prompts=["a red circle", "two squares", "a circle above a square"], n=4))
    assert len(out.prompts) == 4
    assert not {shapes.read(p).category for p in out.prompts} & {"colors", "counting", "position"}


def test_grammar_check_on_keeps_grammar_form(vlm):
    # The strict grammar turns natural phrasing away ("a photo of ..."); re-asks fill the rest.
    judge = embedded(vlm.url, grammar_check=True, max_reasks=4)
    out = judge.expand(ExpandRequest(prompt="a red circle", k=3))
    assert len(out.variants) == 3 and all(shapes.parse(v).category == "colors" for v in out.variants)
    assert any("grammar" in r.why for r in out.rejected) and len(out.raw) > 1


# -- agreement with the exact scorer --------------------------------------------------------------
@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_vqascore_ranks_teachers_as_the_scene_scorer(noise):
    """Held-out prompts drawn by teachers of growing flaw rates: the mean VQAScore
    (embedded VLM, through the judge's client) ranks them as the scene scorer's
    accuracy, also when the VLM answers wrongly one time in ten."""
    prompts = shapes.heldout_prompts(4, seed=11)
    profiles = {"clean": FlawProfile(), "some": FlawProfile(count=0.3, color=0.3, relation=0.3, shape=0.15),
                "many": FlawProfile(count=0.8, color=0.8, relation=0.8, shape=0.5)}
    accuracy, vqa = {}, {}
    with EmbeddedVLMThread(JudgeTemplates(), EmbeddedVLMConfig(noise=noise, seed=3)) as url, \
            ThreadPoolExecutor(4) as pool:
        judge = embedded(url)
        for name, flaws in profiles.items():
            images = [shapes.to_png(shapes.teacher_render(p, i, 32, flaws, teacher_seed=7)[0])
                      for i, p in enumerate(prompts)]
            accuracy[name] = shapes.score(prompts, images).overall
            scores = list(pool.map(lambda p, img: judge.align(AlignRequest(prompt=p.text, image=img)).score,
                                   prompts, images))
            vqa[name] = sum(scores) / len(scores)
    order = sorted(profiles, key=lambda n: -accuracy[n])
    print("accuracy", accuracy, "vqascore", vqa)
    assert order == ["clean", "some", "many"] and len(set(accuracy.values())) == 3, accuracy
    assert sorted(profiles, key=lambda n: -vqa[n]) == order, (accuracy, vqa)
