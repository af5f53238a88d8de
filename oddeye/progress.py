"""Progress on anything a user waits for: a bar on a terminal, a log line every N percent elsewhere.

tqdm redraws its bar many times a second; written to a log file (stderr not a terminal) that
is a flood of carriage-return lines. ``progress_bar`` gives tqdm on a terminal and otherwise a
wrapper that logs one line per ``log_every`` percent (or per ``log_every_s`` seconds when the
total is unknown). Both support ``set_postfix`` (e.g. the training loss) and ``update``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["progress_bar"]

T = TypeVar("T")
log = logging.getLogger("oddeye.progress")


def _interactive() -> bool:
    if os.environ.get("ODDEYE_PROGRESS") == "bar":
        return True
    if os.environ.get("ODDEYE_PROGRESS") == "log":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _LogProgress(Generic[T]):
    """A tqdm look-alike that logs ``desc: n/total (p%) postfix`` at coarse steps."""

    def __init__(
        self,
        iterable: Iterable[T] | None,
        desc: str,
        total: int | None,
        unit: str,
        log_every: float,
        log_every_s: float,
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.unit = unit
        self.n = 0
        self.postfix = ""
        self._step = max(1, int(total * log_every / 100)) if total else None
        self._next = self._step
        self._every_s = log_every_s
        self._t0 = self._last = time.monotonic()

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> _LogProgress[T]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={_fmt(v)}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._next is not None:
            if self.n >= self._next:
                self._emit(now)
                while self._next <= self.n:
                    self._next += self._step  # type: ignore[operator]
        elif now - self._last >= self._every_s:
            self._emit(now)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._last == self._t0 or (self.total and self.n < self.total and self.n):
            self._emit(time.monotonic())
        self._last = float("inf")  # closed: emit nothing more

    def _emit(self, now: float) -> None:
        if self._last == float("inf"):
            return
        self._last = now
        done = f"{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        extra = f" {self.postfix}" if self.postfix else ""
        log.info("%s: %s %s in %.0f s%s", self.desc, done, self.unit, now - self._t0, extra)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def progress_bar(
    iterable: Iterable[T] | None = None,
    desc: str = "",
    total: int | None = None,
    unit: str = "it",
    disable: bool = False,
    log_every: float = 10.0,
    log_every_s: float = 30.0,
) -> Any:
    """Wrap ``iterable`` (or make a manual counter when it is None) with progress reporting.

    On a terminal this is a tqdm bar; otherwise a line is logged every ``log_every`` percent.
    ``disable`` turns both off and returns the iterable itself (or a silent counter).
    """
    if disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True)
    if _interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, mininterval=0.5, dynamic_ncols=True)
    return _LogProgress(iterable, desc, total, unit, log_every, log_every_s)
