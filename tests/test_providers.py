"""Provider clients against their local simulators: protocols, failures, typed outcomes.

Every client meets a server that speaks its provider's protocol (serve/provider_sims.py),
so these tests exercise real HTTP: auth headers, job states, polling, expiring URLs and
error bodies. Sizes are tiny and intervals short so the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import pickle
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from actors.teacher_http import GeneratedImage, TeacherHTTPError
from actors.providers import (PROVIDER_KINDS, ImageJob, ImageProvider, ProviderError, _error_text,
                              make_provider, validate_image)
from evolve.shapes import render, to_png
from serve.provider_sims import ProviderSim, ProviderSimThread, draw_image

KEY = "sk-live-ZQ9x7Kc3Vb1Nm-DO-NOT-LEAK"
WRONG_KEY = "sk-wrong-Pp4Tt8Rr2Ee6-ALSO-SECRET"
SIZE = 32
NATIVE = 64          # what aspect-ratio providers draw in these tests (real ones: ~1024)
PROMPT = "a red circle"
SEED = 7

MODELS = {
    "openai": "teacher-x",                       # an OpenAI-compatible server (like the embedded teachers)
    "bfl": "flux-pro-1.1",
    "fal": "fal-ai/flux/dev",
    "replicate": "black-forest-labs/flux-schnell",
    "stability": "core",
    "ideogram": "V_3",
}
ASYNC_KINDS = ("bfl", "fal", "replicate")              # submit, then poll
EXACT_KINDS = ("openai", "bfl", "fal")                 # honour pixel sizes: sizes are checked
URL_KINDS = ("openai", "bfl", "fal", "replicate", "ideogram")  # results behind expiring URLs


def run(coro_fn):
    """Run an async test body with asyncio.run (as the rest of the suite does)."""
    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(coro_fn(*args, **kwargs))
    return wrapper


Rig = tuple[ProviderSim, aiohttp.ClientSession, ImageProvider]


@asynccontextmanager
async def rig(kind: str, *, key: str | None = KEY, model: str | None = None, extra: dict | None = None,
              client: dict | None = None, **knobs: Any) -> AsyncIterator[Rig]:
    """A simulator of `kind`, a session and a client pointed at it."""
    knobs.setdefault("job_s", 0.03)
    knobs.setdefault("native_side", NATIVE)
    sim = ProviderSim(kind, api_key=KEY, **knobs)
    base = await sim.start()
    opts = {"poll_interval_s": 0.01, "max_poll_s": 5, "timeout_s": 5, **(client or {})}
    try:
        async with aiohttp.ClientSession() as session:
            yield sim, session, make_provider(kind, base, model or MODELS[kind], key, extra=extra, **opts)
    finally:
        await sim.stop()


def size_of(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return im.size


def expected_side(provider: ImageProvider) -> int:
    return provider.expected_side(SIZE) or NATIVE


def assert_outcome(exc: BaseException, kind: str, *, retryable: bool = False) -> ProviderError:
    """A typed, scrubbed, picklable error of `kind`."""
    assert isinstance(exc, ProviderError), f"{type(exc).__name__}: {exc}"
    assert isinstance(exc, TeacherHTTPError)  # the gateway's retry rule applies unchanged
    assert exc.kind == kind, f"expected {kind}, got {exc!r}"
    assert exc.retryable is retryable
    clone = pickle.loads(pickle.dumps(exc))
    assert (clone.kind, clone.status, clone.message, clone.provider, clone.uncertain, clone.free) == (
        exc.kind, exc.status, exc.message, exc.provider, exc.uncertain, exc.free)
    for text in (str(exc), repr(exc), str(exc.args), str(clone), repr(exc.record())):
        assert KEY not in text and WRONG_KEY not in text, text
    return exc


async def fails(coro: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await coro
    return info.value


async def buy(provider: ImageProvider, session: aiohttp.ClientSession, prompt: str = PROMPT,
              seed: int = SEED) -> list[GeneratedImage]:
    return await provider.collect(session, await provider.submit(session, prompt, seed, SIZE), SIZE)


# -- every provider ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_happy_path(kind: str) -> None:
    async with rig(kind) as (sim, session, provider):
        images = await buy(provider, session)
        assert len(images) == 1
        side = expected_side(provider)
        assert size_of(images[0].png) == (side, side)
        assert images[0].png == to_png(render(PROMPT, SEED, side))  # the picture the sim drew, unchanged
        assert sim.counts(PROMPT, SEED)["charged"] == 1
        assert sim.stats()["auth_on_downloads"] == 0  # the key never travels to a download URL


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_wrong_key_is_auth_and_scrubbed(kind: str) -> None:
    # The sims echo the presented key in their auth errors; the client must scrub it.
    async with rig(kind, key=WRONG_KEY) as (sim, session, provider):
        exc = assert_outcome(await fails(provider.submit(session, PROMPT, SEED, SIZE)), "auth")
        assert exc.status in (401, 403)
        assert exc.provider == kind
        assert sim.stats()["charged"] == 0


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_missing_key_is_auth(kind: str) -> None:
    async with rig(kind, key=None) as (_, session, provider):
        assert_outcome(await fails(provider.submit(session, PROMPT, SEED, SIZE)), "auth")


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_empty_prompt_is_bad_request(kind: str) -> None:
    async with rig(kind) as (sim, session, provider):
        exc = assert_outcome(await fails(provider.submit(session, "", SEED, SIZE)), "bad_request")
        assert exc.status in (400, 422)
        assert sim.stats()["charged"] == 0


MODERATED = {"openai": "content_policy", "bfl": "content_policy", "fal": "safety_placeholder",
             "replicate": "content_policy", "stability": "content_policy", "ideogram": "content_policy"}


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_moderated_prompt_is_a_typed_outcome(kind: str) -> None:
    async with rig(kind, moderate="forbidden") as (_, session, provider):
        exc = await fails(buy(provider, session, "a forbidden circle"))
        assert_outcome(exc, MODERATED[kind])


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_rate_limit_is_retryable_with_retry_after(kind: str) -> None:
    async with rig(kind, rate_limit_rpm=60, rate_window_s=1.0) as (sim, session, provider):
        await provider.submit(session, PROMPT, 1, SIZE)
        exc = assert_outcome(await fails(provider.submit(session, PROMPT, 2, SIZE)), "transient", retryable=True)
        assert exc.status == 429
        assert exc.retry_after == 1.0
        assert sim.counts(PROMPT, 2) == {"charged": 0, "requests": 1, "429s": 1}
        assert sim.counts(PROMPT, 1)["charged"] == 1


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_server_error_is_retryable(kind: str) -> None:
    async with rig(kind, error_rate=1.0) as (sim, session, provider):
        exc = await fails(provider.submit(session, PROMPT, SEED, SIZE))
        assert_outcome(exc, "transient", retryable=True)
        assert exc.status in (500, 503)
        assert sim.stats()["charged"] == 0


# Whether a job that ended in the provider's failure state was charged, per its docs (provider_sims).
FAILED_JOB_CHARGED = {"bfl": 1, "fal": 0, "replicate": 1}


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_failed_job(kind: str) -> None:
    async with rig(kind, fail_job_rate=1.0) as (sim, session, provider):
        if kind in ASYNC_KINDS:
            # The job was accepted; its failure state will not change on a poll. BFL and Replicate bill it,
            # fal does not ("you pay only for successful outputs") and its client says so.
            job = await provider.submit(session, PROMPT, SEED, SIZE)
            exc = assert_outcome(await fails(provider.collect(session, job, SIZE)), "failed")
            assert sim.counts(PROMPT, SEED)["charged"] == FAILED_JOB_CHARGED[kind]
            assert exc.free is (FAILED_JOB_CHARGED[kind] == 0) and not exc.uncertain
        else:
            # Synchronous APIs report a failed generation as a 500: worth another try.
            exc = assert_outcome(await fails(provider.submit(session, PROMPT, SEED, SIZE)), "transient",
                                 retryable=True)
            assert exc.status == 500


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_black_placeholder_is_caught(kind: str) -> None:
    async with rig(kind, placeholder=True) as (_, session, provider):
        exc = assert_outcome(await fails(buy(provider, session)), "safety_placeholder")
        if kind == "stability":
            assert "CONTENT_FILTERED" in exc.message  # read from the finish-reason header


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_bytes_that_are_not_an_image(kind: str) -> None:
    async with rig(kind, corrupt=True) as (_, session, provider):
        exc = assert_outcome(await fails(buy(provider, session)), "invalid_image")
        assert "not a decodable image" in exc.message


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_no_credits_is_not_retryable(kind: str) -> None:
    # OpenAI says so with a 429 ("insufficient_quota") and fal with a 403: neither is a rate limit or a bad key.
    async with rig(kind, no_credits=True) as (sim, session, provider):
        assert_outcome(await fails(provider.submit(session, PROMPT, SEED, SIZE)), "credits")
        assert sim.stats()["charged"] == 0


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_collect_is_resumable_and_free(kind: str) -> None:
    async with rig(kind) as (sim, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        first = await provider.collect(session, job, SIZE)
        again = await provider.collect(session, job, SIZE)
        if job.images is None:  # a crash loses the job object: rebuild it from its ledger record
            again = await provider.collect(session, ImageJob.from_record(job.to_record()), SIZE)
        assert [i.png for i in again] == [i.png for i in first]
        assert sim.counts(PROMPT, SEED)["charged"] == 1


@pytest.mark.parametrize("kind", URL_KINDS)
@run
async def test_result_url_expires(kind: str) -> None:
    extra = {"response_format": "url"} if kind == "openai" else None
    model = "dall-e-3" if kind == "openai" else None
    async with rig(kind, url_ttl_s=0.3, model=model, extra=extra) as (sim, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        assert job.images is None and (job.result_url or job.poll_url)
        in_time = await provider.collect(session, job, SIZE)  # collected at once: fine
        assert len(in_time) == 1
        await asyncio.sleep(0.45)
        exc = assert_outcome(await fails(provider.collect(session, job, SIZE)), "expired")
        assert exc.status in (403, 404)
        assert sim.stats()["expired_downloads"] == 1
        assert sim.stats()["charged"] == 1  # an expired URL is not bought again here (DALL-E takes no seed)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@run
async def test_wrong_size_names_both_sizes(kind: str) -> None:
    async with rig(kind, wrong_size=True) as (_, session, provider):
        exc = assert_outcome(await fails(buy(provider, session)), "invalid_image")
        side = provider.expected_side(SIZE)
        assert f"{side}x{side}" in exc.message and f"{2 * side}x{2 * side}" in exc.message


@pytest.mark.parametrize("kind", ("replicate", "stability", "ideogram"))
@run
async def test_aspect_ratio_providers_keep_their_own_size(kind: str) -> None:
    # They cannot draw 32 px; the image is kept as drawn (not resized) and only checked for being real.
    async with rig(kind, native_side=48) as (_, session, provider):
        assert provider.expected_side(SIZE) is None
        assert size_of((await buy(provider, session))[0].png) == (48, 48)


# -- polling -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ASYNC_KINDS)
@run
async def test_polls_honour_retry_after(kind: str) -> None:
    knobs = {"poll_429s": 2, "retry_after_s": 0.1, "sync_wait_cap_s": 0.0}
    async with rig(kind, **knobs) as (sim, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        started = time.monotonic()
        images = await provider.collect(session, job, SIZE)
        assert len(images) == 1
        assert time.monotonic() - started >= 0.2  # slept the server's Retry-After twice
        assert sim.counts(PROMPT, SEED)["429s"] == 2


@pytest.mark.parametrize("kind", ASYNC_KINDS)
@run
async def test_polls_ride_out_transient_errors(kind: str) -> None:
    async with rig(kind, poll_503s=2, sync_wait_cap_s=0.0) as (sim, session, provider):
        images = await buy(provider, session)
        assert len(images) == 1
        assert sim.stats()["statuses"].get("503") == 2
        assert sim.counts(PROMPT, SEED)["charged"] == 1


@pytest.mark.parametrize("kind", ASYNC_KINDS)
@run
async def test_poll_deadline_is_transient(kind: str) -> None:
    async with rig(kind, job_s=5.0, sync_wait_cap_s=0.0, client={"max_poll_s": 0.1}) as (_, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        exc = assert_outcome(await fails(provider.collect(session, job, SIZE)), "transient", retryable=True)
        assert "still pending" in exc.message


@run
async def test_replicate_prefer_wait_returns_a_finished_prediction() -> None:
    async with rig("replicate", job_s=0.02) as (sim, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        assert job.result_url is not None  # finished inside the held request: nothing to poll
        await provider.collect(session, job, SIZE)
        assert sim.stats()["polls"] == 0
        assert sim.state.prefer_headers == ["wait=4"]  # within our own 5 s timeout


@run
async def test_replicate_polls_when_the_wait_runs_out() -> None:
    async with rig("replicate", job_s=0.1, sync_wait_cap_s=0.01) as (sim, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        assert job.result_url is None and job.poll_url
        assert len(await provider.collect(session, job, SIZE)) == 1
        assert sim.stats()["polls"] >= 1


@run
async def test_bfl_unknown_task_is_not_found() -> None:
    async with rig("bfl") as (sim, session, provider):
        job = ImageJob("bfl", "nope", f"{sim.base_url}/v1/get_result?id=nope", None, None)
        assert_outcome(await fails(provider.collect(session, job, SIZE)), "not_found")


@run
async def test_bfl_asks_for_a_size_it_accepts() -> None:
    # FLUX takes multiples of 32 in [256, 1440]: a 32 px teacher is asked for 256 px, and gets it.
    async with rig("bfl") as (_, session, provider):
        assert provider.requested_side(32) == 256 and provider.requested_side(300) == 320
        assert size_of((await buy(provider, session))[0].png) == (256, 256)


# -- transport --------------------------------------------------------------------------------------

@run
async def test_timeout_is_transient() -> None:
    async with rig("bfl", latency_s=0.3, client={"timeout_s": 0.1}) as (_, session, provider):
        exc = await fails(provider.submit(session, PROMPT, SEED, SIZE))
        assert_outcome(exc, "transient", retryable=True)
        assert exc.status is None and "no answer" in exc.message
        assert exc.uncertain  # sent, unanswered: the client cannot know whether it was billed


@run
async def test_connection_refused_is_transient() -> None:
    sim = ProviderSim("fal", api_key=KEY)
    base = await sim.start()
    await sim.stop()  # nothing listens there now
    async with aiohttp.ClientSession() as session:
        provider = make_provider("fal", base, MODELS["fal"], KEY, timeout_s=2)
        exc = await fails(provider.submit(session, PROMPT, SEED, SIZE))
        assert_outcome(exc, "transient", retryable=True)
        assert exc.status is None
        assert not exc.uncertain and "could not connect" in exc.message  # nothing was sent: nothing billed


# -- OpenAI specifics ----------------------------------------------------------------------------------

@run
async def test_gpt_image_models_get_no_response_format() -> None:
    # The sim, like OpenAI, rejects response_format (and seed) for gpt-image-*; the client leaves them out
    # and asks for 1024x1024, which every OpenAI model draws (the gateway scales it down).
    async with rig("openai", model="gpt-image-1") as (sim, session, provider):
        assert provider.requested_side(SIZE) == 1024 and provider.expected_side(SIZE) == 1024
        images = await buy(provider, session)
        assert size_of(images[0].png) == (1024, 1024)
        assert sim.counts(PROMPT, 0)["charged"] == 1  # no seed went out


@run
async def test_idempotency_key_makes_a_repeated_purchase_free() -> None:
    # This project's own servers (idempotency=True) replay the billed answer to a repeated key.
    async with rig("openai", idempotency=True) as (sim, session, provider):
        first = await provider.generate(session, PROMPT, SEED, SIZE, idempotency_key="evolve-abc")
        again = await provider.generate(session, PROMPT, SEED, SIZE, idempotency_key="evolve-abc")
        assert again[0].png == first[0].png
        assert sim.counts(PROMPT, SEED)["charged"] == 1 and sim.stats()["replayed"] == 1
        exc = await fails(provider.submit(session, PROMPT, SEED + 1, SIZE, idempotency_key="evolve-abc"))
        assert_outcome(exc, "bad_request")  # a key reused for another purchase


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_a_repeated_idempotency_key_is_billed_again(kind: str) -> None:
    # No provider documents Idempotency-Key for image generation (OpenAI included): every one takes the
    # header and bills the second call as a new purchase, as the real services would.
    async with rig(kind) as (sim, session, provider):
        for _ in range(2):
            assert len(await provider.generate(session, PROMPT, SEED, SIZE, idempotency_key="evolve-k")) == 1
        assert sim.counts(PROMPT, SEED)["charged"] == 2 and sim.stats()["replayed"] == 0


@run
async def test_openai_compatible_teacher_keeps_flaws() -> None:
    async with rig("openai") as (_, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        flawed = ImageJob("openai", None, None, None, (GeneratedImage(job.images[0].png, ["count"]),))
        assert (await provider.collect(session, flawed, SIZE))[0].flaws == ["count"]


# -- OpenAI's own models: the sim answers as OpenAI does ---------------------------------------------------

async def post_images(sim: ProviderSim, session: aiohttp.ClientSession, **body: Any) -> tuple[int, dict]:
    async with session.post(f"{sim.base_url}/images/generations", json={"prompt": PROMPT, **body},
                            headers={"Authorization": f"Bearer {KEY}"}) as resp:
        return resp.status, await resp.json()


def openai_400(status: int, body: dict, param: str, code: str | None) -> str:
    """Check an OpenAI-shaped 400 {"error": {"message", "type", "param", "code"}}; return its message."""
    assert status == 400, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code), err
    return err["message"]


REJECTED_SIZES = {"dall-e-2": ["32x32", "1792x1024", "auto"], "dall-e-3": ["512x512", "1536x1024"],
                  "gpt-image-1": ["512x512", "1792x1024", "64x64"], "gpt-image-1-mini": ["256x256"]}


@pytest.mark.parametrize("model", sorted(REJECTED_SIZES))
@run
async def test_openai_sim_rejects_seed_and_sizes_its_models_do_not_draw(model: str) -> None:
    async with rig("openai") as (sim, session, _):
        message = openai_400(*await post_images(sim, session, model=model, size="1024x1024", seed=3),
                             "seed", "unknown_parameter")
        assert message == "Unknown parameter: 'seed'."
        for size in REJECTED_SIZES[model]:
            message = openai_400(*await post_images(sim, session, model=model, size=size), "size", "invalid_value")
            assert repr(size) in message and "'1024x1024'" in message
        assert sim.stats()["charged"] == 0


@run
async def test_openai_sim_model_rules() -> None:
    async with rig("openai") as (sim, session, _):
        assert openai_400(*await post_images(sim, session, model="dall-e-3", n=2), "n", "invalid_value")
        openai_400(*await post_images(sim, session, model="gpt-image-1", response_format="url"),
                   "response_format", "unknown_parameter")
        # What each draws, non-square sizes included (the scene stretched to width x height).
        for model, size, want in [("dall-e-2", "256x256", (256, 256)), ("dall-e-3", "1792x1024", (1792, 1024)),
                                  ("gpt-image-1", "1024x1536", (1024, 1536)), ("gpt-image-1", None, (1024, 1024))]:
            status, body = await post_images(sim, session, model=model, response_format="b64_json", size=size)
            if model.startswith("gpt-image"):  # always base64, and response_format is refused
                status, body = await post_images(sim, session, model=model, **({"size": size} if size else {}))
            assert status == 200, body
            assert size_of(base64.b64decode(body["data"][0]["b64_json"])) == want
        # A DALL-E model answers a URL unless asked otherwise.
        status, body = await post_images(sim, session, model="dall-e-3")
        assert status == 200 and body["data"][0]["url"].startswith(sim.state.origin)
        # Any other model name is an OpenAI-compatible server: any square, seed honoured.
        status, body = await post_images(sim, session, model="teacher-x", size="48x48", seed=5,
                                         response_format="b64_json")
        assert status == 200 and size_of(base64.b64decode(body["data"][0]["b64_json"])) == (48, 48)
        assert openai_400(*await post_images(sim, session, model="teacher-x", size="48x64"), "size", None)


@pytest.mark.parametrize("model", ["dall-e-2", "dall-e-3", "gpt-image-1"])
@run
async def test_openai_client_asks_official_models_for_1024(model: str) -> None:
    async with rig("openai", model=model) as (sim, session, provider):
        assert provider.requested_side(SIZE) == 1024 and provider.expected_side(SIZE) == 1024
        images = await buy(provider, session)
        assert size_of(images[0].png) == (1024, 1024)
        assert sim.counts(PROMPT, 0)["charged"] == 1


def test_openai_client_refuses_a_misconfigured_official_model() -> None:
    for model, size in [("dall-e-2", "1792x1024"), ("dall-e-3", "256x256"), ("gpt-image-1", "512x512"),
                        ("gpt-image-1-mini", "32x32")]:
        with pytest.raises(ValueError) as info:
            make_provider("openai", None, model, KEY, extra={"size": size})
        text = str(info.value)
        assert model in text and size in text and "1024x1024" in text, text
    with pytest.raises(ValueError, match="gpt-image-1.*seed"):
        make_provider("openai", None, "gpt-image-1", KEY, extra={"params": {"seed": 1}})
    with pytest.raises(ValueError, match="dall-e-3.*'512x512'"):
        make_provider("openai", None, "dall-e-3", KEY, extra={"params": {"size": "512x512"}})
    with pytest.raises(ValueError, match="seed"):
        make_provider("openai", None, "dall-e-2", KEY, extra={"send_seed": True})
    # Sizes they draw are fine; a non-square or "auto" one is not size-checked.
    wide = make_provider("openai", None, "gpt-image-1", KEY, extra={"size": "1536x1024"})
    assert wide.expected_side(SIZE) is None
    assert make_provider("openai", None, "dall-e-2", KEY, extra={"size": "256x256"}).expected_side(SIZE) == 256
    assert make_provider("openai", None, "gpt-image-1", KEY, extra={"size": "auto"}).expected_side(SIZE) is None
    # A compatible server keeps the teacher's size and its seed.
    compatible = make_provider("openai", None, "teacher-x", KEY, extra={"params": {"seed": 1}})
    assert compatible.requested_side(SIZE) == SIZE and compatible.expected_side(SIZE) == SIZE


# -- what a failure cost: uncertain and free outcomes -----------------------------------------------------

@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_a_reset_after_billing_is_uncertain(kind: str) -> None:
    # The server billed (or created the job), then dropped the connection without an HTTP answer.
    async with rig(kind, reset_rate=1.0) as (sim, session, provider):
        exc = assert_outcome(await fails(provider.submit(session, PROMPT, SEED, SIZE)), "transient",
                             retryable=True)
        assert exc.uncertain and exc.status is None and not exc.free
        assert any(name in exc.message for name in ("ServerDisconnectedError", "ClientOSError")), exc.message
        assert sim.counts(PROMPT, SEED)["charged"] == 1 and sim.stats()["resets"] == 1
        assert "500" not in sim.stats()["statuses"]


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_a_stalled_answer_times_out_uncertain(kind: str) -> None:
    async with rig(kind, stall_rate=1.0, stall_s=5.0, client={"timeout_s": 0.3}) as (sim, session, provider):
        started = time.monotonic()
        exc = assert_outcome(await fails(provider.submit(session, PROMPT, SEED, SIZE)), "transient",
                             retryable=True)
        assert exc.uncertain and "no answer within 0.3s" in exc.message
        assert sim.counts(PROMPT, SEED)["charged"] == 1 and sim.stats()["stalled"] == 1
    assert time.monotonic() - started < 3  # the sim let go once the client hung up


@pytest.mark.parametrize("kind", PROVIDER_KINDS)
@run
async def test_a_bare_429_has_no_retry_after(kind: str) -> None:
    async with rig(kind, rate_limit_rpm=60, rate_window_s=1.0, retry_after=False) as (sim, session, provider):
        await provider.submit(session, PROMPT, 1, SIZE)
        exc = assert_outcome(await fails(provider.submit(session, PROMPT, 2, SIZE)), "transient", retryable=True)
        assert exc.status == 429 and exc.retry_after is None and not exc.uncertain
        assert sim.counts(PROMPT, 2) == {"charged": 0, "requests": 1, "429s": 1}


@pytest.mark.parametrize("kind", ASYNC_KINDS)
@run
async def test_polls_ride_out_bare_429s(kind: str) -> None:
    async with rig(kind, poll_429s=2, retry_after=False, sync_wait_cap_s=0.0) as (sim, session, provider):
        assert len(await buy(provider, session)) == 1
        assert sim.counts(PROMPT, SEED)["429s"] == 2


def test_provider_error_fields_survive_pickle() -> None:
    err = ProviderError(None, "lost", 1.5, "transient", "bfl", uncertain=True, free=False)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.status, clone.message, clone.retry_after, clone.kind, clone.provider, clone.uncertain,
            clone.free) == (None, "lost", 1.5, "transient", "bfl", True, False)
    free = pickle.loads(pickle.dumps(ProviderError(200, "moderated", kind="content_policy", free=True)))
    assert free.free and not free.uncertain
    assert "uncertain=True" in repr(err) and "free=True" in repr(free)
    assert err.record()["uncertain"] is True and free.record()["free"] is True
    assert ProviderError(400, "x", kind="bad_request").args == (400, "x", None, "bad_request", "", False, False)


# -- BFL: active tasks, moderation ----------------------------------------------------------------------

@run
async def test_bfl_429s_the_25th_task_while_24_are_pending() -> None:
    async with rig("bfl", job_s=0.6) as (sim, session, provider):
        jobs = await asyncio.gather(*(provider.submit(session, PROMPT, s, SIZE) for s in range(24)))
        assert len({j.job_id for j in jobs}) == 24
        exc = assert_outcome(await fails(provider.submit(session, PROMPT, 24, SIZE)), "transient", retryable=True)
        assert exc.status == 429 and "active tasks (24)" in exc.message
        assert exc.retry_after is None  # BFL documents no Retry-After for it
        assert sim.counts(PROMPT, 24) == {"charged": 0, "requests": 1, "429s": 1}
        await asyncio.sleep(0.65)  # they finish (Ready, uncollected): the slots are free again
        job = await provider.submit(session, PROMPT, 24, SIZE)
        assert len(await provider.collect(session, job, SIZE)) == 1
        assert sim.stats()["charged"] == 25


@run
async def test_bfl_kontext_max_allows_6_active_tasks() -> None:
    async with rig("bfl", job_s=0.5, model="flux-kontext-max") as (sim, session, provider):
        await asyncio.gather(*(provider.submit(session, PROMPT, s, SIZE) for s in range(6)))
        assert (await fails(provider.submit(session, PROMPT, 6, SIZE))).status == 429
    async with rig("bfl", job_s=0.5, max_active_tasks=None) as (sim, session, provider):
        await asyncio.gather(*(provider.submit(session, PROMPT, s, SIZE) for s in range(30)))
        assert sim.stats()["charged"] == 30


@run
async def test_bfl_moderated_task_is_free() -> None:
    async with rig("bfl", moderate="forbidden") as (sim, session, provider):
        exc = assert_outcome(await fails(buy(provider, session, "a forbidden circle")), "content_policy")
        assert exc.free and not exc.uncertain and "Request Moderated" in exc.message
        assert sim.counts("a forbidden circle", SEED)["charged"] == 0 and sim.stats()["jobs"] == 1


# -- Replicate: aborted and canceled ------------------------------------------------------------------------

@run
async def test_replicate_aborted_prediction_is_free() -> None:
    async with rig("replicate", abort_rate=1.0, sync_wait_cap_s=0.0) as (sim, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        exc = assert_outcome(await fails(provider.collect(session, job, SIZE)), "failed")
        assert exc.free and "aborted" in exc.message
        assert sim.counts(PROMPT, SEED)["charged"] == 0


@run
async def test_replicate_canceled_prediction_is_billed() -> None:
    async with rig("replicate", cancel_rate=1.0, sync_wait_cap_s=0.0) as (sim, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        exc = assert_outcome(await fails(provider.collect(session, job, SIZE)), "failed")
        assert not exc.free and "canceled" in exc.message
        assert sim.counts(PROMPT, SEED)["charged"] == 1
    # Canceled by the user (POST urls.cancel) while it runs: canceled on every later poll, and billed.
    async with rig("replicate", job_s=2.0, sync_wait_cap_s=0.0) as (sim, session, provider):
        job = await provider.submit(session, PROMPT, SEED, SIZE)
        async with session.post(f"{job.poll_url}/cancel", headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "canceled"
        exc = assert_outcome(await fails(provider.collect(session, job, SIZE)), "failed")
        assert not exc.free and "canceled" in exc.message and sim.counts(PROMPT, SEED)["charged"] == 1


# -- interface ---------------------------------------------------------------------------------------

def test_make_provider_names_the_allowed_kinds() -> None:
    with pytest.raises(ValueError) as info:
        make_provider("midjourney", None, "m", None)
    for kind in PROVIDER_KINDS:
        assert kind in str(info.value)


def test_provider_repr_hides_the_key() -> None:
    for kind in PROVIDER_KINDS:
        provider = make_provider(kind, None, MODELS[kind], KEY)
        assert KEY not in repr(provider) and KEY not in str(provider)


def test_collect_refuses_another_providers_job() -> None:
    provider = make_provider("bfl", None, "flux-dev", None)
    with pytest.raises(ValueError, match="fal"):
        asyncio.run(provider.collect(None, ImageJob("fal", "x", "u", "r", None), SIZE))  # type: ignore[arg-type]


def test_provider_error_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown error kind"):
        ProviderError(400, "x", kind="weird")
    err = ProviderError(429, "slow down", 2.0, "transient", "bfl")
    assert err.retryable and "bfl: transient (HTTP 429): slow down (retry after 2s)" == str(err)
    assert not ProviderError(400, "no", kind="bad_request").retryable


def test_sim_in_a_thread_for_sync_callers() -> None:
    with ProviderSimThread("ideogram", api_key=KEY, native_side=NATIVE) as base_url:
        async def main() -> list[GeneratedImage]:
            async with aiohttp.ClientSession() as session:
                return await make_provider("ideogram", base_url, "V_3", KEY, timeout_s=5).generate(
                    session, PROMPT, SEED, SIZE)
        images = asyncio.run(main())
        assert size_of(images[0].png) == (NATIVE, NATIVE)


def test_sim_thread_counts() -> None:
    thread = ProviderSimThread("stability", api_key=KEY, native_side=NATIVE)
    base_url = thread.start()
    try:
        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                await make_provider("stability", base_url, "core", KEY, timeout_s=5).generate(
                    session, PROMPT, SEED, SIZE)
        asyncio.run(main())
        assert thread.counts(PROMPT, SEED) == {"charged": 1, "requests": 1, "429s": 0}
    finally:
        thread.stop()


def test_unknown_sim_knob_is_named() -> None:
    with pytest.raises(TypeError, match="sleepy"):
        ProviderSim("bfl", sleepy=True)


# -- validate_image -------------------------------------------------------------------------------------

def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_validate_keeps_png_bytes() -> None:
    png = to_png(render(PROMPT, 1, SIZE))
    assert validate_image(png, SIZE) == png


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_validate_reencodes_to_png(fmt: str) -> None:
    arr = render("a blue square and a red circle", 3, 64)
    out = validate_image(_encoded(arr, fmt), 64)
    assert out.startswith(b"\x89PNG") and size_of(out) == (64, 64)


def test_validate_wrong_size_names_both() -> None:
    with pytest.raises(ProviderError, match="expected a 32x32 image, got 64x64") as info:
        validate_image(to_png(render(PROMPT, 1, 64)), 32)
    assert info.value.kind == "invalid_image"


@pytest.mark.parametrize("colour", [(0, 0, 0), (128, 128, 128), (255, 255, 255)])
def test_validate_flat_images_are_placeholders(colour: tuple[int, int, int]) -> None:
    flat = np.full((32, 32, 3), colour, np.uint8)
    for data in (to_png(flat), _encoded(flat, "JPEG")):
        with pytest.raises(ProviderError) as info:
            validate_image(data, 32)
        assert info.value.kind == "safety_placeholder"


@pytest.mark.parametrize("data", [b"", b"<html>oops</html>", to_png(render(PROMPT, 1, 32))[:60]])
def test_validate_rejects_non_images(data: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        validate_image(data, None)
    assert info.value.kind == "invalid_image"


def test_sim_draws_noise_for_text_outside_the_grammar() -> None:
    a, b = draw_image("a photo of a cat", 1, 64), draw_image("a photo of a cat", 1, 64)
    assert a == b and validate_image(a, 64) == a


# -- error bodies as the real services send them ---------------------------------------------------------

@pytest.mark.parametrize("kind,status,body,expected", [
    ("openai", 400, {"error": {"message": "Your request was rejected as a result of our safety system.",
                               "type": "image_generation_user_error", "code": None}}, "content_policy"),
    ("openai", 400, {"error": {"message": "Invalid value: 'x'. Supported values for 'moderation' are 'low' "
                               "and 'auto'.", "type": "invalid_request_error", "code": "invalid_value"}},
     "bad_request"),
    ("openai", 429, {"error": {"message": "You exceeded your current quota, please check your plan and billing "
                               "details.", "type": "insufficient_quota", "code": "insufficient_quota"}},
     "credits"),
    ("openai", 429, {"error": {"message": "Rate limit reached", "type": "requests",
                               "code": "rate_limit_exceeded"}}, "transient"),
    ("bfl", 422, {"detail": [{"loc": ["body", "safety_tolerance"], "msg": "Input should be less than or equal "
                              "to 6", "type": "less_than_equal"}]}, "bad_request"),
    ("bfl", 402, {"detail": "Insufficient credits"}, "credits"),
    ("fal", 422, [{"loc": ["body", "prompt"], "msg": "The content was flagged by a content checker.",
                   "type": "content_policy_violation"}], "content_policy"),
    ("fal", 422, {"detail": [{"loc": ["body", "prompt"], "msg": "The content was flagged by a content checker.",
                              "type": "content_policy_violation"}]}, "content_policy"),
    ("fal", 504, {"detail": "Request timed out", "error_type": "request_timeout"}, "transient"),
    ("replicate", 422, {"title": "Input validation failed", "detail": "- input.width: Must be less than or "
                        "equal to 1440", "status": 422}, "bad_request"),
    ("replicate", 404, {"title": "Not found", "detail": "The requested resource could not be found.",
                        "status": 404}, "not_found"),
    ("stability", 403, {"id": "abc", "name": "content_moderation", "errors": ["Your request was flagged by our "
                        "content moderation system."]}, "content_policy"),
    ("stability", 413, {"id": "abc", "name": "payload_too_large", "errors": ["body: payloads cannot be larger "
                        "than 10MiB"]}, "bad_request"),
    ("ideogram", 422, {"detail": "Prompt failed the safety check."}, "content_policy"),
    ("ideogram", 409, "conflict", "transient"),
])
def test_error_bodies_are_classified(kind: str, status: int, body: Any, expected: str) -> None:
    provider = make_provider(kind, None, MODELS[kind], KEY)
    raw = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
    message, code = _error_text(raw)
    assert provider._classify(status, message, code) == expected
