"""Failure classes as data: every exception a cell can meet maps to one class."""

from __future__ import annotations

import traceback


class DataError(Exception):
    """A dataset or calibration set cannot be found or read."""


class UnsupportedError(Exception):
    """A method, format or device cannot do what the cell asks."""


class NonFiniteError(Exception):
    """Non-finite weights, scales or metrics."""


def classify(exc: BaseException) -> str:
    """Map an exception to one of the row's error classes."""
    import torch  # the worker side only

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, (DataError, FileNotFoundError)):
        return "data"
    if isinstance(exc, (UnsupportedError, NotImplementedError)):
        return "unsupported"
    if isinstance(exc, NonFiniteError):
        return "nan"
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("shape" in text or "size mismatch" in text or "must match the size" in text):
        return "shape"
    return "error"


def short_traceback(exc: BaseException, limit: int = 4000) -> str:
    text = "".join(traceback.format_exception(exc))
    return text if len(text) <= limit else "…" + text[-limit:]
