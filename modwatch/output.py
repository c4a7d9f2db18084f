"""Record writers: JSON Lines for machines, a table for people at a terminal."""

from __future__ import annotations

import datetime as dt
from typing import IO, Any, Protocol

import orjson

from modwatch.correlate import Record


def _clean(value: Any) -> Any:
    """Strings hold raw kernel bytes as surrogate escapes; JSON must be valid UTF-8, so
    such bytes are written as the text \\xNN."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def dumps(record: Record) -> bytes:
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # a surrogate escape: not UTF-8 as it stands
        return orjson.dumps(_clean(record), option=orjson.OPT_APPEND_NEWLINE)


class Writer(Protocol):
    def write(self, record: Record) -> None: ...
    def close(self) -> None: ...


class JsonlWriter:
    """One JSON object per line, flushed per record so a pipeline sees it at once."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream

    def write(self, record: Record) -> None:
        self.stream.write(dumps(record))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def printable(text: str) -> str:
    """Control characters and raw bytes escaped, so a name cannot move the cursor."""
    text = text.translate(_CONTROL)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def result_text(record: Record) -> str:
    if record["ret"] is None:
        return "?"
    if record["ok"]:
        return "ok"
    err = record["errno"] or str(record["ret"])
    if record["stage"] == "init" and record["init_ret"] is not None:
        return f"{err} init"
    return err


_COLUMNS = (("TIME", 15), ("PID", 7), ("COMM", 15), ("CALL", 6), ("MODULE", 15), ("RESULT", 12))
_PARAMS = 14


class TableWriter:
    """Fixed columns, under 100 characters before the path, which comes last."""

    def __init__(self, stream: IO[str], utc: bool = False) -> None:
        self.stream = stream
        self.utc = utc
        heads = [name.ljust(width) for name, width in _COLUMNS]
        self.stream.write(" ".join([*heads, "PARAMS".ljust(_PARAMS), "PATH"]) + "\n")
        self.stream.flush()

    def _time(self, iso: str | None) -> str:
        if iso is None:
            return "-"
        when = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
        return (when if self.utc else when.astimezone()).strftime("%H:%M:%S.%f")

    def write(self, record: Record) -> None:
        if record["type"] == "lost":
            when = self._time(record["time"])
            line = f"{when:15} LOST {record['count']} events on CPU {record['cpu']}"
        elif record["type"] == "event":
            args = " ".join(f"{k}={v}" for k, v in record["args"].items())
            line = f"{self._time(record['time']):15} {record['tid']:<7} {record['event']} {args}"
        else:
            call = record["syscall"].replace("_module", "")
            cells = [
                self._time(record["time"]),
                str(record["pid"] if record["pid"] is not None else record["tid"]),
                record["comm"] or "-",
                call,
                record["module"] or "-",
                result_text(record),
                record["params"] if record["params"] is not None else "-",
            ]
            widths = [w for _, w in _COLUMNS] + [_PARAMS]
            line = " ".join(
                _clip(printable(c), w).ljust(w) for c, w in zip(cells, widths, strict=True)
            )
            line += " " + printable(record["path"] or "-")
        self.stream.write(printable(line) if record["type"] in ("lost", "event") else line)
        self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()
