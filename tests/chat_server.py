"""A local server that speaks OpenAI chat completions with image inputs, for judge tests.

Its "vision" is the shapes-world scene parser, so a truthful answer is really
read from the pixels it is sent. `mode` picks how it answers:

    truthful   the better image by `shapes.check`; k grammar prompts of the asked
               prompt's category (plus the asked prompt itself, a case/space
               variant of it and a prompt outside the grammar, which a judge must
               screen out); for mutation, prompts of other categories
    first      always (A), whatever the images (a position-biased VLM)
    script     answers popped from `script` in order (garbage, truncated JSON,
               refusals...); HTTP errors as ("http", status)

Every request body is kept in `requests`, so tests see exactly what was sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
from collections import deque
from typing import Any

import numpy as np
from aiohttp import web
from PIL import Image

from evolve import shapes
from serve.server_thread import ServerThread

A, B = "<(A) is better>", "<(B) is better>"


def _images(content: list[dict[str, Any]]) -> list[np.ndarray]:
    out = []
    for part in content:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            data = base64.b64decode(url.split(",", 1)[1])
            out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text")


class ChatServer(ServerThread):
    thread_name = "chat-server"

    def __init__(self, mode: str = "truthful", api_key: str | None = None, latency_s: float = 0.0) -> None:
        super().__init__()
        self.mode = mode
        self.api_key = api_key
        self.latency_s = latency_s
        self.script: deque = deque()
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    # -- answers ---------------------------------------------------------------------
    def answer(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        first_user = next(m for m in messages if m["role"] == "user")
        question = _text(first_user["content"])
        if self.mode == "script":
            return self.script.popleft()
        if m := re.search(r'text description "(.+?)"\?', question):  # discrimination
            if self.mode == "first":
                return A
            imgs = _images(first_user["content"])
            a, b = (shapes.check(m.group(1), img) for img in imgs)
            return A if (a.satisfied, a.score) >= (b.satisfied, b.score) else B
        if m := re.search(r'text description: "(.+?)".*? generate (\d+) more', question, re.S):
            prompt, k = shapes.parse(m.group(1)), int(m.group(2))
            others = [p.text for p in shapes.all_prompts(prompt.category) if p.text != prompt.text]
            return json.dumps([prompt.text, "  " + prompt.text.upper() + " ", "a hexagon"] + others[:k])
        if m := re.search(r"generate (\d+) new", question):
            n = int(m.group(1))
            return json.dumps([p.text for p in shapes.all_prompts("counting")][:n])
        return "I cannot help with that."

    # -- HTTP ---------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.Response:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "bad key", "type": "auth"}}, status=401)
        body = await request.json()
        self.requests.append(body)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.mode == "script" and self.script and isinstance(self.script[0], tuple):
            _, status = self.script.popleft()
            return web.json_response({"error": {"message": "injected", "type": "server"}}, status=status)
        text = self.answer(body)
        return web.json_response({
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "tiny-vlm"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    async def _start(self) -> str:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/v1"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> "ChatServer":
        self.url = self.start()
        return self
