"""The diffusers teacher: config checks as unit tests, and a tiny random
StableDiffusionPipeline (built offline) served on Ray Serve, met by the official
`openai` client and by the project's own provider client."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from evolve.ray_env import free_port
from serve.diffusers_teacher import DiffusersTeacher, DiffusersTeacherConfig, pipeline_source
from serve.edgen import ApiError

Impl = DiffusersTeacher.func_or_class  # the plain class behind the deployment
KEY_ENV, KEY = "DT_TEST_KEY", "dt-s3cret"
MODEL = "tiny-sd"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_tiny_pipeline.py"


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    # scripts/ is not a package: load the builder from its file.
    spec = importlib.util.spec_from_file_location("build_tiny_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


# -- unit tests: no Ray ---------------------------------------------------------------

def test_config_defaults_and_rejections():
    cfg = DiffusersTeacherConfig(pipeline="org/model")
    assert cfg.sizes == [512, 1024] and cfg.device == "auto" and cfg.torch_dtype == "float16"
    for bad in ({"sizes": [500]}, {"sizes": []}, {"default_steps": 200}, {"default_guidance": 40.0},
                {"torch_dtype": "float64"}, {"device": "tpu"}, {"pipline": "x"},
                {"extra_call_kwargs": {"generator": None}}, {"load_kwargs": {"torch_dtype": "float16"}},
                {"model_name": "bad name"}):
        with pytest.raises(ValidationError):
            DiffusersTeacherConfig(pipeline="org/model", **bad)
    assert DiffusersTeacherConfig(pipeline="x", sizes=[64, 32, 64]).sizes == [32, 64]


def test_pipeline_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pipeline_source("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS") == ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
                                                                         False)
    (tmp_path / "pipe").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline_source("pipe")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert pipeline_source("pipe") == (str(tmp_path / "pipe"), True)
    with pytest.raises(FileNotFoundError):
        pipeline_source("./missing")
    # An absolute folder absent here may be on the GPU nodes: checked there.
    assert pipeline_source("/models/sdxl") == ("/models/sdxl", True)


def _fake(**kw):
    return SimpleNamespace(cfg=DiffusersTeacherConfig(pipeline="x", model_name=MODEL, sizes=[32, 64], max_n=4, **kw))


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "  "}, 400, "prompt is empty"),
    ({"prompt": "a cat", "n": 5}, 400, "n must be 1 to 4"),
    ({"prompt": "a cat", "model": "dall-e-3"}, 404, "not served here"),
    ({"prompt": "a cat", "response_format": "url"}, 400, "b64_json"),
    ({"prompt": "a cat", "style": "vivid"}, 400, "unknown field 'style'"),
    ({"prompt": "a cat", "size": "128x128"}, 400, "sizes: ['32x32', '64x64']"),
    ({"prompt": "a cat", "size": "32x64"}, 400, "not served"),
    ({"prompt": "a cat", "num_inference_steps": 0}, 400, "num_inference_steps must be 1 to 100"),
    ({"prompt": "a cat", "guidance_scale": -1}, 400, "guidance_scale must be 0 to 30"),
])
def test_bad_requests(body, status, words):
    me = _fake()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as e:
        Impl._settings(me, Impl._parse(me, raw))
    assert e.value.status == status and words in e.value.message


def test_settings_defaults():
    me = _fake(default_steps=4, default_guidance=0.0)
    req = Impl._parse(me, json.dumps({"prompt": " a cat ", "n": 2, "seed": 9}).encode())
    assert req.prompt == "a cat" and Impl._seeds(req) == [9, 10]
    assert Impl._settings(me, req) == (64, 4, 0.0)  # no size: the largest served
    assert Impl._settings(me, req.model_copy(update={"size": "32x32"}))[0] == 32


def test_batch_is_grouped_by_size_steps_guidance():
    from PIL import Image

    calls = []

    def call(prompts, seeds, size, steps, guidance):
        calls.append((prompts, seeds, size, steps, guidance))
        return [Image.new("RGB", (size, size), (s % 256, 0, 0)) for s in seeds]
    me = SimpleNamespace(_call_pipeline=call, pipeline_class="Fake")
    items = [("a", 1, 64, 4, 2.0), ("b", 2, 32, 4, 2.0), ("c", 3, 64, 4, 2.0), ("d", 4, 64, 8, 2.0)]
    pngs = Impl._draw_groups(me, items)
    assert sorted(c[:3] for c in calls) == [(["a", "c"], [1, 3], 64), (["b"], [2], 32), (["d"], [4], 64)]
    assert [_decode(base64.b64encode(p).decode())[0, 0, 0] for p in pngs] == [1, 2, 3, 4]  # back in order
    me._call_pipeline = lambda *a: [Image.new("RGB", (48, 48))]  # a pipeline that rounds sizes
    with pytest.raises(RuntimeError, match="drew"):
        Impl._draw_groups(me, items[:1])


def test_idempotency_memory_is_an_lru_that_forgets_failures():
    import asyncio

    from collections import OrderedDict

    me = SimpleNamespace(cfg=DiffusersTeacherConfig(pipeline="x", idempotency_keys=2), stats={"replayed": 0},
                         _idempotent=OrderedDict(), drawn=0)

    async def answer(req, size, steps, guidance):
        me.drawn += 1
        if req.prompt == "boom":
            raise RuntimeError("pipeline failed")
        return {"data": [req.prompt, me.drawn]}
    me._answer = answer

    def req(prompt):
        return SimpleNamespace(prompt=prompt, model=None, n=1, seed=None)

    async def go():
        ask = lambda key, prompt="p": Impl._replayable(me, key, req(prompt), 32, 4, 2.0)  # noqa: E731
        first = await ask("k1")
        assert await ask("k1") == first and me.drawn == 1 and me.stats["replayed"] == 1
        with pytest.raises(ApiError) as e:
            await ask("k1", "other")
        assert e.value.status == 422
        await ask("k2")
        await ask("k3")  # over 2 keys: k1, the least recently used, is forgotten
        assert list(me._idempotent) == ["k2", "k3"]
        assert await ask("k1") != first
        with pytest.raises(RuntimeError):
            await ask("k4", "boom")
        assert "k4" not in me._idempotent  # nothing delivered: a retry draws again
    asyncio.run(go())


# -- integration: one deployment for the module -----------------------------------------

@pytest.fixture(scope="module")
def served(ray_local, tiny_pipeline):
    from ray import serve
    from ray.serve.context import _get_global_client

    from serve.diffusers_teacher import build_diffusers_teacher_app

    cfg = DiffusersTeacherConfig(
        pipeline=str(tiny_pipeline), model_name=MODEL, torch_dtype="float32", num_gpus=0, num_cpus=0.5,
        sizes=[32, 64], default_steps=4, max_n=4, max_batch_size=8, batch_wait_s=0.25, torch_threads=1,
        api_key_env=KEY_ENV, runtime_env={"env_vars": {KEY_ENV: KEY}})
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(build_diffusers_teacher_app(cfg), name="diffusers-teacher", route_prefix="/dt")
    base = f"http://127.0.0.1:{_get_global_client().http_config.port}/dt"
    try:
        yield SimpleNamespace(base=base, handle=handle)
    finally:
        serve.delete("diffusers-teacher")


def _client(served, key=KEY):
    import openai

    return openai.OpenAI(base_url=f"{served.base}/v1", api_key=key, max_retries=0, timeout=60)


def _decode(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _post(served, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"{served.base}/v1/images/generations", data=body, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        assert "Traceback" not in text
        return e.code, json.loads(text)


@pytest.mark.integration
def test_openai_client_gets_seeded_pngs(served):
    client = _client(served)
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(f"{served.base}/health", timeout=30) as r:  # no token needed
        assert json.loads(r.read())["pipeline"] == "StableDiffusionPipeline"

    def gen(seed, n=2, size="64x64", prompt="a red circle on grass"):
        res = client.images.generate(model=MODEL, prompt=prompt, n=n, size=size, response_format="b64_json",
                                     extra_body={"seed": seed})
        return [d.b64_json for d in res.data]
    first = gen(3)
    imgs = [_decode(b) for b in first]
    assert len(imgs) == 2 and all(i.shape == (64, 64, 3) for i in imgs)
    assert all(int(i.max()) - int(i.min()) > 6 for i in imgs)  # a picture, not a flat placeholder
    assert gen(3) == first                       # same seed: the same bytes
    assert gen(4)[0] != first[0]                 # another seed: another image
    # Image i uses seed + i (compared as pixels: its batch-mate differs, see below).
    assert np.abs(_decode(gen(4)[0]).astype(int) - imgs[1].astype(int)).max() <= 1
    assert gen(3, prompt="a blue square")[0] != first[0]
    assert _decode(gen(5, n=1, size="32x32")[0]).shape == (32, 32, 3)


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_draw_the_same_images(served):
    client = _client(served)
    jobs = [("a red circle", 11, "64x64"), ("two blue squares", 12, "64x64"), ("a green triangle", 13, "64x64"),
            ("a tiny star", 14, "32x32")]

    def one(prompt, seed, size):
        res = client.images.generate(model=MODEL, prompt=prompt, n=1, size=size, extra_body={"seed": seed})
        return _decode(res.data[0].b64_json)
    alone = [one(*j) for j in jobs]                # sequential: each drawn in a batch of its own
    before = served.handle.info.remote().result()
    together: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        together[i] = one(*jobs[i])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = served.handle.info.remote().result()
    assert after["images"] - before["images"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs) and after["max_batch"] >= 2
    # Grouped by (size, steps, guidance): fewer pipeline calls than images.
    assert after["pipeline_calls"] - before["pipeline_calls"] < len(jobs)
    for a, b in zip(alone, together):
        # Same noise, same prompt: the same image; at most a rare one-level
        # rounding difference where a kernel sums a larger batch in another order.
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.integration
def test_bad_requests_get_openai_shaped_4xx(served):
    import openai

    client = _client(served)
    with pytest.raises(openai.BadRequestError, match="sizes"):
        client.images.generate(model=MODEL, prompt="a cat", size="1024x1024")
    with pytest.raises(openai.BadRequestError, match="n must be 1 to 4"):
        client.images.generate(model=MODEL, prompt="a cat", n=5, size="32x32")
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        client.images.generate(model=MODEL, prompt="  ", size="32x32")
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(model=MODEL, prompt="a cat", size="32x32", response_format="url")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.images.generate(model="dall-e-3", prompt="a cat", size="32x32")
    with pytest.raises(openai.AuthenticationError):
        _client(served, key="wrong").images.generate(model=MODEL, prompt="a cat", size="32x32")
    with pytest.raises(openai.AuthenticationError):
        _client(served, key="wrong").models.list()
    auth = {"authorization": f"Bearer {KEY}"}
    status, body = _post(served, b"{not json", auth)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = _post(served, json.dumps({"prompt": "a cat", "size": "32x32"}).encode())  # no token
    assert status == 401 and body["error"]["type"] == "authentication_error"


@pytest.mark.integration
def test_idempotency_key_replays_the_first_answer(served):
    auth = {"authorization": f"Bearer {KEY}", "Idempotency-Key": "order-1"}
    ask = {"model": MODEL, "prompt": "a purple moon", "n": 1, "size": "32x32"}  # no seed: a random one
    before = served.handle.info.remote().result()
    s1, first = _post(served, json.dumps(ask).encode(), auth)
    s2, again = _post(served, json.dumps(ask).encode(), auth)
    assert s1 == s2 == 200 and again == first
    after = served.handle.info.remote().result()
    assert after["replayed"] - before["replayed"] == 1 and after["images"] - before["images"] == 1
    status, body = _post(served, json.dumps({**ask, "prompt": "a yellow sun"}).encode(), auth)
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused"


@pytest.mark.integration
def test_the_projects_provider_client_buys_from_it(served, tmp_path, monkeypatch):
    import asyncio

    import aiohttp

    from actors.providers import make_provider

    async def buy():
        provider = make_provider("openai", f"{served.base}/v1", MODEL, KEY)
        async with aiohttp.ClientSession() as session:
            got = await provider.generate(session, "a red circle", 21, 64)
            again = await provider.generate(session, "a red circle", 21, 64, idempotency_key="buy-21")
        return got, again
    got, again = asyncio.run(buy())
    assert len(got) == 1 and _decode(base64.b64encode(got[0].png).decode()).shape == (64, 64, 3)
    assert again[0].png == got[0].png  # the seed travels: the same image

    # As a run's teacher: the gateway asks for a size the pipeline serves
    # (provider_options) and scales the image to the run's 32 px.
    from actors.teacher_gateway import TeacherGateway
    from evolve.config import TeacherConfig
    from evolve.store import ImageStore

    monkeypatch.setenv(KEY_ENV, KEY)
    teacher = TeacherConfig(name="tiny-sd", kind="openai", base_url=f"{served.base}/v1", model=MODEL,
                            api_key_env=KEY_ENV, provider_options={"size": "64x64"}, price_per_image=0.0)

    async def render():
        gw = TeacherGateway(teacher, teacher.base_url, tmp_path / "images", tmp_path / "ledger.sqlite", 32)
        try:
            return await gw.render("a red circle", 21)
        finally:
            await gw.close()
    bought = asyncio.run(render())
    assert _decode(base64.b64encode(ImageStore(tmp_path / "images").get(bought["ref"])).decode()).shape == (32, 32, 3)
