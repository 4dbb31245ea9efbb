"""Edgen inference: the trained student behind the OpenAI Images API, on Ray Serve.

    serve.run(build_edgen_app(EdgenServeConfig(checkpoint=...)), name="edgen", route_prefix="/")
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.images.generate(model="edgen", prompt="three triangles", n=2, size="32x32",
                           response_format="b64_json", extra_body={"seed": 7})

Routes:
- `POST /v1/images/generations`: `prompt`, `n`, `size`, `response_format`
  (`b64_json` only: nothing is stored to link to), `model` (optional), and the
  extras `seed` (image i uses seed + i; random when absent),
  `num_inference_steps`, `guidance_scale`.
- `GET /v1/models`: what is served.
- `GET /generate?prompt=...&seed=...`: one PNG, for a browser.

Hot reload (`watch_dir`): the replicas serve the newest complete checkpoint
in a folder (e.g. a running job's `checkpoints/`) and switch when a newer one
appears, without dropping a request.

Images of concurrent requests are sampled together (`@serve.batch`), grouped by
(steps, guidance, size) inside a batch; an image depends only on its prompt and seed,
never on the batch it was drawn in. Errors are OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`) with 4xx codes that name the
problem; nothing internal (no stack trace) reaches a client.

(No `from __future__ import annotations` here: the ingress class travels to
its replicas by value, and FastAPI must see `Request` as a type, not a name.)
"""


import asyncio
import base64
import hmac
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from evolve.config import EdgenServeConfig

app = FastAPI(title="Edgen", docs_url=None, redoc_url=None)
log = logging.getLogger("ray.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class ImagesRequest(BaseModel):
    """The OpenAI Images generation request, plus Edgen's documented extras."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = Field(None, ge=0, lt=2**31)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    user: str | None = None  # accepted and ignored, as OpenAI's


def _first_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    param = ".".join(str(x) for x in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}", param, "unknown_parameter")
    if param == "response_format":
        return ApiError(400, "response_format must be 'b64_json' (this server keeps no image URLs)", param)
    return ApiError(400, f"{param}: {err['msg']}", param, "invalid_value")


def model_list(model_id: str, created: int) -> dict:
    """The OpenAI `GET /v1/models` answer for a server of one model."""
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "evolve-director"}]}


def parse_images_request(body: bytes, model_name: str, max_n: int, max_prompt_chars: int) -> ImagesRequest:
    """An OpenAI Images request body, checked as every server here checks it: JSON
    object, known fields, a non-empty prompt within `max_prompt_chars` (stripped),
    the served model (or none named), 1 <= n <= max_n. Errors are `ApiError`s."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        req = ImagesRequest.model_validate(data)
    except ValidationError as e:
        raise _first_error(e) from None
    prompt = req.prompt.strip()
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    if len(prompt) > max_prompt_chars:
        raise ApiError(400, f"prompt is {len(prompt)} characters, over {max_prompt_chars}", "prompt")
    if req.model not in (None, model_name):
        raise ApiError(404, f"model {req.model!r} is not served here (this is {model_name!r})",
                       "model", "model_not_found")
    if not 1 <= req.n <= max_n:
        raise ApiError(400, f"n must be 1 to {max_n}, not {req.n}", "n")
    return req.model_copy(update={"prompt": prompt})


def served_sizes(student_config) -> dict[str, tuple[int, int]]:
    """OpenAI sizes ("WIDTHxHEIGHT") a student draws -> (height, width): its
    square, and a student trained on aspect buckets also each bucket."""
    S = student_config.image_size
    sizes = {f"{S}x{S}": (S, S)}
    enc = getattr(student_config, "encoders", None)
    if enc is not None and enc.aspect_buckets:
        from evolve.student.encoders import aspect_buckets

        sizes |= {f"{w}x{h}": (h, w) for h, w in aspect_buckets(S)}
    return sizes


def resolve_checkpoint(checkpoint: Path | None) -> Path:
    from evolve.driver import BASE_CHECKPOINT

    path = Path(checkpoint) if checkpoint is not None else BASE_CHECKPOINT
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no student checkpoint (config.json) in {path}")
    return path.resolve()


def newest_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete checkpoint folder (holding config.json and weights)
    under `folder`; half-written ones (".tmp", or without weights) are skipped."""
    if folder is None or not Path(folder).is_dir():
        return None
    done = [p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")
            and not p.name.endswith(".tmp") and (p / "config.json").exists() and any(p.glob("*.safetensors"))]
    return max(done, key=lambda p: (p.stat().st_mtime, p.name)).resolve() if done else None


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(app)
class Edgen:
    def __init__(self, cfg: EdgenServeConfig) -> None:
        import torch

        from evolve.student.generate import load_student

        self.cfg = cfg
        torch.set_num_threads(cfg.torch_threads)
        self.checkpoint = str(newest_checkpoint(cfg.watch_dir) or cfg.checkpoint or resolve_checkpoint(None))
        self.student = load_student(self.checkpoint)
        self.size = self.student.config.image_size
        self.created = int(time.time())
        self._sample_batch.set_max_batch_size(cfg.max_batch_size)
        self._sample_batch.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self.stats = {"requests": 0, "images": 0, "batches": 0, "max_batch": 0, "reloads": 0}
        if cfg.watch_dir:
            threading.Thread(target=self._watch, name="edgen-hot-reload", daemon=True).start()

    def _watch(self) -> None:
        """Hot reload (a thread): load the newest checkpoint beside the running
        model, then swap the reference; batches already running finish on the
        old one, so no request is dropped or sees a half-loaded model."""
        from evolve.student.generate import load_student

        while True:
            time.sleep(self.cfg.watch_every_s)
            try:
                path = newest_checkpoint(self.cfg.watch_dir)
                if path is None or str(path) == self.checkpoint:
                    continue
                student = load_student(path)
                if student.config.image_size != self.size:
                    raise ValueError(f"{path} draws {student.config.image_size}px, this server {self.size}px")
                self.student, self.checkpoint = student, str(path)
                self.stats["reloads"] += 1
            except Exception as e:  # noqa: BLE001 - keep serving the model we have
                log.warning("hot reload skipped: %s", e)

    # -- routes --------------------------------------------------------------------
    @app.post("/v1/images/generations")
    async def generations(self, request: Request):
        try:
            self._authorize(request)
            req = self._parse(await self._body(request))
            seeds = self._seeds(req)
            steps, guidance = self._sampling(req)
            size = self._size(req)
            pngs = await asyncio.gather(*[self._sample_batch((req.prompt, s, steps, guidance, size))
                                          for s in seeds])
        except ApiError as e:
            return e.response()
        self.stats["requests"] += 1
        self.stats["images"] += len(pngs)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(p).decode(), "revised_prompt": None} for p in pngs]}

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except ApiError as e:
            return e.response()
        return model_list(self.cfg.model_name, self.created)

    @app.get("/generate")
    async def generate(self, request: Request, prompt: str = "", seed: int = 0):
        try:
            self._authorize(request)
            req = self._parse(json.dumps({"prompt": prompt, "seed": seed}).encode())
            steps, guidance = self._sampling(req)
            png = await self._sample_batch((req.prompt, req.seed, steps, guidance, self._size(req)))
        except ApiError as e:
            return e.response()
        return Response(content=png, media_type="image/png")

    async def info(self) -> dict:
        """For tests and the CLI: what is served and how it has been batched."""
        return {"checkpoint": self.checkpoint, "size": self.size, **self.stats}

    # -- checks --------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.cfg.api_key_env:
            return
        token = os.environ.get(self.cfg.api_key_env)
        if not token:
            raise ApiError(500, "the server's API key is not configured", kind="server_error")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong bearer token", code="invalid_api_key",
                           kind="authentication_error")

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise ApiError(413, f"request body over {self.cfg.max_body_bytes} bytes")
        body = await request.body()
        if len(body) > self.cfg.max_body_bytes:
            raise ApiError(413, f"request body over {self.cfg.max_body_bytes} bytes")
        return body

    def _parse(self, body: bytes) -> ImagesRequest:
        cfg = self.cfg
        req = parse_images_request(body, cfg.model_name, cfg.max_n, cfg.max_prompt_chars)
        prompt = req.prompt
        sizes = served_sizes(self.student.config)
        if req.size not in (None, *sizes):
            raise ApiError(400, f"size {req.size!r} is not served; sizes: {list(sizes)}", "size")
        if cfg.grammar_check:
            from evolve.shapes.grammar import PromptError, parse

            try:
                parse(prompt)
            except PromptError as e:
                raise ApiError(400, f"prompt outside the shapes world: {e}", "prompt", "invalid_prompt") from None
        return req.model_copy(update={"prompt": prompt})

    def _sampling(self, req: ImagesRequest) -> tuple[int, float]:
        cfg = self.cfg
        steps = cfg.default_steps if req.num_inference_steps is None else req.num_inference_steps
        guidance = cfg.default_guidance if req.guidance_scale is None else req.guidance_scale
        if not 1 <= steps <= cfg.max_steps:
            raise ApiError(400, f"num_inference_steps must be 1 to {cfg.max_steps}, not {steps}",
                           "num_inference_steps")
        if not 1.0 <= guidance <= cfg.max_guidance:
            raise ApiError(400, f"guidance_scale must be 1 to {cfg.max_guidance}, not {guidance}",
                           "guidance_scale")
        return steps, float(guidance)

    def _size(self, req: ImagesRequest) -> tuple[int, int]:
        """(height, width) of the request's images (checked by _parse)."""
        return served_sizes(self.student.config)[req.size] if req.size else (self.size, self.size)

    @staticmethod
    def _seeds(req: ImagesRequest) -> list[int]:
        base = req.seed if req.seed is not None else random.randrange(2**31 - req.n)
        return [base + i for i in range(req.n)]

    # -- sampling ------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _sample_batch(self, items: list[tuple[str, int, int, float, tuple[int, int]]]) -> list[bytes]:
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(items))
        # The sampler is CPU/GPU bound: run it off the event loop, so that
        # requests keep arriving (and joining the next batch) meanwhile.
        return await asyncio.to_thread(self._sample_groups, items)

    def _sample_groups(self, items: list[tuple[str, int, int, float, tuple[int, int]]]) -> list[bytes]:
        from evolve.config import SampleConfig
        from evolve.shapes.render import to_png
        from evolve.student.diffusion import sample

        student = self.student  # one model for the whole batch, even across a hot reload
        out: list[bytes | None] = [None] * len(items)
        groups: dict[tuple[int, float, tuple[int, int]], list[int]] = {}
        for i, (_, _, steps, guidance, size) in enumerate(items):
            groups.setdefault((steps, guidance, size), []).append(i)
        for (steps, guidance, size), idx in groups.items():
            imgs = sample(student, [items[i][0] for i in idx], [items[i][1] for i in idx],
                          SampleConfig(steps=steps, guidance=guidance, batch_size=len(idx)), size)
            for i, img in zip(idx, imgs):
                out[i] = to_png(img)
        return out


def build_edgen_app(cfg: EdgenServeConfig):
    """The Serve application for `cfg` (config-driven, as ray.serve.llm's builders)."""
    # Resolved here: a missing checkpoint fails now, not in a replica.
    if cfg.watch_dir is None or newest_checkpoint(cfg.watch_dir) is None:
        cfg = cfg.model_copy(update={"checkpoint": resolve_checkpoint(cfg.checkpoint)})
    options = {"ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
               "max_ongoing_requests": max(64, 2 * cfg.max_batch_size)}
    if cfg.num_replicas == "auto" or cfg.autoscaling_config:
        options["autoscaling_config"] = cfg.autoscaling_config or {"min_replicas": 1, "max_replicas": 2}
    else:
        options["num_replicas"] = cfg.num_replicas
    return Edgen.options(**options).bind(cfg)
