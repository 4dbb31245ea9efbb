"""The shared OpenAI Images API pieces (serve/openai_images.py), as unit tests:
each refusal names its param and code; auth; the answers' shapes; what a
policy changes."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from serve.openai_images import (ApiError, ImagesPolicy, bearer_token, check_bearer, check_body_size, image_seeds,
                                 images_response, model_list, parse_images_request, read_body)

EDGEN = ImagesPolicy("edgen", max_n=8, max_prompt_chars=300)  # as Edgen's defaults
LENIENT = ImagesPolicy("tutor", aliases=("tutor-v2",), extras=frozenset({"seed"}), unknown_fields="ignore",
                       seed_range=None)  # as the embedded teachers'


def parse(body, policy: ImagesPolicy = EDGEN):
    return parse_images_request(body if isinstance(body, bytes) else json.dumps(body).encode(), policy)


def refusal(body, policy: ImagesPolicy = EDGEN) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(body, policy)
    return e.value


@pytest.mark.parametrize("body, status, param, code, words", [
    (b"{not json", 400, None, "invalid_json", "not valid JSON"),
    (b"\xff\xfe", 400, None, "invalid_json", "not valid JSON"),
    ([1, 2], 400, None, "invalid_json", "JSON object"),
    ({"n": 1}, 400, "prompt", "missing_required_parameter", "prompt: Field required"),
    ({"prompt": 7}, 400, "prompt", "invalid_value", "prompt:"),
    ({"prompt": " \n "}, 400, "prompt", "empty_prompt", "prompt is empty"),
    ({"prompt": "x" * 301}, 400, "prompt", "prompt_too_long", "301 characters, over 300"),
    ({"prompt": "a cat", "model": "dall-e-3"}, 404, "model", "model_not_found", "not served here"),
    ({"prompt": "a cat", "n": 0}, 400, "n", "invalid_value", "n must be 1 to 8"),
    ({"prompt": "a cat", "n": 9}, 400, "n", "invalid_value", "n must be 1 to 8"),
    ({"prompt": "a cat", "n": "2"}, 400, "n", "invalid_value", "n:"),  # integers are JSON numbers
    ({"prompt": "a cat", "n": True}, 400, "n", "invalid_value", "n:"),
    ({"prompt": "a cat", "response_format": "url"}, 400, "response_format", "invalid_value", "keeps no image URLs"),
    ({"prompt": "a cat", "style": "vivid"}, 400, "style", "unknown_parameter", "unknown field 'style'"),
    ({"prompt": "a cat", "seed": -1}, 400, "seed", "invalid_value", "seed must be 0 to 2147483647"),
    ({"prompt": "a cat", "seed": 2**31}, 400, "seed", "invalid_value", "seed must be"),
    ({"prompt": "a cat", "seed": 1.5}, 400, "seed", "invalid_value", "seed:"),
    ({"prompt": "a cat", "num_inference_steps": "4"}, 400, "num_inference_steps", "invalid_value", "steps:"),
    ({"prompt": "a cat", "guidance_scale": "high"}, 400, "guidance_scale", "invalid_value", "guidance_scale:"),
    ({"prompt": "a cat", "size": 32}, 400, "size", "invalid_value", "size:"),
])
def test_each_refusal_names_its_param_and_code(body, status, param, code, words):
    e = refusal(body)
    assert (e.status, e.param, e.code, e.type) == (status, param, code, "invalid_request_error")
    assert words in e.message and str(e) == e.message
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param,
                                  "code": code}}


def test_a_good_request():
    req = parse({"prompt": "  three triangles ", "n": 2, "size": "32x32", "seed": 7, "model": "edgen",
                 "response_format": "b64_json", "user": "u1", "num_inference_steps": 4, "guidance_scale": 3})
    assert (req.prompt, req.n, req.size, req.seed, req.num_inference_steps) == ("three triangles", 2, "32x32", 7, 4)
    assert req.guidance_scale == 3.0 and image_seeds(req) == [7, 8]
    bare = parse({"prompt": "a cat"})
    assert (bare.model, bare.n, bare.size, bare.seed, bare.response_format) == (None, 1, None, None, None)
    seeds = image_seeds(bare.model_copy(update={"n": 3}))
    assert len(seeds) == 3 and seeds == list(range(seeds[0], seeds[0] + 3)) and 0 <= seeds[0] < 2**31
    assert image_seeds(bare, default=0) == [0]


def test_policies_differ_where_servers_do():
    # Unknown fields: refused, or ignored with any extra the policy does not take.
    odd = {"prompt": "a cat", "quality": "hd", "num_inference_steps": 4, "seed": -3}
    assert refusal(odd).param == "quality"
    req = parse(odd, LENIENT)
    assert req.num_inference_steps is None and req.seed == -3  # not an extra here; any integer seed
    assert refusal({**odd, "seed": "3"}, LENIENT).param == "seed"  # ignored fields are not; known ones are checked
    # Names: aliases are the server too.
    assert parse({"prompt": "a cat", "model": "tutor-v2"}, LENIENT).model == "tutor-v2"
    assert refusal({"prompt": "a cat", "model": "edgen"}, LENIENT).code == "model_not_found"
    # OpenAI's defaults: 10 images, 4000 characters; None: no prompt limit.
    assert parse({"prompt": "a cat", "n": 10}, LENIENT).n == 10 and refusal({"prompt": "a", "n": 11}, LENIENT)
    assert refusal({"prompt": "x" * 4001}, LENIENT).code == "prompt_too_long"
    assert parse({"prompt": "x" * 5000}, ImagesPolicy("m", max_prompt_chars=None)).prompt == "x" * 5000
    # Formats: a server that links images takes "url" too (and says no more about URLs when it refuses).
    urls = ImagesPolicy("m", response_formats=("url", "b64_json"))
    assert parse({"prompt": "a cat", "response_format": "url"}, urls).response_format == "url"
    e = refusal({"prompt": "a cat", "response_format": "png"}, urls)
    assert "'url' or 'b64_json'" in e.message and "keeps no" not in e.message
    # Seeds: another range.
    assert refusal({"prompt": "a cat", "seed": 100}, ImagesPolicy("m", seed_range=(0, 100))).param == "seed"


def test_bearer_auth_never_names_a_key(monkeypatch):
    assert bearer_token("Bearer sk-1") == "sk-1" and bearer_token("Basic sk-1") is None and bearer_token(None) is None
    check_bearer("Bearer sk-1", "sk-1")
    check_bearer(None, None)  # a server without a key takes anyone
    for header in (None, "", "Bearer", "Bearer sk-2", "sk-1", "bearer sk-1", "Bearer sk-1 "):
        with pytest.raises(ApiError) as e:
            check_bearer(header, "sk-1")
        assert (e.value.status, e.value.code, e.value.type) == (401, "invalid_api_key", "authentication_error")
        assert "sk-" not in json.dumps(e.value.body())
    with pytest.raises(ApiError) as e:  # a key meant but not configured: the server's fault
        check_bearer("Bearer ", "")
    assert (e.value.status, e.value.type) == (500, "server_error")


def test_body_size_limit():
    check_body_size(100, 100)
    check_body_size(None, 100)
    check_body_size("abc", 100)  # an unreadable Content-Length: the body's own length decides
    for size in (101, "101"):
        with pytest.raises(ApiError) as e:
            check_body_size(size, 100)
        assert (e.value.status, e.value.code) == (413, "request_too_large") and "100 bytes" in e.value.message

    reads = []

    async def read() -> bytes:
        reads.append(1)
        return b"x" * 200
    with pytest.raises(ApiError):  # declared too big: refused before reading
        asyncio.run(read_body("500", read, 100))
    assert not reads
    with pytest.raises(ApiError):  # declared small, but is not
        asyncio.run(read_body("10", read, 100))
    assert asyncio.run(read_body(None, read, 1000)) == b"x" * 200


def test_answer_shapes():
    pngs = [b"\x89PNG-a", b"\x89PNG-b"]
    out = images_response(pngs, created=123, extra_per_image=[{"flaws": []}, {"flaws": ["count"]}])
    assert out == {"created": 123, "data": [{"b64_json": base64.b64encode(pngs[0]).decode(), "flaws": []},
                                            {"b64_json": base64.b64encode(pngs[1]).decode(), "flaws": ["count"]}]}
    plain = images_response(pngs[:1])
    assert isinstance(plain["created"], int) and plain["data"] == [{"b64_json": base64.b64encode(pngs[0]).decode()}]
    with pytest.raises(ValueError):
        images_response(pngs, extra_per_image=[{}])
    assert model_list("edgen", 5) == {"object": "list", "data": [{"id": "edgen", "object": "model", "created": 5,
                                                                  "owned_by": "evolve-director"}]}
    assert model_list("m", 0, owned_by="me")["data"][0]["owned_by"] == "me"


def test_errors_carry_headers_and_openai_types():
    e = ApiError(429, "slow down", code="rate_limit_exceeded", type="requests", headers={"Retry-After": "2"})
    assert e.headers == {"Retry-After": "2"} and e.body()["error"]["type"] == "requests"
    assert ApiError(400, "x").headers == {} and ApiError(400, "x").body()["error"]["param"] is None
