"""Progress of a long tokenization: rows done, rows/s and the time left.

A tqdm bar on a terminal; elsewhere (a log file, CI, a launcher capturing output) a plain line every
EVERY rows, since a bar's carriage returns turn a log into one unreadable line. Written to stderr, so
stdout keeps only the command's result.
"""

from __future__ import annotations

import sys
import time

EVERY = 100_000


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class RowProgress:
    """`update(n)` after n more rows; `total` is an estimate (newlines, Parquet metadata) or None."""

    def __init__(self, total: int | None, enabled: bool = True, stream=None):
        self.total, self.enabled, self.stream = total, enabled, stream or sys.stderr
        self.done, self.start, self.next_line = 0, time.monotonic(), EVERY
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=" rows", unit_scale=True, desc="tokenizing", file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        if not self.enabled or n <= 0:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_line:
            self.next_line += EVERY
            self._line()

    def _line(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (f", about {_duration((self.total - self.done) / rate)} left"
                if self.total and self.total > self.done and rate > 0 else "")
        of = f" of ~{self.total:,}" if self.total else ""
        print(f"tokenizing: {self.done:,}{of} rows, {rate:,.0f} rows/s{left}", file=self.stream, flush=True)

    def __enter__(self) -> RowProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and exc[0] is None and self.done:
            self._line()
