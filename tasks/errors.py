"""Failure classes as data: every exception a cell can meet maps to one class."""

from __future__ import annotations

import os
import re
import traceback


class DataError(Exception):
    """A dataset or calibration set cannot be found or read."""


class UnsupportedError(Exception):
    """A method, format or device cannot do what the cell asks."""


class NonFiniteError(Exception):
    """Non-finite weights, scales or metrics."""


class DeviceLost(Exception):
    """A sticky accelerator error: the CUDA context of this process is unusable, every later
    kernel fails. The actor must exit (Ray replaces it) and the cell is retried on a fresh one."""


# CUDA errors after which the context stays broken (they are "sticky"); a plain CUDA OOM is not.
STICKY_DEVICE_ERROR = re.compile(
    r"illegal memory access|device-side assert|unspecified launch failure|misaligned address|"
    r"illegal instruction|uncorrectable ECC|cudaErrorLaunchFailure|CUDA error: unknown error|"
    r"\bXid\b|GPU has fallen off the bus|CUBLAS_STATUS_EXECUTION_FAILED",
    re.IGNORECASE)


def is_sticky_device_error(exc: BaseException) -> bool:
    return isinstance(exc, DeviceLost) or bool(STICKY_DEVICE_ERROR.search(str(exc)))


def classify(exc: BaseException) -> str:
    """Map an exception to one of the row's error classes."""
    import torch  # the worker side only

    if is_sticky_device_error(exc):
        return "crash"
    text = str(exc).lower()
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate memory" in text:
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


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace the value of every secret-looking environment variable (HF_TOKEN, AWS keys, ...)
    with ``***``, so tokens never land in rows or logs."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 6:
            text = text.replace(value, "***")
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)
