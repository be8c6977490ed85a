"""A GGUF's ``tokenizer.ggml.*`` section → a ``tokenizers``-library tokenizer (byte-level BPE, as DeepSeek's)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from tierlm.errors import CheckpointError
from tierlm.weights.gguf_config import tokenizer_metadata

_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5  # gguf.TokenType values


@lru_cache(maxsize=1)
def deepseek_pretokenizer() -> dict:
    """DeepSeek-V3's pre-tokenizer (its three Split regexes + ByteLevel), from the shipped tokenizer.json."""
    from tierlm.runtime.demo import tokenizer_files_dir

    spec = json.loads((tokenizer_files_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    return spec["pre_tokenizer"]


def tokenizer_from_gguf(metadata: dict[str, Any], source: str):
    """The Tokenizer a GGUF describes. Supports ``gpt2`` (byte-level BPE) vocabularies."""
    from tierlm.tokenizer import Tokenizer

    t = tokenizer_metadata(metadata)
    if t.model != "gpt2":
        raise CheckpointError(f"{source}: tokenizer kind {t.model!r} is not supported (DeepSeek GGUFs use 'gpt2')")
    types = t.token_types or (1,) * len(t.tokens)
    vocab, added = {}, []
    for i, (tok, kind) in enumerate(zip(t.tokens, types)):
        if kind == _UNUSED:
            continue  # padding rows of the embedding table
        if kind in (_CONTROL, _USER_DEFINED):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == _CONTROL})
        vocab[tok] = i
    if t.pre == "deepseek-v3":
        pre = deepseek_pretokenizer()
    elif t.pre in (None, "default", "gpt-2"):
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        raise CheckpointError(f"{source}: pre-tokenizer {t.pre!r} is not supported ('deepseek-v3' or 'gpt-2')")
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": list(t.merges)},
    }
    config = {"bos_token": t.tokens[t.bos_id] if t.bos_id is not None else None,
              "eos_token": t.tokens[t.eos_id] if t.eos_id is not None else None,
              "chat_template": t.chat_template}
    return Tokenizer(json.dumps(spec), config, source=source)
