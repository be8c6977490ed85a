"""Errors that tierlm shows to users. Each message names the cause and the fix."""


class TierlmError(Exception):
    """Base class for errors meant for the user (printed without a traceback by the CLI)."""


class ConfigError(TierlmError, ValueError):
    """A model configuration field is missing, unknown or inconsistent."""


class CheckpointError(TierlmError):
    """A checkpoint file is missing, truncated, or does not match its configuration."""


class NumericalError(TierlmError, FloatingPointError):
    """A forward pass produced inf/NaN (typically fp16 overflow)."""


class RequestError(TierlmError, ValueError):
    """A generation request is invalid (empty prompt, longer than the context, bad sampling values)."""


class OutOfMemory(TierlmError, MemoryError):
    """A step ran out of device memory and there was nothing left to free."""
