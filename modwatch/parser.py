"""Parse `trace_pipe` text into events.

The text has traps (see the kernel notes): strings are printed raw, so a task
name or a parameter string may hold quotes and newlines, and a task name in a
line's prefix may begin with lines of its own. The parser therefore reads
*logical* lines: a header line of one of modwatch's events (its event name is
unguessable for an unprivileged user) followed by any continuation lines. Only
the last fields of an event may be strings, so every other field is anchored
before them; the task name is fetched twice (`comm="X" comm2="X"`), which has
exactly one reading whatever X holds. Nothing is dropped in silence: a line
that fits nowhere comes out as `Unparsed`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from modwatch import tpformat
from modwatch.probes import ProbeSpec, Tracepoint

# `TASK-TID (TGID) [CPU] FLAGS SECS.USECS: EVENT: BODY`. The task is printed `%16s`
# (at most 15 characters, padded left); `(TGID)` appears with record-tgid, FLAGS with
# irq-info and has 4 characters before ~5.15 and 5 after.
_HEADER = re.compile(
    r"(?P<task>.{0,16}?)-(?P<tid>\d+) +"
    r"(?:\((?: *(?P<tgid>\d+)|-+)\) +)?"
    r"\[(?P<cpu>\d+)\] +"
    r"(?:(?P<flags>\S{4,5}) +)?"
    r"(?P<sec>\d+)\.(?P<usec>\d{6}): (?P<event>[A-Za-z_]\w*)(?:: ?|(?=\(| -> ))"
)
# The count is missing when the kernel could not tell how many were lost.
_LOST = re.compile(r"CPU:(?P<cpu>\d+) \[LOST (?:(?P<count>\d+) )?EVENTS\]")
TASK_WIDTH = 16

_NUMBER = {"s": r"-?\d+", "u": r"\d+", "x": r"0x[0-9a-fA-F]+"}


class Event(NamedTuple):
    """One kernel event of modwatch's probe set."""

    kind: str  # e.g. "finit_module", "module_load"
    compat: bool  # from a 32-bit syscall entry point
    tid: int
    tgid: int | None
    cpu: int
    ts_us: int  # trace clock, microseconds
    task: str  # task name from the line prefix (may be "<...>")
    fields: dict[str, int | str | None]  # None: the kernel printed (fault)


class Lost(NamedTuple):
    """`CPU:N [LOST M EVENTS]`: the kernel overwrote M events of that CPU (None: an
    unknown number)."""

    cpu: int
    events: int | None


class Unparsed(NamedTuple):
    """Text that fits no event of the probe set."""

    text: str


Item = Event | Lost | Unparsed


def _value_pattern(name: str, type_: str) -> str:
    if type_ in ("string", "ustring"):
        # A string the kernel could not read prints as (fault), unquoted: group is None.
        return f'(?:"(?P<{name}>(?s:.*))"|\\(fault\\))'
    return f"(?P<{name}>{_NUMBER[type_[0]]})"


def counted_strings(spec: ProbeSpec) -> tuple[tuple[str, str], ...]:
    """(string, length) argument pairs: a string `nX` whose byte length is fetched
    before it as `lX` is cut by that length, so it can hold anything, even `" nY="`."""
    numeric = {a.name for a in spec.args if not a.is_string}
    return tuple(
        (a.name, f"l{a.name[1:]}")
        for a in spec.args
        if a.is_string and a.name.startswith("n") and f"l{a.name[1:]}" in numeric
    )


def body_pattern(spec: ProbeSpec) -> re.Pattern[str]:
    """The regex a probe's body must match in full, built from its fetch-args. Counted
    strings (see `counted_strings`) are left in the group `_counted`, for `cut_counted`."""
    args = list(spec.args)
    counted = counted_strings(spec)
    if counted:
        args = args[: len(args) - len(counted)]
        if [a.name for a in spec.args[len(args) :]] != [n for n, _ in counted]:
            raise ValueError(f"{spec.event}: counted strings must come last")
    comm_pair = len(args) >= 2 and (args[-2].name, args[-1].name) == ("comm", "comm2")
    if comm_pair:
        args = args[:-2]
    if (
        any(a.is_string for a in args[:-1])
        or ((comm_pair or counted) and args and args[-1].is_string)
        or (comm_pair and counted)
    ):
        raise ValueError(f"{spec.event}: only one trailing string can be parsed")
    # Probe location: `(sym+0x0/0x20)`, or for a return `(caller+0x5d/0xb0 <- sym)`.
    parts = [r"\([^()\n]*\)"]
    parts += [f" {a.name}={_value_pattern(a.name, a.type)}" for a in args]
    if comm_pair:
        parts.append(r' comm="(?P<comm>(?s:.*))" comm2="(?P=comm)"')
    if counted:
        parts.append(r"(?P<_counted>(?s: .*))")
    return re.compile("".join(parts))


def cut_counted(
    text: str, counted: tuple[tuple[str, str], ...], fields: dict[str, int | str | None]
) -> dict[str, str | None] | None:
    """The counted strings of `text` (` n0="..." n1=(fault) ...`), each cut by the byte
    length in `fields`; None if the text does not fit them exactly."""
    raw = text.encode("utf-8", "surrogateescape")
    values: dict[str, str | None] = {}
    pos = 0
    for name, length_name in counted:
        fault = f" {name}=(fault)".encode()
        quoted = f' {name}="'.encode()
        length = fields.get(length_name)
        if raw.startswith(fault, pos):
            values[name] = None
            pos += len(fault)
        elif raw.startswith(quoted, pos) and isinstance(length, int):
            start = pos + len(quoted)
            end = start + length
            if raw[end : end + 1] != b'"':
                return None
            values[name] = raw[start:end].decode("utf-8", "surrogateescape")
            pos = end + 1
        else:
            return None
    return values if pos == len(raw) else None


_TRACEPOINT_BODY = {
    # TP_printk("%s %s", name, show_module_flags(taints)): letters, or "" when untainted.
    "module_load": re.compile(r"(?P<name>(?s:.*)) (?P<taints>[A-Z]*)"),
    "module_free": re.compile(r"(?P<name>(?s:.*))"),
}
# The print formats those patterns read (6.1 and 6.12): a kernel whose format has
# another shape is read through a pattern built from its own format.
_KNOWN_SHAPES = {
    "module_load": ("%s %s", ("name", "taints")),
    "module_free": ("%s", ("name",)),
}


def _tracepoint_kind(tp: Tracepoint) -> _Kind:
    fmt = tpformat.parse(tp.print_fmt) if tp.print_fmt is not None else None
    if fmt is not None and fmt.shape != _KNOWN_SHAPES[tp.event]:
        built = tpformat.pattern(fmt)
        if built is not None:
            return _Kind(tp.kind, False, built[0], built[1])
    return _Kind(tp.kind, False, _TRACEPOINT_BODY[tp.event], {})


def tracepoint_note(tp: Tracepoint) -> str:
    """How the events of a (non-syscall) tracepoint are read, for --dry-run and doctor."""
    name = f"{tp.system}:{tp.event}"
    if tp.print_fmt is None:
        return f"{name}: print format not read; the known one is assumed"
    fmt = tpformat.parse(tp.print_fmt)
    if fmt is not None and fmt.shape == _KNOWN_SHAPES[tp.event]:
        return f"{name}: print format as known ({fmt.text!r})"
    if fmt is not None and tpformat.pattern(fmt) is not None:
        return (
            f"{name}: print format {fmt.text!r} differs from the known one: read by it, "
            f"fields {', '.join(fmt.names)}"
        )
    return f"{name}: print format not understood ({tp.print_fmt!r}); the known one is assumed"


# The syscalls' own tracepoints (kernel/trace/trace_syscalls.c) print `sys_X(fd: 3,
# uargs: 7fff76679e42, flags: 0)` at entry and `sys_X -> 0x0` at exit: every value an
# unsigned long in hex, without 0x at entry (seen on 6.1 and 6.12).
_SYSCALL_ARGS = {
    "finit_module": (("fd", "fd"), ("uargs", "param_values"), ("flags", "flags")),
    "init_module": (("umod", "module_image"), ("len", "len"), ("uargs", "param_values")),
    "delete_module": (("name_user", "name"), ("flags", "flags")),
}
_HEX = "(?P<{}>[0-9a-f]+)"
# Values to read back as signed: the kernel printed them as unsigned long.
_SIGNED = {"fd": 32, "ret": 64}


# Any list of `name: value` pairs: a kernel that adds an argument still parses, and the
# argument is kept (under its printed name) for --raw.
_SYSCALL_ENTRY = re.compile(r"\((?P<_args>\w+: [0-9a-f]+(?:, \w+: [0-9a-f]+)*)?\)")
_SYSCALL_EXIT = re.compile(" -> 0x" + _HEX.format("ret"))


def _syscall_fields(kind: str, text: str) -> dict[str, int | str | None] | None:
    """The arguments of a syscall entry (`fd: 3, uargs: 7fff..`) by modwatch's names, and
    any the kernel prints beyond them by their own; None if one modwatch needs is missing."""
    printed = dict(pair.split(": ") for pair in text.split(", ")) if text else {}
    fields: dict[str, int | str | None] = {}
    for name, field in _SYSCALL_ARGS[kind]:
        if name not in printed:
            return None
        fields[field] = int(printed.pop(name), 16)
    fields.update((name, int(value, 16)) for name, value in printed.items())
    return fields


class _Kind(NamedTuple):
    kind: str
    compat: bool
    pattern: re.Pattern[str]
    numeric: dict[str, int]  # field -> base for int()
    counted: tuple[tuple[str, str], ...] = ()
    signed: bool = False  # syscall tracepoint values, printed as unsigned long
    syscall_args: bool = False  # a syscall entry's `(name: value, ...)` list


def _kind_of(spec: ProbeSpec | Tracepoint) -> _Kind:
    if isinstance(spec, Tracepoint):
        if spec.system == "syscalls":
            if spec.event.startswith("sys_exit_"):
                return _Kind(spec.kind, False, _SYSCALL_EXIT, {"ret": 16}, signed=True)
            return _Kind(spec.kind, False, _SYSCALL_ENTRY, {}, signed=True, syscall_args=True)
        return _tracepoint_kind(spec)
    numeric = {a.name: 16 if a.type[0] == "x" else 10 for a in spec.args if not a.is_string}
    return _Kind(spec.kind, spec.compat, body_pattern(spec), numeric, counted_strings(spec))


def _signed(fields: dict[str, int | str | None]) -> None:
    """Read back as signed what the syscall tracepoints print as unsigned long."""
    for name, bits in _SIGNED.items():
        value = fields.get(name)
        if isinstance(value, int):
            value &= (1 << bits) - 1
            fields[name] = value - (1 << bits) if value >> (bits - 1) else value


def _width(text: str) -> int:
    """Bytes the kernel printed: it pads the task name to 16 bytes, not characters."""
    return len(text.encode("utf-8", "surrogateescape")) if not text.isascii() else len(text)


def _residue_start(pending: list[str], task: str) -> int | None:
    """Where the lines that begin the next header's task name start, if there are any: a
    task name holding newlines fills the %16s field across lines, so those lines and the
    header's own part are exactly TASK_WIDTH bytes long with their newlines."""
    width = _width(task)
    if width >= TASK_WIDTH:
        return None
    for j in range(len(pending) - 1, -1, -1):
        width += _width(pending[j]) + 1
        if width == TASK_WIDTH:
            return j
        if width > TASK_WIDTH:
            return None
    return None


class Parser:
    """Incremental parser. `read` takes one read of a trace_pipe, `feed` any piece of
    text; `flush` resolves what is held back (the end of the input)."""

    def __init__(self, events: dict[str, ProbeSpec | Tracepoint]) -> None:
        # By the name trace_pipe prints: a syscall's entry and exit tracepoints share one.
        self._specs: dict[str, list[ProbeSpec | Tracepoint]] = {}
        for name, spec in events.items():
            printed = spec.printed if isinstance(spec, Tracepoint) else name
            self._specs.setdefault(printed, []).append(spec)
        # Each event's patterns, compiled when it is first seen: compiling all of them
        # took a tenth of a capture's start under emulation, and most events are rare.
        self._kinds: dict[str, list[_Kind]] = {}
        self._partial = ""
        self._header: re.Match[str] | None = None
        self._header_line = ""
        self._task_start = ""  # lines of the current header's task name before its line
        self._pending: list[str] = []
        # The last line in _pending that looks like a LOST line. It is one only if the next
        # header follows it (the kernel prints it right before that CPU's next event);
        # otherwise it is text inside a string.
        self._lost_at: tuple[int, Lost] | None = None

    def feed(self, data: str) -> list[Item]:
        out: list[Item] = []
        lines = (self._partial + data).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line, out)
        return out

    def read(self, data: str) -> list[Item]:
        """One read of a trace_pipe: its events, the last one included (no later line can
        continue it). The kernel returns whole events per read, except that a read that
        fills the kernel's text buffer can stop one byte short, the last event's newline
        then coming first in the next read (reads of 4,095 bytes on 6.1 and 8,155 on
        6.12, one read in 50 to 120 in a run of events of varied lengths): a line cut
        by a read waits for the rest."""
        out = self.feed(data)
        if data.endswith("\n"):
            out += self.flush()
        return out

    def flush(self) -> list[Item]:
        """Resolve what is held back: after a read that ended with a whole line, and at
        the end of the input."""
        out: list[Item] = []
        if self._partial:
            self._line(self._partial, out)
            self._partial = ""
        self._lost_at = None  # a LOST line is always followed by its event in the same read
        self._resolve(self._pending, out)
        self._pending = []
        return out

    def _line(self, line: str, out: list[Item]) -> None:
        header = _HEADER.match(line)
        if header is None or header["event"] not in self._specs:
            m = _LOST.fullmatch(line)
            if m:
                self._lost_at = (
                    len(self._pending),
                    Lost(int(m["cpu"]), int(m["count"]) if m["count"] else None),
                )
            self._pending.append(line)
            return
        pending, self._pending = self._pending, []
        lost_at, self._lost_at = self._lost_at, None
        task_start: list[str] = []
        if lost_at is not None:
            at, lost = lost_at
            after = pending[at + 1 :]
            if not after or _residue_start(after, header["task"]) == 0:
                self._resolve(pending[:at], out)
                out.append(lost)
                task_start = after
                pending = []
        if pending:
            j = _residue_start(pending, header["task"])
            if j is not None and self._header is None:
                out.extend(Unparsed(p) for p in pending[:j])
                task_start, pending = pending[j:], []
            elif j is not None:
                event = self._event(pending[:j])
                if event is not None:
                    out.append(event)
                    self._header = None
                    task_start, pending = pending[j:], []
        if pending or self._header is not None:
            self._resolve(pending, out)
        self._header, self._header_line = header, line
        self._task_start = "\n".join(task_start)

    def _resolve(self, pending: list[str], out: list[Item]) -> None:
        """Emit the current event with as many of the pending lines as continue its last
        string; what is left over comes out as Unparsed."""
        if self._header is None:
            out.extend(Unparsed(p) for p in pending)
            return
        for j in range(len(pending), -1, -1):
            event = self._event(pending[:j])
            if event is not None:
                out.append(event)
                out.extend(Unparsed(p) for p in pending[j:])
                break
        else:
            out.append(Unparsed("\n".join([self._header_line, *pending])))
        self._header = None

    def _event(self, more: list[str]) -> Event | None:
        header = self._header
        assert header is not None
        body = "\n".join([self._header_line[header.end() :], *more])
        event = header["event"]
        kinds = self._kinds.get(event)
        if kinds is None:
            kinds = self._kinds[event] = [_kind_of(spec) for spec in self._specs[event]]
        for kind in kinds:
            m = kind.pattern.fullmatch(body)
            if m is not None:
                break
        else:
            return None
        fields: dict[str, int | str | None] = {}
        for name, value in m.groupdict().items():
            base = kind.numeric.get(name)
            fields[name] = int(value, base) if base is not None and value is not None else value
        if kind.syscall_args:
            args = _syscall_fields(kind.kind, str(fields.pop("_args") or ""))
            if args is None:
                return None
            fields = args
        if kind.signed:
            _signed(fields)
        if kind.counted:
            counted = cut_counted(str(fields.pop("_counted")), kind.counted, fields)
            if counted is None:
                return None
            fields.update(counted)
        task = header["task"]
        if self._task_start:
            task = f"{self._task_start}\n{task}"
        return Event(
            kind=kind.kind,
            compat=kind.compat,
            tid=int(header["tid"]),
            tgid=int(header["tgid"]) if header["tgid"] else None,
            cpu=int(header["cpu"]),
            ts_us=int(header["sec"]) * 1_000_000 + int(header["usec"]),
            task=task.lstrip(" "),
            fields=fields,
        )
