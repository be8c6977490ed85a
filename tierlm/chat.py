"""Chat messages, chat templates and DeepSeek-R1 reasoning output.

Three jobs that sit between the HTTP layer and token ids:
- ``normalize_messages``: validate OpenAI-style messages into the plain dicts that templates expect.
- ``render``: run a Hugging Face ``chat_template`` (Jinja) exactly as transformers does, in a sandbox.
- ``ReasoningParser`` / ``split_reasoning``: separate R1's ``<think>…</think>`` reasoning from the answer,
  streaming or all at once.

Token-level work (special tokens, ids) lives in ``tierlm.tokenizer``; this module has no tokenizer import.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tierlm.errors import TierlmError

ROLES = ("system", "user", "assistant", "tool")
THINK_START, THINK_END = "<think>", "</think>"

# DeepSeek-V3 hub template, as shipped in tokenizer_config.json (system prompts joined by "\n\n"; reasoning
# before </think> is dropped from earlier assistant turns). Raw strings: "\n" here is a Jinja escape.
V3_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    r"{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}"
    r"{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}"
    r"{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    r"{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] + "
    r"'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + "
    r"'```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    r"{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    r"{% set content = message['content'] %}{% if '</think>' in content %}"
    r"{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + "
    r"'<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    r"{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    r"'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'<｜tool▁output▁begin｜>' + "
    r"message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}"
    r"{% endif %}"
)

# DeepSeek-R1 hub template, verbatim (the revision that opens the reasoning block itself; tool-call quirks
# included). Differences from V3: only the last system prompt is used, and the generation prompt is
# "<｜Assistant｜><think>\n", so the model's output starts inside the reasoning block (ReasoningParser.for_prompt).
R1_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + "
    r"message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}"
    r"{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + "
    r"'<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + "
    r"'```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    r"{% set content = message['content'] %}{% if '</think>' in content %}"
    r"{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + "
    r"'<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    r"{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    r"'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + "
    r"message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}"
    r"{{'<｜Assistant｜><think>\n'}}{% endif %}"
)

BUILTIN_TEMPLATES = {"v3": V3_TEMPLATE, "r1": R1_TEMPLATE}


class ChatTemplateError(TierlmError, ValueError):
    """A chat template is unknown, does not compile, or failed while rendering."""


class InvalidMessageError(TierlmError, ValueError):
    """A chat message has a missing or wrongly typed field."""


# ----------------------------------------------------------------------------------------------- messages


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate chat messages and return copies in the form templates expect.

    Each message needs ``role`` in system/user/assistant/tool and ``content`` as a str or a list of
    ``{"type": "text", "text": ...}`` parts (joined with "\\n", as vLLM does). An assistant message may instead
    carry ``tool_calls`` (``[{"function": {"name", "arguments"}}]``) with ``content`` None; dict arguments are
    serialized to JSON. Other keys are passed through untouched. Idempotent.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidMessageError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidMessageError("messages is empty; send at least one user message")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise InvalidMessageError(f"{where} must be a dict with 'role' and 'content', got {type(msg).__name__}")
        msg = dict(msg)
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidMessageError(f"{where}.role is {role!r}; expected one of {', '.join(ROLES)}")
        tool_calls = msg.pop("tool_calls", None)
        if tool_calls:
            if role != "assistant":
                raise InvalidMessageError(f"{where} has tool_calls but role {role!r}; only assistant turns call tools")
            msg["tool_calls"] = [_normalize_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(tool_calls)]
        content = msg.get("content")
        if content is None and not tool_calls:
            raise InvalidMessageError(f"{where} ({role}) has no content; give 'content' as a string")
        msg["content"] = None if content is None else _content_text(content, f"{where}.content")
        out.append(msg)
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidMessageError(
                    f"{where}[{j}] must be {{'type': 'text', 'text': str}}; only text parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidMessageError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


def _normalize_tool_call(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise InvalidMessageError(
            f"{where} must be {{'type': 'function', 'function': {{'name': str, 'arguments': str}}}}")
    args = fn.get("arguments", "{}")
    if isinstance(args, Mapping):
        args = json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        raise InvalidMessageError(
            f"{where}.function.arguments must be a JSON string or a dict, got {type(args).__name__}")
    return {**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}}


def map_message_text(messages: list[dict[str, Any]], fn: Callable[[str], str]) -> list[dict[str, Any]]:
    """Copies of normalized messages with ``fn`` applied to every piece of user data a template prints:
    contents and tool-call names and arguments (not roles or types, which templates compare)."""
    out = []
    for msg in messages:
        msg = dict(msg)
        if msg["content"] is not None:
            msg["content"] = fn(msg["content"])
        if "tool_calls" in msg:
            msg["tool_calls"] = [
                {**c, "function": {**c["function"], "name": fn(c["function"]["name"]),
                                   "arguments": fn(c["function"]["arguments"])}}
                for c in msg["tool_calls"]
            ]
        out.append(msg)
    return out


def message_strings(messages: list[dict[str, Any]]) -> list[str]:
    """The strings ``map_message_text`` would transform."""
    found: list[str] = []
    map_message_text(messages, lambda s: found.append(s) or s)
    return found


# ----------------------------------------------------------------------------------------------- templates


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # The same environment transformers builds in chat_template_utils: sandboxed (templates ship inside
    # downloaded checkpoints), trim/lstrip blocks, and its three helpers.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template does not compile (line {e.lineno}: {e.message}); fix the template") from None


def render(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool, **variables: Any) -> str:
    """Render Jinja ``source`` over already-normalized ``messages``; ``variables`` (bos_token, tools, …) go to
    the template as globals, like transformers' ``apply_chat_template(..., tokenize=False)``."""
    template = _compile(source)
    variables.setdefault("tools", None)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except (TypeError, KeyError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed on these messages ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------- reasoning


def split_reasoning(text: str, started_in_reasoning: bool | None = None) -> tuple[str, str]:
    """Split a complete R1 output into ``(reasoning, content)``.

    ``started_in_reasoning``: the prompt already opened ``<think>`` (R1 template). None detects it: a
    ``</think>`` with no ``<think>`` before it means the output began inside the block. Without that, the
    output is reasoning only if it starts (after whitespace) with ``<think>``. One newline after ``<think>``,
    newlines right before ``</think>`` and newlines right after it are dropped. A block never closed is
    all reasoning (the output was cut off while thinking).
    """
    if started_in_reasoning is None:
        end = text.find(THINK_END)
        started_in_reasoning = end >= 0 and THINK_START not in text[:end]
    if started_in_reasoning:
        rest = text[len(THINK_START):] if text.startswith(THINK_START) else text
    else:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_START):
            return "", text
        rest = stripped[len(THINK_START):]
    rest = rest[1:] if rest.startswith("\n") else rest
    end = rest.find(THINK_END)
    if end < 0:
        return rest, ""
    return rest[:end].rstrip("\n"), rest[end + len(THINK_END):].lstrip("\n")


class ReasoningParser:
    """Streaming ``split_reasoning``: feed text deltas, get ``(reasoning_delta, content_delta)`` back.

    Text that could still turn out to be part of a tag (``"</thi"``) or a newline that ``split_reasoning``
    would drop is held back until the next delta decides it, so any chunking of the same text gives exactly
    ``split_reasoning(text, started_in_reasoning)`` once ``finish()`` is called.
    """

    _OPEN, _NEWLINE, _REASONING, _CONTENT_START, _CONTENT = range(5)

    def __init__(self, started_in_reasoning: bool = False):
        self.started_in_reasoning = started_in_reasoning
        self._state = self._OPEN
        self._buf = ""

    @classmethod
    def for_prompt(cls, prompt: str) -> ReasoningParser:
        """A parser for the output that follows ``prompt``: in reasoning if the prompt ends by opening it."""
        return cls(started_in_reasoning=prompt.rstrip().endswith(THINK_START))

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """Release everything still held back; call once after the last ``feed``."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while True:
            buf = self._buf
            if self._state == self._OPEN:
                head = buf if self.started_in_reasoning else buf.lstrip()
                if head.startswith(THINK_START):
                    self._buf, self._state = head[len(THINK_START):], self._NEWLINE
                elif not final and THINK_START.startswith(head):
                    break  # could still become "<think>"
                else:
                    self._state = self._NEWLINE if self.started_in_reasoning else self._CONTENT
            elif self._state == self._NEWLINE:
                if not buf and not final:
                    break
                self._buf, self._state = buf.removeprefix("\n"), self._REASONING
            elif self._state == self._REASONING:
                end = buf.find(THINK_END)
                if end >= 0:
                    reasoning.append(buf[:end].rstrip("\n"))
                    self._buf, self._state = buf[end + len(THINK_END):], self._CONTENT_START
                    continue
                if final:
                    reasoning.append(buf)
                    self._buf = ""
                    break
                # Hold back a tail that may start "</think>", and the newlines just before it.
                longest = min(len(buf), len(THINK_END) - 1)
                tag = next((k for k in range(longest, 0, -1) if THINK_END.startswith(buf[-k:])), 0)
                emit = buf[: len(buf) - tag].rstrip("\n")
                reasoning.append(emit)
                self._buf = buf[len(emit):]
                break
            elif self._state == self._CONTENT_START:
                self._buf = buf.lstrip("\n")
                if not self._buf and not final:
                    break
                self._state = self._CONTENT
            else:
                content.append(buf)
                self._buf = ""
                break
        return "".join(reasoning), "".join(content)
