"""Record writers: JSON Lines for machines, a table for people at a terminal."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import stat
from collections.abc import Callable, Sequence
from typing import IO, Any, NamedTuple, Protocol

import orjson

from modwatch.correlate import Record
from modwatch.decode import MODULE_TAINTS, errno_message


def escape(text: str) -> str:
    """The reversible escaping of a string that is not valid UTF-8 (raw kernel bytes are
    held as surrogate escapes): a backslash becomes `\\\\`, a byte that is not UTF-8
    becomes `\\xNN`, every other character stays itself."""
    out = []
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


def unescape(text: str) -> bytes:
    """The bytes behind a string written by `escape`."""
    parts = re.split(r"(\\\\|\\x[0-9a-f]{2})", text)
    return b"".join(
        b"\\"
        if part == "\\\\"
        else bytes([int(part[2:], 16)])
        if part.startswith("\\x")
        else part.encode()
        for part in parts
    )


def _needs_escape(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _escaped(record: Record) -> Record:
    """The record with each string that is not valid UTF-8 escaped, and the names of
    those fields (`args.NAME` inside a raw event) listed under `escaped`."""
    names: list[str] = []

    def clean(name: str, value: Any) -> Any:
        if isinstance(value, str) and _needs_escape(value):
            names.append(name)
            return escape(value)
        if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
            if any(isinstance(v, str) and _needs_escape(v) for v in value):
                names.append(name)
                return [escape(v) if isinstance(v, str) else v for v in value]
            return value
        if isinstance(value, list):  # of objects: ancestry, an audit's records
            return [clean(f"{name}.{i}", v) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: clean(f"{name}.{k}", v) for k, v in value.items()}
        return value

    cleaned = {k: clean(k, v) for k, v in record.items()}
    cleaned["escaped"] = sorted(names)
    return cleaned


def dumps(record: Record) -> bytes:
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # a surrogate escape: raw bytes that are not UTF-8
        return orjson.dumps(_escaped(record), option=orjson.OPT_APPEND_NEWLINE)


class Writer(Protocol):
    def write(self, record: Record) -> None: ...
    def close(self) -> None: ...


class JsonlWriter:
    """One JSON object per line, written at once (a pipeline sees each record as it
    comes). Into a regular file, a record that cannot be written whole (a full disk) is
    cut back off, so that the file holds complete lines only."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.fd: int | None = None
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            stream.flush()
            self.fd = stream.fileno()  # write(2) directly: no buffer to drain or undo
        self.regular = self.fd is not None and stat.S_ISREG(os.fstat(self.fd).st_mode)

    def write(self, record: Record) -> None:
        data = dumps(record)
        if self.fd is None:
            self.stream.write(data)
            self.stream.flush()
            return
        start = os.lseek(self.fd, 0, os.SEEK_END) if self.regular else None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, start)
            raise

    def close(self) -> None:
        if self.fd is None:
            self.stream.flush()


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


def printable(text: str) -> str:
    """Control characters and raw bytes escaped, so a name cannot move the cursor."""
    text = text.translate(_CONTROL)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


# Why a record has no return value, in the RESULT column's 12 characters.
_NO_RETURN = {"return_missed": "? no return", "in_flight": "? in flight", "evicted": "? evicted"}


def result_text(record: Record) -> str:
    if record["ret"] is None:
        return _NO_RETURN.get(record["incomplete"], "?")
    if record["ok"]:
        return "ok"
    err = record["errno"] or str(record["ret"])
    if record["stage"] == "init" and record["init_ret"] is not None:
        return f"{err} init"
    return err


# Table columns: a header, a width, and the cell of a record. The path, when chosen,
# comes last and takes what room is left.
class Column(NamedTuple):
    head: str
    width: int
    cell: Callable[[Record], object]


def _pid(record: Record) -> object:
    return record["pid"] if record["pid"] is not None else record["tid"]


def _sha(record: Record) -> object:
    return record["sha256"][:16] if record["sha256"] else None


def _hex(value: int | None) -> str | None:
    return None if value is None else hex(value)


def _yes_no(value: bool | None) -> str | None:
    return None if value is None else "yes" if value else "no"


COLUMNS: dict[str, Column] = {
    "time": Column("TIME", 15, lambda r: r["time"]),  # formatted by the writer
    "pid": Column("PID", 7, _pid),
    "tid": Column("TID", 7, lambda r: r["tid"]),
    "ppid": Column("PPID", 7, lambda r: r["ppid"]),
    "uid": Column("UID", 6, lambda r: r["uid"]),
    "euid": Column("EUID", 6, lambda r: r["euid"]),
    "loginuid": Column("LOGINUID", 8, lambda r: r["loginuid"]),
    "comm": Column("COMM", 15, lambda r: r["comm"]),
    "exe": Column("EXE", 24, lambda r: r["exe"]),
    "call": Column("CALL", 6, lambda r: r["syscall"].replace("_module", "")),
    "module": Column("MODULE", 15, lambda r: r["module"]),
    "result": Column("RESULT", 12, lambda r: result_text(r)),
    "stage": Column("STAGE", 10, lambda r: r["stage"]),
    "params": Column("PARAMS", 14, lambda r: r["params"]),
    "flags": Column("FLAGS", 8, lambda r: _hex(r["flags_raw"])),
    "taints": Column("TAINTS", 6, lambda r: "".join(r["taints"]) if r["taints"] else None),
    "signed": Column("SIGNED", 6, lambda r: _yes_no(r["signed"])),
    "in_tree": Column("IN_TREE", 7, lambda r: _yes_no(r["in_tree"])),
    "sha256": Column("SHA256", 16, _sha),
    "cgroup": Column("CGROUP", 24, lambda r: r["cgroup"]),
    "container": Column("CONTAINER", 12, lambda r: r["container"]),
    "path": Column("PATH", 0, lambda r: r["path"]),
}
DEFAULT_COLUMNS = ("time", "pid", "comm", "call", "module", "result", "params", "path")


class TableWriter:
    """Fixed columns (DEFAULT_COLUMNS: under 100 characters before the path, which comes
    last). Under a failed or tainting record, a line says what its errno and taint
    letters mean."""

    def __init__(
        self, stream: IO[str], utc: bool = False, columns: Sequence[str] = DEFAULT_COLUMNS
    ) -> None:
        self.stream = stream
        self.utc = utc
        names = [c for c in columns if c != "path"]
        self.columns = [COLUMNS[c] for c in names]
        self.path = "path" in columns
        heads = [c.head.ljust(c.width) for c in self.columns]
        self.stream.write(" ".join([*heads, "PATH"] if self.path else heads).rstrip() + "\n")
        self.stream.flush()

    def _time(self, iso: str | None) -> str:
        if iso is None:
            return "-"
        when = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
        return (when if self.utc else when.astimezone()).strftime("%H:%M:%S.%f")

    def write(self, record: Record) -> None:
        if record["type"] == "lost":
            when = self._time(record["time"])
            line = printable(f"{when:15} LOST {record['count']} events on CPU {record['cpu']}")
        elif record["type"] == "event":
            args = " ".join(f"{k}={v}" for k, v in record["args"].items())
            when = self._time(record["time"])
            line = printable(f"{when:15} {record['tid']:<7} {record['event']} {args}")
        else:
            cells = []
            for column in self.columns:
                value = column.cell(record)
                if column.head == "TIME":
                    text = self._time(value if isinstance(value, str) else None)
                else:
                    text = _text(value)
                cells.append(_clip(printable(text), column.width).ljust(column.width))
            if self.path:
                cells.append(printable(record["path"] or "-"))
            line = " ".join(cells).rstrip()
            details = _details(record)
            if details:
                line += "\n    " + printable(details)
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _details(record: Record) -> str:
    """What a record's errno and taint letters mean, for people."""
    parts = []
    message = errno_message(record["ret"])
    if message is not None:
        stage = f", stage {record['stage']}" if record["stage"] else ""
        parts.append(f"{record['errno'] or record['ret']}: {message}{stage}")
    if record["taints"]:
        meanings = [f"{t} {MODULE_TAINTS.get(t, 'unknown taint')}" for t in record["taints"]]
        parts.append("taints " + ", ".join(meanings))
    return "; ".join(parts)
