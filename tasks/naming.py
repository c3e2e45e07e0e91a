"""The one "did you mean" used by every registry and by spec validation. Torch-free."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the closest candidate, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1)
    return f"did you mean '{close[0]}'? " if close else ""
