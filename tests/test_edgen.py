"""Edgen inference: request checks as unit tests, and the Serve app end to end
with the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest

from evolve.config import EdgenServeConfig
from evolve.ray_env import free_port
from evolve.student.generate import BASE_CHECKPOINT
from serve.edgen import ApiError, Edgen, error_response, grammar_check_for, world_kind

Impl = Edgen.func_or_class  # the plain class behind the deployment


def fake(cfg: EdgenServeConfig | None = None, student=None, checkpoint=BASE_CHECKPOINT):
    """A replica's state without a replica: by default the shipped (shapes-world) base student's."""
    from evolve.config import StudentConfig

    cfg = cfg or EdgenServeConfig()
    student = student or SimpleNamespace(config=StudentConfig())
    return SimpleNamespace(cfg=cfg, size=student.config.image_size, student=student,
                           grammar_check=grammar_check_for(cfg.grammar_check, checkpoint))


def parse(body, cfg=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Impl._parse(fake(cfg), raw)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"prompt": "   "}, 400, "prompt is empty"),
    ({"prompt": "a red circle " * 40}, 400, "over 300"),
    ({"prompt": "a red circle", "n": 9}, 400, "n must be 1 to 8"),
    ({"prompt": "a red circle", "n": 0}, 400, "n must be 1 to 8"),
    ({"prompt": "a red circle", "size": "1024x1024"}, 400, "sizes: ['32x32']"),
    ({"prompt": "a red circle", "response_format": "url"}, 400, "b64_json"),
    ({"prompt": "a red circle", "colour": "red"}, 400, "unknown field 'colour'"),
    ({"prompt": "a red circle", "n": "three"}, 400, "n:"),
    ({"prompt": "a mauve circle"}, 400, "mauve"),
    ({"prompt": "a red circle", "model": "dall-e-3"}, 404, "not served here"),
])
def test_bad_requests_get_a_4xx_that_names_the_problem(body, status, words):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == status and words in e.value.message
    assert json.loads(error_response(e.value).body)["error"]["message"] == e.value.message


def test_good_request_and_sampling_limits():
    req = parse({"prompt": "  three triangles ", "n": 2, "size": "32x32", "seed": 7, "model": "edgen"})
    assert req.prompt == "three triangles" and Impl._seeds(req) == [7, 8]
    assert Impl._sampling(fake(), req) == (20, 2.0)
    with pytest.raises(ApiError, match="num_inference_steps must be 1 to 100"):
        Impl._sampling(fake(), req.model_copy(update={"num_inference_steps": 500}))
    with pytest.raises(ApiError, match="guidance_scale must be 1 to 20"):
        Impl._sampling(fake(), req.model_copy(update={"guidance_scale": 0.5}))
    # Outside the shapes world, any prompt goes through.
    assert parse({"prompt": "a mauve circle"}, EdgenServeConfig(grammar_check=False)).prompt == "a mauve circle"


def test_a_student_on_aspect_buckets_serves_each_bucket():
    """Sizes are OpenAI's WIDTHxHEIGHT; a batch mixing sizes is drawn size by size."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from evolve.config import EncoderConfig, StudentConfig
    from evolve.shapes.render import from_png
    from evolve.student.model import build_student
    from serve.edgen import served_sizes

    enc = EncoderConfig(max_tokens=12, tiny_vae_channels=(8, 16), batch_size=8, aspect_buckets=True)
    cfg = StudentConfig(arch="pixart", image_size=32, latent_channels=4, vae_scale=2, caption_channels=32,
                        max_tokens=12, hidden_size=32, num_layers=1, num_heads=2, patch_size=2, encoders=enc)
    assert served_sizes(StudentConfig()) == {"32x32": (32, 32)}
    assert served_sizes(cfg)["48x32"] == (32, 48) and len(served_sizes(cfg)) == 7
    me = fake(EdgenServeConfig(grammar_check=False), build_student(cfg).eval())
    req = Impl._parse(me, json.dumps({"prompt": "a red circle", "size": "48x32"}).encode())
    assert Impl._size(me, req) == (32, 48)
    with pytest.raises(ApiError, match="is not served"):
        Impl._parse(me, json.dumps({"prompt": "a red circle", "size": "40x32"}).encode())
    pngs = Impl._sample_groups(me, [("a red circle", 1, 2, 2.0, (32, 48)), ("two squares", 2, 2, 2.0, (32, 32)),
                                    ("a red circle", 1, 2, 2.0, (32, 48))])
    shapes = [from_png(p).shape for p in pngs]
    assert shapes == [(32, 48, 3), (32, 32, 3), (32, 48, 3)] and pngs[0] == pngs[2]


def test_bearer_token(monkeypatch):
    cfg = EdgenServeConfig(api_key_env="EDGEN_TEST_KEY")
    me = fake(cfg)

    def request(auth=None):
        return SimpleNamespace(headers={"authorization": auth} if auth else {})
    monkeypatch.delenv("EDGEN_TEST_KEY", raising=False)
    with pytest.raises(ApiError) as e:
        Impl._authorize(me, request("Bearer x"))
    assert e.value.status == 500 and "x" not in e.value.message
    monkeypatch.setenv("EDGEN_TEST_KEY", "s3cret")
    for bad in (None, "Bearer wrong", "s3cret"):
        with pytest.raises(ApiError) as e:
            Impl._authorize(me, request(bad))
        assert e.value.status == 401 and "s3cret" not in e.value.message
    Impl._authorize(me, request("Bearer s3cret"))


def _checkpoint(folder, kind: str | None):
    folder.mkdir(parents=True, exist_ok=True)
    if kind is not None:
        (folder / "world.json").write_text(json.dumps({"kind": kind}))
    return folder


@pytest.mark.parametrize("kind, flag, checked", [
    ("shapes", None, True),     # a shapes-world student: prompts outside the grammar are a 400
    ("prompts", None, False),   # a free-text student takes any prompt
    (None, None, False),        # no world.json: an unknown student takes any prompt
    ("shapes", False, False),   # grammar_check forces it, either way
    (None, True, True),
    ("prompts", True, True),
])
def test_grammar_check_follows_the_students_world(tmp_path, kind, flag, checked):
    ckpt = _checkpoint(tmp_path / "ckpt", kind)
    assert world_kind(ckpt) == kind and grammar_check_for(flag, ckpt) is checked
    me = fake(EdgenServeConfig(grammar_check=flag), checkpoint=ckpt)
    body = json.dumps({"prompt": "A photo of a cat, mauve."}).encode()
    if checked:
        with pytest.raises(ApiError) as e:
            Impl._parse(me, body)
        assert (e.value.status, e.value.param, e.value.code) == (400, "prompt", "invalid_prompt")
        assert "outside the shapes world" in e.value.message
        assert Impl._parse(me, json.dumps({"prompt": "a red circle"}).encode()).prompt == "a red circle"
    else:
        assert Impl._parse(me, body).prompt == "A photo of a cat, mauve."


def test_the_shipped_base_student_is_a_shapes_world_student(tmp_path):
    assert world_kind(BASE_CHECKPOINT) == "shapes" and grammar_check_for(None, BASE_CHECKPOINT)
    (tmp_path / "world.json").write_text("[1]")
    with pytest.raises(ValueError, match="kind"):
        world_kind(tmp_path)


def test_the_model_goes_on_the_replicas_gpu_also_after_a_hot_reload(tmp_path, monkeypatch):
    """With a GPU (faked here: the loaded model records where it is sent) the
    model is moved there, at start and at each hot reload; the reload also
    re-reads the new checkpoint's world."""
    import torch

    import evolve.student.generate as generate
    from evolve.config import StudentConfig

    class Recorder:
        def __init__(self, path):
            self.path, self.config, self.devices = str(path), StudentConfig(), []

        def to(self, device):
            self.devices.append(device)
            return self
    monkeypatch.setattr(generate, "load_student", Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    watch = tmp_path / "checkpoints"
    first = _checkpoint(watch / "round_000", "shapes")
    (first / "config.json").write_text("{}")
    (first / "model.safetensors").write_bytes(b"")
    import inspect

    Plain = Impl.__mro__[1]  # Edgen as written: its own __init__, not Serve's ASGI wrapper's (async)
    assert Plain.__module__ == "serve.edgen" and not inspect.iscoroutinefunction(Plain.__init__)
    me = Plain.__new__(Plain)
    Plain.__init__(me, EdgenServeConfig(watch_dir=watch, watch_every_s=3600))
    assert me.device == "cuda" and me.student.devices == ["cuda"] and me.grammar_check
    assert not Impl._reload(me)  # nothing newer
    second = _checkpoint(watch / "round_001", "prompts")
    (second / "config.json").write_text("{}")
    (second / "model.safetensors").write_bytes(b"")
    os.utime(second, (first.stat().st_mtime + 10,) * 2)
    assert Impl._reload(me) and me.student.path == str(second.resolve())
    assert me.student.devices == ["cuda"] and not me.grammar_check and me.stats["reloads"] == 1


@pytest.mark.integration
def test_openai_client_against_the_serve_app(ray_local, tmp_path):
    import openai
    from PIL import Image
    from ray import serve
    from ray.serve.context import _get_global_client

    from serve.edgen import build_edgen_app

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    handle = serve.run(build_edgen_app(EdgenServeConfig(default_steps=4, batch_wait_s=0.2)),
                       name="edgen", route_prefix="/edgen")
    base = f"http://127.0.0.1:{_get_global_client().http_config.port}/edgen"
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["edgen"]
        res = client.images.generate(model="edgen", prompt="three triangles", n=3, size="32x32",
                                     response_format="b64_json", extra_body={"seed": 5})
        pngs = [base64.b64decode(d.b64_json) for d in res.data]
        imgs = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs]
        assert len(imgs) == 3 and all(i.shape == (32, 32, 3) for i in imgs)
        # An image depends on its prompt and seed only, not on its batch-mates.
        one = client.images.generate(prompt="three triangles", extra_body={"seed": 6})
        assert base64.b64decode(one.data[0].b64_json) == pngs[1]
        info = handle.info.remote().result()
        assert info["images"] == 4 and info["max_batch"] == 3  # the n=3 request ran as one batch

        with pytest.raises(openai.BadRequestError, match="mauve"):
            client.images.generate(prompt="a mauve circle")
        with pytest.raises(openai.NotFoundError, match="not served here"):
            client.images.generate(model="dall-e-3", prompt="a red circle")

        with urllib.request.urlopen(f"{base}/generate?prompt=a%20blue%20square&seed=3", timeout=60) as r:
            assert r.headers["content-type"] == "image/png" and r.read().startswith(b"\x89PNG")
        # Edgen as a teacher: the gateway speaks the same API, so a trained
        # student can teach the next one.
        import asyncio

        from actors.teacher_gateway import TeacherGateway
        from evolve.config import TeacherConfig
        from evolve.store import ImageStore

        async def buy():
            gw = TeacherGateway(TeacherConfig(name="edgen", kind="openai", base_url=f"{base}/v1", model="edgen",
                                              price_per_image=0.0), f"{base}/v1", tmp_path / "images",
                                tmp_path / "ledger.sqlite", 32)
            try:
                return await gw.render("a blue square", 11)
            finally:
                await gw.close()
        got = asyncio.run(buy())
        assert ImageStore(tmp_path / "images").has(got["ref"])

        req = urllib.request.Request(f"{base}/v1/images/generations", data=b"x" * 20000,
                                     headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 413 and "Traceback" not in e.value.read().decode()
    finally:
        serve.delete("edgen")


@pytest.mark.integration
def test_hot_reload_switches_checkpoint_under_load_without_failed_requests(ray_local, tmp_path):
    """The server watches a folder of checkpoints; a new one written while
    requests keep coming is picked up, and no request fails meanwhile."""
    import os
    import shutil
    import threading
    import time

    from ray import serve
    from ray.serve.context import _get_global_client

    from evolve.config import StudentConfig
    from evolve.shapes import vocabulary
    from evolve.student.model import Student
    from serve.edgen import build_edgen_app

    watch = tmp_path / "checkpoints"
    shutil.copytree(BASE_CHECKPOINT, watch / "round_000")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    cfg = EdgenServeConfig(watch_dir=watch, watch_every_s=0.3, default_steps=2, batch_wait_s=0.05)
    handle = serve.run(build_edgen_app(cfg), name="edgen-reload", route_prefix="/reload")
    url = f"http://127.0.0.1:{_get_global_client().http_config.port}/reload/generate?prompt=a%20red%20circle&seed=1"
    try:
        def get() -> bytes:
            with urllib.request.urlopen(url, timeout=60) as r:
                assert r.status == 200
                return r.read()
        before = get()
        assert handle.info.remote().result()["checkpoint"].endswith("round_000")
        failures, done, stop = [], [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    done.append(get())
                except Exception as e:  # noqa: BLE001 - counted, the test fails on any
                    failures.append(repr(e))
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        # A new checkpoint appears the way the trainer writes one: whole, then renamed.
        new_student = Student.from_config(StudentConfig(block_channels=(16, 32), text_dim=32, text_layers=1,
                                                        vocabulary=tuple(vocabulary())))
        new_student.save_pretrained(watch / ".round_001.tmp")
        os.replace(watch / ".round_001.tmp", watch / "round_001")
        deadline = time.time() + 60
        while not handle.info.remote().result()["checkpoint"].endswith("round_001"):
            assert time.time() < deadline, "the new checkpoint was not picked up"
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        assert not failures, failures[:3]
        assert len(done) >= 4 and handle.info.remote().result()["reloads"] == 1
        assert get() != before  # the same prompt and seed, drawn by the new weights
    finally:
        serve.delete("edgen-reload")
