"""Failure classes as data: every exception a cell can meet maps to one class."""

from __future__ import annotations

import logging
import os
import re
import traceback


class DataError(Exception):
    """A dataset or calibration set cannot be found or read."""


class UnsupportedError(Exception):
    """A method, format or device cannot do what the cell asks."""


class NonFiniteError(Exception):
    """Non-finite weights, scales or metrics."""


class AccessError(Exception):
    """The hub refused access (HTTP 401/403): a gated or private repository, a missing or wrong
    token. Deterministic: the cell is not retried until the user has access."""


def hub_refusal(exc: BaseException) -> str | None:
    """What the hub said when ``exc`` (or an exception it was raised from) is a refusal of
    access: 'gated', '401' or '403'; None for anything else. Transformers and datasets wrap
    huggingface_hub's errors in their own (OSError, DatasetNotFoundError), so the chain is read."""
    try:
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    except ImportError:
        return None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GatedRepoError):
            return "gated"
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, HfHubHTTPError) and status in (401, 403):
            return str(status)
        exc = exc.__cause__ or exc.__context__
    return None


def access_advice(what: str, name: str, refusal: str) -> str:
    """The message of a hub refusal: which repository, what the hub said, what to do."""
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    said = {"gated": "it is gated", "401": "401 Unauthorized", "403": "403 Forbidden"}[refusal]
    return (f"{what} {name}: the hub refused access ({said}; {token}). Accept the {what}'s licence "
            f"on its hub page with the account whose token the job uses, then set HF_TOKEN for the "
            f"job (it is forwarded to every actor); not retried")


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
    if isinstance(exc, AccessError):
        return "auth"
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


class RedactSecrets(logging.Filter):
    """A logging filter that passes every record through ``redact`` (message, arguments and the
    traceback of an exception logged with it), so that no token reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        return True


def redact_logs() -> None:
    """Install ``RedactSecrets`` on every handler of the root logger (call after configuring it)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
