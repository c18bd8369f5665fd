"""Which trial failures the search records and goes on from, and how it words them."""

from __future__ import annotations

import logging
import traceback as _tb
from collections.abc import Callable
from typing import TypeVar

from greenopt.errors import GreenoptError

# Expected trial failures: recorded FAIL (with traceback) and the search goes on. torch's
# OutOfMemoryError and kernel errors from torch/bitsandbytes are RuntimeErrors. Anything
# else (TypeError, KeyError, AssertionError, NotImplementedError, ...) is a bug: re-raised.
EXPECTED = (GreenoptError, MemoryError, RuntimeError)
BUGS = (NotImplementedError, RecursionError)  # RuntimeError subclasses that mean a bug

log = logging.getLogger(__name__)
T = TypeVar("T")


def expected(e: BaseException) -> bool:
    return isinstance(e, EXPECTED) and not isinstance(e, BUGS)


def traceback_text(e: BaseException, limit: int = 20_000) -> str:
    text = "".join(_tb.format_exception(type(e), e, e.__traceback__))
    return text if len(text) <= limit else "...\n" + text[-limit:]


def reason(e: BaseException) -> str:
    import torch  # lazy: torch loads only where a trial failed

    kind = "out of memory" if isinstance(e, (MemoryError, torch.OutOfMemoryError)) else type(e).__name__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{kind}: {text}"[:500] if text else kind


def attempt(what: str, fn: Callable[[], T]) -> T | None:
    """``fn()``, or None after logging an expected failure (``could not {what}: ...``); a bug is re-raised."""
    try:
        return fn()
    except Exception as e:
        if not expected(e):
            raise
        log.warning("could not %s: %s", what, reason(e))
        return None
