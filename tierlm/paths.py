"""Where tierlm keeps what it writes for itself (the demo model, compiled CPU kernels, disk measurements)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$TIERLM_CACHE``, else ``~/.cache/tierlm``."""
    return Path(os.environ.get("TIERLM_CACHE") or Path.home() / ".cache" / "tierlm")
