"""Embedded teacher servers, the Images API client and the teacher gateway,
over real HTTP on 127.0.0.1. Gateways run as plain objects in an event loop
(fast); one integration test runs them, and the teacher host, as Ray actors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import urllib.request
from typing import Any, AsyncIterator

import aiohttp
import pytest

from actors.teacher_http import TeacherHTTPError
from actors.providers import make_provider
from actors.teacher_gateway import BudgetExceeded, TeacherGateway, TeacherGatewayError, start_gateway
from evolve.config import TeacherConfig
from evolve.ledger import Ledger
from evolve.shapes.render import from_png
from evolve.store import ImageStore
from serve.teachers import EmbeddedTeacherHost, TeacherServers, TeacherServersThread

GOOD = "a red square and a blue triangle"
BAD = "a purple circle"  # "purple" is not a colour of the shapes world


def teacher(name: str = "tutor", **kw: Any) -> TeacherConfig:
    kw.setdefault("latency_s", 0.0)
    kw.setdefault("price_per_image", 0.01)
    return TeacherConfig(name=name, **kw)


@contextlib.asynccontextmanager
async def serving(cfg: TeacherConfig, **kw: Any) -> AsyncIterator[tuple[TeacherServers, str]]:
    servers = TeacherServers()
    urls = await servers.start([cfg], 32, **kw)
    try:
        yield servers, urls[cfg.name]
    finally:
        await servers.stop()


def gateway(cfg: TeacherConfig, url: str, tmp_path, **kw: Any) -> TeacherGateway:
    kw = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, **kw}
    return TeacherGateway(cfg, url, tmp_path / "images", tmp_path / "ledger.sqlite", 32, **kw)


async def post(url: str, body: Any, key: str | None = None) -> tuple[int, dict, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/images/generations", data=data, headers=headers) as r:
            return r.status, dict(r.headers), await r.json()


def req(prompt: str = GOOD, **kw: Any) -> dict[str, Any]:
    return {"model": "tutor", "prompt": prompt, "n": 1, "size": "32x32",
            "response_format": "b64_json", "seed": 0, **kw}


# -- the server ----------------------------------------------------------------

def test_server_returns_pngs_that_decode():
    async def main() -> None:
        async with serving(teacher()) as (servers, url):
            status, _, body = await post(url, req(n=2, seed=5))
            assert status == 200 and isinstance(body["created"], int) and len(body["data"]) == 2
            a, b = (from_png(base64.b64decode(d["b64_json"]), 32) for d in body["data"])
            assert a.shape == (32, 32, 3) and a.any() and (a != b).any()  # seeds 5 and 6 differ
            # Same seed, same image: n=2 from seed 5 starts with the image for seed 5.
            _, _, one = await post(url, req(seed=5))
            assert one["data"][0]["b64_json"] == body["data"][0]["b64_json"]
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/models") as r:
                    assert [m["id"] for m in (await r.json())["data"]] == ["tutor"]
                async with s.get(url.removesuffix("/v1") + "/health") as r:
                    assert r.status == 200
            assert servers.stats()["tutor"]["images"] == 3
    asyncio.run(main())


def test_server_rejects_bad_requests_in_openai_format():
    async def main() -> None:
        async with serving(teacher()) as (_, url):
            status, _, body = await post(url, req(BAD))
            assert status == 400 and "purple" in body["error"]["message"]
            assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "prompt"
            status, _, body = await post(url, req(size="64x64"))
            assert status == 400 and "size" in body["error"]["message"].lower()
            status, _, body = await post(url, b"{not json")
            assert status == 400 and body["error"]["code"] == "invalid_json"
            status, _, body = await post(url, req(model="dall-e-3"))
            assert status == 404 and body["error"]["code"] == "model_not_found"
    asyncio.run(main())


def test_server_throttles_with_retry_after():
    async def main() -> None:
        async with serving(teacher(server_rpm=2)) as (_, url):
            assert (await post(url, req()))[0] == 200
            assert (await post(url, req()))[0] == 200
            status, headers, body = await post(url, req())
            assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(headers["Retry-After"]) <= 60
    asyncio.run(main())


def test_server_and_client_auth_never_leak_the_key():
    async def main() -> None:
        async with serving(teacher(), api_keys={"tutor": "sk-server-secret"}) as (_, url):
            assert (await post(url, req(), key="sk-server-secret"))[0] == 200
            status, _, body = await post(url, req(), key="sk-wrong")
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            assert (await post(url, req()))[0] == 401
            async with aiohttp.ClientSession() as s:
                with pytest.raises(TeacherHTTPError) as info:
                    await make_provider("openai", url, "tutor", "sk-wrong-key-123").generate(s, GOOD, 0, 32)
            err = info.value
            assert err.status == 401 and not err.retryable
            assert "sk-wrong-key-123" not in str(err) + repr(err)
            async with aiohttp.ClientSession() as s:  # nothing listens there: retryable
                with pytest.raises(TeacherHTTPError) as info:
                    await make_provider("openai", "http://127.0.0.1:9/v1", "tutor", "sk-x",
                                        timeout_s=2.0).generate(s, GOOD, 0, 32)
            assert info.value.status is None and info.value.retryable
    asyncio.run(main())


def test_servers_on_a_thread_for_sync_callers():
    with TeacherServersThread([teacher("one"), teacher("two")], 32) as urls:
        assert set(urls) == {"one", "two"} and all(u.startswith("http://127.0.0.1:") for u in urls.values())
        with urllib.request.urlopen(urls["two"].removesuffix("/v1") + "/health", timeout=5) as r:
            assert json.load(r)["teacher"] == "two"


def test_server_reads_free_text_and_draws_it_as_its_canonical_scene():
    """A prompt that reads as a shapes scene is drawn as the scene's grammar
    text: "A red circle." draws what "a red circle" draws with the same seed,
    and grammar prompts draw exactly what teacher_render draws for them."""
    from evolve.config import FlawProfile
    from evolve.shapes.grammar import parse
    from evolve.shapes.render import teacher_render, to_png

    cfg = teacher(flaws=FlawProfile(count=0.5, color=0.5, relation=0.5, shape=0.5), seed=3)

    async def main() -> None:
        async with serving(cfg) as (_, url):
            async def draw(prompt: str, seed: int = 4) -> dict[str, Any]:
                status, _, body = await post(url, req(prompt, seed=seed, n=2))
                assert status == 200, body
                return body["data"]
            for grammar in (GOOD, "a red circle", "three triangles", "a square left of a circle"):
                got = await draw(grammar)
                for i, d in enumerate(got):  # byte for byte what the grammar prompt always drew
                    arr, fired = teacher_render(parse(grammar), 4 + i, 32, cfg.flaws, cfg.seed)
                    assert base64.b64decode(d["b64_json"]) == to_png(arr) and d["flaws"] == fired
            assert await draw("A red circle.") == await draw("a red circle")
            assert await draw("A photo of a red square together with a blue triangle") == await draw(GOOD)
            assert await draw("a square to the left of a triangle") == await draw("a square left of a triangle")
            assert await draw("A red circle.", seed=5) != await draw("a red circle")
            for bad in (BAD, "A photo of a cat.", "a red circle and"):
                status, _, body = await post(url, req(bad))
                assert status == 400 and bad in body["error"]["message"], body
                assert (body["error"]["param"], body["error"]["code"]) == ("prompt", "invalid_prompt")
    asyncio.run(main())


def test_server_checks_fields_as_openai_images_does_and_ignores_other_clients_fields():
    async def main() -> None:
        async with serving(teacher(model="tutor-v2")) as (servers, url):
            ok = [req(quality="hd", style="vivid", num_inference_steps=4), req(model="tutor-v2"),
                  {"prompt": GOOD}, req(prompt="  " + GOOD + " "), req(seed=-7)]
            for body in ok:
                status, _, answer = await post(url, body)
                assert status == 200 and len(answer["data"]) == 1, (body, answer)
            for body, param, code in [(req(n=11), "n", "invalid_value"), (req(n=True), "n", "invalid_value"),
                                      (req(seed="1"), "seed", "invalid_value"),
                                      (req(response_format="url"), "response_format", "invalid_value"),
                                      (req(prompt=" "), "prompt", "empty_prompt"),
                                      ({"n": 1}, "prompt", "missing_required_parameter"),
                                      ([GOOD], None, "invalid_json")]:
                status, _, answer = await post(url, body)
                assert status == 400 and (answer["error"]["param"], answer["error"]["code"]) == (param, code), answer
                assert set(answer["error"]) == {"message", "type", "param", "code"}
            status, _, answer = await post(url, b"x" * 70000)
            assert status == 413 and answer["error"]["code"] == "request_too_large"
            assert servers.stats()["tutor"]["statuses"] == {"200": 5, "400": 7, "413": 1}
    asyncio.run(main())


def test_provider_sims_draw_free_text_as_its_scene():
    from serve.provider_sims import draw_image

    assert draw_image("A photo of a red circle.", 3, 32) == draw_image("a red circle", 3, 32)
    assert draw_image("a red circle", 3, 32) != draw_image("a photo of a cat", 3, 32)  # noise


# -- the gateway ---------------------------------------------------------------

def test_gateway_keeps_to_rpm_and_max_in_flight(tmp_path):
    async def main() -> None:
        cfg = teacher(rpm=600, latency_s=0.0)  # one request per 0.1 s
        async with serving(cfg) as (servers, url):
            gw = gateway(cfg, url, tmp_path / "rpm")
            t0 = time.monotonic()
            out = await gw.render_many([(GOOD, s) for s in range(6)])
            assert time.monotonic() - t0 >= 0.45 and all("ref" in r for r in out)
            await gw.close()

        cfg = teacher(max_in_flight=2, latency_s=0.1)
        async with serving(cfg) as (servers, url):
            gw = gateway(cfg, url, tmp_path / "slots")
            t0 = time.monotonic()
            out = await gw.render_many([(GOOD, s) for s in range(6)])
            assert time.monotonic() - t0 >= 0.28 and all("ref" in r for r in out)
            assert servers.stats()["tutor"]["max_in_flight"] == 2
            await gw.close()
    asyncio.run(main())


def test_gateway_retries_503_and_honours_retry_after(tmp_path):
    async def main() -> None:
        # The server's 503s come from Random(seed): seed 2 answers 3 of its first 15
        # requests with 503, so no request can run out of its 6 attempts.
        cfg = teacher(error_rate=0.3, seed=2)
        async with serving(cfg) as (servers, url):
            gw = gateway(cfg, url, tmp_path / "503")
            out = await gw.render_many([(GOOD, s) for s in range(12)])
            assert all("ref" in r for r in out), out
            n503 = servers.stats()["tutor"]["statuses"].get("503", 0)
            assert n503 > 0 and gw.stats()["retries"] == n503 and gw.stats()["paid_calls"] == 12
            await gw.close()

        # One request per 0.5 s window; the gateway's own backoff (<= 0.05 s) would
        # burn its 6 attempts in well under a window, so success needs Retry-After.
        cfg = teacher(server_rpm=120)
        async with serving(cfg, rate_window_s=0.5) as (servers, url):
            gw = gateway(cfg, url, tmp_path / "429")
            t0 = time.monotonic()
            out = await gw.render_many([(GOOD, s) for s in range(3)])
            assert all("ref" in r for r in out), out
            assert time.monotonic() - t0 >= 0.95
            assert gw.stats()["throttled_429"] >= 2 and servers.stats()["tutor"]["images"] == 3
            await gw.close()
    asyncio.run(main())


def test_gateway_never_pays_twice(tmp_path):
    async def main() -> None:
        cfg = teacher(latency_s=0.05)
        async with serving(cfg) as (servers, url):
            gw = gateway(cfg, url, tmp_path)
            together = await asyncio.gather(*(gw.render(GOOD, 7) for _ in range(5)))
            assert len({r["ref"] for r in together}) == 1
            assert sorted(r["cached"] for r in together) == [False] + [True] * 4
            later = await gw.render(GOOD, 7)
            assert later["cached"] and later["ref"] == together[0]["ref"]
            await gw.close()

            again = gateway(cfg, url, tmp_path)  # a restart: only the ledger remembers
            assert (await again.render(GOOD, 7))["cached"]
            assert again.stats()["spent"] == pytest.approx(0.01) and again.stats()["paid_calls"] == 0
            await again.close()
            assert servers.stats()["tutor"]["images"] == 1
        assert Ledger(tmp_path / "ledger.sqlite").spent() == pytest.approx(0.01)
        assert ImageStore(tmp_path / "images").has(together[0]["ref"])
    asyncio.run(main())


def test_a_call_cut_off_mid_flight_is_paid_once(tmp_path):
    """The gateway dies while the teacher is drawing (billed, never received); the
    restarted gateway asks again with the same Idempotency-Key and gets that image."""
    async def main() -> None:
        cfg = teacher(latency_s=0.4)
        async with serving(cfg) as (servers, url):
            gw = gateway(cfg, url, tmp_path)
            doomed = asyncio.ensure_future(gw.render(GOOD, 3))
            await asyncio.sleep(0.15)           # the request is at the server now
            for task in [doomed, *gw._inflight.values()]:  # the process dies: every task stops
                task.cancel()
            await gw.close()                    # connection gone: nothing recorded
            assert Ledger(tmp_path / "ledger.sqlite").entries() == []
            again = gateway(cfg, url, tmp_path)
            out = await again.render(GOOD, 3)
            await again.close()
            st = servers.stats()["tutor"]
            assert st["images"] == 1 and st["replayed"] == 1 and not out["cached"]
            assert len(Ledger(tmp_path / "ledger.sqlite").entries()) == 1

            key = again.idempotency_key(GOOD, 3)
            async with aiohttp.ClientSession() as s:  # a key reused for another call is refused
                async with s.post(url + "/images/generations", json=req(seed=4),
                                  headers={"Idempotency-Key": key}) as r:
                    assert r.status == 422 and (await r.json())["error"]["code"] == "idempotency_key_reused"
    asyncio.run(main())


def test_gateway_never_exceeds_budget_under_concurrency(tmp_path):
    async def main() -> None:
        cfg = teacher(budget=0.05, latency_s=0.05)
        async with serving(cfg) as (servers, url):
            gw = gateway(cfg, url, tmp_path)
            out = await gw.render_many([(GOOD, s) for s in range(20)])
            ok = [r for r in out if "ref" in r]
            refused = [r for r in out if r.get("error_type") == "BudgetExceeded"]
            assert len(ok) == 5 and len(refused) == 15 and "budget" in refused[0]["error"]
            assert gw.stats()["spent"] == pytest.approx(0.05)
            assert servers.stats()["tutor"]["requests"] == 5
            await gw.close()

            again = gateway(cfg, url, tmp_path)  # the spend survives a restart
            assert (await again.render(GOOD, ok[0]["seed"]))["cached"]  # bought images stay free
            with pytest.raises(BudgetExceeded):
                await again.render(GOOD, 99)
            await again.close()
    asyncio.run(main())


def test_gateway_does_not_retry_permanent_errors(tmp_path):
    async def main() -> None:
        cfg = teacher()
        async with serving(cfg) as (servers, url):
            gw = gateway(cfg, url, tmp_path)
            bad, good = await gw.render_many([(BAD, 0), (GOOD, 0)])
            assert bad["error_type"] == "TeacherGatewayError" and "purple" in bad["error"]
            assert "ref" in good
            assert servers.stats()["tutor"]["requests"] == 2
            assert gw.stats()["retries"] == 0 and gw.stats()["errors"] == 1
            with pytest.raises(TeacherGatewayError) as info:
                await gw.render(BAD, 1)
            assert info.value.status == 400 and info.value.permanent
            await gw.close()
    asyncio.run(main())


def test_gateway_never_reveals_the_api_key(tmp_path, monkeypatch, caplog):
    async def main() -> None:
        cfg = teacher(api_key_env="EVOLVE_TEST_TEACHER_KEY")
        async with serving(cfg, api_keys={"tutor": "sk-right-secret"}) as (_, url):
            monkeypatch.setenv("EVOLVE_TEST_TEACHER_KEY", "sk-client-wrong-secret")
            gw = gateway(cfg, url, tmp_path)
            with pytest.raises(TeacherGatewayError) as info:
                await gw.render(GOOD, 0)
            [bad] = await gw.render_many([(GOOD, 1)])
            text = str(info.value) + repr(info.value) + json.dumps(bad) + json.dumps(gw.stats())
            assert info.value.status == 401 and "401" in bad["error"]
            assert "secret" not in text and "secret" not in caplog.text
            await gw.close()

            monkeypatch.setenv("EVOLVE_TEST_TEACHER_KEY", "sk-right-secret")
            gw = gateway(cfg, url, tmp_path)
            assert "ref" in await gw.render(GOOD, 0)
            await gw.close()
    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())


# -- as Ray actors -------------------------------------------------------------

@pytest.mark.integration
def test_gateway_and_teacher_host_as_ray_actors(ray_local, tmp_path):
    ray = ray_local
    host = EmbeddedTeacherHost.options(name="embedded-teachers-test").remote()
    cfg = teacher("rayed", latency_s=0.01)
    try:
        urls = ray.get(host.start.remote([cfg], 32))
        assert ray.get(host.urls.remote()) == urls
        gw = start_gateway(cfg, urls["rayed"], tmp_path / "images", tmp_path / "ledger.sqlite", 32)
        assert ray.get_actor("teacher:rayed") is not None
        out = ray.get(gw.render_many.remote([(GOOD, 0), (GOOD, 1), (GOOD, 0), (BAD, 0)]))
        assert [("ref" in r) for r in out] == [True, True, True, False]
        assert out[0]["ref"] == out[2]["ref"]
        stats = ray.get(gw.stats.remote())
        assert stats["paid_calls"] == 2 and stats["spent"] == pytest.approx(0.02)
        with pytest.raises(TeacherGatewayError):  # typed errors survive the trip through Ray
            ray.get(gw.render.remote(BAD, 2))
        assert ray.get(host.stats.remote())["rayed"]["images"] == 2
        assert ImageStore(tmp_path / "images").has(out[1]["ref"])
        ray.kill(gw)
    finally:
        ray.get(host.stop.remote())
        ray.kill(host)


# -- the gateway over every provider's protocol ----------------------------------------------------

PROVIDER_MODELS = {"bfl": "flux-pro-1.1", "fal": "fal-ai/flux/dev", "replicate": "black-forest-labs/flux-schnell",
                   "stability": "core", "ideogram": "V_3", "openai": "teacher-x"}


@contextlib.asynccontextmanager
async def provider_rig(kind: str, tmp_path, monkeypatch, **knobs: Any):
    from serve.provider_sims import ProviderSim

    knobs = {"job_s": 0.05, "native_side": 64, **knobs}
    sim = ProviderSim(kind, api_key="sk-provider-secret", **knobs)
    base = await sim.start()
    monkeypatch.setenv("PROVIDER_KEY", "sk-provider-secret")
    cfg = teacher("pro", kind=kind, model=PROVIDER_MODELS[kind], api_key_env="PROVIDER_KEY",
                  poll_interval_s=0.01, max_poll_s=5)
    try:
        yield sim, cfg, (lambda: gateway(cfg, base, tmp_path))
    finally:
        await sim.stop()


@pytest.mark.parametrize("kind", sorted(PROVIDER_MODELS))
def test_gateway_buys_from_every_provider(kind, tmp_path, monkeypatch):
    async def main() -> None:
        async with provider_rig(kind, tmp_path, monkeypatch) as (sim, cfg, make):
            gw = make()
            out = await gw.render_many([(GOOD, 1), (GOOD, 2), (GOOD, 1)])
            await gw.close()
            assert [o.get("error") for o in out] == [None] * 3, out
            png = ImageStore(tmp_path / "images").get(out[0]["ref"])
            assert from_png(png, 32).shape == (32, 32, 3)  # aspect-ratio providers' 64 px, scaled to 32
            entries = Ledger(tmp_path / "ledger.sqlite").entries()
            assert len(entries) == 2 and sim.stats()["charged"] == 2
            if kind in ("stability", "ideogram", "replicate"):
                assert entries[0]["native_size"] == 64
            assert gw.stats()["spent"] == pytest.approx(2 * cfg.price_per_image)
    asyncio.run(main())


@pytest.mark.parametrize("kind", ["bfl", "fal", "replicate"])
def test_gateway_killed_after_submit_collects_after_restart(kind, tmp_path, monkeypatch):
    """A job paid for, then the gateway dies while polling: the restarted gateway
    collects that job (free) instead of submitting again."""
    async def main() -> None:
        # (Replicate holds the create call up to `Prefer: wait`; cut short so the job is polled.)
        async with provider_rig(kind, tmp_path, monkeypatch, job_s=0.5, sync_wait_cap_s=0.05) as (sim, cfg, make):
            gw = make()
            doomed = asyncio.ensure_future(gw.render(GOOD, 5))
            for _ in range(200):  # until the job is submitted and logged as open
                await asyncio.sleep(0.01)
                if gw.stats()["open_jobs"]:
                    break
            assert gw.stats()["open_jobs"] == 1
            for task in [doomed, *gw._inflight.values()]:
                task.cancel()
            await gw.close()
            assert Ledger(tmp_path / "ledger.sqlite").entries() == []

            again = make()
            assert again.stats()["spent"] == pytest.approx(cfg.price_per_image)  # the open job is money spent
            out = await again.render(GOOD, 5)
            await again.close()
            assert again.stats()["resumed_jobs"] == 1 and again.stats()["open_jobs"] == 0
            assert sim.counts(GOOD, 5)["charged"] == 1
            assert len(Ledger(tmp_path / "ledger.sqlite").entries()) == 1 and out["ref"]
            assert again.stats()["spent"] == pytest.approx(cfg.price_per_image)  # counted once
    asyncio.run(main())


def test_gateway_typed_outcomes(tmp_path, monkeypatch):
    async def main() -> None:
        async with provider_rig("bfl", tmp_path, monkeypatch, moderate="triangle") as (sim, cfg, make):
            gw = make()
            out = (await gw.render_many([("a triangle", 0)]))[0]
            assert out["kind"] == "content_policy" and out["error_type"] == "TeacherGatewayError", out
            # BFL does not charge a moderated task: nor does the ledger.
            assert gw.stats()["spent"] == 0 and sim.counts("a triangle", 0)["charged"] == 0
            asked = sim.stats()["requests"]
            again = make()  # even after a restart, a refused prompt is not sent again
            out = (await again.render_many([("a triangle", 0)]))[0]
            assert out["kind"] == "content_policy" and "refused earlier" in out["error"]
            assert sim.stats()["requests"] == asked and again.stats()["refused"] == 1
            await gw.close()
            await again.close()
        async with provider_rig("fal", tmp_path / "b", monkeypatch, placeholder=True) as (sim, cfg, make):
            gw = make()
            out = (await gw.render_many([(GOOD, 0)]))[0]
            assert out["kind"] == "safety_placeholder"
            assert gw.stats()["spent"] == pytest.approx(cfg.price_per_image)  # billed, unusable: still spent
            again = (await gw.render_many([(GOOD, 0)]))[0]  # the filter's verdict is the prompt's: not bought again
            assert again["kind"] == "safety_placeholder" and "refused earlier" in again["error"]
            assert sim.counts(GOOD, 0)["charged"] == 1
            await gw.close()
        async with provider_rig("bfl", tmp_path / "d", monkeypatch, fail_job_rate=1.0) as (sim, cfg, make):
            gw = make()
            assert (await gw.render_many([(GOOD, 0)]))[0]["kind"] == "failed"
            again = (await gw.render_many([(GOOD, 0)]))[0]  # billed for nothing once: not paid for again
            assert again["kind"] == "failed" and "failed earlier" in again["error"]
            assert sim.counts(GOOD, 0)["charged"] == 1 and gw.stats()["failed_before"] == 1
            await gw.close()
        async with provider_rig("stability", tmp_path / "c", monkeypatch, no_credits=True) as (sim, cfg, make):
            gw = make()
            first, second = await gw.render_many([(GOOD, 0), (GOOD, 1)])
            assert first["kind"] == second["kind"] == "credits"
            assert sim.stats()["requests"] <= 2
            assert (await gw.render_many([(GOOD, 2)]))[0]["kind"] == "credits"  # not sent: the account is empty
            assert sim.stats()["requests"] <= 2
            await gw.close()
    asyncio.run(main())


@pytest.mark.integration
def test_gateway_actor_killed_mid_batch_pays_nothing_twice(ray_local, tmp_path):
    """kill -9 of the gateway actor while a batch is at the teacher: Ray starts it
    again and asks the batch again; every image arrives, none is billed twice
    (this project's servers honour Idempotency-Key, so the calls in flight are
    asked again under their keys)."""
    import os
    import signal

    import ray

    cfg = teacher("killed", latency_s=0.3, max_in_flight=4)
    todo = [(GOOD, s) for s in range(12)]
    servers = TeacherServersThread([cfg], 32)
    urls = servers.start()
    servers_stats = servers.stats
    try:
        gw = start_gateway(cfg, urls["killed"], str(tmp_path / "images"), str(tmp_path / "ledger.sqlite"), 32)
        pid = ray.get(gw.pid.remote())
        pending = gw.render_many.remote(todo)
        deadline = time.time() + 20
        while servers_stats()["killed"]["images"] < 5 and time.time() < deadline:
            time.sleep(0.02)   # some bought, four more at the teacher right now
        os.kill(pid, signal.SIGKILL)
        out = ray.get(pending, timeout=60)  # the restarted gateway answers the same call
        assert ray.get(gw.pid.remote()) != pid
        assert all("ref" in o for o in out), out
        st = servers_stats()["killed"]
        ledger = Ledger(tmp_path / "ledger.sqlite")
        entries = ledger.entries()
        assert len(entries) == len({(e["prompt"], e["seed"]) for e in entries}) == len(todo)
        assert st["images"] == len(todo)  # billed once per image, the in-flight ones included
        assert st["replayed"] >= 1 and ledger.totals().uncertain == 0  # in-flight calls settled by asking again
        store = ImageStore(tmp_path / "images")
        assert all(store.has(o["ref"]) for o in out)
        print("killed mid-batch:", {"replayed": st["replayed"], "billed": st["images"]})
        ray.kill(gw)
    finally:
        servers.stop()


# -- spend when a paid call's outcome is unknown ----------------------------------------------------

@contextlib.asynccontextmanager
async def openai_rig(tmp_path, monkeypatch, knobs: dict | None = None, **cfg_kw: Any):
    """The OpenAI-Images simulator (no idempotency, as OpenAI) and a gateway factory."""
    from serve.provider_sims import ProviderSim

    sim = ProviderSim("openai", api_key="sk-provider-secret", **(knobs or {}))
    base = await sim.start()
    monkeypatch.setenv("PROVIDER_KEY", "sk-provider-secret")
    cfg_kw.setdefault("timeout_s", 0.3)
    cfg = teacher("pro", kind="openai", model="teacher-x", api_key_env="PROVIDER_KEY", **cfg_kw)
    try:
        yield sim, cfg, (lambda **kw: TeacherGateway(cfg, base, tmp_path / "images", tmp_path / "ledger.sqlite",
                                                     32, backoff_base_s=0.01, backoff_max_s=0.05, **kw))
    finally:
        await sim.stop()


def test_a_call_that_times_out_is_counted_spent_and_not_bought_again(tmp_path, monkeypatch):
    async def main() -> None:
        async with openai_rig(tmp_path, monkeypatch, {"stall_rate": 1.0, "stall_s": 1.0}) as (sim, cfg, make):
            gw = make()
            assert gw.timeout_s == 0.3  # the teacher's own timeout_s
            out = (await gw.render_many([(GOOD, 1)]))[0]
            assert out["kind"] == "uncertain" and "on_uncertain: skip" in out["error"], out
            st = gw.stats()
            assert st["uncertain"] == pytest.approx(0.01) and st["certain"] == 0
            assert st["spent"] == pytest.approx(0.01) and st["uncertain_calls"] == 1
            assert sim.counts(GOOD, 1)["charged"] == 1  # the server billed it: counting it was right
            asked = sim.stats()["requests"]
            assert (await gw.render_many([(GOOD, 1)]))[0]["kind"] == "uncertain"
            await gw.close()
            again = make()  # a restart does not forget it either
            assert (await again.render_many([(GOOD, 1)]))[0]["kind"] == "uncertain"
            assert sim.stats()["requests"] == asked and again.stats()["spent"] == pytest.approx(0.01)
            await again.close()
    asyncio.run(main())


def test_rebuy_pays_again_and_counts_both_charges(tmp_path, monkeypatch):
    async def main() -> None:
        async with openai_rig(tmp_path, monkeypatch, {"stall_rate": 1.0, "stall_s": 1.0},
                              on_uncertain="rebuy", max_attempts=1) as (sim, cfg, make):
            gw = make()
            first = (await gw.render_many([(GOOD, 1)]))[0]
            assert "error" in first and first["kind"] == "transient"  # out of attempts, may be bought again
            sim.knobs.stall_rate = 0.0
            second = await gw.render(GOOD, 1)
            st = gw.stats()
            assert second["ref"] and st["rebought"] == 1
            assert st["certain"] == pytest.approx(0.01) and st["uncertain"] == pytest.approx(0.01)
            assert sim.counts(GOOD, 1)["charged"] == 2 and st["spent"] == pytest.approx(0.02)
            await gw.close()
    asyncio.run(main())


def test_an_idempotent_server_is_asked_again_and_bills_once(tmp_path, monkeypatch):
    async def main() -> None:
        async with openai_rig(tmp_path, monkeypatch, {"stall_rate": 1.0, "stall_s": 1.0, "idempotency": True},
                              idempotency=True) as (sim, cfg, make):
            gw = make()
            out = await gw.render(GOOD, 1)
            st = gw.stats()
            assert out["ref"] and sim.stats()["replayed"] >= 1 and sim.counts(GOOD, 1)["charged"] == 1
            assert st["certain"] == pytest.approx(0.01) and st["uncertain"] == 0 and st["uncertain_now"] >= 1
            await gw.close()
    asyncio.run(main())


def test_a_gateway_killed_mid_call_counts_that_call_uncertain(tmp_path, monkeypatch):
    async def main() -> None:
        async with openai_rig(tmp_path, monkeypatch, {"job_s": 0.4}, timeout_s=5) as (sim, cfg, make):
            gw = make()
            doomed = asyncio.ensure_future(gw.render(GOOD, 3))
            await asyncio.sleep(0.15)  # the request is at the server now
            for task in [doomed, *gw._inflight.values()]:  # the process dies: every task stops
                task.cancel()
            await gw.close()
            again = make()
            st = again.stats()
            assert st["uncertain"] == pytest.approx(0.01) and st["uncertain_calls"] == 1
            assert (await again.render_many([(GOOD, 3)]))[0]["kind"] == "uncertain"
            await asyncio.sleep(0.4)
            assert sim.counts(GOOD, 3)["charged"] == 1
            await again.close()
    asyncio.run(main())


def test_the_budget_counts_uncertain_spend(tmp_path, monkeypatch):
    async def main() -> None:
        async with openai_rig(tmp_path, monkeypatch, {"stall_rate": 1.0, "stall_s": 1.0},
                              budget=0.015) as (sim, cfg, make):
            gw = make()
            first, second = await gw.render_many([(GOOD, 1)]), await gw.render_many([(GOOD, 2)])
            assert first[0]["kind"] == "uncertain" and second[0]["kind"] == "budget", second
            assert "uncertain" in second[0]["error"] and sim.stats()["charged"] == 1
            await gw.close()
    asyncio.run(main())
