"""Request bodies of the HTTP API as pydantic models, and the OpenAI-shaped error body.

Every bound is explicit: a client's number that the runtime could not use (a negative ``n``, ``max_tokens`` of
10^30, ``top_k`` past any vocabulary, a NaN temperature) fails here with a 400 that names the field, never
deeper down as a 500. Unknown fields are ignored, as OpenAI's SDKs send newer fields than a server knows;
fields whose meaning this server cannot honour (``tools``, ``response_format``, a ``chat_template``) are
refused by ``completions.py`` with a message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM any)
MAX_TOKENS_LIMIT = 1 << 24  # larger than any context; anything above is a client's mistake
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions API
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat

StopString = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by chat and text completions (OpenAI's, and vLLM's extras: top_k, min_p,
    repetition_penalty, ignore_eos, stop_token_ids)."""

    model: str | None = Field(None, max_length=512)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1 << 24)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = Field(None, max_length=256)

    def as_dict(self) -> dict[str, Any]:
        """The message as chat templates take it ("developer" is OpenAI's newer name for "system")."""
        d = self.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        return d


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Fields refused with a message when set (see completions.py):
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    chat_template: Any = None


class CompletionRequest(SamplingFields):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(union_mode="left_to_right")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a ``prompt`` string, or chat ``messages`` rendered with the server's template."""

    model: str | None = Field(None, max_length=512)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # for ``prompt``: prepend BOS
    add_generation_prompt: bool = True  # for ``messages``


class DetokenizeRequest(_Body):
    model: str | None = Field(None, max_length=512)
    tokens: list[TokenId]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """The body OpenAI's API (and its SDKs) use for errors."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def describe_validation_error(e: ValidationError) -> tuple[str, str | None]:
    """A one-line message naming the first bad field (``messages.0.role: ...``), and that field's path."""
    errors = e.errors(include_url=False)
    # In a union (``stop``: a string or a list) the first error is often "not a string"; an error about a
    # value of the right type ("list too long") says more.
    err = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
    loc = ".".join(str(p) for p in err.get("loc", ()) if not _is_union_tag(p))
    msg = err.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{loc}: {msg}{more}" if loc else f"{msg}{more}"), loc or None


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried in the location ("stop.str", "prompt.list[int]"); users never
    # wrote those.
    return isinstance(part, str) and (part in ("str", "int", "float", "bool")
                                      or part.startswith(("list[", "dict[", "function-", "constrained-")))
