"""The judge as a Ray Serve deployment.

    handle = serve.run(build_judge_app(cfg), name="judge", route_prefix="/judge")
    verdict = await handle.discriminate.remote(DiscriminateRequest(...))
    variants = await handle.expand.remote(ExpandRequest(...))
    new = await handle.mutate.remote(MutateRequest(...))
    # evaluation of held-out images
    comparison = await handle.compare.remote(CompareRequest(prompt=..., first=png, second=png))
    alignment = await handle.align.remote(AlignRequest(prompt=..., image=png))
    questions = await handle.questions.remote(QuestionsRequest(prompt=..., n=8))

`discriminate` calls from many callers are gathered into batches
(`JudgeConfig.max_batch_size`, `batch_wait_s`) and handed to the backend as
one list, so a VLM backend can run them as one forward pass. `compare` and
`align` are batched the same way and a batch's requests run concurrently (a
VLM batches what arrives together); a bad request fails alone. Over HTTP, POST
JSON `{"op": "discriminate" | "expand" | "mutate" | "compare" | "align" |
"questions", ...fields}` to the route; image fields (student_image,
teacher_images[].image, first, second, image) are base64 strings. The logic
lives in `serve/judge_backends.py`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from evolve.config import JudgeConfig
from evolve.judging import (
    AlignRequest,
    AlignResult,
    CompareRequest,
    Comparison,
    DiscriminateRequest,
    DiscriminateVerdict,
    ExpandRequest,
    ExpandResult,
    MutateRequest,
    MutateResult,
    QuestionsRequest,
    QuestionsResult,
)
from serve.judge_backends import make_backend

# Serve caps a batch at max_ongoing_requests; build_judge_app raises it with the batch size.
MIN_ONGOING_REQUESTS = 64


JUDGE_REPLICA_CPUS = 0.1  # it waits on the VLM (or parses a 32x32 scene): a sliver


@serve.deployment(ray_actor_options={"num_cpus": JUDGE_REPLICA_CPUS}, max_ongoing_requests=MIN_ONGOING_REQUESTS)
class Judge:
    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        self.backend = make_backend(cfg)
        for batch in (self._discriminate_batch, self._compare_batch, self._align_batch):
            batch.set_max_batch_size(cfg.max_batch_size)
            batch.set_batch_wait_timeout_s(cfg.batch_wait_s)
        # Its own threads: an align fans its questions out on the backend's pool,
        # which must not be the pool waiting for it.
        self._pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="judge-eval")
        self._eval_requests = {"compare": 0, "align": 0, "questions": 0}
        self._batches = 0
        self._requests = 0
        self._max_batch_seen = 0

    # -- the three duties --------------------------------------------------------
    async def discriminate(self, req: DiscriminateRequest) -> DiscriminateVerdict:
        out = await self._discriminate_batch(req)
        if isinstance(out, Exception):  # a bad request fails alone, not its batch
            raise out
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)  # reset from cfg in __init__
    async def _discriminate_batch(
        self, reqs: list[DiscriminateRequest]
    ) -> list[DiscriminateVerdict | Exception]:
        self._batches += 1
        self._requests += len(reqs)
        self._max_batch_seen = max(self._max_batch_seen, len(reqs))
        return await asyncio.to_thread(self._run_batch, reqs)

    def _run_batch(self, reqs: list[DiscriminateRequest]) -> list[DiscriminateVerdict | Exception]:
        try:
            return list(self.backend.discriminate(reqs))
        except Exception:  # noqa: BLE001 - find which request failed, answer the others
            out: list[DiscriminateVerdict | Exception] = []
            for r in reqs:
                try:
                    out.append(self.backend.discriminate([r])[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out

    async def expand(self, req: ExpandRequest) -> ExpandResult:
        return await asyncio.to_thread(self.backend.expand, req)

    async def mutate(self, req: MutateRequest) -> MutateResult:
        return await asyncio.to_thread(self.backend.mutate, req)

    # -- evaluation ------------------------------------------------------------------
    async def compare(self, req: CompareRequest) -> Comparison:
        """One pairwise question in the order given (winner "first", "second" or None)."""
        return _raise_or(await self._compare_batch(req))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)  # reset from cfg in __init__
    async def _compare_batch(self, reqs: list[CompareRequest]) -> list[Comparison | Exception]:
        self._eval_requests["compare"] += len(reqs)
        return await self._each(lambda r: self.backend.compare(r.prompt, r.first, r.second), reqs)

    async def align(self, req: AlignRequest) -> AlignResult:
        """How well one image shows its prompt (VQAScore, decomposed questions, or the scene check)."""
        return _raise_or(await self._align_batch(req))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)  # reset from cfg in __init__
    async def _align_batch(self, reqs: list[AlignRequest]) -> list[AlignResult | Exception]:
        self._eval_requests["align"] += len(reqs)
        return await self._each(self.backend.align, reqs)

    async def questions(self, req: QuestionsRequest) -> QuestionsResult:
        """Yes/no questions for a prompt (once per prompt: not worth batching)."""
        self._eval_requests["questions"] += 1
        return await asyncio.to_thread(self.backend.questions, req)

    async def _each(self, fn: Callable[[Any], Any], reqs: list[Any]) -> list[Any]:
        """fn on every request concurrently; a request's exception is its result."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, fn, r) for r in reqs]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def stats(self) -> dict[str, float]:
        """Batching so far (discriminate batches run, requests in them, largest
        batch; evaluation requests by op) and, for a VLM backend, its counters
        (questions, re-asks, API errors, no-verdicts, seconds spent waiting on the VLM)."""
        out: dict[str, float] = {"batches": self._batches, "requests": self._requests,
                                 "max_batch_seen": self._max_batch_seen,
                                 "max_batch_size": self.cfg.max_batch_size,
                                 **{f"{op}_requests": n for op, n in self._eval_requests.items()}}
        backend_stats = getattr(self.backend, "stats", None)
        if callable(backend_stats):
            out.update(backend_stats())
        return out

    # -- HTTP ------------------------------------------------------------------------
    async def __call__(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"body is not JSON: {e}")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object with an 'op' field")
        op = body.pop("op", None)
        try:
            if op == "discriminate":
                result: BaseModel = await self.discriminate(
                    DiscriminateRequest.model_validate(_unbase64(body)))
            elif op == "expand":
                result = await self.expand(ExpandRequest.model_validate(body))
            elif op == "mutate":
                result = await self.mutate(MutateRequest.model_validate(body))
            elif op == "compare":
                result = await self.compare(CompareRequest.model_validate(_unbase64(body)))
            elif op == "align":
                result = await self.align(AlignRequest.model_validate(_unbase64(body)))
            elif op == "questions":
                result = await self.questions(QuestionsRequest.model_validate(body))
            else:
                return _error(400, f"unknown op {op!r}; expected one of {', '.join(OPS)}")
        except (ValidationError, ValueError) as e:  # ValidationError is a ValueError; kept explicit
            return _error(400, str(e))
        return JSONResponse(result.model_dump(mode="json"))


OPS = ("discriminate", "expand", "mutate", "compare", "align", "questions")


def _raise_or(out: Any) -> Any:
    if isinstance(out, Exception):  # a bad request fails alone, not its batch
        raise out
    return out


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _b64(value: Any, field: str) -> Any:
    if not isinstance(value, str):
        return value  # let pydantic report the wrong type
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{field} is not valid base64: {e}") from e


def _unbase64(body: dict[str, Any]) -> dict[str, Any]:
    """Decode the base64 image fields of a JSON request (discriminate, compare, align)."""
    out = dict(body)
    for field in ("student_image", "first", "second", "image"):
        if field in out:
            out[field] = _b64(out[field], field)
    if isinstance(out.get("teacher_images"), list):
        out["teacher_images"] = [
            {**t, "image": _b64(t["image"], f"teacher_images[{i}].image")}
            if isinstance(t, dict) and "image" in t else t
            for i, t in enumerate(out["teacher_images"])
        ]
    return out


def build_judge_app(cfg: JudgeConfig | dict[str, Any]) -> serve.Application:
    """The judge application for `cfg` (a JudgeConfig or its dict, so it also
    works as a Serve config-file builder: `import_path: serve.judge:build_judge_app`)."""
    cfg = JudgeConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
    make_backend(cfg)  # fail here, in the driver, on a backend that cannot be built
    return Judge.options(
        ray_actor_options={"num_cpus": JUDGE_REPLICA_CPUS, "resources": dict(cfg.resources)},
        max_ongoing_requests=max(MIN_ONGOING_REQUESTS, 2 * cfg.max_batch_size),
    ).bind(cfg)


VLM_ROUTE = "/vlm"


def build_vlm_app(cfg: JudgeConfig) -> serve.Application:
    """Ray Serve LLM's OpenAI-compatible app for the judge's VLM (backend "vllm").

    `cfg.llm` holds `ray.serve.llm.LLMConfig` fields: model_loading_config
    (model_id, model_source: a Hub id or a local/S3 folder), engine_kwargs (vLLM's:
    max_model_len, limit_mm_per_prompt, tensor_parallel_size...), accelerator_type,
    deployment_config (autoscaling_config: min/max replicas). Needs vLLM on the
    GPU nodes (`pip install "ray[llm]"`)."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise ImportError(f"judge backend 'vllm' needs vLLM where the judge runs "
                          f"(pip install 'ray[llm]'): {e}") from e
    return build_openai_app({"llm_configs": [LLMConfig(**vllm_llm_config(cfg))]})


def vllm_llm_config(cfg: JudgeConfig) -> dict[str, Any]:
    """`cfg.llm` with the judge's `resources` in each engine GPU's bundle (one
    per tensor-parallel rank, on one node) unless it places itself."""
    llm = dict(cfg.llm or {})
    if cfg.resources and "placement_group_config" not in llm:
        tp = int((llm.get("engine_kwargs") or {}).get("tensor_parallel_size", 1))
        llm["placement_group_config"] = {"bundles": [{"GPU": 1, **cfg.resources}] * tp, "strategy": "STRICT_PACK"}
    return llm


def vlm_client_config(cfg: JudgeConfig, serve_port: int) -> JudgeConfig:
    """Backend "vllm" seen from the judge: an "openai" backend at the cluster's
    own Serve proxy (every node runs one on loopback)."""
    if cfg.backend != "vllm":
        return cfg
    model_id = cfg.llm["model_loading_config"]["model_id"]
    return cfg.model_copy(update={"backend": "openai", "model": model_id, "api_key_env": None,
                                  "base_url": f"http://127.0.0.1:{serve_port}{VLM_ROUTE}/v1"})


def deploy_judge(cfg: JudgeConfig, serve_port: int):
    """Deploy the judge (and, for backend "vllm", its VLM first); returns the judge's handle."""
    if cfg.backend == "vllm":
        serve.run(build_vlm_app(cfg), name="vlm", route_prefix=VLM_ROUTE)
        cfg = vlm_client_config(cfg, serve_port)
    return serve.run(build_judge_app(cfg), name="judge", route_prefix="/judge")
