"""Facts about a caller from /proc, read while its module call is in flight.

Races are expected: the caller may have closed the fd or exited by the time its
event is read. Whatever vanished is None, never an exception.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from modwatch.correlate import Caller, FileRequest, InCall
from modwatch.modfile import FileFacts, FileReader
from modwatch.probes import Arch

PROCFS_PATH = "/proc"


def read_bytes(path: str) -> bytes | OSError:
    """A whole /proc file. os.open and os.read: a buffered file object costs more than
    the read itself, for every caller of a flood of module calls."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        return err
    try:
        chunks = []
        while chunk := os.read(fd, 8192):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as err:
        return err
    finally:
        os.close(fd)


STATUS_KEYS = ("Name", "Tgid", "PPid", "Uid")


def read_status(tid: int, procfs: str = PROCFS_PATH) -> dict[str, str]:
    """The fields of `/proc/TID/status` that modwatch uses (STATUS_KEYS); empty when
    the thread is gone. /proc/TID exists for every thread id, not only for process ids.
    Each field is found, not the whole file parsed: it has some 60 lines."""
    data = read_bytes(f"{procfs}/{tid}/status")
    if isinstance(data, OSError):
        return {}
    data = b"\n" + data
    status = {}
    for key in STATUS_KEYS:
        label = b"\n" + key.encode() + b":"
        at = data.find(label)
        if at < 0:
            continue
        start = at + len(label)
        end = data.find(b"\n", start)
        status[key] = data[start : end if end >= 0 else None].strip().decode("utf-8", "replace")
    return status


def read_stat(pid: int, procfs: str = PROCFS_PATH) -> tuple[str, int] | None:
    """Name and parent pid from `/proc/PID/stat` (cheaper than status); None when gone.
    The name is in parentheses and may itself hold any of ") (": the last ")" ends it."""
    data = read_bytes(f"{procfs}/{pid}/stat")
    if isinstance(data, OSError):
        return None
    try:
        left, right = data.index(b"("), data.rindex(b")")
        # After the name: state, ppid, ...
        ppid = int(data[right + 2 :].split(maxsplit=2)[1])
    except (ValueError, IndexError):
        return None
    return data[left + 1 : right].decode("utf-8", "replace"), ppid


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


LOGINUID_UNSET = 4294967295  # (uid_t)-1: no login session (a daemon, early boot)
MAX_ANCESTRY = 64  # a bound against a pid cycle read across races
# A container id (64 hex digits) in a cgroup path segment: docker-ID.scope, /docker/ID,
# cri-containerd-ID.scope, crio-ID.scope, libpod-ID.scope, ...
_CONTAINER = re.compile(r"(?:^|[-/])([0-9a-f]{64})(?:\.scope)?$")


def _why(err: OSError) -> str:
    return f"{err.strerror or err}"


def container_id(cgroup: str) -> str | None:
    """The container id a cgroup path names, if any (its last such segment)."""
    for segment in reversed(cgroup.split("/")):
        m = _CONTAINER.search(segment)
        if m:
            return m[1]
    return None


def ancestry(ppid: int | None, procfs: str = PROCFS_PATH) -> list[dict[str, Any]]:
    """pid and name of each ancestor, from the parent up to pid 1 (or as far as /proc
    still knows them)."""
    chain: list[dict[str, Any]] = []
    pid = ppid
    while pid and len(chain) < MAX_ANCESTRY and all(a["pid"] != pid for a in chain):
        stat = read_stat(pid, procfs)
        if stat is None:
            break
        chain.append({"pid": pid, "name": stat[0]})
        pid = stat[1]
    return chain


ANCESTRY_TTL = 1.0  # seconds an ancestry read is reused for other calls with that parent
ANCESTRY_CACHE_SIZE = 1024


class AncestryCache:
    """Ancestries by parent pid, each reused for ANCESTRY_TTL seconds: in a flood of
    module calls from one process (any user can make one), its chain is read once a
    second, not once a call. The chain is the parent's and its ancestors', the same for
    every child of that parent; within the TTL a record may miss an ancestor's exit or
    exec."""

    def __init__(
        self,
        procfs: str = PROCFS_PATH,
        ttl: float = ANCESTRY_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.procfs, self.ttl, self.clock = procfs, ttl, clock
        self._chains: dict[int, tuple[float, list[dict[str, Any]]]] = {}

    def __call__(self, ppid: int | None) -> list[dict[str, Any]]:
        if not ppid:
            return []
        now = self.clock()
        hit = self._chains.get(ppid)
        if hit is not None and now - hit[0] < self.ttl:
            return list(hit[1])
        if len(self._chains) >= ANCESTRY_CACHE_SIZE:
            self._chains.clear()
        chain = ancestry(ppid, self.procfs)
        self._chains[ppid] = (now, chain)
        return list(chain)


def fd_ino(pid: int, fd: int, procfs: str = PROCFS_PATH) -> int | None:
    """The inode number of the file behind a process's fd."""
    try:
        return os.stat(f"{procfs}/{pid}/fd/{fd}").st_ino
    except OSError:
        return None


def caller(
    tid: int,
    fd: int | None,
    procfs: str = PROCFS_PATH,
    ancestors: Callable[[int | None], list[dict[str, Any]]] | None = None,
) -> Caller:
    """What /proc says of the thread's process now; `ancestors` (an AncestryCache) gives
    its ancestry, else it is read here."""
    status = read_status(tid, procfs)
    pid = int(status["Tgid"]) if "Tgid" in status else None
    owner = pid if pid is not None else tid
    path = fd_path(owner, fd, procfs) if fd is not None else None
    ino = fd_ino(owner, fd, procfs) if fd is not None and path is not None else None
    if not status:
        return Caller(None, None, path, path_ino=ino, gone=True)
    # Uid: real, effective, saved, filesystem.
    uids = status.get("Uid", "").split()
    ppid = int(status["PPid"]) if "PPid" in status else None
    base = f"{procfs}/{pid}"
    reasons: dict[str, str] = {}

    loginuid: int | None = None
    raw = read_bytes(f"{base}/loginuid")
    if isinstance(raw, OSError):
        reasons["loginuid"] = _why(raw)
    elif int(raw or LOGINUID_UNSET) == LOGINUID_UNSET:
        reasons["loginuid"] = "unset: not from a login session"
    else:
        loginuid = int(raw)

    exe: str | None = None
    try:
        exe = os.readlink(f"{base}/exe")
    except OSError as err:
        reasons["exe"] = _why(err)

    cmdline: list[str] | None = None
    raw = read_bytes(f"{base}/cmdline")
    if isinstance(raw, OSError):
        reasons["cmdline"] = _why(raw)
    else:
        cmdline = [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]] if raw else []

    cgroup: str | None = None
    raw = read_bytes(f"{base}/cgroup")
    if isinstance(raw, OSError):
        reasons["cgroup"] = _why(raw)
    else:
        unified = [line[3:] for line in raw.splitlines() if line.startswith(b"0::")]
        if unified:
            cgroup = os.fsdecode(unified[0])
        else:
            reasons["cgroup"] = "no unified (cgroup v2) hierarchy"

    return Caller(
        pid,
        int(uids[0]) if uids else None,
        path,
        path_ino=ino,
        ppid=ppid,
        euid=int(uids[1]) if len(uids) > 1 else None,
        loginuid=loginuid,
        exe=exe,
        cmdline=cmdline,
        cgroup=cgroup,
        container=container_id(cgroup) if cgroup else None,
        ancestry=ancestors(ppid) if ancestors is not None else ancestry(ppid, procfs),
        gone=False,
        reasons=reasons or None,
    )


class ProcEnricher:
    """Live enrichment from /proc. `record` (if set) receives each result so that a
    saved trace can replay it."""

    def __init__(
        self,
        procfs: str = PROCFS_PATH,
        record: Callable[[int, int, Caller], None] | None = None,
        files: FileReader | None = None,
        tgid_of: Callable[[int, float], int | None] | None = None,
    ) -> None:
        self.procfs = procfs
        self.record = record
        self.files = files or FileReader()
        self.ancestors = AncestryCache(procfs)
        # The kernel's thread-to-process map (tracefs.TaskGroups.tgid): a thread's process,
        # given when (time.monotonic) the thread was found gone.
        self.tgid_of = tgid_of

    def module_file(self, request: FileRequest) -> Future[FileFacts]:
        """The loader's file, opened again through /proc while its call is in flight (the
        very file the kernel read), and read in a worker; by its path if that fails, if
        the fd holds another file by then (not the inode the kernel read), or if the fd
        is unknown (the call's entry was lost); a path the kernel cut is looked for
        first (`request.search`)."""
        r = request
        own: int | None = None
        if r.fd is not None:
            try:
                own = os.open(
                    f"{self.procfs}/{r.pid or r.tid}/fd/{r.fd}", os.O_RDONLY | os.O_CLOEXEC
                )
            except OSError:
                own = None
        return self.files.start(own, r.path, r.wall_ns, r.ino, r.search)

    def caller(self, tid: int, ts_us: int, fd: int | None) -> Caller:
        asked_at = time.monotonic()
        facts = caller(tid, fd, self.procfs, self.ancestors)
        if facts.gone and facts.pid is None and self.tgid_of is not None:
            # Exited: switched out for the last time, when the kernel noted its process.
            facts = facts._replace(pid=self.tgid_of(tid, asked_at))
        if self.record is not None:
            self.record(tid, ts_us, facts)
        return facts
