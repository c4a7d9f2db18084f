"""Join the events of one module operation into one record.

Events of one operation share the caller's thread id: the syscall entry opens an
operation, the kernel-side events (find_module_all, parse_args, module_load,
do_init_module, module_free) fill it in, and the syscall's return closes it and
yields the record.

The kernel-side events come from an instance of their own, which a flood of failing
calls cannot overrun (probes.RARE_KINDS). The first of them on a thread with no
operation opens one whose entry was lost, reported if the other instance lost events
by the time it is let go (else its events were the kernel's own): the call
is known from the event (module_file: finit_module, load_module: init_module,
find_module: delete_module), and so are its outcome (do_init_module's return is the
load's, module_free means the unload worked) and most of its fields.
"""

from __future__ import annotations

import datetime as dt
import errno
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from modwatch import filepath
from modwatch.decode import LOAD_FLAGS, UNLOAD_FLAGS, errno_name, flag_names
from modwatch.merge import ALL
from modwatch.modfile import FILE_KEYS, FileFacts
from modwatch.parser import Event, Lost
from modwatch.pathsearch import Target

SCHEMA_VERSION = 1
SYSCALLS = ("finit_module", "init_module", "delete_module")
# The caller's facts in a record, besides pid and uid.
CALLER_KEYS = ("ppid", "euid", "loginuid", "exe", "cmdline", "cgroup", "container", "ancestry")
RECORD_KEYS = (
    "v",
    "type",
    "time",
    "syscall",
    "module",
    "path",
    "path_source",
    *FILE_KEYS,
    "params",
    "flags",
    "flags_raw",
    "ret",
    "errno",
    "ok",
    "stage",
    "incomplete",
    "init_ret",
    "taints",
    "pid",
    "tid",
    "uid",
    "comm",
    *CALLER_KEYS,
    "proc_gone",
    "reasons",
    "escaped",
)
# Open operations whose return never came (a missed kretprobe, lost events) are
# emitted as incomplete once this many are held, oldest first.
MAX_OPEN = 4096

# Why a record is incomplete (its `incomplete` key; null when it is not):
ENTRY_MISSED = "entry_missed"  # the return came without its entry (lost, or before start)
RETURN_MISSED = "return_missed"  # the thread left the call, but its return never came
EVICTED = "evicted"  # more than MAX_OPEN calls open at once: the oldest is let go
IN_FLIGHT = "in_flight"  # the capture (or the saved trace) ended during the call
# A load that got past parse_args without its parameters event: a parameter string too
# long for one event of the ring buffer (about 4,000 bytes on a 4 KiB sub-buffer).
PARAMS_LOST = "params_lost"
# Parameters of PARAMS_MAX bytes: as many as a probe fetches, so maybe cut.
PARAMS_TRUNCATED = "params_truncated"
PARAMS_MAX = 4095  # MAX_STRING_SIZE (PATH_MAX) less the NUL
# kernel_read_file_id: security_kernel_read_file reads a module file (6.1 and 6.12).
READING_MODULE = 2
# The events that open an operation whose syscall entry was lost, and its syscall.
_OPENED_BY = {
    "module_file": "finit_module",
    "load_module": "init_module",
    "find_module": "delete_module",
}

Record = dict[str, Any]


# Whether thread `tid` is (still) inside `syscall` (32-bit entry point when `compat`);
# None when that cannot be told (the thread is running on another CPU).
InCall = Callable[[int, str, bool], bool | None]


class Caller(NamedTuple):
    """What /proc tells about the caller of an operation, read while it is in flight."""

    pid: int | None
    uid: int | None
    path: str | None  # the module file, from the caller's fd (finit_module)
    path_ino: int | None = None  # its inode number then
    ppid: int | None = None
    euid: int | None = None
    loginuid: int | None = None  # None also when unset (4294967295)
    exe: str | None = None
    cmdline: list[str] | None = None
    cgroup: str | None = None  # the unified (v2) hierarchy's path
    container: str | None = None  # a container id the cgroup path names
    ancestry: list[dict[str, Any]] | None = None  # {"pid", "name"} from parent to pid 1
    gone: bool | None = None  # the process had exited; None: /proc was not asked
    reasons: dict[str, str] | None = None  # why a field is None, where it could be known


NO_CALLER = Caller(None, None, None)
GONE = "the process had exited when /proc was read"


# The module file's facts, being read (or read already).
FileJob = Future[FileFacts]


class FileRequest(NamedTuple):
    """A finit_module call's file to read: the call (tid, ts_us), its caller's pid and
    fd, the path known so far, the load's wall time, and the inode number the kernel
    read (where known), to recognise that file by."""

    tid: int
    ts_us: int
    pid: int | None
    fd: int | None  # None: the entry was lost, the file is read by its path
    path: str | None
    wall_ns: int
    ino: int | None
    # The kernel's names did not reach the top, nor did /proc: what to find it by.
    search: Target | None = None


class Enricher(Protocol):
    def caller(self, tid: int, ts_us: int, fd: int | None) -> Caller: ...

    def module_file(self, request: FileRequest) -> FileJob | None:
        """Start reading the file a finit_module call loads, once it has passed the
        permission check (so no unprivileged caller can make modwatch read files)."""
        ...


class NoEnrichment:
    def caller(self, tid: int, ts_us: int, fd: int | None) -> Caller:
        return NO_CALLER

    def module_file(self, request: FileRequest) -> FileJob | None:
        return None


class Pending(NamedTuple):
    """A record's module-file facts still being read: the capture waits for them (a
    bounded time) before the record goes out, then calls `apply_file_facts`."""

    tid: int
    ts_us: int
    future: Future[FileFacts]


def apply_file_facts(record: Record, facts: FileFacts) -> None:
    record.update((key, getattr(facts, key)) for key in FILE_KEYS)
    if facts.path is not None:  # found on the file system: the kernel's names were cut
        record["path"], record["path_source"] = facts.path, filepath.SEARCH
    reasons = {**(record["reasons"] or {}), **(facts.reasons or {})}
    record["reasons"] = {k: v for k, v in reasons.items() if record.get(k) is None} or None


class TraceClock:
    """Maps the instance's trace clock (microseconds) to wall time."""

    def __init__(self, wall_minus_trace_us: int) -> None:
        self.offset_us = wall_minus_trace_us

    def iso(self, ts_us: int) -> str:
        when = dt.datetime.fromtimestamp((ts_us + self.offset_us) / 1e6, tz=dt.UTC)
        return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Operation:
    syscall: str
    tid: int
    ts_us: int
    compat: bool = False
    # Found outside its syscall by a sweep: when, by the trace clock (None: not yet).
    left_at_us: int | None = None
    comm: str | None = None
    flags_raw: int | None = None
    caller: Caller = NO_CALLER
    module: str | None = None
    params: str | None = None
    passed_permission: bool = False
    init_ran: bool = False
    init_ret: int | None = None
    taints: list[str] | None = None
    file_seen: bool = False
    params_seen: bool = False
    past_params: bool = False  # module_load or do_init_module: parse_args has run
    kernel_uid: int | None = None
    kernel_euid: int | None = None
    kernel_path: filepath.KernelPath | None = None
    fd: int | None = None  # finit_module's
    file_job: FileJob | None = None
    entry_missed: bool = False  # opened by a kernel-side event: the entry was lost
    kernel_events: int = 0  # events after the entry (for unmatched, if let go unreported)
    load_seen: bool = False  # load_module came
    freed: bool = False  # module_free came


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _task(task: str) -> str | None:
    return None if task == "<...>" else task


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _stage(op: _Operation, ret: int) -> str | None:
    if ret == 0:
        return None
    if op.init_ran:
        return "init"
    unload = op.syscall == "delete_module"
    if not op.passed_permission and ret == -errno.EPERM:
        return "permission"
    return "unload" if unload else "load"


def _begins_another(op: _Operation, ev: Event) -> bool:
    """Whether a kernel-side event on the thread of an open operation can only belong to
    a later call (both the operation's return and the later call's entry were lost):
    a second module file or load_module, either of them in an unload, or a lookup by
    name once a load is past its own (or an unload has had its own)."""
    unload = op.syscall == "delete_module"
    if ev.kind == "module_file":
        return ev.fields.get("id") == READING_MODULE and (op.file_seen or unload)
    if ev.kind == "load_module":
        return op.load_seen or unload
    if ev.kind == "find_module":
        if unload:
            return op.module is not None
        return op.past_params or op.params_seen or op.init_ret is not None
    return False


def _caller_facts(op: _Operation) -> Record:
    """The caller keys of a record: from /proc, the euid from the kernel where it told;
    `reasons` says why a fact /proc could have given is null."""
    caller = op.caller
    facts: Record = {key: getattr(caller, key) for key in CALLER_KEYS}
    if op.kernel_euid is not None:
        facts["euid"] = op.kernel_euid
    reasons = dict(caller.reasons or {})
    if caller.gone:
        reasons.update((key, GONE) for key, value in facts.items() if value is None)
    facts["proc_gone"] = caller.gone
    facts["reasons"] = {k: v for k, v in reasons.items() if facts.get(k) is None} or None
    return facts


class Correlator:
    """Feed events in trace order; get records back as operations complete."""

    def __init__(
        self, clock: TraceClock, enricher: Enricher | None = None, params_probe: bool = True
    ) -> None:
        self.clock = clock
        self.enricher = enricher or NoEnrichment()
        # Whether the probe set has the parameters event (module_params), so that a
        # load past parse_args without one is known to have lost it.
        self.params_probe = params_probe
        self.open: OrderedDict[int, _Operation] = OrderedDict()
        self.last_ts_us: int | None = None
        self.unmatched = 0  # kernel-side events outside any operation (e.g. boot-time)
        self.lost_seen = False  # events were lost: an operation's entry may be among them

    def event(self, ev: Event) -> list[Record]:
        self.last_ts_us = ev.ts_us
        kind = ev.kind
        if kind in SYSCALLS:
            return self._enter(ev)
        if kind.endswith("_ret") and kind[: -len("_ret")] in SYSCALLS:
            return self._return(ev)
        records: list[Record] = []
        op = self.open.get(ev.tid)
        if op is not None and _begins_another(op, ev):
            # The thread's call ended, its return lost, and another began, its entry lost.
            del self.open[ev.tid]
            records += self._let_go(op, RETURN_MISSED)
            op = None
        if op is None:
            op = self._open_late(ev, records)
        if op is None:
            self.unmatched += 1
            return records
        op.kernel_events += 1
        f = ev.fields
        if kind == "load_module":
            op.passed_permission = op.load_seen = True
            if op.flags_raw is None:
                op.flags_raw = _int(f.get("flags"))
        elif kind == "find_module":
            op.passed_permission = True
            op.module = op.module or _str(f["name"])
        elif kind == "module_params":
            op.passed_permission = op.params_seen = True
            op.params = _str(f["params"])
        elif kind == "module_load":
            op.passed_permission = op.past_params = True
            op.module = str(f["name"])
            op.taints = list(str(f["taints"]))
        elif kind == "do_init_module":
            op.passed_permission = op.init_ran = op.past_params = True
            op.module = _str(f.get("name")) or op.module
        elif kind == "do_init_module_ret":
            op.init_ret = _int(f["ret"])
        elif kind == "caller_cred":
            # The permission check's credentials; the module's init may check others.
            if op.kernel_uid is None and not op.init_ran:
                op.kernel_uid, op.kernel_euid = _int(f["uid"]), _int(f.get("euid"))
        elif kind == "module_file":
            op.passed_permission = True
            # The first file read of a finit_module is the module's own; the module's
            # init may read firmware later, on the same thread.
            if op.syscall == "finit_module" and not op.file_seen and not op.init_ran:
                op.file_seen = True
                op.kernel_path = filepath.rebuild(f)
        elif kind == "module_free":
            op.passed_permission = op.freed = True
            if op.module is None:
                op.module = str(f["name"])
        else:
            self.unmatched += 1
        if op.passed_permission and op.file_job is None and op.syscall == "finit_module":
            path, _ = filepath.choose(op.kernel_path, op.caller.path, op.caller.path_ino)
            if op.fd is not None or path is not None:
                wall_ns = (op.ts_us + self.clock.offset_us) * 1000
                kpath = op.kernel_path
                ino = kpath.ino if kpath is not None else None
                # /proc did not complete a path the kernel cut: find its top by searching.
                search = kpath.target() if kpath is not None and path == kpath.text() else None
                request = FileRequest(
                    op.tid, op.ts_us, op.caller.pid, op.fd, path, wall_ns, ino, search
                )
                op.file_job = self.enricher.module_file(request)
        return records

    def _open_late(self, ev: Event, records: list[Record]) -> _Operation | None:
        """An operation opened by a kernel-side event, its entry lost; None for an event
        that opens none (a firmware read). It becomes a record only if events were lost
        by the time it is let go (see `_let_go`): the loss may be read after it."""
        syscall = _OPENED_BY.get(ev.kind)
        if syscall is None or (ev.kind == "module_file" and ev.fields.get("id") != READING_MODULE):
            return None
        op = _Operation(
            syscall=syscall,
            tid=ev.tid,
            ts_us=ev.ts_us,
            comm=_task(ev.task),
            caller=self.enricher.caller(ev.tid, ev.ts_us, None),
            entry_missed=True,
        )
        if ev.tgid is not None and op.caller.pid is None:
            op.caller = op.caller._replace(pid=ev.tgid)
        self._add(op, records)
        return op

    def lost(self, lost: Lost) -> Record:
        self.lost_seen = True
        return {
            "v": SCHEMA_VERSION,
            "type": "lost",
            "time": None if self.last_ts_us is None else self.clock.iso(self.last_ts_us),
            "cpu": lost.cpu,
            "count": lost.events,
        }

    def sweep(
        self,
        in_call: InCall | None,
        read_through_us: int = ALL,
        clock_us: Callable[[], int] = lambda: 0,
    ) -> list[Record]:
        """Let go of operations whose return was missed (a kretprobe out of instances,
        events lost). An operation found outside its syscall (by `in_call`; None: do not
        look now) at a time by the trace clock (`clock_us`, read after looking) will never
        see its return once everything the kernel wrote until then has been read
        (`read_through_us`): the kernel writes the return before the thread leaves the
        call. Those come out as incomplete records; the rest are looked at again. With
        the defaults, one sweep marks and the next lets go."""
        records = []
        left = []
        for tid, op in list(self.open.items()):
            if op.left_at_us is not None:
                if read_through_us >= op.left_at_us:
                    del self.open[tid]
                    records += self._let_go(op, RETURN_MISSED)
            elif in_call is not None and in_call(tid, op.syscall, op.compat) is False:
                left.append(op)
        if left:
            now_us = clock_us()
            for op in left:
                op.left_at_us = now_us
        return records

    def leaving(self) -> bool:
        """Whether an operation was found outside its syscall and waits to be let go."""
        return any(op.left_at_us is not None for op in self.open.values())

    def finish(self) -> list[Record]:
        """Operations still open at the end: records with a null `ret`."""
        records = []
        for op in self.open.values():
            incomplete = IN_FLIGHT if op.left_at_us is None else RETURN_MISSED
            records += self._let_go(op, incomplete)
        self.open.clear()
        return records

    def _let_go(self, op: _Operation, incomplete: str) -> list[Record]:
        """The record of an operation whose return never came. One opened by kernel-side
        events is a call whose entry was lost only if events were lost: else they were
        the kernel's own doing (a lookup by module name, say), counted as unmatched."""
        if op.entry_missed and not self.lost_seen:
            self.unmatched += op.kernel_events
            return []
        return [self._record(op, None, incomplete)]

    def _enter(self, ev: Event) -> list[Record]:
        records = []
        stale = self.open.pop(ev.tid, None)
        if stale is not None:  # its return was missed: the thread has moved on
            records += self._let_go(stale, RETURN_MISSED)
        op = _Operation(
            syscall=ev.kind,
            tid=ev.tid,
            ts_us=ev.ts_us,
            compat=ev.compat,
            # Without kprobes (syscall tracepoints) only the line prefix names the task.
            comm=_str(ev.fields["comm"]) if "comm" in ev.fields else _task(ev.task),
            flags_raw=_int(ev.fields.get("flags")),
            fd=_int(ev.fields.get("fd")) if ev.kind == "finit_module" else None,
            caller=self.enricher.caller(ev.tid, ev.ts_us, _int(ev.fields.get("fd"))),
        )
        if ev.tgid is not None and op.caller.pid is None:
            op.caller = op.caller._replace(pid=ev.tgid)
        self._add(op, records)
        return records

    def _add(self, op: _Operation, records: list[Record]) -> None:
        self.open[op.tid] = op
        while len(self.open) > MAX_OPEN:
            _, oldest = self.open.popitem(last=False)
            records += self._let_go(oldest, EVICTED)

    def _return(self, ev: Event) -> list[Record]:
        syscall = ev.kind[: -len("_ret")]
        records = []
        op = self.open.pop(ev.tid, None)
        if op is not None and op.syscall != syscall:
            records += self._let_go(op, RETURN_MISSED)  # that call's return was missed
            op = None
        incomplete = None
        if op is None:  # the entry was lost: a record of what the return says
            op = _Operation(syscall=syscall, tid=ev.tid, ts_us=ev.ts_us, compat=ev.compat)
            incomplete = ENTRY_MISSED
        records.append(self._record(op, _int(ev.fields["ret"]), incomplete))
        return records

    def _record(self, op: _Operation, ret: int | None, incomplete: str | None = None) -> Record:
        if op.entry_missed:
            incomplete = ENTRY_MISSED
            if ret is None and op.syscall == "delete_module" and op.freed:
                ret = 0
            elif ret is None and op.init_ran:
                ret = op.init_ret  # load_module returns do_init_module's return
        if incomplete is None and op.params is not None:
            params_bytes = op.params.encode("utf-8", "surrogateescape")
            incomplete = PARAMS_TRUNCATED if len(params_bytes) >= PARAMS_MAX else None
        elif incomplete is None and self.params_probe and op.past_params and not op.params_seen:
            incomplete = PARAMS_LOST
        table = UNLOAD_FLAGS if op.syscall == "delete_module" else LOAD_FLAGS
        path, path_source = filepath.choose(op.kernel_path, op.caller.path, op.caller.path_ino)
        record = {
            "v": SCHEMA_VERSION,
            "type": "unload" if op.syscall == "delete_module" else "load",
            "time": self.clock.iso(op.ts_us),
            "syscall": op.syscall,
            "module": op.module,
            "path": path,
            "path_source": path_source,
            **dict.fromkeys(FILE_KEYS),
            "params": op.params,
            "flags": None if op.flags_raw is None else flag_names(op.flags_raw, table),
            "flags_raw": op.flags_raw,
            "ret": ret,
            "errno": errno_name(ret),
            "ok": None if ret is None else ret == 0,
            "stage": None if ret is None else _stage(op, ret),
            "incomplete": incomplete,
            "init_ret": op.init_ret,
            "taints": op.taints,
            "pid": op.caller.pid,
            "tid": op.tid,
            "uid": op.kernel_uid if op.kernel_uid is not None else op.caller.uid,
            "comm": op.comm,
            **_caller_facts(op),
            "escaped": None,  # the writer lists strings it had to escape (not UTF-8)
        }
        if op.file_job is not None:
            record["_pending"] = Pending(op.tid, op.ts_us, op.file_job)
        return record
