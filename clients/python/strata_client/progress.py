"""A dependency-free progress line on stderr, drawn like the strata CLI's: a terminal gets one line
redrawn in place (at most every 0.1 s); anything else (a log file, a CI job) gets plain lines, at
most one every `plain_interval` seconds and never the same text twice."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def bar(fraction: float, width: int = 30) -> str:
    """`[#########---------]` for a fraction in [0, 1]."""
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width + 0.5)
    return "[" + "#" * full + "-" * (width - full) + "]"


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (the CLI's units)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float) -> str:
    """75 -> '1m 15s'; 3.25 -> '3.2s'."""
    t = int(seconds)
    if t >= 3600:
        return f"{t // 3600}h {(t % 3600) // 60}m {t % 60}s"
    if t >= 60:
        return f"{t // 60}m {t % 60}s"
    return f"{seconds:.1f}s"


class ProgressLine:
    """One progress line. Not thread-safe; use from the thread that does the work."""

    def __init__(self, stream: Optional[TextIO] = None, plain_interval: float = 2.0) -> None:
        self._stream = stream if stream is not None else sys.stderr
        isatty = getattr(self._stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._interval = plain_interval
        self._last = float("-inf")
        self._last_text = ""
        self._width = 0
        self._open = False

    @property
    def is_terminal(self) -> bool:
        """Whether the line is redrawn in place (the stream is a terminal)."""
        return self._tty

    def update(self, text: str, force: bool = False) -> None:
        """Shows `text` unless the previous update was too recent (`force` shows it anyway)."""
        now = time.monotonic()
        if self._tty:
            if not force and now - self._last < 0.1:
                return
            self._last = now
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()
            self._width = len(text)
            self._open = True
            return
        if not force and now - self._last < self._interval:
            return
        if text == self._last_text:
            return
        self._last = now
        self._last_text = text
        self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self, text: str) -> None:
        """Shows `text` and ends the line (the next update starts a new one)."""
        self.update(text, force=True)
        if self._tty and self._open:
            self._stream.write("\n")
            self._stream.flush()
            self._open = False
            self._width = 0
