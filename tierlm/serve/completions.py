"""OpenAI chat and text completions: a validated request → prompts and sampling parameters → sequences on
the scheduler → one JSON response, or a stream of server-sent events.

Streams follow what OpenAI's SDKs parse: ``data: {json}`` events; in chat, the role in each choice's first
delta; ``finish_reason`` on the chunk that carries a choice's last text; a usage chunk (empty ``choices``)
when ``stream_options.include_usage`` is set; ``data: [DONE]`` last. A failure after the headers went out is
an ``{"error": ...}`` event (the SDKs raise it). While no token comes (a long prefill, a full queue) a
``: keep-alive`` comment goes out every few seconds, so proxies and clients do not time out.

DeepSeek-R1 reasoning (``<think>…</think>``) is split off the answer by ``chat.ReasoningParser`` and returned
as ``reasoning_content`` (DeepSeek's API name) and ``reasoning`` (vLLM's newer name).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tierlm import __version__
from tierlm.chat import ReasoningParser
from tierlm.errors import TierlmError
from tierlm.runtime.generate import TokenEvent
from tierlm.runtime.sampling import SamplingParams
from tierlm.runtime.scheduler import GenerationFailed, QueueFullError
from tierlm.serve.engine import Engine, Submission
from tierlm.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body

MAX_CHOICES = 64  # prompts × n in one request
FINGERPRINT = f"tierlm-{__version__}"
POLL_S = 0.5  # how often a waiting handler looks at the shutdown deadline
SHUTDOWN_MESSAGE = "the server is shutting down and this request ran past the grace period; retry it"


class ApiError(Exception):
    """An error the client gets as an OpenAI-shaped body with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


def check_model(engine: Engine, name: str | None) -> None:
    if name is not None and name != engine.name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {engine.name!r} "
                            "(GET /v1/models lists it)", param="model", code="model_not_found")


@dataclass
class Job:
    """One completion request, ready to submit: choice i continues ``prompts[i]`` with ``params[i]``."""

    chat: bool
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    prompt_tokens: int  # each distinct prompt counted once, as OpenAI's usage does
    reasoning: list[bool] = field(default_factory=list)  # chat: the prompt opened a <think> block
    logprobs: bool = False
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex


# ------------------------------------------------------------------------------------------------ requests


async def chat_job(engine: Engine, body: ChatCompletionRequest) -> Job:
    check_model(engine, body.model)
    if body.chat_template is not None:
        raise ApiError(400, "a chat template in the request is refused: templates are code the server would run; "
                            "start the server with --chat-template instead", param="chat_template")
    if body.tools or body.tool_choice not in (None, "none"):
        raise ApiError(400, "tools are not supported by this server yet; send the request without tools",
                       param="tools")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format other than text is not supported by this server yet",
                       param="response_format")
    messages = [m.as_dict() for m in body.messages]
    text, ids = await asyncio.to_thread(_render_chat, engine, messages)
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = [sampling_params(engine, body, len(ids), max_tokens, top, j) for j in range(body.n)]
    started = ReasoningParser.for_prompt(text).started_in_reasoning
    return Job(True, engine.name, [ids] * body.n, params, len(ids), [started] * body.n, body.logprobs,
               body.stream, _include_usage(body))


async def completion_job(engine: Engine, body: CompletionRequest) -> Job:
    check_model(engine, body.model)
    if body.echo:
        raise ApiError(400, "echo is not supported by this server", param="echo")
    if body.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported by this server", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of other than n is not supported by this server", param="best_of")
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)) or not p:
        p = [p]
    if len(p) * body.n > MAX_CHOICES:
        raise ApiError(400, f"{len(p)} prompts × n={body.n} is more than {MAX_CHOICES} choices in one request",
                       param="prompt")
    tok = engine.tokenizer
    prompts = await asyncio.to_thread(lambda: [tok.encode(x, add_bos=True) if isinstance(x, str) else list(x)
                                               for x in p])
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for this API
    jobs_prompts, params = [], []
    for ids in prompts:
        for j in range(body.n):
            jobs_prompts.append(ids)
            params.append(sampling_params(engine, body, len(ids), max_tokens, body.logprobs, j))
    return Job(False, engine.name, jobs_prompts, params, sum(map(len, prompts)), [], body.logprobs is not None,
               body.stream, _include_usage(body))


def _include_usage(body: SamplingFields) -> bool:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options needs stream: true", param="stream_options")
    return bool(body.stream_options and body.stream_options.include_usage)


def _render_chat(engine: Engine, messages: list[dict]) -> tuple[str, list[int]]:
    tok = engine.tokenizer
    try:
        text = tok.render_chat(messages, add_generation_prompt=True, template=engine.chat_template)
        return text, tok.encode_chat(messages, add_generation_prompt=True, template=engine.chat_template)
    except TierlmError as e:
        raise ApiError(400, str(e), param="messages") from None


def sampling_params(engine: Engine, body: SamplingFields, prompt_len: int, max_tokens: int | None,
                    logprobs: int | None, choice: int) -> SamplingParams:
    """The request's sampling fields over the checkpoint's generation_config.json defaults."""
    ctx = engine.ctx
    if prompt_len >= ctx:
        raise ApiError(400, f"this model's maximum context length is {ctx} tokens, but the prompt has "
                            f"{prompt_len} tokens; shorten it", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = ctx - prompt_len
    elif prompt_len + max_tokens > ctx:
        raise ApiError(400, f"this model's maximum context length is {ctx} tokens, but {prompt_len + max_tokens} "
                            f"were requested ({prompt_len} in the prompt, {max_tokens} for the completion); "
                            "lower max_tokens or shorten the prompt", param="max_tokens",
                       code="context_length_exceeded")
    defaults = engine.defaults

    def pick(name: str, fallback):
        value = getattr(body, name)
        return value if value is not None else defaults.get(name, fallback)

    seed = body.seed + choice if body.seed is not None else None  # n seeded choices differ, reproducibly
    params = SamplingParams(
        temperature=float(pick("temperature", 1.0)), top_p=float(pick("top_p", 1.0)), top_k=int(pick("top_k", 0)),
        min_p=float(pick("min_p", 0.0)), repetition_penalty=float(pick("repetition_penalty", 1.0)),
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        seed=seed, max_tokens=max_tokens, stop=body.stop or (), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, logprobs=logprobs)
    try:
        return params.validate()
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def submit(engine: Engine, job: Job) -> Submission:
    try:
        return engine.submit(job.prompts, job.params)
    except QueueFullError as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
    except TierlmError as e:
        raise ApiError(400, str(e)) from None


# ------------------------------------------------------------------------------------------------ output


@functools.lru_cache(maxsize=1 << 16)
def _token_info(tok, token_id: int) -> tuple[str, list[int]]:
    """A token's text and its raw bytes (a byte-level BPE token may hold part of a UTF-8 character)."""
    text = tok.decode([token_id])
    piece = tok.id_to_token(token_id)
    if piece is None or token_id in tok.special_ids or piece in tok.added_tokens:
        return text, list(text.encode())
    try:
        return text, [_BYTE_OF_CHAR[c] for c in piece]
    except KeyError:  # not a byte-level vocabulary
        return text, list(text.encode())


def _bytes_to_unicode() -> dict[str, int]:
    # GPT-2's byte-level alphabet: each byte is a printable character in tokenizer.json's vocabulary.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF_CHAR = _bytes_to_unicode()


class ChoiceState:
    """What one choice has produced so far: text split by the reasoning parser, token count, logprobs."""

    def __init__(self, job: Job, index: int, tok):
        self.job, self.index, self.tok = job, index, tok
        self.parser = ReasoningParser(job.reasoning[index]) if job.chat else None
        self.reasoning_mode = bool(job.chat and job.reasoning[index])
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list = []  # chat: entries of "content"; text: (token, logprob, top, offset)
        self.text_len = 0

    def add(self, ev: TokenEvent) -> tuple[str, str, object]:
        """Take one event; return (reasoning delta, content delta, this token's logprobs in the API's shape)."""
        self.tokens += 1
        if self.parser is not None:
            reasoning, content = self.parser.feed(ev.text)
            if ev.finish_reason:
                r2, c2 = self.parser.finish()
                reasoning, content = reasoning + r2, content + c2
        else:
            reasoning, content = "", ev.text
        self.reasoning.append(reasoning)
        self.content.append(content)
        lp = self._logprobs(ev) if self.job.logprobs and ev.logprob is not None else None
        self.text_len += len(content)
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
        return reasoning, content, lp

    def _logprobs(self, ev: TokenEvent):
        text, raw = _token_info(self.tok, ev.token_id)
        tops = [(*_token_info(self.tok, t), lp) for t, lp in (ev.top_logprobs or [])]
        if self.job.chat:
            entry = {"token": text, "logprob": ev.logprob, "bytes": raw,
                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in tops]}
            self.logprobs.append(entry)
            return {"content": [entry]}
        entry = (text, ev.logprob, {t: lp for t, _, lp in tops}, self.text_len)
        self.logprobs.append(entry)
        return _text_logprobs([entry])


def _text_logprobs(entries) -> dict:
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [e[2] for e in entries], "text_offset": [e[3] for e in entries]}


def _usage(job: Job, choices: list[ChoiceState]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion}


async def collect(engine: Engine, job: Job, sub: Submission) -> dict:
    """Wait for every choice to finish; the non-streaming response body."""
    choices = [ChoiceState(job, i, engine.tokenizer) for i in range(len(job.prompts))]
    left = len(choices)
    while left:
        wait = _until_deadline(engine)
        if wait == 0:
            raise ApiError(503, SHUTDOWN_MESSAGE, type="server_error", code="shutting_down")
        item = await sub.next(POLL_S if wait is None else min(POLL_S, wait))
        if item is None:
            continue
        i, ev = item
        if i is None:  # cancelled: the client went away, nobody reads this
            raise ApiError(499, "the client closed the request", code="client_closed")
        if isinstance(ev, GenerationFailed):
            raise ApiError(500, str(ev), type="server_error", code="generation_failed")
        choices[i].add(ev)
        left -= ev.finish_reason is not None
    out = []
    for c in choices:
        content, reasoning = "".join(c.content), "".join(c.reasoning)
        if job.chat:
            message = {"role": "assistant", "content": content}
            if c.reasoning_mode or reasoning:
                message["reasoning_content"] = message["reasoning"] = reasoning
            lp = {"content": c.logprobs} if job.logprobs else None
            out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            lp = _text_logprobs(c.logprobs) if job.logprobs else None
            out.append({"index": c.index, "text": content, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": job.model, "system_fingerprint": FINGERPRINT, "choices": out, "usage": _usage(job, choices)}


def _until_deadline(engine: Engine) -> float | None:
    """Seconds left before a shutdown cuts requests off (0 when past it), None when not shutting down."""
    deadline = getattr(engine, "deadline", None)
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(engine: Engine, job: Job, sub: Submission, keepalive_s: float) -> AsyncIterator[str]:
    """The SSE body. Cancels the request's sequences when the client goes away (the generator is closed)."""
    choices = [ChoiceState(job, i, engine.tokenizer) for i in range(len(job.prompts))]
    head = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": job.model, "system_fingerprint": FINGERPRINT}
    if job.include_usage:
        head["usage"] = None  # OpenAI: every chunk but the last has usage null

    def chunk(i: int, body: dict, finish_reason: str | None, logprobs) -> str:
        return _sse({**head, "choices": [{"index": i, **body, "logprobs": logprobs, "finish_reason": finish_reason}]})

    try:
        if job.chat:
            for i in range(len(choices)):
                yield chunk(i, {"delta": {"role": "assistant", "content": ""}}, None, None)
        left = len(choices)
        quiet_since = time.monotonic()
        poll = min(POLL_S, keepalive_s)
        while left:
            wait = _until_deadline(engine)
            if wait == 0:
                yield _sse(error_body(SHUTDOWN_MESSAGE, "server_error", code=503))
                yield "data: [DONE]\n\n"
                return
            item = await sub.next(poll if wait is None else min(poll, wait))
            if item is None:
                if time.monotonic() - quiet_since >= keepalive_s:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                continue
            quiet_since = time.monotonic()
            i, ev = item
            if i is None:  # cancelled from elsewhere: end the stream
                return
            if isinstance(ev, GenerationFailed):
                yield _sse(error_body(str(ev), "server_error", code=500))
                yield "data: [DONE]\n\n"
                return
            reasoning, content, lp = choices[i].add(ev)
            left -= ev.finish_reason is not None
            if not (reasoning or content or lp or ev.finish_reason):
                continue  # text held back (half a character, a possible stop string or tag)
            if job.chat:
                delta = {}
                if reasoning:
                    delta["reasoning_content"] = delta["reasoning"] = reasoning
                if content or not reasoning:
                    delta["content"] = content
                yield chunk(i, {"delta": delta}, ev.finish_reason, lp)
            else:
                yield chunk(i, {"text": content}, ev.finish_reason, lp)
        if job.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(job, choices)})
        yield "data: [DONE]\n\n"
    finally:
        sub.cancel()
