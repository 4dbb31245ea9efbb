"""An embedded VLM: an OpenAI-compatible chat-completions server whose eyes are
the shapes world's scene parser (`evolve.shapes.read` + `check`), so the judge's
whole free-text path (questions, answers, re-asks, logprobs) runs for real on
a 2-core machine, over HTTP on 127.0.0.1.

    POST /v1/chat/completions   OpenAI's request and response format: messages with
                                text and `image_url` data-URL parts; `max_tokens`
                                (or `max_completion_tokens`), `temperature`, `logprobs`,
                                `top_logprobs`, `response_format` (json_schema /
                                json_object) and vLLM's `structured_outputs`
                                ({"choice": [...]} or {"json": schema})
    GET  /v1/models, /health, /stats (requests and question kinds, for tests)

It knows which question it is asked by matching the first user message against
the configured `JudgeTemplates` (regexes built from the template strings, so
custom wording still works; a re-ask conversation is answered by answering
its first question again). What it answers, from the pixels:

discriminate
    Two images, (A) first: the one whose `check(read(prompt), image)` is better
    by (satisfied, score). An exact tie goes to the image whose pixels hash
    lower, so both orders of one pair get the same verdict. One image is taken
    as a side-by-side (A)|(B) composite (`serve.vlm_judge.side_by_side`): the
    white border and label strip are cut away and the two pictures compared.
    A prompt that reads as no scene: a deterministic coin flip seeded by the
    images, in the order shown (a VLM outside its competence).
expand / mutate
    k (up to k + 2) other prompts of the prompt's category / n prompts of the
    categories the examples (the question's JSON list) do not cover, in varied
    natural phrasing that `read` understands ("A photo of 4 circles.", "a square
    on top of a circle"); seeded by the whole conversation, so a re-ask gives
    other variants.
vqa / answer
    "Yes" or "No", with P(yes) = `p_yes(satisfied, score)` of the scene check
    (vqa) or of the atomic question (`evolve.shapes.questions.answer`): 0.97
    when it holds, else 0.02 + 0.30 * score (0.02-0.32, a near miss higher);
    0.5 for a prompt that reads as no scene or a question of an unknown form.
    With logprobs on, the yes/no token's `top_logprobs` hold "Yes", "yes",
    " Yes", "No", "no", " No" (in that ratio) and a few fillers, summing to 0.99.
questions
    The atomic questions of `evolve.shapes.questions.write`, as a JSON list.
anything else
    "I cannot help with that." (the judge re-asks, then counts no verdict).

`EmbeddedVLMConfig.noise`: with that probability (seeded by the conversation)
a verdict is the wrong one (choice swapped, yes/no flipped with P(yes) ->
1 - P(yes)), and each generated prompt is of a wrong category. `logprobs` off:
every response has `logprobs: null`, as a server without them.

Ways to run it: `EmbeddedVLMServer` (async start/stop in the current loop),
`EmbeddedVLMThread` (for synchronous code), `EmbeddedVLMHost` (a Ray actor,
on the dashboard), `serve_forever` (a CLI command).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import random
import re
import string
import time
from collections import Counter
from typing import Any, Mapping

import numpy as np
import ray
from aiohttp import web
from PIL import Image

from evolve.config import EmbeddedVLMConfig, JudgeTemplates
from evolve.shapes import questions as atomic
from evolve.shapes.grammar import CATEGORIES, Prompt, PromptError, all_prompts
from evolve.shapes.reading import read
from evolve.shapes.scene import check
from serve.server_thread import ServerThread

log = logging.getLogger(__name__)

MODEL = "embedded-vlm"
REFUSAL = "I cannot help with that."
P_HOLDS, P_UNSURE = 0.97, 0.5
IMAGE_TOKENS = 64  # what an image counts in `usage.prompt_tokens`


def p_yes(satisfied: bool, score: float) -> float:
    """P("Yes") for a check that holds (0.97) or fails (0.02 + 0.30 * score: 0.02-0.32)."""
    return P_HOLDS if satisfied else 0.02 + 0.30 * min(max(float(score), 0.0), 1.0)


# -- recognising the judge's questions -------------------------------------------------
# Most specific first: the vqa question also fits answer's "{question} Please answer yes or no."
KINDS = ("discriminate", "expand", "mutate", "questions", "vqa", "answer")
_FIELDS = {"prompt": r"(?P<prompt>.+?)", "k": r"(?P<k>\d+)", "n": r"(?P<n>\d+)",
           "examples": r"(?P<examples>.*?)", "style": r"(?P<style>.*?)", "question": r"(?P<question>.+?)"}


def _loose(literal: str) -> str:
    """A template's literal text, any run of whitespace (or none) between words."""
    words = literal.split()
    return r"\s*" + r"\s*".join(map(re.escape, words)) + (r"\s*" if words else "")


def template_regex(template: str) -> re.Pattern:
    """A regex that fully matches `template` with its {fields} filled in."""
    out, seen = [], set()
    for literal, field, _spec, _conv in string.Formatter().parse(template):
        out.append(_loose(literal))
        if field is None:
            continue
        if field in seen:
            out.append(f"(?P={field})")
        else:
            out.append(_FIELDS.get(field, r"(?:.*?)"))
            seen.add(field)
    return re.compile("".join(out), re.S | re.I)


# -- seeing -----------------------------------------------------------------------------
def split_composite(img: np.ndarray) -> list[np.ndarray]:
    """The pictures of a side-by-side composite: rows that are mostly white are the
    border and the label strip; columns white across the picture rows separate
    the pictures; each is trimmed to its non-white rows."""
    white = (img >= 235).all(axis=2)
    rows_ok = white.mean(axis=1) < 0.5
    rows = np.flatnonzero(rows_ok)
    if rows.size == 0:
        return []
    gaps = white[rows[0]:rows[-1] + 1].all(axis=0).tolist() + [True]
    out, start = [], None
    for x, gap in enumerate(gaps):
        if not gap and start is None:
            start = x
        elif gap and start is not None:
            r = np.flatnonzero(~white[:, start:x].all(axis=1) & rows_ok)
            out.append(img[r[0]:r[-1] + 1, start:x])
            start = None
    return out


def _pixels_key(img: np.ndarray) -> str:
    return hashlib.sha256(str(img.shape).encode() + img.tobytes()).hexdigest()


# -- writing ----------------------------------------------------------------------------
_FRAMES = ("{}", "{}", "{}", "a photo of {}", "a picture of {}", "an image of {}", "a drawing of {}",
           "an illustration of {}", "{} on a black background", "a photo of {} on a black background",
           "{} in the image")
_RELATIONS = {"left of": ("left of", "to the left of", "on the left of"),
              "right of": ("right of", "to the right of", "on the right side of"),
              "above": ("above", "over", "on top of"),
              "below": ("below", "under", "beneath", "underneath")}
_DIGITS = {1: "1", 2: "2", 3: "3", 4: "4"}


def _bodies(p: Prompt) -> list[str]:
    s = p.shapes
    if p.category == "two_object":
        return [f"a {s[0]} {c} a {s[1]}" for c in ("and", "with", "together with", "as well as", "plus")]
    if p.category == "color_attr":
        c = p.colors
        return [f"a {c[0]} {s[0]} {j} a {c[1]} {s[1]}" for j in ("and", "with", "together with")]
    if p.category == "position":
        return [f"a {s[0]} {r} a {s[1]}" for r in _RELATIONS[p.relation]]
    if p.category == "counting":
        n = p.n_objects
        return [p.text, f"{_DIGITS[n]} {s[0]}" + ("s" if n > 1 else "")]
    return [p.text]


def phrase(p: Prompt, rng: random.Random) -> str:
    """`p` in one of many natural phrasings, every one of which `read`s back as `p`."""
    cands = [f.format(b) for b in _bodies(p) for f in _FRAMES]
    cands += [("There are " if p.category == "counting" and p.n_objects > 1 else "There is ") + b
              for b in _bodies(p)]
    rng.shuffle(cands)
    for text in cands:
        if rng.random() < 0.5:  # as people write: capitalised, with a full stop
            text = text[0].upper() + text[1:] + "."
        try:
            if read(text).text == p.text:
                return text
        except PromptError:
            pass
    return p.text


def _other_category(cats: list[str], rng: random.Random) -> str:
    return cats[rng.randrange(len(cats))]


def _json_list(text: str) -> list[str]:
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return []
    return [x for x in obj if isinstance(x, str)] if isinstance(obj, list) else []


# -- the model ----------------------------------------------------------------------------
class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


class Reply:
    """What the model says: its kind, its value (text or a list), and P(yes) for a yes/no."""

    def __init__(self, kind: str, value: Any, p: float | None = None) -> None:
        self.kind, self.value, self.p = kind, value, p


class EmbeddedVLM:
    """The model behind the server: a chat-completions body in, a response body out (no HTTP)."""

    def __init__(self, templates: JudgeTemplates | None = None, cfg: EmbeddedVLMConfig | None = None,
                 model: str = MODEL) -> None:
        self.t = templates or JudgeTemplates()
        self.cfg = cfg or EmbeddedVLMConfig()
        self.model = model
        self.rx = {k: template_regex(getattr(self.t, k)) for k in KINDS}
        self._ids = itertools.count(1)

    # -- the request ------------------------------------------------------------------
    def complete(self, body: Any) -> tuple[str, dict[str, Any]]:
        """(question kind, response body) for a request body; BadRequest for a malformed one."""
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.", code="invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        if model != self.model:
            raise BadRequest(f"The model `{model}` does not exist.", "model", 404, "model_not_found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise BadRequest("'messages' must be a non-empty array of objects with a 'role'.", "messages")
        if body.get("stream"):
            raise BadRequest("streaming is not supported by this server", "stream")
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise BadRequest(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
            raise BadRequest(f"temperature must be a number from 0 to 2, got {temperature!r}", "temperature")
        want_lp = body.get("logprobs") or False
        top = body.get("top_logprobs")
        if not isinstance(want_lp, bool):
            raise BadRequest("logprobs must be a boolean", "logprobs")
        if top is not None:
            # OpenAI: top_logprobs is an integer 0-20 and requires logprobs: true.
            if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
                raise BadRequest("top_logprobs must be an integer from 0 to 20", "top_logprobs")
            if not want_lp:
                raise BadRequest("logprobs must be true when top_logprobs is set", "top_logprobs")
        shape = _constraint(body)

        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise BadRequest("'messages' has no user message.", "messages")
        text, images = _content(first.get("content"))
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        reply = self.reply(text, images, digest)

        # A refusal ignores the constraint; under a JSON one it comes as OpenAI's
        # structured-outputs refusal: content null, the text in message.refusal.
        refused = reply.kind == "refusal"
        out = reply.value if refused else _render(reply, shape)
        toks = tokenize(out)
        finish = "stop"
        if max_tokens is not None and len(toks) > max_tokens:
            toks, finish = toks[:max_tokens], "length"
            out = "".join(toks)
        logprobs = None
        if want_lp and self.cfg.logprobs:
            logprobs = self._logprobs(toks, reply, 0 if top is None else top)
        message: dict[str, Any] = {"role": "assistant", "content": out, "refusal": None}
        if refused and shape is not None and shape[0] != "choice":
            message.update(content=None, refusal=out)
            if logprobs is not None:
                logprobs = {"content": None, "refusal": logprobs["content"]}
        prompt_tokens = sum(len(tokenize(_content(m.get("content"), decode=False)[0])) for m in messages)
        prompt_tokens += IMAGE_TOKENS * sum(len(_content(m.get("content"), decode=False)[1]) for m in messages)
        return reply.kind, {
            "id": f"chatcmpl-{digest[:12]}-{next(self._ids)}", "object": "chat.completion",
            "created": int(time.time()), "model": self.model, "system_fingerprint": None,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": logprobs, "message": message}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(toks),
                      "total_tokens": prompt_tokens + len(toks)},
        }

    # -- the answer ---------------------------------------------------------------------
    def question(self, text: str) -> tuple[str, dict[str, str]] | None:
        """Which template `text` fills, and its fields."""
        text = text.strip()
        for kind in KINDS:
            if m := self.rx[kind].fullmatch(text):
                return kind, m.groupdict()
        return None

    def reply(self, text: str, images: list[np.ndarray], digest: str) -> Reply:
        asked = self.question(text)
        if asked is None:
            return Reply("refusal", REFUSAL)
        kind, g = asked
        rng = random.Random(f"{self.cfg.seed}:{kind}:{digest}")
        wrong = rng.random() < self.cfg.noise  # drawn first, so it does not depend on the answer
        if kind == "discriminate":
            return self._discriminate(g["prompt"], images, wrong)
        if kind == "expand":
            return self._expand(g["prompt"], int(g["k"]), rng)
        if kind == "mutate":
            return self._mutate(_json_list(g.get("examples") or ""), int(g["n"]), rng)
        if kind == "questions":
            return Reply(kind, atomic.write(g["prompt"], int(g["n"])))
        if not images:
            return Reply("refusal", "I cannot see an image.")
        if kind == "vqa":
            try:
                res = check(read(g["prompt"]), images[0])
                p = p_yes(res.satisfied, res.score)
            except PromptError:
                p = P_UNSURE
        else:
            ans = atomic.answer(g["question"], images[0])
            p = P_UNSURE if ans is None else p_yes(*ans)
        if wrong:
            p = 1.0 - p
        yes = p > 0.5 or (p == 0.5 and rng.random() < 0.5)
        return Reply(kind, self.t.yes if yes else self.t.no, p)

    def _discriminate(self, prompt: str, images: list[np.ndarray], wrong: bool) -> Reply:
        if len(images) == 1:
            images = split_composite(images[0])
        if len(images) != 2:
            return Reply("refusal", "I need exactly two images, (A) and (B), to compare.")
        a, b = images
        try:
            p = read(prompt)
        except PromptError:
            pick_a = random.Random(f"unsure:{self.cfg.seed}:{_pixels_key(a)}:{_pixels_key(b)}").random() < 0.5
        else:
            ra, rb = check(p, a), check(p, b)
            ka, kb = (ra.satisfied, ra.score), (rb.satisfied, rb.score)
            # a tie goes to the same picture whichever side it is shown on
            pick_a = ka > kb if ka != kb else _pixels_key(a) <= _pixels_key(b)
        if wrong:
            pick_a = not pick_a
        return Reply("discriminate", self.t.choice_a if pick_a else self.t.choice_b)

    def _expand(self, prompt: str, k: int, rng: random.Random) -> Reply:
        try:
            p = read(prompt)
        except PromptError:
            return Reply("refusal", REFUSAL)
        pool = [q for q in all_prompts(p.category) if q.text != p.text]
        rng.shuffle(pool)
        others = [c for c in CATEGORIES if c != p.category]
        out = []
        for q in pool[:k + 2]:
            if rng.random() < self.cfg.noise:
                q = rng.choice(all_prompts(_other_category(others, rng)))
            out.append(phrase(q, rng))
        return Reply("expand", out)

    def _mutate(self, examples: list[str], n: int, rng: random.Random) -> Reply:
        seen_text, seen_cat = set(), set()
        for e in examples:
            try:
                q = read(e)
            except PromptError:
                continue
            seen_text.add(q.text)
            seen_cat.add(q.category)
        fresh = [c for c in CATEGORIES if c not in seen_cat] or list(CATEGORIES)
        rng.shuffle(fresh)
        pools = {c: [q for q in all_prompts(c) if q.text not in seen_text] for c in CATEGORIES}
        for pool in pools.values():
            rng.shuffle(pool)
        out: list[str] = []
        turn = 0
        while len(out) < n and any(pools[c] for c in fresh):
            c = fresh[turn % len(fresh)]
            turn += 1
            if not pools[c]:
                continue
            q = pools[c].pop()
            if seen_cat and rng.random() < self.cfg.noise:  # a wrong answer: a covered structure
                q = rng.choice(all_prompts(rng.choice(sorted(seen_cat))))
            out.append(phrase(q, rng))
        return Reply("mutate", out)

    # -- logprobs ---------------------------------------------------------------------------
    def _yes_no_dist(self, p: float) -> dict[str, float]:
        dist: dict[str, float] = Counter()
        for word, share in ((self.t.yes, p), (self.t.no, 1.0 - p)):
            for tok, w in ((word, 0.90), (word.lower(), 0.06), (" " + word, 0.04)):
                dist[tok] += 0.95 * share * w
        for tok, w in (("The", 0.02), ("I", 0.01), ("It", 0.006), ("This", 0.004)):
            dist[tok] += w
        return dist

    def _logprobs(self, toks: list[str], reply: Reply, top: int) -> dict[str, Any]:
        words = {self.t.yes.strip().lower(), self.t.no.strip().lower()}
        decisive = None
        if reply.p is not None:
            decisive = next((i for i, t in enumerate(toks) if t.strip().lower() in words), None)
        content = []
        for i, tok in enumerate(toks):
            if i == decisive:
                dist = self._yes_no_dist(reply.p)
            else:  # a confident token; fillers that are not yes/no
                dist = Counter({tok: 0.99})
                for filler, w in (("\n", 0.004), (" the", 0.003), (".", 0.002)):
                    if filler != tok:
                        dist[filler] += w
            chosen = dist.get(tok, 1e-4)
            best = sorted(dist.items(), key=lambda kv: -kv[1])[:top]
            # OpenAI: logprobs.content[i] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}
            content.append({"token": tok, "logprob": math.log(chosen), "bytes": list(tok.encode()),
                            "top_logprobs": [{"token": t, "logprob": math.log(q), "bytes": list(t.encode())}
                                             for t, q in best]})
        return {"content": content, "refusal": None}


_TOKEN = re.compile(r"\s*(?:[A-Za-z]+|\d+|[^\sA-Za-z\d])|\s+")


def tokenize(text: str) -> list[str]:
    """Word-level tokens, leading space attached (as BPE vocabularies have " Yes"); they join back to `text`."""
    return _TOKEN.findall(text)


def _content(content: Any, decode: bool = True) -> tuple[str, list]:
    """A message's text (its text parts joined) and its images (decoded, or the URLs)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or an array of content parts", "messages")
    texts, images = [], []
    for part in content:
        if not isinstance(part, dict):
            raise BadRequest("each content part must be an object", "messages")
        if part.get("type") == "text":
            if not isinstance(part.get("text"), str):
                raise BadRequest("a text part needs a string 'text'", "messages")
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise BadRequest("an image_url part needs image_url.url", "messages")
            images.append(_decode_image(url) if decode else url)
        else:
            raise BadRequest(f"unsupported content part type {part.get('type')!r}", "messages")
    return "\n".join(texts), images


def _decode_image(url: str) -> np.ndarray:
    # Nothing is fetched: this server has no network. Images come inline, as data URLs.
    if not url.startswith("data:") or ";base64," not in url:
        raise BadRequest("only base64 data URLs (data:image/png;base64,...) are supported", "messages")
    try:
        data = base64.b64decode(url.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (binascii.Error, ValueError, OSError) as e:
        raise BadRequest(f"an image could not be decoded: {e}", "messages", code="invalid_image") from None


def _constraint(body: dict[str, Any]) -> tuple[str, Any] | None:
    """("choice", [...]), ("json", schema) or ("json_object", None) from the request, or None."""
    so = body.get("structured_outputs")  # vLLM >= 0.12 (extra_body)
    if so is not None:
        if not isinstance(so, dict):
            raise BadRequest("structured_outputs must be an object", "structured_outputs")
        if "choice" in so:
            if not isinstance(so["choice"], list) or not so["choice"] or not all(
                    isinstance(c, str) for c in so["choice"]):
                raise BadRequest("structured_outputs.choice must be a non-empty list of strings",
                                 "structured_outputs")
            return "choice", so["choice"]
        if "json" in so:
            schema = so["json"]
            if isinstance(schema, str):  # vLLM takes the schema as an object or its JSON text
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError:
                    raise BadRequest("structured_outputs.json is not JSON", "structured_outputs") from None
            if not isinstance(schema, dict):
                raise BadRequest("structured_outputs.json must be a JSON schema", "structured_outputs")
            return "json", schema
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        # OpenAI: response_format = {type: json_schema, json_schema: {name, schema, strict}}
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not isinstance(js.get("schema"), dict):
            raise BadRequest("response_format.json_schema needs a 'name' and a 'schema' object", "response_format")
        return "json", js["schema"]
    raise BadRequest(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                     "response_format")


_KEY = {"discriminate": "choice", "expand": "prompts", "mutate": "prompts", "questions": "questions",
        "vqa": "answer", "answer": "answer", "refusal": "answer"}


def _render(reply: Reply, shape: tuple[str, Any] | None) -> str:
    """The reply as text, within the request's constraint (as constrained decoding would write it)."""
    value = reply.value
    if shape is None:
        return json.dumps(value) if isinstance(value, list) else value
    kind, arg = shape
    if kind == "choice":
        text = value if isinstance(value, str) else json.dumps(value)
        return next((c for c in arg if c.strip().lower() == text.strip().lower()), arg[0])
    if kind == "json_object":
        return json.dumps({_KEY[reply.kind]: value})
    return json.dumps(_fit(value, arg, _KEY[reply.kind]))


def _fit(value: Any, schema: Mapping[str, Any], key: str) -> Any:
    """`value` shaped to a JSON schema's object / array / enum / length rules."""
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties") or {}
        name = next(iter(schema.get("required") or props or [key]))
        return {name: _fit(value, props.get(name, {}), key)}
    if kind == "array":
        items = list(value) if isinstance(value, list) else [value]
        hi, lo = schema.get("maxItems"), schema.get("minItems", 0)
        items = items[:hi] if hi is not None else items
        while items and len(items) < lo:  # a constrained decoder must write more: it repeats itself
            items.append(items[len(items) % max(1, len(items))])
        return [_fit(v, schema.get("items") or {}, key) for v in items]
    if "enum" in schema:
        text = str(value)
        return next((e for e in schema["enum"] if str(e).strip().lower() == text.strip().lower()),
                    schema["enum"][0])
    if isinstance(value, str) and isinstance(schema.get("maxLength"), int):
        return value[:schema["maxLength"]]
    return value


# -- HTTP -------------------------------------------------------------------------------------
class _State:
    def __init__(self, vlm: EmbeddedVLM, api_key: str | None) -> None:
        self.vlm, self.api_key = vlm, api_key
        self.requests = 0
        self.kinds: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.in_flight = self.max_in_flight = 0

    def stats(self) -> dict[str, Any]:
        return {"model": self.vlm.model, "requests": self.requests, "kinds": dict(self.kinds),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight}


_STATE = web.AppKey("embedded_vlm_state", _State)


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> web.Response:
    # OpenAI's error shape: {"error": {"message", "type", "param", "code"}}
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status)


@web.middleware
async def _auth_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    st = request.app[_STATE]
    if request.path.startswith("/v1/") and st.api_key is not None:
        auth = request.headers.get("Authorization", "")
        given = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), st.api_key.encode()):
            st.statuses[401] += 1
            return _error(401, "Incorrect API key provided.", code="invalid_api_key")
    try:
        resp = await handler(request)
    except BadRequest as e:
        resp = _error(e.status, e.message, param=e.param, code=e.code)
    except web.HTTPException as e:  # aiohttp's own 404/405, in OpenAI's shape
        resp = _error(e.status, e.reason)
    except Exception:
        log.exception("embedded VLM: internal error")
        resp = _error(500, "The server had an error processing your request.", "server_error")
    st.statuses[resp.status] += 1
    return resp


async def _chat(request: web.Request) -> web.Response:
    st = request.app[_STATE]
    st.requests += 1
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        # The scene parser's numpy work runs off the loop, so requests overlap as on a real server.
        kind, resp = await asyncio.to_thread(st.vlm.complete, body)
        if st.vlm.cfg.latency_s:
            await asyncio.sleep(st.vlm.cfg.latency_s)
    finally:
        st.in_flight -= 1
    st.kinds[kind] += 1
    return web.json_response(resp)


async def _models(request: web.Request) -> web.Response:
    model = request.app[_STATE].vlm.model
    return web.json_response({"object": "list", "data": [
        {"id": model, "object": "model", "created": 0, "owned_by": "evolve-director"}]})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "model": request.app[_STATE].vlm.model})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].stats())


def build_vlm_app(templates: JudgeTemplates | None = None, cfg: EmbeddedVLMConfig | None = None, *,
                  api_key: str | None = None, model: str = MODEL) -> web.Application:
    """The server's aiohttp app. With `api_key`, /v1/* needs `Authorization: Bearer <key>`."""
    app = web.Application(middlewares=[_auth_and_errors], client_max_size=64 * 2**20)
    app[_STATE] = _State(EmbeddedVLM(templates, cfg, model), api_key)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/stats", _stats)
    return app


class EmbeddedVLMServer:
    """The server in the current event loop, on 127.0.0.1 (port 0: a free one)."""

    def __init__(self, templates: JudgeTemplates | None = None, cfg: EmbeddedVLMConfig | None = None, *,
                 api_key: str | None = None, model: str = MODEL) -> None:
        self.app = build_vlm_app(templates, cfg, api_key=api_key, model=model)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> str:
        """Start serving; returns the base URL `http://127.0.0.1:PORT/v1`."""
        await self.stop()
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)  # loopback only, never the network
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]
        return self.url

    def stats(self) -> dict[str, Any]:
        return self.app[_STATE].stats()

    async def stop(self) -> None:
        runner, self._runner, self.url = self._runner, None, None
        if runner is not None:
            await runner.cleanup()


class EmbeddedVLMThread(ServerThread):
    """`EmbeddedVLMServer` on a background thread, for synchronous callers:

        with EmbeddedVLMThread(templates, cfg) as url: ...
    """

    thread_name = "embedded-vlm"

    def __init__(self, templates: JudgeTemplates | None = None, cfg: EmbeddedVLMConfig | None = None, *,
                 api_key: str | None = None, model: str = MODEL, port: int = 0) -> None:
        super().__init__()
        self._server = EmbeddedVLMServer(templates, cfg, api_key=api_key, model=model)
        self._port = port
        self.url: str | None = None

    async def _start(self) -> str:
        self.url = await self._server.start(self._port)
        return self.url

    async def _stop(self) -> None:
        await self._server.stop()

    def stats(self) -> dict[str, Any]:
        return self.read(self._server.stats)


class VLMHost:
    """Hosts the server inside one process (see EmbeddedVLMHost)."""

    def __init__(self) -> None:
        self._server: EmbeddedVLMServer | None = None

    async def start(self, templates: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                    api_key: str | None = None, port: int = 0) -> str:
        await self.stop()  # idempotent restart
        self._server = EmbeddedVLMServer(JudgeTemplates.model_validate(templates or {}),
                                         EmbeddedVLMConfig.model_validate(config or {}), api_key=api_key)
        return await self._server.start(port)

    async def url(self) -> str | None:
        return None if self._server is None else self._server.url

    async def stats(self) -> dict[str, Any]:
        return {} if self._server is None else self._server.stats()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()


# An async actor: its event loop keeps serving HTTP between method calls; the
# scene parser on 32 px images needs a sliver of a CPU.
EmbeddedVLMHost = ray.remote(num_cpus=0.05, max_concurrency=100)(VLMHost)


def serve_forever(templates: JudgeTemplates | None = None, cfg: EmbeddedVLMConfig | None = None,
                  port: int = 0, api_key: str | None = None) -> None:
    """Serve until Ctrl-C; prints the base URL first."""
    async def main() -> None:
        server = EmbeddedVLMServer(templates, cfg, api_key=api_key)
        url = await server.start(port)
        try:
            print(url, flush=True)
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
