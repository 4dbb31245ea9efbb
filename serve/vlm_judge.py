"""A VLM as the judge: any OpenAI-compatible chat-completions endpoint with image inputs.

The same backend serves a separate `vllm serve`, SGLang, a hosted VLM, or the
cluster's own vLLM (`ray.serve.llm`, reached through the Serve proxy; see
`serve/judge.py`). It asks the questions upstream EvolveDirector asks
(`JudgeTemplates`), one pairwise question at a time:

discriminate
    Teacher images are ranked by knockout (the best so far against the next),
    then the student meets the winner. Which image is shown as (A) is drawn per
    comparison (`order="random"`, as upstream) or both orders are asked and only
    agreeing answers count (`order="both"`). Every question and raw answer is
    kept in the verdict (`comparisons`).
expand / mutate
    k prompts as a JSON list, screened (`evolve.judging.screen_prompts`): no
    duplicates, near-duplicates of the training set, empty or over-long prompts,
    and, with `grammar_check`, nothing the shapes grammar rejects. A short
    answer is re-asked for the rest.
align (evaluation)
    VQAScore without questions: the `vqa` question with the image, P(yes) =
    p(yes tokens) / (p(yes tokens) + p(no tokens)) over the first generated
    token's `top_logprobs` (a yes token is any that, stripped and lower-cased,
    is the `yes` word), or 1/0 from the text where the response has no
    logprobs or neither word is in the list. With questions: each asked with
    the `answer` template, concurrently; the score is the mean P(yes).
questions (evaluation)
    At most n yes/no questions (TIFA / DSG style) from the `questions` template.

Answers are constrained where the server can (`structured`: JSON schema or
vLLM's choice), read strictly otherwise, re-asked at most `max_reasks` times,
and then become a typed "no verdict" (`decided=False`) that the loop counts.
Nothing a VLM says can raise out of this class; only bad input (an image that
does not decode) does. Requests to the VLM run concurrently (`max_concurrency`),
which is what lets vLLM batch them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image, ImageDraw

from evolve.config import JudgeConfig
from evolve.judging import (
    AlignRequest,
    AlignResult,
    Answer,
    Comparison,
    DiscriminateRequest,
    DiscriminateVerdict,
    ExpandRequest,
    ExpandResult,
    MutateRequest,
    MutateResult,
    QuestionsRequest,
    QuestionsResult,
    Rejected,
    parse_choice,
    parse_prompt_list,
    parse_yes_no,
    screen_prompts,
)
from evolve.worlds import shapes_canonical

log = logging.getLogger(__name__)

STUDENT = "student"


def fit_image(png: bytes, max_pixels: int, what: str) -> Image.Image:
    """Decode, and downscale (keeping the aspect ratio) to at most `max_pixels`."""
    try:
        img = Image.open(io.BytesIO(png))
        img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is bad input
        raise ValueError(f"{what}: cannot decode image ({e})") from e
    img = img.convert("RGB")
    w, h = img.size
    if w * h > max_pixels:
        scale = (max_pixels / (w * h)) ** 0.5
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.LANCZOS)
    return img


def side_by_side(a: Image.Image, b: Image.Image) -> Image.Image:
    """One image: `a` and `b` on white, labelled (A) and (B) underneath (upstream's layout)."""
    h = max(a.height, b.height)
    border = max(2, h // 50)
    label = max(10, h // 8)
    out = Image.new("RGB", (a.width + b.width + 3 * border, h + 2 * border + label + border), "white")
    out.paste(a, (border, border))
    out.paste(b, (a.width + 2 * border, border))
    draw = ImageDraw.Draw(out)
    for text, x, w in (("(A)", border, a.width), ("(B)", a.width + 2 * border, b.width)):
        draw.text((x + w // 2 - label // 2, h + 2 * border), text, fill="black", font_size=label)
    return out


def image_part(img: Image.Image) -> dict[str, Any]:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


YES_NO_MAX_TOKENS = 16  # "Yes", or {"answer": "Yes"}: a few tokens; longer is rambling


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def p_yes_from_logprobs(tokens: Any, yes: str, no: str) -> float | None:
    """VQAScore's P(yes) from a response's `logprobs.content`, or None where it tells nothing.

    OpenAI: logprobs.content[i] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]};
    only the first generated token counts (as VQAScore). Its candidates are
    top_logprobs plus the token itself (a server may leave it out of the list)."""
    if not tokens:
        return None
    first = tokens[0]
    cands = {}
    for c in list(_get(first, "top_logprobs") or []) + [first]:
        tok, lp = _get(c, "token"), _get(c, "logprob")
        if isinstance(tok, str) and isinstance(lp, (int, float)) and tok not in cands:
            cands[tok] = float(lp)
    p = {yes.strip().lower(): 0.0, no.strip().lower(): 0.0}
    for tok, lp in cands.items():
        word = tok.strip().lower()
        if word in p:
            p[word] += math.exp(lp)  # OpenAI uses -9999.0 for "very unlikely": exp gives 0
    total = sum(p.values())
    return p[yes.strip().lower()] / total if total > 0 else None


_QUESTION_WORD = re.compile(r"(?:is|are|does|do|did|can|could|was|were|has|have|will|would|should)\b", re.I)


def _as_question(text: str) -> str | None:
    """A yes/no question as kept: ends with "?"; one that opens like a question but
    lacks the mark gets it (a harmless repair); a statement is no question."""
    if text.endswith("?"):
        return text
    return text.rstrip(" .") + "?" if _QUESTION_WORD.match(text) else None


class OpenAIJudgeBackend:
    """`JudgeBackend` over a chat-completions VLM (see the module docstring)."""

    def __init__(self, cfg: JudgeConfig, client: Any = None) -> None:
        if cfg.backend != "openai" or not cfg.base_url or not cfg.model:
            raise ValueError("OpenAIJudgeBackend needs a JudgeConfig with backend 'openai', base_url and model")
        self.cfg = cfg
        self.t = cfg.templates
        if client is None:
            import openai

            key = None
            if cfg.api_key_env:
                key = os.environ.get(cfg.api_key_env)
                if not key:
                    raise ValueError(f"judge: environment variable {cfg.api_key_env} (the VLM's API key) is not set")
            # The client retries 429/5xx/connection errors with backoff (max_retries).
            client = openai.OpenAI(base_url=cfg.base_url, api_key=key or "EMPTY",
                                   timeout=cfg.timeout_s, max_retries=3)
        self.client = client
        self.pool = ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="vlm-judge")
        # grammar_check None ("as the run's world") is resolved by the run; here it means off.
        self.canonical = shapes_canonical if cfg.grammar_check else None
        self._lock = threading.Lock()
        self.counters = {"questions": 0, "reasks": 0, "api_errors": 0, "no_verdict": 0,
                         "seconds": 0.0}

    # -- talking to the VLM ----------------------------------------------------------
    def _count(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                self.counters[k] += v

    def _structured(self, kind: str, n: int = 0) -> dict[str, Any]:
        """Request fields that constrain the answer to what the question asks
        (kind: "choice", "yes_no", "prompts": exactly n, "questions": 1 to n)."""
        if self.cfg.structured == "none":
            return {}
        if kind in ("choice", "yes_no"):
            key, choices = (("choice", [self.t.choice_a, self.t.choice_b]) if kind == "choice"
                            else ("answer", [self.t.yes, self.t.no]))
            schema = {"type": "object", "properties": {key: {"type": "string", "enum": choices}},
                      "required": [key], "additionalProperties": False}
            if self.cfg.structured == "vllm":
                return {"extra_body": {"structured_outputs": {"choice": choices}}}
        else:
            key, lo = ("prompts", n) if kind == "prompts" else ("questions", 1)
            schema = {"type": "object", "additionalProperties": False, "required": [key],
                      "properties": {key: {"type": "array", "minItems": lo, "maxItems": n,
                                           "items": {"type": "string", "minLength": 1,
                                                     "maxLength": self.cfg.max_prompt_chars}}}}
            if self.cfg.structured == "vllm":
                return {"extra_body": {"structured_outputs": {"json": schema}}}
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": kind, "schema": schema}}}

    def _chat(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> tuple[str, Any]:
        """The answer's text and its `logprobs.content` (None where the server sent none)."""
        if self.t.system:
            messages = [{"role": "system", "content": self.t.system}, *messages]
        t0 = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(
                model=self.cfg.model, messages=messages,
                **{"max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature, **extra})
        finally:
            self._count(questions=1, seconds=time.perf_counter() - t0)
        choice = resp.choices[0] if resp.choices else None
        content = choice.message.content if choice is not None and choice.message is not None else None
        logprobs = _get(choice, "logprobs") if choice is not None else None
        return content or "", (_get(logprobs, "content") if logprobs is not None else None)

    def _ask(self, content: list[dict[str, Any]], structured: dict[str, Any],
             read: Any) -> tuple[Any, list[str], str | None]:
        """Ask; re-ask (in the same conversation) while `read(answer, logprobs)` reports a
        problem, at most `max_reasks` times. Returns (what read made of the last
        answer, every raw answer, the last problem or None)."""
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        answers: list[str] = []
        value, problem = None, "not asked"
        for attempt in range(self.cfg.max_reasks + 1):
            if attempt:
                self._count(reasks=1)
            try:
                answer, logprobs = self._chat(messages, structured)
            except Exception as e:  # noqa: BLE001 - an API failure is "no answer", not a crash
                self._count(api_errors=1)
                # The type and status only: a provider's message may echo request details.
                status = getattr(e, "status_code", None)
                problem = f"API error {type(e).__name__}" + (f" (HTTP {status})" if status else "")
                log.warning("judge VLM call failed: %s", problem)
                answers.append(f"<{problem}>")
                break
            answers.append(answer)
            value, problem = read(answer, logprobs)
            if problem is None:
                break
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": self.t.reask.format(problem=problem)}]
        return value, answers, problem

    # -- discriminate ------------------------------------------------------------------
    def compare(self, prompt: str, first: bytes, second: bytes) -> Comparison:
        """One question, in this order: is `first` (shown as A) or `second` (B) better?
        The winner is named "first" or "second" (for `evolve judge-eval`)."""
        px = self.cfg.max_pixels
        return self._compare(prompt, ("first", fit_image(first, px, "first image")),
                             ("second", fit_image(second, px, "second image")))

    def _compare(self, prompt: str, first: tuple[str, Image.Image], second: tuple[str, Image.Image]) -> Comparison:
        text = {"type": "text", "text": self.t.discriminate.format(prompt=prompt)}
        if self.cfg.image_layout == "side_by_side":
            images = [image_part(side_by_side(first[1], second[1]))]
        else:
            images = [image_part(first[1]), image_part(second[1])]
        letter, answers, _ = self._ask(images + [text], self._structured("choice"),
                                       lambda a, _lp: parse_choice(a, self.t.choice_a, self.t.choice_b))
        winner = {"A": first[0], "B": second[0]}.get(letter) if letter else None
        return Comparison(first=first[0], second=second[0], answers=answers, winner=winner)

    def duel(self, prompt: str, x: tuple[str, Image.Image], y: tuple[str, Image.Image], key: str = ""
             ) -> tuple[str | None, list[Comparison]]:
        """The better of x and y (None = no verdict), and the questions it took.
        `key` identifies the request (its images), so the drawn order differs
        between samples of one prompt but not between reruns of one sample."""
        if self.cfg.order == "both":
            comps = [self._compare(prompt, x, y), self._compare(prompt, y, x)]
        else:
            # Seeded by the pair, so a rerun of the same round asks the same way round.
            rng = random.Random(f"{self.cfg.seed}:{key}:{prompt}:{x[0]}:{y[0]}")
            comps = [self._compare(prompt, *((x, y) if rng.random() < 0.5 else (y, x)))]
        winners = {c.winner for c in comps}
        if len(winners) == 1 and None not in winners:
            return winners.pop(), comps
        return None, comps

    def _decode(self, req: DiscriminateRequest) -> tuple[list[tuple[str, Image.Image]], tuple | None]:
        px = self.cfg.max_pixels
        teachers = [(t.teacher, fit_image(t.image, px, f"image of teacher {t.teacher!r}"))
                    for t in req.teacher_images]
        student = None if req.student_image is None else (STUDENT, fit_image(req.student_image, px, "student image"))
        return teachers, student

    def _verdict(self, req: DiscriminateRequest, teachers: list[tuple[str, Image.Image]],
                 student: tuple[str, Image.Image] | None) -> DiscriminateVerdict:
        key = hashlib.sha1(b"".join([req.student_image or b""] + [t.image for t in req.teacher_images]),
                           usedforsecurity=False).hexdigest()
        best, comps, undecided = teachers[0], [], 0
        for challenger in teachers[1:]:  # knockout, as upstream
            w, c = self.duel(req.prompt, best, challenger, key)
            comps += c
            if w is None:
                undecided += 1  # the incumbent stays
            elif w == challenger[0]:
                best = challenger
        if student is None:
            decided = undecided == 0
            matches = False
            reason = f"best teacher {best[0]}" + ("" if decided else f"; {undecided} duel(s) undecided")
        else:
            w, c = self.duel(req.prompt, student, best, key)
            comps += c
            decided, matches = w is not None, w == STUDENT
            reason = (f"no verdict: student vs {best[0]} undecided" if not decided
                      else f"student {'beat' if matches else 'lost to'} {best[0]}")
        if not decided:
            self._count(no_verdict=1)
        return DiscriminateVerdict(prompt=req.prompt, best_teacher=best[0], student_matches=matches,
                                   decided=decided, comparisons=comps, reason=reason)

    def discriminate(self, reqs: list[DiscriminateRequest]) -> list[DiscriminateVerdict]:
        # Every image is decoded before the first question, so a bad one fails
        # the batch before anything is asked (and paid for) twice.
        decoded = [self._decode(r) for r in reqs]
        return list(self.pool.map(lambda rd: self._verdict(rd[0], *rd[1]), zip(reqs, decoded)))

    # -- expand / mutate ---------------------------------------------------------------------
    def _generate(self, question: Any, want: int, avoid: list[str]
                  ) -> tuple[list[str], list[str], list[Rejected]]:
        """Up to `want` screened prompts; a short answer is re-asked for the rest."""
        kept: list[str] = []
        raw: list[str] = []
        rejected: list[Rejected] = []

        def read(answer: str, _logprobs: Any) -> tuple[None, str | None]:
            items, problem = parse_prompt_list(answer)
            new, bad = screen_prompts(items, avoid + kept, self.cfg.max_prompt_chars, self.canonical)
            kept.extend(new[: want - len(kept)])
            rejected.extend(bad)
            if len(kept) >= want:
                return None, None
            notes = [problem] if problem else []
            if bad:
                notes.append("rejected: " + "; ".join(f"{r.prompt[:60]!r} ({r.why[:80]})" for r in bad[:5]))
            return None, (f"{len(kept)} of {want} usable prompts so far; give {want - len(kept)} more"
                          + (" - " + "; ".join(notes) if notes else ""))

        if want > 0:
            _, raw, _ = self._ask([{"type": "text", "text": question(want)}],
                                  self._structured("prompts", want), read)
        return kept, raw, rejected

    def expand(self, req: ExpandRequest) -> ExpandResult:
        if self.canonical is not None:
            self.canonical(req.prompt)  # a prompt outside the grammar is bad input
        kept, raw, rejected = self._generate(
            lambda k: self.t.expand.format(prompt=req.prompt, k=k), req.k, [req.prompt, *req.avoid_prompts])
        return ExpandResult(prompt=req.prompt, variants=kept, raw=raw, rejected=rejected)

    def mutate(self, req: MutateRequest) -> MutateResult:
        rng = random.Random(f"mutate:{self.cfg.seed}:{req.seed}")
        examples = rng.sample(req.avoid_prompts, min(self.cfg.mutate_examples, len(req.avoid_prompts)))
        style = rng.choice(self.t.mutate_styles) if self.t.mutate_styles else ""
        kept, raw, rejected = self._generate(
            lambda n: self.t.mutate.format(n=n, examples=json.dumps(examples), style=style),
            req.n, list(req.avoid_prompts))
        return MutateResult(prompts=kept, raw=raw, rejected=rejected)

    # -- evaluation: alignment and decomposed questions ---------------------------------------
    def _yes_no(self, image: dict[str, Any], text: str, question: str) -> Answer:
        """One yes/no question about one image; P(yes) from logprobs where the server gives them."""
        yes, no = self.t.yes, self.t.no
        # Structured output vs logprobs: no constraint when logprobs are asked for.
        # A json_schema answer starts with '{', so the first token says nothing; and
        # guided decoding masks the logits, which vLLM's logprobs may include
        # (its --logprobs-mode: "raw" = before logit processors, "processed" =
        # after; V0 computed them after the guided-decoding processor, masked
        # tokens -inf, vllm-project/vllm#4149). VQAScore wants the model's own
        # P(yes), so the question asks for a bare yes/no and the answer is read strictly.
        extra: dict[str, Any] = {"max_tokens": min(self.cfg.max_tokens, YES_NO_MAX_TOKENS)}
        if self.cfg.logprobs:
            extra.update(logprobs=True, top_logprobs=self.cfg.top_logprobs)
        else:
            extra.update(self._structured("yes_no"))

        def read(answer: str, logprobs: Any) -> tuple[tuple[float, bool] | None, str | None]:
            p = p_yes_from_logprobs(logprobs, yes, no) if self.cfg.logprobs else None
            if p is not None:
                return (p, True), None
            said, problem = parse_yes_no(answer, yes, no)
            return (None, problem) if said is None else ((1.0 if said else 0.0, False), None)

        value, raw, _ = self._ask([image, {"type": "text", "text": text}], extra, read)
        p, from_lp = value if value is not None else (None, False)
        return Answer(question=question, raw=raw, p_yes=p, from_logprobs=from_lp)

    def align(self, req: AlignRequest) -> AlignResult:
        """VQAScore (no questions) or the mean P(yes) over `req.questions`; score None = no verdict."""
        image = image_part(fit_image(req.image, self.cfg.max_pixels, "image"))
        if req.questions is None:
            text = self.t.vqa.format(prompt=req.prompt)
            answers, method = [self._yes_no(image, text, text)], "vqascore"
        else:
            answers = list(self.pool.map(
                lambda q: self._yes_no(image, self.t.answer.format(question=q), q), req.questions))
            method = "questions"
        got = [a.p_yes for a in answers if a.p_yes is not None]
        score = sum(got) / len(got) if got else None
        if score is None:
            self._count(no_verdict=1)
        return AlignResult(prompt=req.prompt, score=score, method=method, answers=answers,
                           logprobs=bool(answers) and all(a.from_logprobs for a in answers))

    def questions(self, req: QuestionsRequest) -> QuestionsResult:
        """At most n usable questions; an answer with none, or a malformed one short
        of n, is re-asked (the complete strings of a truncated list are kept)."""
        kept: list[str] = []
        rejected: list[Rejected] = []

        def read(answer: str, _logprobs: Any) -> tuple[None, str | None]:
            items, problem = parse_prompt_list(answer)
            new, bad = screen_prompts(items, kept, self.cfg.max_prompt_chars)
            rejected.extend(bad)
            for text in new:
                q = _as_question(text)
                if q is None or len(q) > self.cfg.max_prompt_chars:
                    rejected.append(Rejected(prompt=text, why="not a yes/no question"))
                elif len(kept) < req.n:
                    kept.append(q)
            if kept and (problem is None or len(kept) >= req.n):
                return None, None
            notes = [problem] if problem else []
            if rejected:
                notes.append("rejected: " + "; ".join(f"{r.prompt[:60]!r} ({r.why[:80]})" for r in rejected[-5:]))
            return None, (f"{len(kept)} usable yes/no questions so far; give up to {req.n - len(kept)} more"
                          + (" - " + "; ".join(notes) if notes else ""))

        _, raw, _ = self._ask([{"type": "text", "text": self.t.questions.format(prompt=req.prompt, n=req.n)}],
                              self._structured("questions", req.n), read)
        return QuestionsResult(prompt=req.prompt, questions=kept, raw=raw, rejected=rejected)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self.counters)
