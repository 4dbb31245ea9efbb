"""The embedded VLM (serve/embedded_vlm.py) over real HTTP: the openai client and raw requests.

It must answer every judge template from the pixels it is sent, in OpenAI's
chat-completions format (logprobs included) and within vLLM's / OpenAI's
structured-output constraints. No Ray.
"""

from __future__ import annotations

import base64
import json
import math
import urllib.error
import urllib.request

import openai
import pytest

from evolve import shapes
from evolve.config import EmbeddedVLMConfig, FlawProfile, JudgeTemplates
from evolve.shapes import questions as atomic
from serve.embedded_vlm import (MODEL, REFUSAL, EmbeddedVLMThread, p_yes, phrase, split_composite,
                                template_regex, tokenize)

T = JudgeTemplates()
PROMPT, WRONG = "a square left of a circle", "a square right of a circle"


def png(text: str, seed: int = 0, size: int = 32) -> bytes:
    return shapes.to_png(shapes.render(text, seed=seed, size=size))


def image(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


@pytest.fixture(scope="module")
def vlm():
    server = EmbeddedVLMThread(T, EmbeddedVLMConfig())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(vlm):
    return openai.OpenAI(base_url=vlm.url, api_key="unused", max_retries=0)


def ask(client, content, **kw):
    messages = content if isinstance(content, list) and content and "role" in content[0] else \
        [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def say(client, content, **kw) -> str:
    return ask(client, content, **kw).choices[0].message.content


def post(url: str, body, key: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + "/chat/completions", data=raw if raw is not None else json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- pieces ------------------------------------------------------------------------------
def test_template_regexes_and_tokens():
    rx = template_regex(T.expand)
    m = rx.fullmatch(T.expand.format(prompt="a red circle", k=4))
    assert m and m["prompt"] == "a red circle" and m["k"] == "4"
    m = template_regex(T.mutate).fullmatch(T.mutate.format(n=3, examples='["a", "b. c"]', style=""))
    assert m and json.loads(m["examples"]) == ["a", "b. c"]
    assert template_regex(T.vqa).fullmatch(T.answer.format(question="Is there a circle?")) is None
    for s in ["Yes", '{"answer": "No"}', "<(A) is better>", " two  spaces\n"]:
        assert "".join(tokenize(s)) == s
    assert tokenize("Yes, it is.")[:2] == ["Yes", ","]
    assert p_yes(True, 1.0) == 0.97 and p_yes(False, 0.0) == pytest.approx(0.02)
    assert p_yes(False, 0.9) < 0.5


def test_phrasings_read_back():
    import random

    rng = random.Random(0)
    seen = set()
    for p in shapes.all_prompts():
        for _ in range(3):
            t = phrase(p, rng)
            assert shapes.read(t).text == p.text, t
            seen.add(t != p.text)
    assert seen == {True, False}  # some natural phrasings, some grammar text


def test_split_composite():
    from PIL import Image

    from serve.vlm_judge import side_by_side

    a, b = shapes.render("a red circle", 0, 24), shapes.render("three squares", 1, 24)
    parts = split_composite(__import__("numpy").asarray(side_by_side(Image.fromarray(a), Image.fromarray(b))))
    assert len(parts) == 2 and (parts[0] == a).all() and (parts[1] == b).all()


# -- each template, answered from the pixels -----------------------------------------------
def test_discriminate_both_orders_ties_and_composite(client):
    good, bad = png(PROMPT, 1), png(WRONG, 2)
    q = text(T.discriminate.format(prompt=PROMPT))
    assert say(client, [image(good), image(bad), q]) == T.choice_a
    assert say(client, [image(bad), image(good), q]) == T.choice_b
    # a tie (two right images): the same picture wins whichever side it is on
    other = png(PROMPT, 3)
    first = say(client, [image(good), image(other), q])
    second = say(client, [image(other), image(good), q])
    assert {first, second} == {T.choice_a, T.choice_b}
    # one side-by-side composite, as the judge's image_layout "side_by_side" sends
    from serve.vlm_judge import fit_image, image_part, side_by_side

    comp = image_part(side_by_side(fit_image(bad, 10**6, "b"), fit_image(good, 10**6, "g")))
    assert say(client, [comp, q]) == T.choice_b
    # constrained: vLLM's choice and OpenAI's json_schema
    assert say(client, [image(good), image(bad), q],
               extra_body={"structured_outputs": {"choice": [T.choice_a, T.choice_b]}}) == T.choice_a
    schema = {"type": "object", "properties": {"choice": {"type": "string", "enum": [T.choice_a, T.choice_b]}},
              "required": ["choice"]}
    out = say(client, [image(bad), image(good), q],
              response_format={"type": "json_schema", "json_schema": {"name": "choice", "schema": schema}})
    assert json.loads(out) == {"choice": T.choice_b}


def test_discriminate_outside_competence_is_a_deterministic_coin(client):
    answers = [say(client, [image(png("a circle", i)), image(png("a square", i)),
                            text(T.discriminate.format(prompt="a watercolor fox"))]) for i in range(12)]
    assert set(answers) == {T.choice_a, T.choice_b}
    assert say(client, [image(png("a circle", 0)), image(png("a square", 0)),
                        text(T.discriminate.format(prompt="a watercolor fox"))]) == answers[0]


def test_expand_variants_same_category_and_differ_on_reask(client):
    q = T.expand.format(prompt="a red square and a blue triangle", k=4)
    first = json.loads(say(client, [text(q)]))
    assert len(first) >= 4 and len(set(first)) == len(first)
    assert {shapes.read(v).category for v in first} == {"color_attr"}
    assert "a red square and a blue triangle" not in {shapes.read(v).text for v in first}
    assert any(shapes.read(v).text != v for v in first), "natural phrasing, not only grammar text"
    again = say(client, [{"role": "user", "content": [text(q)]}, {"role": "assistant", "content": json.dumps(first)},
                         {"role": "user", "content": T.reask.format(problem="too few")}])
    assert json.loads(again) != first and {shapes.read(v).category for v in json.loads(again)} == {"color_attr"}
    # vLLM's json constraint: exactly k
    schema = {"type": "object", "required": ["prompts"], "properties": {"prompts": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string"}}}}
    out = json.loads(say(client, [text(T.expand.format(prompt="two circles", k=2))],
                         extra_body={"structured_outputs": {"json": schema}}))
    assert len(out["prompts"]) == 2 and {shapes.read(v).category for v in out["prompts"]} == {"counting"}


def test_mutate_covers_other_categories(client):
    examples = ["a red circle", "Three squares.", "a photo of a circle above a triangle"]
    q = T.mutate.format(n=6, examples=json.dumps(examples), style=T.mutate_styles[0])
    out = json.loads(say(client, [text(q)]))
    assert len(out) == 6
    cats = [shapes.read(p).category for p in out]
    assert set(cats) == {"single_object", "two_object", "color_attr"}


def test_vqa_logprobs(client):
    right, flawed = png(PROMPT, 4), png(WRONG, 4)
    q = text(T.vqa.format(prompt=PROMPT))

    def p_of(img):
        r = ask(client, [image(img), q], logprobs=True, top_logprobs=10, max_tokens=4)
        lp = r.choices[0].logprobs.content
        top = {t.token: math.exp(t.logprob) for t in lp[0].top_logprobs}
        assert sum(top.values()) <= 1.0 + 1e-9
        assert {"Yes", "No", "yes", "no"} <= set(top) and len(top) > 4
        assert lp[0].token == r.choices[0].message.content and lp[0].bytes == list(lp[0].token.encode())
        py, pn = top["Yes"] + top["yes"] + top[" Yes"], top["No"] + top["no"] + top[" No"]
        return r.choices[0].message.content, py / (py + pn)

    said, p = p_of(right)
    assert said == "Yes" and p == pytest.approx(0.97)
    said, p = p_of(flawed)
    assert said == "No" and p < 0.35
    # a prompt that reads as no scene: unsure
    r = ask(client, [image(right), text(T.vqa.format(prompt="a dog on a sofa"))], logprobs=True, top_logprobs=20)
    top = {t.token: math.exp(t.logprob) for t in r.choices[0].logprobs.content[0].top_logprobs}
    assert top["Yes"] == pytest.approx(top["No"])
    # no logprobs asked: none sent
    assert ask(client, [image(right), q]).choices[0].logprobs is None


def test_questions_and_answers(client):
    out = json.loads(say(client, [text(T.questions.format(prompt="A red square and a blue triangle.", n=8))]))
    assert out == atomic.write("a red square and a blue triangle", 8)
    assert out[:2] == ["Is there a square?", "Is there a triangle?"] and "Is the square red?" in out
    assert json.loads(say(client, [text(T.questions.format(prompt="three circles", n=1))])) == [
        "Are there exactly three circles?"]
    assert json.loads(say(client, [text(T.questions.format(prompt="a dog", n=4))])) == ['Does the image show "a dog"?']
    good, bad = png("a red square and a blue triangle", 5), png("a blue square and a red triangle", 5)
    for q in out:
        assert say(client, [image(good), text(T.answer.format(question=q))]) == "Yes", q
    said = [say(client, [image(bad), text(T.answer.format(question=q))]) for q in out]
    assert said.count("No") == 2  # the two colours
    r = ask(client, [image(good), text(T.answer.format(question="Is it raining?"))], logprobs=True, top_logprobs=5)
    top = {t.token: t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs}
    assert top["Yes"] == pytest.approx(top["No"])  # a question it cannot read: 0.5


def test_refusal_and_usage(client, vlm):
    r = ask(client, [text("Write me a poem about the sea.")])
    assert r.choices[0].message.content == REFUSAL and r.usage.completion_tokens == len(tokenize(REFUSAL))
    r = ask(client, [text("Write me a poem.")],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert r.choices[0].message.content is None and r.choices[0].message.refusal == REFUSAL
    r = ask(client, [image(png("a circle")), text(T.vqa.format(prompt="a circle"))], max_tokens=1)
    assert r.usage.prompt_tokens > 64 and r.choices[0].finish_reason == "stop"
    r = ask(client, [text(T.expand.format(prompt="a circle", k=2))], max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    stats = vlm.stats()
    assert stats["kinds"]["refusal"] >= 2 and stats["requests"] == sum(stats["kinds"].values()) + \
        sum(v for k, v in stats["statuses"].items() if k != "200")


def test_raw_http_errors_models_health(vlm):
    status, body = post(vlm.url, None, raw=b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_json"
    status, body = post(vlm.url, {"model": MODEL, "messages": "hello"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(vlm.url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3})
    assert status == 400 and body["error"]["param"] == "top_logprobs"
    status, body = post(vlm.url, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
    assert status == 400 and "data URL" in body["error"]["message"]
    status, body = post(vlm.url, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = post(vlm.url, {"model": MODEL, "messages": [{"role": "user", "content": [
        image(png(PROMPT)), text(T.vqa.format(prompt=PROMPT))]}], "logprobs": True, "top_logprobs": 2})
    assert status == 200 and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Yes", "refusal": None}
    assert [t["token"] for t in choice["logprobs"]["content"][0]["top_logprobs"]] == ["Yes", "yes"]
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    base = vlm.url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(vlm.url + "/models") as r:
        assert json.loads(r.read())["data"][0]["id"] == MODEL
    with urllib.request.urlopen(base + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(base + "/stats") as r:
        assert json.loads(r.read())["statuses"]["400"] >= 4


def test_logprobs_off_auth_noise_and_custom_wording():
    custom = JudgeTemplates(
        vqa='Look at the picture. Is it "{prompt}"? Reply yes or no.',
        discriminate='Which of (A) and (B) shows "{prompt}" better? Say <(A) is better> or <(B) is better>.',
        answer="Question: {question} (yes/no)", yes="Yes", no="No")
    with EmbeddedVLMThread(custom, EmbeddedVLMConfig(logprobs=False), api_key="sk-vlm") as url:
        c = openai.OpenAI(base_url=url, api_key="sk-vlm", max_retries=0)
        r = ask(c, [image(png(PROMPT)), text(custom.vqa.format(prompt=PROMPT))], logprobs=True, top_logprobs=5)
        assert r.choices[0].message.content == "Yes" and r.choices[0].logprobs is None  # as a server without them
        assert say(c, [image(png(WRONG)), image(png(PROMPT)), text(custom.discriminate.format(prompt=PROMPT))]) \
            == custom.choice_b
        assert say(c, [image(png(PROMPT)), text(custom.answer.format(question="Is there a circle?"))]) == "Yes"
        assert say(c, [image(png(PROMPT)), text(T.vqa.format(prompt=PROMPT))]) == REFUSAL  # not its wording
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=url, api_key="wrong", max_retries=0), [text("hi")])
        assert post(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})[0] == 401

    flawless = [(png(PROMPT, i), png(WRONG, i)) for i in range(40)]
    with EmbeddedVLMThread(T, EmbeddedVLMConfig(noise=0.3, seed=1)) as url:
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        said = [say(c, [image(g), image(b), text(T.discriminate.format(prompt=PROMPT))]) for g, b in flawless]
        flipped = said.count(T.choice_b)
        assert 4 <= flipped <= 20, flipped  # about 30% wrong, deterministically
        assert said == [say(c, [image(g), image(b), text(T.discriminate.format(prompt=PROMPT))]) for g, b in flawless]
        yes = [say(c, [image(g), text(T.vqa.format(prompt=PROMPT))]) for g, _ in flawless]
        assert 4 <= yes.count("No") <= 20


def test_flawed_teachers_get_lower_p_yes(client):
    """Graded: a teacher's flawed image is answered No, with P(yes) below 0.35."""
    for p in shapes.heldout_prompts(2, seed=7):
        img, fired = shapes.teacher_render(p, 3, 32, FlawProfile(count=1, color=1, relation=1, shape=1), 0)
        r = ask(client, [image(shapes.to_png(img)), text(T.vqa.format(prompt=p.text))], logprobs=True, top_logprobs=6)
        top = {t.token: math.exp(t.logprob) for t in r.choices[0].logprobs.content[0].top_logprobs}
        assert r.choices[0].message.content == "No" and top["Yes"] / (top["Yes"] + top["No"]) < 0.35, (p.text, fired)


@pytest.mark.integration
def test_ray_actor_host(ray_local):
    from serve.embedded_vlm import EmbeddedVLMHost

    custom = JudgeTemplates(vqa='Is this "{prompt}"? yes or no')
    host = EmbeddedVLMHost.options(name="embedded-vlm-test").remote()
    try:
        url = ray_local.get(host.start.remote(custom.model_dump(), {"logprobs": True}, "k"), timeout=60)
        assert url.startswith("http://127.0.0.1:") and ray_local.get(host.url.remote()) == url
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        r = ask(c, [image(png(PROMPT)), text(custom.vqa.format(prompt=PROMPT))], logprobs=True, top_logprobs=2)
        assert r.choices[0].message.content == "Yes" and r.choices[0].logprobs.content[0].top_logprobs
        assert ray_local.get(host.stats.remote())["kinds"] == {"vqa": 1}
        ray_local.get(host.stop.remote())
        assert ray_local.get(host.url.remote()) is None
    finally:
        ray_local.kill(host)
