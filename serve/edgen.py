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

The model sits (and samples) on the replica's GPU when it has one
(`num_gpus`), on its CPU otherwise. Prompts are screened by the shapes grammar
(`grammar_check`) when set so, or, left None, when the loaded checkpoint's
`world.json` says `{"kind": "shapes"}` (decided again at each hot reload; no
world.json: any prompt goes, as for a student of an unknown world).

Images of concurrent requests are sampled together (`@serve.batch`), grouped by
(steps, guidance, size) inside a batch; an image depends only on its prompt and seed,
never on the batch it was drawn in. Requests, auth and errors are the OpenAI
Images API's as serve/openai_images.py checks and shapes them: OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`) with 4xx codes that name the
problem; nothing internal (no stack trace) reaches a client.

(No `from __future__ import annotations` here: the ingress class travels to
its replicas by value, and FastAPI must see `Request` as a type, not a name.)
"""


import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from evolve.config import EdgenServeConfig
from serve.openai_images import (ApiError, ImagesPolicy, ImagesRequest, check_bearer, image_seeds, images_response,
                                 model_list, parse_images_request, read_body)

app = FastAPI(title="Edgen", docs_url=None, redoc_url=None)
log = logging.getLogger("ray.serve")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


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


def resolve_checkpoint(checkpoint: Path | str | None) -> Path | str:
    """The checkpoint to serve (the shipped base for None): a local folder, or
    the URI of a committed one on an object store, checked to hold a student."""
    from evolve.storage import is_remote, local_folder
    from evolve.student.generate import BASE_CHECKPOINT

    path = checkpoint if checkpoint is not None else BASE_CHECKPOINT
    if not (local_folder(path) / "config.json").exists():
        raise FileNotFoundError(f"no student checkpoint (config.json) in {path}")
    return str(path) if is_remote(path) else Path(path).resolve()


def newest_checkpoint(folder: Path | str | None) -> Path | str | None:
    """The newest complete checkpoint folder (holding config.json and weights)
    under `folder`; half-written ones (".tmp", or without weights) are skipped.
    On an object store (`s3://...`): the newest committed subfolder, as its URI."""
    from evolve.storage import COMMITTED, Storage, is_remote

    if folder is not None and is_remote(folder):
        st = Storage.at(folder)
        stamps = {}
        for name in st.list():
            try:
                stamps[name] = json.loads(st.read(f"{name}/{COMMITTED}"))
            except FileNotFoundError:  # a file, or a folder not (yet) committed
                continue
        done = [n for n, m in stamps.items() if "config.json" in m["files"]
                and any(f.endswith(".safetensors") for f in m["files"])]
        return st.uri(max(done, key=lambda n: (stamps[n]["ts"], n))) if done else None
    if folder is None or not Path(folder).is_dir():
        return None
    done = [p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")
            and not p.name.endswith(".tmp") and (p / "config.json").exists() and any(p.glob("*.safetensors"))]
    return max(done, key=lambda p: (p.stat().st_mtime, p.name)).resolve() if done else None


def world_kind(checkpoint: Path | str) -> str | None:
    """The world a checkpoint's student learnt: `kind` in its folder's world.json
    (`{"kind": "shapes"}`), None where there is none; ValueError for a broken one."""
    f = Path(checkpoint) / "world.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str):
        raise ValueError(f"{f} must be a JSON object with a string 'kind', e.g. {{\"kind\": \"shapes\"}}")
    return kind


def grammar_check_for(flag: bool | None, checkpoint: Path | str | None) -> bool:
    """Whether prompts are screened by the shapes grammar: `flag` when set, else
    iff the checkpoint's student learnt the shapes world (a student of another
    or an unknown world takes any prompt)."""
    if flag is not None:
        return flag
    return checkpoint is not None and world_kind(checkpoint) == "shapes"


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(app)
class Edgen:
    def __init__(self, cfg: EdgenServeConfig) -> None:
        import torch

        self.cfg = cfg
        torch.set_num_threads(cfg.torch_threads)
        # The replica's GPU when it has one (a deployment with num_gpus), else the CPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.checkpoint = str(newest_checkpoint(cfg.watch_dir) or cfg.checkpoint or resolve_checkpoint(None))
        self.student, self.grammar_check = self._load(self.checkpoint)
        self.size = self.student.config.image_size
        self.created = int(time.time())
        self._sample_batch.set_max_batch_size(cfg.max_batch_size)
        self._sample_batch.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self.stats = {"requests": 0, "images": 0, "batches": 0, "max_batch": 0, "reloads": 0}
        if cfg.watch_dir:
            threading.Thread(target=self._watch, name="edgen-hot-reload", daemon=True).start()

    def _load(self, path: Path | str):
        """(the student on this replica's device, whether its prompts are grammar-checked)."""
        from evolve.storage import local_folder
        from evolve.student.generate import load_student

        path = local_folder(path)  # a URI's folder: fetched into this node's cache
        grammar = grammar_check_for(self.cfg.grammar_check, path)  # first: a broken world.json loads nothing
        # load_student caches the module: .to() moves the cached one, which is
        # only this replica's (one process, one device).
        return load_student(path).to(self.device), grammar

    def _watch(self) -> None:
        """Hot reload (a thread): every `watch_every_s`, `_reload`."""
        while True:
            time.sleep(self.cfg.watch_every_s)
            try:
                self._reload()
            except Exception as e:  # noqa: BLE001 - keep serving the model we have
                log.warning("hot reload skipped: %s", e)

    def _reload(self) -> bool:
        """Switch to the newest checkpoint in `watch_dir` if it is another; whether
        it did. The new model is loaded beside the running one, then the
        reference swapped: batches already running finish on the old one, so
        no request is dropped or sees a half-loaded model."""
        path = newest_checkpoint(self.cfg.watch_dir)
        if path is None or str(path) == self.checkpoint:
            return False
        student, grammar = self._load(path)
        if student.config.image_size != self.size:
            raise ValueError(f"{path} draws {student.config.image_size}px, this server {self.size}px")
        self.student, self.grammar_check, self.checkpoint = student, grammar, str(path)
        self.stats["reloads"] += 1
        return True

    # -- routes --------------------------------------------------------------------
    @app.post("/v1/images/generations")
    async def generations(self, request: Request):
        try:
            self._authorize(request)
            req = self._parse(await read_body(request.headers.get("content-length"), request.body,
                                              self.cfg.max_body_bytes))
            steps, guidance = self._sampling(req)
            size = self._size(req)
            pngs = await asyncio.gather(*[self._sample_batch((req.prompt, s, steps, guidance, size))
                                          for s in self._seeds(req)])
        except ApiError as e:
            return error_response(e)
        self.stats["requests"] += 1
        self.stats["images"] += len(pngs)
        return images_response(pngs, extra_per_image=[{"revised_prompt": None}] * len(pngs))

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except ApiError as e:
            return error_response(e)
        return model_list(self.cfg.model_name, self.created)

    @app.get("/generate")
    async def generate(self, request: Request, prompt: str = "", seed: int = 0):
        try:
            self._authorize(request)
            req = self._parse(json.dumps({"prompt": prompt, "seed": seed}).encode())
            steps, guidance = self._sampling(req)
            png = await self._sample_batch((req.prompt, req.seed, steps, guidance, self._size(req)))
        except ApiError as e:
            return error_response(e)
        return Response(content=png, media_type="image/png")

    async def info(self) -> dict:
        """For tests and the CLI: what is served, where, and how it has been batched."""
        return {"checkpoint": self.checkpoint, "size": self.size, "device": self.device,
                "grammar_check": self.grammar_check, **self.stats}

    # -- checks --------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.cfg.api_key_env:  # "" when the variable is unset: check_bearer's 500
            check_bearer(request.headers.get("authorization"), os.environ.get(self.cfg.api_key_env, ""))

    def _parse(self, body: bytes) -> ImagesRequest:
        cfg = self.cfg
        req = parse_images_request(body, ImagesPolicy(cfg.model_name, max_n=cfg.max_n,
                                                      max_prompt_chars=cfg.max_prompt_chars))
        sizes = served_sizes(self.student.config)
        if req.size not in (None, *sizes):
            raise ApiError(400, f"size {req.size!r} is not served; sizes: {list(sizes)}", "size", "invalid_value")
        if self.grammar_check:
            from evolve.worlds import shapes_canonical

            try:
                shapes_canonical(req.prompt)
            except ValueError as e:
                raise ApiError(400, f"prompt outside the shapes world: {e}", "prompt", "invalid_prompt") from None
        return req

    def _sampling(self, req: ImagesRequest) -> tuple[int, float]:
        cfg = self.cfg
        steps = cfg.default_steps if req.num_inference_steps is None else req.num_inference_steps
        guidance = cfg.default_guidance if req.guidance_scale is None else req.guidance_scale
        if not 1 <= steps <= cfg.max_steps:
            raise ApiError(400, f"num_inference_steps must be 1 to {cfg.max_steps}, not {steps}",
                           "num_inference_steps", "invalid_value")
        if not 1.0 <= guidance <= cfg.max_guidance:
            raise ApiError(400, f"guidance_scale must be 1 to {cfg.max_guidance}, not {guidance}",
                           "guidance_scale", "invalid_value")
        return steps, float(guidance)

    def _size(self, req: ImagesRequest) -> tuple[int, int]:
        """(height, width) of the request's images (checked by _parse)."""
        return served_sizes(self.student.config)[req.size] if req.size else (self.size, self.size)

    _seeds = staticmethod(image_seeds)  # seed + i; random when absent

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
        from evolve.images import to_png
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
