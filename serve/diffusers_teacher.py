"""A local open-weights teacher: a diffusers pipeline behind the OpenAI Images API, on Ray Serve.

Any `DiffusionPipeline` checkpoint (SDXL, SD3, FLUX, PixArt, ...; a local
folder or a Hub id) served on the cluster's GPU nodes, speaking the API the
teacher gateway already speaks (`OpenAIImagesProvider`), so an all-open
cluster buys its teacher images from itself and needs no outside API:

    cfg = DiffusersTeacherConfig(pipeline="/models/pixart-sigma-1024", model_name="pixart",
                                 sizes=[1024], torch_dtype="float16", num_gpus=1)
    serve.run(build_diffusers_teacher_app(cfg), name="diffusers-teacher", route_prefix="/pixart")
    # the teacher, in the run config:
    TeacherConfig(name="pixart", kind="openai", base_url="http://HEAD:8000/pixart/v1", model="pixart",
                  price_per_image=0.0)

or `serve run serve.diffusers_teacher:build_diffusers_teacher_app pipeline=... model_name=...`
(or a Serve config file with these `args`): Serve validates them into a
`DiffusersTeacherConfig`.

Routes:
- `POST /v1/images/generations`: `prompt`, `model` (the served `model_name`;
  may be left out), `n` (1 to `max_n`), `size` ("WxH", one of the square
  `sizes`; absent or "auto": the largest), `response_format` (`b64_json` only:
  nothing is stored to link to, "url" is a 400), and the extras `seed`
  (image i uses seed + i; random when absent), `num_inference_steps`,
  `guidance_scale`. Header `Idempotency-Key`: a repeated key gets the first
  answer again (not drawn again); the same key with other parameters is a 422.
- `GET /v1/models`: the one served model.
- `GET /health`: liveness (no token needed), with the device and dtype.

Images of concurrent requests are drawn together (`@serve.batch`), grouped by
(size, steps, guidance): one pipeline call per group, with a list of prompts
and one `torch.Generator` per image seeded with that image's seed, so an image
depends on (prompt, seed, size, steps, guidance) and not on its batch-mates
(up to float rounding: kernels may sum in another order for another batch
size, which can move a pixel by one level now and then, on GPUs especially).
The pipeline runs in a thread, one batch at a time (a pipeline and its
scheduler are not thread-safe), so the replica keeps accepting requests.

Requests, auth and errors are checked and shaped by serve/openai_images.py,
as Edgen's are; size and sampling limits are this server's. Errors are
OpenAI-shaped (`ApiError`): 400 bad JSON / field / size / n / prompt / steps /
guidance, 401 wrong bearer token, 404 unknown model, 413 body too big, 422
reused Idempotency-Key, 500 when the pipeline fails (the message names no
internals; the replica log has the traceback).

The idempotency memory is an LRU in each replica: with several replicas a
replayed key may reach another one, which draws again (the same seed gives
the same image, so only the compute is paid twice; there is no bill here).

(No `from __future__ import annotations`: the ingress class travels to its
replicas by value, and FastAPI must see `Request` as a type, not a name.)
"""


import asyncio
import inspect
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, field_validator, model_validator
from ray import serve

from evolve.config import _Strict
from serve.openai_images import (ApiError, ImagesPolicy, ImagesRequest, check_bearer, image_seeds, images_response,
                                 model_list, parse_images_request, read_body)

app = FastAPI(title="Diffusers teacher", docs_url=None, redoc_url=None)
log = logging.getLogger("ray.serve")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)

# Keys this server sets on every pipeline call: `extra_call_kwargs` may not override them.
RESERVED_CALL_KWARGS = frozenset({"prompt", "height", "width", "num_inference_steps", "guidance_scale",
                                  "generator", "num_images_per_prompt", "output_type", "return_dict"})
RESERVED_LOAD_KWARGS = frozenset({"dtype", "torch_dtype", "local_files_only", "pretrained_model_name_or_path"})


class DiffusersTeacherConfig(_Strict):
    """One diffusers pipeline served as an OpenAI-Images teacher (serve/diffusers_teacher.py)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    pipeline: str = Field(min_length=1, description="a local diffusers folder (model_index.json) or a Hub id")
    model_name: str = Field("diffusers", pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
                            description="the model /v1/models shows and requests name")
    torch_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="weights' dtype (float16 on a CPU falls back to float32)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
                        description="auto: cuda if available, else cpu")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per replica (0 on a CPU-only cluster)")
    num_cpus: float = Field(1.0, gt=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources per replica, e.g. "
                                        "{teachers: 1} to land on cluster.yaml's teacher nodes")
    num_replicas: int | Literal["auto"] = Field(1, description="'auto' or autoscaling_config: autoscale")
    autoscaling_config: dict | None = Field(None, description="Serve autoscaling (min/max_replicas, ...)")
    max_batch_size: int = Field(4, ge=1, description="@serve.batch: most images drawn together")
    batch_wait_s: float = Field(0.05, ge=0, description="@serve.batch: wait this long for batch-mates")
    default_steps: int = Field(30, ge=1)
    max_steps: int = Field(100, ge=1)
    default_guidance: float = Field(4.5, ge=0)
    max_guidance: float = Field(30.0, ge=0)
    sizes: list[int] = Field(default_factory=lambda: [512, 1024],
                             description="square sides served (multiples of 8); default size: the largest")
    max_n: int = Field(4, ge=1, le=128, description="most images per request")
    api_key_env: str | None = Field(None, description="env var holding the bearer token; None = no auth")
    max_prompt_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(65536, ge=256, description="larger request bodies get 413")
    enable_cpu_offload: bool = Field(False, description="accelerate's model CPU offload (CUDA only): "
                                     "less GPU memory, slower")
    extra_call_kwargs: dict[str, Any] = Field(default_factory=dict,
                                              description="passed to every pipeline call "
                                              "(e.g. {'max_sequence_length': 256})")
    load_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to from_pretrained "
                                        "(e.g. {'variant': 'fp16'})")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="the replicas' Ray runtime_env, "
                                        "e.g. {'env_vars': {'HF_HOME': '/models/hf'}}")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per replica; None: torch's")
    idempotency_keys: int = Field(1024, ge=0, description="recent Idempotency-Keys remembered per replica")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("sizes must name at least one size")
        bad = [s for s in v if s < 8 or s % 8]
        if bad:
            raise ValueError(f"sizes must be multiples of 8 (a diffusers rule), not {bad}")
        return sorted(set(v))

    @field_validator("extra_call_kwargs")
    @classmethod
    def _call_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(RESERVED_CALL_KWARGS & set(v))
        if clash:
            raise ValueError(f"extra_call_kwargs may not set {clash}: the server sets them per request")
        return v

    @field_validator("load_kwargs")
    @classmethod
    def _load_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(RESERVED_LOAD_KWARGS & set(v))
        if clash:
            raise ValueError(f"load_kwargs may not set {clash}: use torch_dtype / pipeline")
        return v

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "DiffusersTeacherConfig":
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps {self.default_steps} is over max_steps {self.max_steps}")
        if self.default_guidance > self.max_guidance:
            raise ValueError(f"default_guidance {self.default_guidance} is over max_guidance {self.max_guidance}")
        return self


def pipeline_source(spec: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder).

    An existing folder is local (made absolute: replicas run elsewhere); an
    absolute path that is not here may still be on the GPU nodes (local,
    checked there); any other path-like spec ("./x", "~/x") must exist here;
    the rest ("org/name") is a Hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return str(path.resolve()), True
    if path.is_absolute():
        return str(path), True
    if spec.startswith((".", "~")) or path.exists():
        raise FileNotFoundError(f"no diffusers pipeline folder at {spec}")
    return spec, False


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@serve.deployment(ray_actor_options={"num_cpus": 1, "num_gpus": 1}, max_ongoing_requests=64)
@serve.ingress(app)
class DiffusersTeacher:
    def __init__(self, cfg: DiffusersTeacherConfig) -> None:
        import torch
        from diffusers import DiffusionPipeline

        self.cfg = cfg
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = resolve_device(cfg.device)
        dtype = getattr(torch, cfg.torch_dtype)
        if self.device == "cpu" and dtype == torch.float16:
            log.warning("float16 on a CPU is slow or unsupported: loading %s as float32", cfg.pipeline)
            dtype = torch.float32
        self.dtype = str(dtype).removeprefix("torch.")
        source, local = pipeline_source(cfg.pipeline)
        started = time.time()
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=local, **cfg.load_kwargs)
        if cfg.enable_cpu_offload and self.device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            if cfg.enable_cpu_offload:
                log.warning("enable_cpu_offload needs CUDA; the pipeline stays on %s", self.device)
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.pipeline_class = type(pipe).__name__
        self._accepts = set(inspect.signature(pipe.__call__).parameters)
        self._lock = threading.Lock()  # one pipeline call at a time, whatever calls it
        log.info("%s (%s) loaded on %s as %s in %.1fs", cfg.pipeline, self.pipeline_class, self.device,
                 self.dtype, time.time() - started)
        self.created = int(time.time())
        self._draw_batch.set_max_batch_size(cfg.max_batch_size)
        self._draw_batch.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self.stats = {"requests": 0, "images": 0, "batches": 0, "max_batch": 0, "pipeline_calls": 0,
                      "replayed": 0}
        # Idempotency-Key -> (the parameters asked, the task drawing the answer), most recent last.
        self._idempotent: OrderedDict[str, tuple[tuple, asyncio.Future]] = OrderedDict()

    # -- routes --------------------------------------------------------------------
    @app.post("/v1/images/generations")
    async def generations(self, request: Request):
        try:
            self._authorize(request)
            req = self._parse(await read_body(request.headers.get("content-length"), request.body,
                                              self.cfg.max_body_bytes))
            size, steps, guidance = self._settings(req)
            key = request.headers.get("idempotency-key")
            if key:
                return await self._replayable(key, req, size, steps, guidance)
            return await self._answer(req, size, steps, guidance)
        except ApiError as e:
            return error_response(e)
        except Exception:  # noqa: BLE001 - a client sees a 500, the replica log the traceback
            log.exception("image generation failed")
            return error_response(ApiError(500, "image generation failed on the server", code="generation_failed",
                                           type="server_error"))

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except ApiError as e:
            return error_response(e)
        return model_list(self.cfg.model_name, self.created)

    @app.get("/health")
    async def health(self):
        return {"status": "ok", "model": self.cfg.model_name, "pipeline": self.pipeline_class,
                "device": self.device, "dtype": self.dtype}

    async def info(self) -> dict:
        """For tests and dashboards: what is served and how it has been batched."""
        return {"model": self.cfg.model_name, "pipeline": self.pipeline_class, "device": self.device,
                "dtype": self.dtype, "sizes": self.cfg.sizes, **self.stats}

    # -- checks: OpenAI's (serve/openai_images.py); size and sampling limits: this pipeline's
    def _authorize(self, request: Request) -> None:
        if self.cfg.api_key_env:  # "" when the variable is unset: check_bearer's 500
            check_bearer(request.headers.get("authorization"), os.environ.get(self.cfg.api_key_env, ""))

    _seeds = staticmethod(image_seeds)  # seed + i; random when absent

    def _parse(self, body: bytes) -> ImagesRequest:
        cfg = self.cfg
        return parse_images_request(body, ImagesPolicy(cfg.model_name, max_n=cfg.max_n,
                                                       max_prompt_chars=cfg.max_prompt_chars))

    def _settings(self, req: ImagesRequest) -> tuple[int, int, float]:
        """(size, steps, guidance) of a parsed request, defaults filled in and limits checked."""
        cfg = self.cfg
        if req.size in (None, "auto"):
            size = max(cfg.sizes)
        else:
            w, _, h = req.size.partition("x")
            if not (w == h and w.isdigit() and int(w) in cfg.sizes):
                raise ApiError(400, f"size {req.size!r} is not served; sizes: {[f'{s}x{s}' for s in cfg.sizes]}",
                               "size", "invalid_value")
            size = int(w)
        steps = cfg.default_steps if req.num_inference_steps is None else req.num_inference_steps
        guidance = cfg.default_guidance if req.guidance_scale is None else req.guidance_scale
        if not 1 <= steps <= cfg.max_steps:
            raise ApiError(400, f"num_inference_steps must be 1 to {cfg.max_steps}, not {steps}",
                           "num_inference_steps", "invalid_value")
        if not 0 <= guidance <= cfg.max_guidance:
            raise ApiError(400, f"guidance_scale must be 0 to {cfg.max_guidance}, not {guidance}",
                           "guidance_scale", "invalid_value")
        return size, steps, float(guidance)

    # -- answers -------------------------------------------------------------------
    async def _answer(self, req: ImagesRequest, size: int, steps: int, guidance: float) -> dict:
        pngs = await asyncio.gather(*[self._draw_batch((req.prompt, seed, size, steps, guidance))
                                      for seed in self._seeds(req)])
        self.stats["requests"] += 1
        self.stats["images"] += len(pngs)
        return images_response(pngs, extra_per_image=[{"revised_prompt": None}] * len(pngs))

    async def _replayable(self, key: str, req: ImagesRequest, size: int, steps: int, guidance: float) -> dict:
        """The answer for an Idempotency-Key: the first call's, for every repeat
        (a client that lost the reply asks again and gets the same images)."""
        if len(key) > 255:
            raise ApiError(400, "Idempotency-Key is over 255 characters", "Idempotency-Key")
        asked = (req.prompt, req.model, req.n, req.seed, size, steps, guidance)
        seen = self._idempotent.get(key)
        if seen is not None:
            if seen[0] != asked:
                raise ApiError(422, "This Idempotency-Key was used with other parameters.", "Idempotency-Key",
                               "idempotency_key_reused")
            self._idempotent.move_to_end(key)
            self.stats["replayed"] += 1
            return await asyncio.shield(seen[1])
        # Drawn to the end even if this client goes away: its retry gets it.
        task = asyncio.ensure_future(self._answer(req, size, steps, guidance))
        if self.cfg.idempotency_keys:
            self._idempotent[key] = (asked, task)
            while len(self._idempotent) > self.cfg.idempotency_keys:
                self._idempotent.popitem(last=False)
        try:
            return await asyncio.shield(task)
        except Exception:
            if self._idempotent.get(key, (None, None))[1] is task:
                del self._idempotent[key]  # nothing was delivered: a retry draws afresh
            raise

    # -- drawing -------------------------------------------------------------------
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, max_concurrent_batches=1)
    async def _draw_batch(self, items: list[tuple[str, int, int, int, float]]) -> list[bytes]:
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(items))
        # The pipeline is GPU/CPU bound: off the event loop, so requests keep
        # arriving (and joining the next batch) meanwhile.
        return await asyncio.to_thread(self._draw_groups, items)

    def _draw_groups(self, items: list[tuple[str, int, int, int, float]]) -> list[bytes]:
        out: list[bytes | None] = [None] * len(items)
        groups: dict[tuple[int, int, float], list[int]] = {}
        for i, (_, _, size, steps, guidance) in enumerate(items):
            groups.setdefault((size, steps, guidance), []).append(i)
        for (size, steps, guidance), idx in groups.items():
            images = self._call_pipeline([items[i][0] for i in idx], [items[i][1] for i in idx], size, steps,
                                         guidance)
            for i, image in zip(idx, images):
                if image.size != (size, size):
                    raise RuntimeError(f"{self.pipeline_class} drew {image.size} for size {size}: "
                                       "serve only sizes this pipeline draws exactly")
                out[i] = _png(image)
        return out

    def _call_pipeline(self, prompts: list[str], seeds: list[int], size: int, steps: int, guidance: float) -> list:
        import torch

        kwargs: dict[str, Any] = {"prompt": prompts, "height": size, "width": size, "num_inference_steps": steps,
                                  "generator": [torch.Generator(self.device).manual_seed(s) for s in seeds],
                                  "num_images_per_prompt": 1, "output_type": "pil"}
        if "guidance_scale" in self._accepts:
            kwargs["guidance_scale"] = guidance
        kwargs.update(self.cfg.extra_call_kwargs)
        with self._lock, torch.inference_mode():
            self.stats["pipeline_calls"] += 1
            return list(self.pipe(**kwargs).images)


def build_diffusers_teacher_app(cfg: DiffusersTeacherConfig):
    """The Serve application for `cfg` (config-driven, as ray.serve.llm's builders;
    `serve run` and Serve config files pass their `args` validated into `cfg`)."""
    if isinstance(cfg, dict):
        cfg = DiffusersTeacherConfig.model_validate(cfg)
    # Resolved here: a missing local folder fails now, not in a replica.
    source, _ = pipeline_source(cfg.pipeline)
    cfg = cfg.model_copy(update={"pipeline": source})
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "resources": dict(cfg.resources)}
    if cfg.runtime_env:
        actor["runtime_env"] = cfg.runtime_env
    options: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": max(64, 4 * cfg.max_batch_size)}
    if cfg.num_replicas == "auto" or cfg.autoscaling_config:
        options["autoscaling_config"] = cfg.autoscaling_config or {"min_replicas": 1, "max_replicas": 2}
    else:
        options["num_replicas"] = cfg.num_replicas
    return DiffusersTeacher.options(**options).bind(cfg)
