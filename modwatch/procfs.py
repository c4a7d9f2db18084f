"""Facts about a caller from /proc, read while its module call is in flight.

Races are expected: the caller may have closed the fd or exited by the time its
event is read. Whatever vanished is None, never an exception.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from modwatch.correlate import Caller, InCall
from modwatch.probes import Arch

PROCFS_PATH = "/proc"


def read_status(tid: int, procfs: str = PROCFS_PATH) -> dict[str, str]:
    """`/proc/TID/status` as a dict; empty when the thread is gone. /proc/TID exists for
    every thread id, not only for process ids."""
    try:
        with open(f"{procfs}/{tid}/status", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    status = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            status[key] = value.strip()
    return status


def fd_path(pid: int, fd: int, procfs: str = PROCFS_PATH) -> str | None:
    """The path behind a process's fd, or None if the fd or the process is gone."""
    if fd < 0:
        return None
    try:
        return os.readlink(f"{procfs}/{pid}/fd/{fd}")
    except OSError:
        return None


def syscall_nr(tid: int, procfs: str = PROCFS_PATH) -> int | str | None:
    """`/proc/TID/syscall`: the number of the syscall the thread is blocked in (-1 for
    none), "running" when it runs on a CPU right now, None when the thread is gone."""
    try:
        with open(f"{procfs}/{tid}/syscall", encoding="ascii", errors="replace") as f:
            first = f.read().split(maxsplit=1)
    except OSError:
        return None
    if not first:
        return None
    try:
        return int(first[0])
    except ValueError:
        return first[0]


def in_call_checker(arch: Arch, procfs: str = PROCFS_PATH) -> InCall:
    """Whether a thread is still inside a module syscall, for Correlator.sweep."""

    def in_call(tid: int, syscall: str, compat: bool) -> bool | None:
        nr = syscall_nr(tid, procfs)
        if isinstance(nr, str):
            return None  # running: it may be on its way in or out
        return nr == arch.syscall_nr(syscall, compat)

    return in_call


def caller(tid: int, fd: int | None, procfs: str = PROCFS_PATH) -> Caller:
    status = read_status(tid, procfs)
    pid = int(status["Tgid"]) if "Tgid" in status else None
    # Uid: real, effective, saved, filesystem.
    uid = int(status["Uid"].split()[0]) if "Uid" in status else None
    path = fd_path(pid if pid is not None else tid, fd, procfs) if fd is not None else None
    return Caller(pid, uid, path)


class ProcEnricher:
    """Live enrichment from /proc. `record` (if set) receives each result so that a
    saved trace can replay it."""

    def __init__(
        self,
        procfs: str = PROCFS_PATH,
        record: Callable[[int, int, Caller], None] | None = None,
    ) -> None:
        self.procfs = procfs
        self.record = record

    def caller(self, tid: int, ts_us: int, fd: int | None) -> Caller:
        facts = caller(tid, fd, self.procfs)
        if self.record is not None:
            self.record(tid, ts_us, facts)
        return facts
