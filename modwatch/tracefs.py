"""Access to tracefs: finding the mount, appending probe definitions, instances.

Every write that the kernel refuses becomes a ModwatchError that carries the path
and the kernel's own reason from `error_log`. Writes to `kprobe_events` always
append: a truncating open would delete every kprobe on the system.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from modwatch import tpformat
from modwatch.errors import ExitStatus, ModwatchError

PROC_MOUNTS = "/proc/mounts"
LOCKDOWN_PATH = "/sys/kernel/security/lockdown"
DEFAULT_MOUNTPOINT = "/sys/kernel/tracing"


def _unescape(field: bytes) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes."""
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)
    return os.fsdecode(raw)


def find_mount(mounts_path: str = PROC_MOUNTS) -> str | None:
    """The tracefs mount point: tracefs itself first (/sys/kernel/tracing preferred),
    else the `tracing` directory of a debugfs mount."""
    tracefs: list[str] = []
    debugfs: list[str] = []
    try:
        with open(mounts_path, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        if fields[2] == b"tracefs":
            tracefs.append(_unescape(fields[1]))
        elif fields[2] == b"debugfs":
            debugfs.append(os.path.join(_unescape(fields[1]), "tracing"))
    tracefs.sort(key=lambda p: p != DEFAULT_MOUNTPOINT)
    for point in tracefs + [d for d in debugfs if os.path.isdir(d)]:
        return point
    return None


def mount(target: str = DEFAULT_MOUNTPOINT) -> None:
    """Mount tracefs at `target` (the kernel creates /sys/kernel/tracing for it)."""
    import ctypes  # rarely needed: not loaded by every start

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", target.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def unmount(target: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def lockdown_mode(path: str = LOCKDOWN_PATH) -> str | None:
    """The active lockdown mode (`none`, `integrity`, `confidentiality`), or None when the
    kernel has no lockdown LSM."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


@dataclass(frozen=True)
class KernelError:
    """The kernel's reason for a refused write, from error_log."""

    reason: str
    command: str | None
    at: str | None  # the word the caret points at

    def __str__(self) -> str:
        text = self.reason
        if self.at:
            text += f" at '{self.at}'"
        return text


def parse_error_log(text: str) -> KernelError | None:
    """The last entry of a tracefs error_log:
    `[  12.3] trace_kprobe: error: REASON` / `  Command: CMD` / a caret line."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("[")]
    if not starts:
        return None
    entry = lines[starts[-1] :]
    head = entry[0].split("] ", 1)[-1]
    reason = head.split("error: ", 1)[-1].strip()
    command = at = None
    if len(entry) > 1 and entry[1].strip().startswith("Command:"):
        prefix, _, command = entry[1].partition("Command: ")
        if len(entry) > 2 and "^" in entry[2]:
            col = entry[2].index("^") - len(prefix) - len("Command: ")
            if 0 <= col < len(command):
                at = command[col:].split(" ", 1)[0]
    return KernelError(reason, command, at)


class ProbeRejected(ModwatchError):
    """The kernel refused a probe definition; `reason` is its error_log entry, if any."""

    def __init__(self, message: str, definition: str, reason: KernelError | None) -> None:
        super().__init__(message, ExitStatus.PROBE_REJECTED)
        self.definition, self.reason = definition, reason

    def symbol(self) -> str | None:
        """The probed symbol, if that is what the kernel refused (it has no such function,
        or cannot probe it): error_log's caret points at it."""
        symbol = self.definition.split(" ")[1]
        return symbol if self.reason is not None and self.reason.at == symbol else None


class Tracefs:
    """One tracefs mount."""

    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return os.path.exists(self.path(*parts))

    def read(self, *parts: str) -> str:
        with open(self.path(*parts), encoding="utf-8", errors="surrogateescape") as f:
            return f.read()

    def lines(self, *parts: str) -> Iterator[str]:
        with open(self.path(*parts), encoding="utf-8", errors="surrogateescape") as f:
            yield from (line.rstrip("\n") for line in f)

    def kernel_error(self) -> KernelError | None:
        try:
            return parse_error_log(self.read("error_log"))
        except OSError:
            return None

    def write(self, rel: str, text: str, append: bool = False) -> None:
        """Write `text` in one write(2). `append` is for kprobe_events, which must never be
        opened with O_TRUNC; Python's "a" mode fails there (it seeks), so use os.open."""
        path = self.path(rel)
        flags = os.O_WRONLY | (os.O_APPEND if append else 0)
        fd = os.open(path, flags)
        try:
            os.write(fd, text.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)

    def add_probe(self, definition: str) -> None:
        try:
            self.write("kprobe_events", definition + "\n", append=True)
        except OSError as err:
            reason = self.kernel_error()
            why = str(reason) if reason else os.strerror(err.errno or 0)
            raise ProbeRejected(
                f"modwatch: the kernel rejected probe '{definition}' in "
                f"{self.path('kprobe_events')}: {why}",
                definition,
                reason,
            ) from err

    def remove_probe(self, removal: str, group: str) -> None:
        """Remove one probe. If it is enabled somewhere else (EBUSY), disable the group at
        the top level and in every instance, then try once more. A probe that is already
        gone is not an error."""
        try:
            self.write("kprobe_events", removal + "\n", append=True)
            return
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.EINVAL) and removal not in self.groups(group).get(
                group, ()
            ):
                return
            if err.errno != errno.EBUSY:
                raise
        self.disable_group_everywhere(group)
        self.write("kprobe_events", removal + "\n", append=True)

    def disable_group_everywhere(self, group: str) -> None:
        places = [self.path("events", group, "enable")]
        places += [
            os.path.join(d, "events", group, "enable") for d in self.instance_paths().values()
        ]
        for enable in places:
            if os.path.exists(enable):
                try:
                    with open(enable, "w", encoding="ascii") as f:
                        f.write("0")
                except OSError:
                    pass

    def probe_lines(self) -> list[str]:
        """kprobe_events, one definition per line; none on a kernel without it."""
        if not self.exists("kprobe_events"):
            return []
        return list(self.lines("kprobe_events"))

    def groups(self, prefix: str) -> dict[str, list[str]]:
        """Probe groups whose name starts with `prefix`, with their `-:GROUP/EVENT` removals."""
        found: dict[str, list[str]] = {}
        for line in self.probe_lines():
            # `p:GROUP/EVENT SYMBOL ...`, `r10:GROUP/EVENT ...`
            head = line.split(" ", 1)[0]
            _, _, name = head.partition(":")
            group, _, _ = name.partition("/")
            if group.startswith(prefix):
                found.setdefault(group, []).append(f"-:{name}")
        return found

    def instance_paths(self) -> dict[str, str]:
        base = self.path("instances")
        try:
            names = os.listdir(base)
        except OSError:
            return {}
        return {n: os.path.join(base, n) for n in names}

    def make_instance(self, name: str) -> str:
        path = self.path("instances", name)
        os.mkdir(path)
        return path

    def remove_instance(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.path("instances", name))

    def print_fmt(self, system: str, event: str) -> str | None:
        """A tracepoint's `print fmt:` (its format file), or None if it cannot be read."""
        try:
            return tpformat.print_fmt_line(self.read("events", system, event, "format"))
        except OSError:
            return None

    def kprobe_misses(self, events: Iterable[str]) -> dict[str, int]:
        """The kernel's count of missed hits (`kprobe_profile`, third column) of each
        given probe event that has any: a return probe out of instances, or a probe
        that fired inside another one. Those events never reached the buffer."""
        wanted = set(events)
        misses = {}
        for line in self.lines("kprobe_profile"):
            fields = line.split()
            if len(fields) == 3 and fields[0] in wanted and fields[2].isdigit() and int(fields[2]):
                misses[fields[0]] = int(fields[2])
        return misses

    def available_functions(self) -> Symbols:
        """Names in available_filter_functions (`name` or `name [module]`); none if it
        cannot be read."""
        try:
            with open(self.path("available_filter_functions"), "rb") as f:
                text = f.read()
        except OSError:
            text = b""
        return Symbols(text, before=(b"\n",), after=(b"\n", b" "))

    def has_tracepoint(self, system: str, event: str) -> bool:
        return self.exists("events", system, event)


class TaskGroups:
    """The kernel's map from a thread to its process (`saved_tgids`, kept while an
    instance has record-tgid set), which the trace's `(TGID)` column is printed from.

    The kernel notes a thread there at its first switch after one of its events, so an
    event read at once may show no tgid; once the thread has exited (switched out for
    the last time), the map has it. Only a reading made after the thread was found gone
    is asked: an older one may still hold another, earlier thread of that number. The
    map lists every thread noted (thousands of lines): it is read at most every
    `interval` seconds, and a thread asked about in between gets no answer.
    """

    def __init__(
        self, fs: Tracefs, interval: float = 0.1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.fs = fs
        self.interval = interval
        self.clock = clock
        self._map: dict[int, int] = {}
        self._read_at: float | None = None

    def tgid(self, tid: int, gone_at: float) -> int | None:
        """The process of thread `tid`, found gone (by `clock`) at `gone_at`."""
        if self._read_at is None or self._read_at < gone_at:
            now = self.clock()
            if self._read_at is not None and now - self._read_at < self.interval:
                return None
            self._read_at = now
            try:
                pairs = (line.split() for line in self.fs.lines("saved_tgids"))
                self._map = {int(p[0]): int(p[1]) for p in pairs if len(p) == 2}
            except (OSError, ValueError):
                self._map = {}
        return self._map.get(tid)


class Symbols:
    """The names of a kernel symbol list, asked one at a time.

    The list stays the text the kernel wrote: available_filter_functions has some 60,000
    lines and /proc/kallsyms some 200,000, a capture asks about a dozen names, and
    searching the text for each costs a fraction of building a set of every line (which
    took seconds under emulation). A name matches between one of `before` and one of
    `after`; every line of the text starts after a newline and ends with one.
    """

    def __init__(self, text: bytes, before: tuple[bytes, ...], after: tuple[bytes, ...]) -> None:
        self._text = b"\n" + text + (b"" if text.endswith(b"\n") else b"\n")
        self._around = [(b, a) for b in before for a in after]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            return False
        encoded = name.encode("utf-8", "surrogateescape")
        return any(b + encoded + a in self._text for b, a in self._around)


def kallsyms_text_symbols(path: str = "/proc/kallsyms") -> Symbols:
    """Text symbols (`t`/`T`) of the kernel proper (a module's lines end in `[module]`)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        text = b""
    return Symbols(text, before=(b" t ", b" T "), after=(b"\n",))
