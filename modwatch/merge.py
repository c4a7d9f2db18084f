"""Two streams of trace items in one timestamp order.

A session reads two trace_pipes: its main instance (the syscalls, which any user can
flood) and its rare instance (events past the permission check). Each pipe comes in
timestamp order; the correlator needs both in one. An item can be released once
nothing earlier can still come from the other stream: that stream holds a later item
already, or it was read to its end after a watermark was taken (the trace clock's
now, less a margin for events written but not yet committed) and the item is older.

`Lost` and `Unparsed` items have no timestamp: they take that of the item before
them in their own stream, so that they keep their place in it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from modwatch.parser import Event, Item

MAIN, RARE = 0, 1
ALL = 1 << 62  # a watermark past every timestamp: release everything held


class Merge:
    def __init__(self) -> None:
        self._held: tuple[collections.deque[tuple[int, Item]], ...] = (
            collections.deque(),
            collections.deque(),
        )
        self._last_ts = [0, 0]

    def add(self, stream: int, items: Iterable[Item]) -> None:
        held = self._held[stream]
        ts = self._last_ts[stream]
        for item in items:
            if type(item) is Event:
                ts = item.ts_us
            held.append((ts, item))
        self._last_ts[stream] = ts

    def held(self, stream: int | None = None) -> int:
        """How many items wait (in one stream, or in both)."""
        if stream is None:
            return len(self._held[MAIN]) + len(self._held[RARE])
        return len(self._held[stream])

    def last_ts(self, stream: int) -> int:
        return self._last_ts[stream]

    def release(self, watermark: int, complete: tuple[bool, bool]) -> list[Item]:
        """Items up to `watermark` (trace clock, microseconds) in timestamp order, as far
        as they can be told: `complete[S]` says stream S was read to its end after the
        watermark was taken, so that nothing up to it can come from S any more."""
        main, rare = self._held
        out: list[Item] = []
        if not rare and complete[RARE]:
            # The common case, and a flood's: the main stream alone.
            if main and main[-1][0] <= watermark:
                out = [item for _, item in main]
                main.clear()
                return out
            while main and main[0][0] <= watermark:
                out.append(main.popleft()[1])
            return out
        while True:
            if main and (not rare or main[0][0] <= rare[0][0]):
                first, other, other_done = main, rare, complete[RARE]
            elif rare:
                first, other, other_done = rare, main, complete[MAIN]
            else:
                return out
            if first[0][0] > watermark or not (other or other_done):
                return out
            out.append(first.popleft()[1])
