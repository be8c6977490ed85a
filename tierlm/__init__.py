"""tierlm: run giant Mixture-of-Experts models across GPU, RAM and NVMe tiers."""

__version__ = "0.1.0"


def load(path=None, **kwargs):
    """Load a checkpoint (HF folder or GGUF; None = the built-in demo model). See ``tierlm.runtime.engine.load``."""
    from tierlm.runtime.engine import load as _load

    return _load(path, **kwargs)
