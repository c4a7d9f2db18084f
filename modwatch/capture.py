"""A capture session: set up probes in modwatch's own two tracefs instances (the main
one, and the rare one for the events past the permission check), read both
trace_pipes in one timestamp order, yield records, and take everything down again.

Setup runs in ordered steps, each registering its undo *before* it acts, so that
an error or a signal at any point leaves nothing behind; teardown undoes every
step best effort, in reverse. Leftovers of a session that was SIGKILLed are
removed at the next start: groups and instances are named `modwatch_PID_TOKEN`
(`modwatch_PID_TOKEN_rare`), and only those whose PID no longer runs modwatch are
touched.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

from modwatch import btf, tracefs
from modwatch.correlate import (
    Correlator,
    Enricher,
    Pending,
    Record,
    TraceClock,
    apply_file_facts,
)
from modwatch.errors import ExitStatus, ModwatchError
from modwatch.merge import ALL, MAIN, RARE, Merge
from modwatch.modfile import FileFacts, FileReader
from modwatch.parser import Event, Item, Lost, Parser, tracepoint_note
from modwatch.probes import (
    FUNCTION_LISTS,
    GROUP_PREFIX,
    ProbeSet,
    ProbeSpec,
    SymbolLookup,
    build_probe_set,
    build_tracepoint_set,
    current_arch,
    new_group,
    rare_instance,
)
from modwatch.procfs import PROCFS_PATH, ProcEnricher, in_call_checker
from modwatch.tracefile import SavedTrace, TraceWriter

READ_SIZE = 1 << 16
# How long a record waits for its module file's facts before it goes out without them,
# and how often the reader looks while one waits.
FILE_WAIT = 2.0
OUTBOX_INTERVAL = 0.02
# How old an event must be (by the trace clock) before it is put in order with the other
# instance's: events are written with the time they began, and committed a moment later.
MERGE_MARGIN_US = 50_000
# While idle, how often a session checks that its instance and probes are still there
# (someone else may disable and remove them): a small read every few seconds. Also how
# often the threads of open calls are looked at (a sweep: has a return been missed?).
CHECK_INTERVAL = 5.0
# The instance's ring buffer, unless --buffer-kb says: this many KiB in all, shared out
# over the CPUs, or the kernel's default per CPU if that is larger. A burst of module
# calls is held until the reader catches up; a larger burst overruns it (counted).
BUFFER_BUDGET_KB = 32768
# Clocks for the instance, in order of preference, with the matching clock of ours.
_CLOCKS = (("mono", time.CLOCK_MONOTONIC), ("boot", time.CLOCK_BOOTTIME))


class Stop(Exception):
    """Raised by the signal handlers: stop capturing, tear down, exit normally."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Options:
    duration: float | None = None
    count: int | None = None
    pid: int | None = None
    failed_only: bool = False
    raw: bool = False
    save_trace: IO[str] | None = None
    command: list[str] | None = None
    no_kprobes: bool = False  # tracepoints only, as on a kernel without kprobe events
    hashing: bool = True  # read each loaded module file (hash, signature, .modinfo)
    buffer_kb: int | None = None  # the ring buffer per CPU; None: BUFFER_BUDGET_KB shared


@dataclass
class Stats:
    """What a session counted besides its records; reported at the end."""

    unparsed: int = 0
    unparsed_samples: list[str] = field(default_factory=list)
    lost: int = 0
    unmatched: int = 0
    missed: dict[str, int] = field(default_factory=dict)  # probe event -> hits the kernel missed
    command_status: int | None = None
    teardown_errors: list[str] = field(default_factory=list)
    buffer_kb: int | None = None  # the instance's ring buffer per CPU, as the kernel has it
    buffer_problem: str | None = None  # why the default size could not be had


def _buffer_kb(text: str) -> int:
    """buffer_size_kb: "1408", or "7 (expanded: 1408)" before the buffer is first used."""
    if "expanded:" in text:
        return int(text.split("expanded:", 1)[1].strip(" )\n"))
    return int(text.split()[0])


def _owner_alive(pid: int, procfs: str = PROCFS_PATH) -> bool:
    try:
        with open(f"{procfs}/{pid}/cmdline", "rb") as f:
            return b"modwatch" in f.read()
    except OSError:
        return False


def _session_pid(name: str) -> int | None:
    # modwatch_PID_TOKEN
    parts = name[len(GROUP_PREFIX) :].split("_")
    return int(parts[0]) if name.startswith(GROUP_PREFIX) and parts[0].isdigit() else None


def remove_leftovers(fs: tracefs.Tracefs) -> list[str]:
    """Remove instances and probe groups of dead modwatch sessions; returns their names."""
    removed = []
    for name in fs.instance_paths():
        pid = _session_pid(name)
        if pid is not None and not _owner_alive(pid):
            fs.remove_instance(name)
            removed.append(f"instance {name}")
    for group, removals in fs.groups(GROUP_PREFIX).items():
        pid = _session_pid(group)
        if pid is not None and not _owner_alive(pid):
            for removal in removals:
                fs.remove_probe(removal, group)
            removed.append(f"probe group {group}")
    return removed


def open_tracefs() -> tracefs.Tracefs:
    """The tracefs to use, after the checks a capture needs, each with its own status."""
    if os.geteuid() != 0:
        raise ModwatchError(
            "modwatch: capture needs root (tracefs and kprobe_events are root-only): "
            "run it with sudo, or use --dry-run / --replay FILE without root",
            ExitStatus.NOT_ROOT,
        )
    if tracefs.lockdown_mode() == "confidentiality":
        raise ModwatchError(
            f"modwatch: kernel lockdown is in confidentiality mode ({tracefs.LOCKDOWN_PATH}), "
            "which forbids kprobes and tracefs: boot with lockdown=integrity or none",
            ExitStatus.LOCKDOWN,
        )
    root = tracefs.find_mount()
    if root is None:
        try:
            tracefs.mount()
        except OSError as err:
            raise ModwatchError(
                f"modwatch: tracefs is not mounted and mounting it at "
                f"{tracefs.DEFAULT_MOUNTPOINT} failed ({err.strerror}): "
                f"mount -t tracefs nodev {tracefs.DEFAULT_MOUNTPOINT}",
                ExitStatus.NO_TRACEFS,
            ) from err
        root = tracefs.DEFAULT_MOUNTPOINT
    return tracefs.Tracefs(root)


def plan(
    fs: tracefs.Tracefs,
    group: str,
    kprobes: bool = True,
    lookup: SymbolLookup | None = None,
    checked: str = FUNCTION_LISTS,
) -> ProbeSet:
    """The probe set for the running kernel, chosen from what it offers: kprobes where
    the kernel has kprobe events (and `kprobes` is true), else its tracepoints alone.
    Symbols are looked up in the kernel's function lists unless `lookup` is given
    (`checked` says where that looks, for the error of a required symbol)."""
    if not kprobes or not fs.exists("kprobe_events"):
        return _with_print_formats(fs, build_tracepoint_set(group, fs.has_tracepoint))
    if lookup is None:
        lookup = _function_lists(fs)
    return _with_print_formats(fs, _kprobe_set(group, lookup, fs.has_tracepoint, checked))


def _function_lists(fs: tracefs.Tracefs) -> SymbolLookup:
    """Where a symbol is: available_filter_functions, else /proc/kallsyms (read only if
    a symbol is not in the first)."""
    functions = fs.available_functions()
    kallsyms: tracefs.Symbols | None = None

    def lookup(symbol: str) -> str | None:
        nonlocal kallsyms
        if symbol in functions:
            return "available_filter_functions"
        if kallsyms is None:
            kallsyms = tracefs.kallsyms_text_symbols()
        return "/proc/kallsyms" if symbol in kallsyms else None

    return lookup


def _with_print_formats(fs: tracefs.Tracefs, probe_set: ProbeSet) -> ProbeSet:
    """The module tracepoints with the print format the running kernel uses for them
    (the syscalls' tracepoints print through their own code, not their format)."""
    tracepoints = tuple(
        t
        if t.system == "syscalls"
        else dataclasses.replace(t, print_fmt=fs.print_fmt(t.system, t.event))
        for t in probe_set.tracepoints
    )
    notes = tuple(tracepoint_note(t) for t in tracepoints if t.system != "syscalls")
    return dataclasses.replace(
        probe_set, tracepoints=tracepoints, choices=(*probe_set.choices, *notes)
    )


def _kprobe_set(
    group: str,
    lookup: SymbolLookup,
    has_tracepoint: Callable[[str, str], bool],
    checked: str = FUNCTION_LISTS,
) -> ProbeSet:
    """build_probe_set with the running kernel's BTF offsets, noting where they came from."""
    offset, note = btf_offsets()
    probe_set = build_probe_set(group, current_arch(), lookup, has_tracepoint, offset, checked)
    return dataclasses.replace(probe_set, choices=(note, *probe_set.choices))


@functools.cache
def kernel_btf(path: str) -> btf.BTF | btf.BTFError:
    """The kernel's BTF, read once per process (it does not change while it runs)."""
    try:
        return btf.BTF.load(path)
    except btf.BTFError as err:
        return err


def btf_offsets() -> tuple[Callable[[str], int | None], str]:
    """Struct member offsets of the running kernel from its BTF (None for a member it
    lacks, or for every member without BTF), and a note saying where they came from."""
    types = kernel_btf(btf.VMLINUX)
    if isinstance(types, btf.BTFError):
        return (lambda member: None), f"BTF: none ({types}): no struct offsets"

    def offset(member: str) -> int | None:
        try:
            return types.offset(member)
        except btf.BTFError:
            return None

    return offset, f"BTF: {btf.VMLINUX}"


def plan_offline(group: str, kprobes: bool = True) -> tuple[ProbeSet, str | None]:
    """The probe set for --dry-run: checked against the running kernel when tracefs can
    be read, else the architecture's defaults and the reason they are unchecked."""
    try:
        fs = open_tracefs()
    except ModwatchError as err:
        if not kprobes:
            return build_tracepoint_set(group, lambda s, e: True), err.message.removeprefix(
                "modwatch: "
            )
        probe_set = _kprobe_set(group, lambda s: "unchecked", lambda s, e: True)
        return probe_set, err.message.removeprefix("modwatch: ")
    return plan(fs, group, kprobes), None


class _Signals:
    """SIGINT, SIGTERM and SIGHUP end a session. While it sets up, a signal raises Stop
    and setup unwinds. Once it reads, a signal only sets `stop` and wakes the reader's
    poll (through `wakeup_fd`), so that the reader ends in good order: it reads what the
    kernel still has and emits every call in flight as a record."""

    def __init__(self) -> None:
        self.stop: int | None = None
        self.deferred = False
        self.previous: dict[int, Any] = {}
        self.wakeup_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.stop = signum
        if not self.deferred:
            raise Stop(signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup)
        os.close(self.wakeup_fd)
        os.close(self._write_fd)


class Capture:
    """One capture from the kernel (or from a saved trace with `replay`)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.stats = Stats()
        self.instance: str | None = None
        self.probe_set: ProbeSet | None = None
        self.leftovers: list[str] = []
        self.on_armed: Callable[[Capture], None] | None = None
        self._outbox = collections.deque()
        self._armed = {}
        self._fds = []
        self._merge = Merge()
        self._read_through_us = -1  # trace clock time up to which every event was read

    # -- records from a saved trace ---------------------------------------------------

    def replay(self, path: str) -> Generator[Record, None, None]:
        saved = SavedTrace(path)
        self.probe_set = saved.probe_set
        yield from self._delivered(self._replayed(saved))

    def _replayed(self, saved: SavedTrace) -> Iterator[Record]:
        correlator = Correlator(
            TraceClock(saved.clock_offset_us), saved, _has_params_probe(saved.probe_set)
        )
        # The rare instance's text is small: all of it is read first, then merged in.
        merge = Merge()
        rare = Parser(saved.probe_set.by_event())
        for text in saved.rare_chunks:
            merge.add(RARE, rare.read(text))
        merge.add(RARE, rare.flush())
        parser = Parser(saved.probe_set.by_event())
        emitted = 0
        for chunk in [*saved.chunks(), None]:
            merge.add(MAIN, parser.feed(chunk) if chunk is not None else parser.flush())
            items = merge.release(ALL, (chunk is None, True))
            for record in self._records(items, correlator):
                yield record
                emitted += record["type"] != "lost"
                if self.options.count is not None and emitted >= self.options.count:
                    return
        yield from self._finish(correlator)

    # -- records out, in order, with their module files' facts ---------------------------

    def _delivered(self, source: Iterator[Record | None]) -> Iterator[Record]:
        """Records in the order they came. One whose module file is still being read
        waits for it, at most FILE_WAIT seconds, and the records after it wait in line.
        `None` from `source` says: nothing new, look again."""
        outbox = self._outbox
        for item in source:
            if item is not None:
                outbox.append((item, item.pop("_pending", None), time.monotonic() + FILE_WAIT))
            yield from self._release(final=False)
        yield from self._release(final=True)

    def _release(self, final: bool) -> Iterator[Record]:
        outbox = self._outbox
        while outbox:
            record, pending, deadline = outbox[0]
            if pending is not None:
                if final:
                    concurrent.futures.wait([pending.future], max(0, deadline - time.monotonic()))
                if not pending.future.done() and time.monotonic() < deadline:
                    return
                apply_file_facts(record, self._file_facts(pending))
            outbox.popleft()
            yield record

    def _file_facts(self, pending: Pending) -> FileFacts:
        future = pending.future
        if not future.done():
            future.cancel()
            return FileFacts(reasons={"sha256": f"still being read after {FILE_WAIT:g} s"})
        try:
            facts = future.result()
        except Exception as err:  # a file no reader foresaw: the record still goes out
            return FileFacts(reasons={"sha256": f"reading failed: {type(err).__name__}: {err}"})
        if self._saver is not None:
            self._saver.module_file(pending.tid, pending.ts_us, facts)
        return facts

    # -- records from the kernel ------------------------------------------------------

    def run(self) -> Generator[Record, None, None]:
        """Arm, read and yield records until the duration, count or command ends or a
        signal arrives; everything is torn down when the generator finishes or is closed."""
        signals = self._signals = _Signals()
        try:
            with contextlib.ExitStack() as undo:
                correlator = self._arm(undo)
                signals.deferred = True
                yield from self._delivered(self._read(correlator))
        except Stop:
            pass  # a signal came during setup: what was set up is torn down
        finally:
            signals.restore()

    def _arm(self, undo: contextlib.ExitStack) -> Correlator:
        fs = self._fs = open_tracefs()
        undo.callback(self._release_private_mount)
        # The file workers load OpenSSL while this thread waits on the kernel's setup.
        files = FileReader(hashing=self.options.hashing)
        undo.callback(files.close)
        files.prepare()
        self.leftovers = remove_leftovers(fs)
        group = new_group(os.getpid())
        # Teardown runs in reverse: the instances are removed before the probes, because
        # removing one disables its events and an enabled probe cannot be removed.
        probe_set = self.probe_set = self._add_probes(fs, group, undo)

        # Two instances: the rare events in one whose buffer no flood of failing calls
        # can overrun (probes.RARE_KINDS), everything else in the main one.
        self.instance, rare = group, rare_instance(group)
        clock_name, clock_id = _CLOCKS[0]
        task_groups = None
        for name in (group, rare):
            undo.callback(self._best_effort, fs.remove_instance, name)
            self._guard(fs.make_instance, name)
            base = os.path.join("instances", name)
            # The caller's pid as the kernel knew it, in a `(TGID)` column: the caller may
            # have exited before /proc can be asked. An option of this instance only.
            record_tgid = os.path.join(base, "options", "record-tgid")
            if fs.exists(record_tgid):
                with contextlib.suppress(OSError):  # else the pid comes from /proc only
                    fs.write(record_tgid, "1")
                    task_groups = task_groups or tracefs.TaskGroups(fs)
            if name == group:
                clock_name, clock_id = next(
                    (c for c in _CLOCKS if c[0] in fs.read(base, "trace_clock").split()),
                    _CLOCKS[0],
                )
            # A new clock empties the buffer page by page: before it is made larger.
            self._guard(fs.write, os.path.join(base, "trace_clock"), clock_name)
            if name == group:
                self._size_buffer(fs, base)
        undo.callback(self._remount_if_gone, fs)  # runs first: both removals need tracefs
        self._clock_id = clock_id
        clock = TraceClock(time.time_ns() // 1000 - time.clock_gettime_ns(clock_id) // 1000)

        # What each instance's set_event lists while everything is armed (`SYSTEM:EVENT`).
        armed: dict[str, frozenset[str]] = {}
        enables = []
        for name, specs in zip((group, rare), probe_set.split(), strict=True):
            base = os.path.join("instances", name, "events")
            events = [
                (group, e.event) if isinstance(e, ProbeSpec) else (e.system, e.event) for e in specs
            ]
            armed[name] = frozenset(f"{system}:{event}" for system, event in events)
            enables += [os.path.join(base, system, event, "enable") for system, event in events]
            for each in specs:
                if isinstance(each, ProbeSpec) and each.filter is not None:
                    filter_path = os.path.join(base, group, each.event, "filter")
                    self._guard(fs.write, filter_path, each.filter)
        self._armed = armed
        for enable in enables:
            self._guard(fs.write, enable, "1")

        for name in (group, rare):
            fd = os.open(fs.path("instances", name, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
            undo.callback(os.close, fd)
            self._fds.append(fd)
        self._parsers = (Parser(probe_set.by_event()), Parser(probe_set.by_event()))

        writer = None
        if self.options.save_trace is not None:
            writer = TraceWriter(self.options.save_trace, probe_set, clock.offset_us)
        self._saver = writer
        enricher: Enricher = ProcEnricher(
            record=writer.caller if writer else None,
            files=files,
            tgid_of=None if task_groups is None else task_groups.tgid,
        )
        return Correlator(clock, enricher, _has_params_probe(probe_set))

    def _add_probes(self, fs: tracefs.Tracefs, group: str, undo: contextlib.ExitStack) -> ProbeSet:
        """Plan the probe set and add its probes, the kernel checking each symbol as its
        probe is added (reading its function list instead took longer than all the rest
        of the setup under emulation). A symbol the kernel rejects is planned again
        without: an optional probe is left out, a required one is an error."""
        rejected: dict[str, str] = {}
        added: set[str] = set()
        while True:
            probe_set = plan(
                fs,
                group,
                not self.options.no_kprobes,
                lambda symbol: None if symbol in rejected else "kprobe_events",
                "kprobe_events: " + "; ".join(f"{s}: {why}" for s, why in rejected.items()),
            )
            for spec in probe_set.probes:
                definition = spec.definition()
                if definition in added:
                    continue
                undo.callback(self._best_effort, fs.remove_probe, spec.removal(), group)
                try:
                    fs.add_probe(definition)
                except tracefs.ProbeRejected as err:
                    if err.symbol() is None or err.reason is None:
                        raise
                    rejected[spec.symbol] = err.reason.reason
                    break
                added.add(definition)
            else:
                return probe_set

    def _size_buffer(self, fs: tracefs.Tracefs, base: str) -> None:
        """Give the instance its ring buffer: --buffer-kb per CPU (an error if the kernel
        refuses), else BUFFER_BUDGET_KB shared out (the kernel's default if refused)."""
        path = os.path.join(base, "buffer_size_kb")
        default = _buffer_kb(fs.read(path))
        wanted = self.options.buffer_kb
        size = wanted or max(default, BUFFER_BUDGET_KB // (os.cpu_count() or 1))
        self.stats.buffer_kb = default
        if size == default:
            return
        try:
            fs.write(path, str(size))
        except OSError as err:
            if wanted is not None:
                raise ModwatchError(
                    f"modwatch: the kernel refused a ring buffer of {wanted} KiB per CPU "
                    f"({err.strerror}): choose a smaller --buffer-kb",
                    ExitStatus.PROBE_REJECTED,
                ) from err
            self.stats.buffer_problem = f"{size} KiB per CPU refused: {err.strerror}"
            return
        self.stats.buffer_kb = _buffer_kb(fs.read(path))  # as the kernel rounded it

    def _remount_if_gone(self, fs: tracefs.Tracefs) -> None:
        """Teardown needs tracefs: if someone unmounted it, mount it again where only this
        session looks, so that its probes and instance are still removed."""
        if fs.exists("instances"):
            return
        import tempfile  # rarely needed: not loaded by every start

        point = tempfile.mkdtemp(prefix="modwatch-tracefs-")
        try:
            tracefs.mount(point)
        except OSError as err:
            os.rmdir(point)
            self.stats.teardown_errors.append(f"mounting tracefs again at {point}: {err.strerror}")
            return
        self._private_mount = fs.root = point

    def _release_private_mount(self) -> None:
        if self._private_mount is not None:
            self._best_effort(tracefs.unmount, self._private_mount)
            self._best_effort(os.rmdir, self._private_mount)

    def _check_still_armed(self) -> None:
        """Raise if someone else removed this session's instance or probes, or disabled
        its events: the kernel would say nothing, and the capture would see nothing.
        One read per instance while idle: its set_event lists its enabled events (a
        removed probe must have been disabled first)."""
        fs = self._fs
        assert fs is not None
        try:
            gone = any(
                not events.issubset(fs.read("instances", name, "set_event").split())
                for name, events in self._armed.items()
            )
        except OSError:
            gone = True
        if gone and not fs.exists("instances"):
            raise ModwatchError(
                f"modwatch: tracefs was unmounted from {fs.root} by someone else; nothing "
                "more can be captured: mount it again and start modwatch again",
                ExitStatus.TRACE_GONE,
            )
        if gone:
            raise ModwatchError(
                f"modwatch: tracefs instances {', '.join(self._armed)} or their probes were "
                "disabled or removed by someone else; nothing more can be captured: start "
                "modwatch again",
                ExitStatus.TRACE_GONE,
            )

    @staticmethod
    def _guard(action: Callable[..., object], *args: str) -> None:
        """Run one setup step; a refusal by tracefs becomes a ModwatchError."""
        try:
            action(*args)
        except OSError as err:
            raise ModwatchError(
                f"modwatch: setting up tracefs failed at {err.filename or args[0]}: {err.strerror}",
                ExitStatus.PROBE_REJECTED,
            ) from err

    def _read(self, correlator: Correlator) -> Iterator[Record | None]:
        opts = self.options
        assert self.probe_set is not None
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        poller.register(self._signals.wakeup_fd, select.POLLIN)
        child: subprocess.Popen[bytes] | None = None
        pidfd = -1
        if self.on_armed is not None:
            self.on_armed(self)
        if opts.command:
            try:
                child = subprocess.Popen(opts.command)
            except OSError as err:
                raise ModwatchError(
                    f"modwatch: cannot run {opts.command[0]}: {err.strerror}", ExitStatus.USAGE
                ) from err
            pidfd = os.pidfd_open(child.pid)
            poller.register(pidfd, select.POLLIN)
        deadline = None if opts.duration is None else time.monotonic() + opts.duration
        in_call = in_call_checker(current_arch())
        next_sweep = time.monotonic() + CHECK_INTERVAL
        emitted = 0
        try:
            while True:
                waiting = self._outbox or self._merge.held() or correlator.leaving()
                timeout = OUTBOX_INTERVAL if waiting else CHECK_INTERVAL
                if deadline is not None:
                    timeout = min(timeout, max(0, deadline - time.monotonic()))
                ready = poller.poll(timeout * 1000)
                if not ready and not waiting:
                    self._check_still_armed()
                # The sweep runs on what the drains before this one read: threads are
                # looked at every CHECK_INTERVAL; one found outside its call is let go
                # as soon as a drain has read past the time it was found there.
                look = time.monotonic() >= next_sweep
                swept = correlator.sweep(in_call if look else None, *self._sweep_clocks())
                if look:
                    next_sweep = time.monotonic() + CHECK_INTERVAL
                records = itertools.chain(self._drain(correlator), self._wanted_only(swept))
                for record in records:
                    yield record
                    if record["type"] != "lost":
                        emitted += 1
                        if opts.count is not None and emitted >= opts.count:
                            return
                if child is not None and any(r[0] == pidfd for r in ready):
                    self.stats.command_status = child.wait()
                    # Its events were written before it exited: read what is left.
                    yield from self._drain(correlator)
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if self._signals.stop is not None:
                    break
                yield None  # a record waiting for its module file may be ready
        finally:
            if pidfd >= 0:
                os.close(pidfd)
            if child is not None and child.returncode is None:
                # Stopped before COMMAND ended: it does not outlive the capture.
                child.terminate()
                try:
                    self.stats.command_status = child.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    self.stats.command_status = child.wait()
        # Calls whose threads have left them without a return event: marked, then let go
        # after a last read, so that a return on its way is not taken for a missed one.
        yield from self._wanted_only(correlator.sweep(in_call, *self._sweep_clocks()))
        yield from self._drain(correlator, final=True)
        yield from self._wanted_only(correlator.sweep(in_call, *self._sweep_clocks()))
        if self.probe_set.kprobes and self._fs is not None:
            try:
                self.stats.missed = self._fs.kprobe_misses(p.event for p in self.probe_set.probes)
            except OSError as err:
                self.stats.teardown_errors.append(f"reading kprobe_profile: {err.strerror}")
        yield from self._finish(correlator)

    def _sweep_clocks(self) -> tuple[int, Callable[[], int]]:
        """For Correlator.sweep: how far the drains have read, and the trace clock."""
        return self._read_through_us, lambda: time.clock_gettime_ns(self._clock_id) // 1000

    def _drain(self, correlator: Correlator, final: bool = False) -> Iterator[Record]:
        """Read what both trace_pipes have now, and yield the records of the events that
        can be put in order (see merge): those up to a watermark taken before reading,
        or every one with `final` (nothing more will be written)."""
        merge = self._merge
        now_us = time.clock_gettime_ns(self._clock_id) // 1000
        watermark = ALL if final else now_us - MERGE_MARGIN_US
        while (items := self._chunk(RARE)) is not None:
            merge.add(RARE, items)
        main_done = False
        while not main_done:
            items = self._chunk(MAIN)
            if items is None:
                main_done = True
            else:
                merge.add(MAIN, items)
                yield from self._records(merge.release(watermark, (False, True)), correlator)
                # Past the watermark: the rest waits for the next one (a flood may never
                # let the pipe run dry).
                if merge.last_ts(MAIN) > watermark:
                    break
        if final:  # a line cut by a read, never finished (the kernel always does): as is
            for stream in (MAIN, RARE):
                merge.add(stream, self._parsers[stream].flush())
        yield from self._records(merge.release(watermark, (main_done, True)), correlator)
        if main_done:  # both pipes ran dry: every event up to the watermark was read
            self._read_through_us = watermark
        if self._saver is not None:
            self._saver.flush()

    def _chunk(self, stream: int) -> list[Item] | None:
        """One read of a trace_pipe, parsed (see Parser.read); None when it has nothing
        now."""
        try:
            data = os.read(self._fds[stream], READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as err:
            name = self.instance if stream == MAIN else rare_instance(self.instance or "")
            raise ModwatchError(
                f"modwatch: reading trace_pipe of instance {name} failed "
                f"({err.strerror}): was it removed by someone else?",
                ExitStatus.TRACE_GONE,
            ) from err
        if not data:
            return None
        text = data.decode("utf-8", "surrogateescape")
        if self._saver is not None:
            self._saver.text(text, rare=stream == RARE)
        return self._parsers[stream].read(text)

    def _records(self, items: list[Item], correlator: Correlator) -> Iterator[Record]:
        opts = self.options
        for item in items:
            if isinstance(item, Event):
                if opts.raw:
                    records = [_raw_record(item, correlator.clock)]
                    correlator.last_ts_us = item.ts_us
                else:
                    records = correlator.event(item)
            elif isinstance(item, Lost):
                self.stats.lost += item.events or 0
                records = [correlator.lost(item)]
            else:
                self.stats.unparsed += 1
                if len(self.stats.unparsed_samples) < 3:
                    self.stats.unparsed_samples.append(item.text)
                continue
            for record in records:
                if self._wanted(record):
                    yield record

    def _finish(self, correlator: Correlator) -> Iterator[Record]:
        yield from self._wanted_only(correlator.finish())
        self.stats.unmatched = correlator.unmatched

    def _wanted_only(self, records: list[Record]) -> Iterator[Record]:
        return (record for record in records if self._wanted(record))

    def _wanted(self, record: Record) -> bool:
        opts = self.options
        if record["type"] == "lost":
            return True
        if opts.pid is not None and opts.pid not in (record.get("pid"), record.get("tid")):
            return False
        return not (opts.failed_only and record.get("ok") is not False and not opts.raw)

    def _best_effort(self, action: Callable[..., object], *args: object) -> None:
        """Teardown never stops halfway: a failed step is noted, and the rest still runs."""
        try:
            action(*args)
        except OSError as err:
            self.stats.teardown_errors.append(f"{action.__name__}{args}: {err.strerror}")

    _saver: TraceWriter | None = None
    _signals: _Signals
    _fs: tracefs.Tracefs | None = None
    # Each instance's events, as its set_event lists them.
    _armed: dict[str, frozenset[str]]
    _fds: list[int]  # the trace_pipes of the main and the rare instance
    _parsers: tuple[Parser, Parser]
    _merge: Merge
    _clock_id: int = time.CLOCK_MONOTONIC
    _private_mount: str | None = None  # tracefs mounted again for teardown
    # Records on their way out: (record, its module file being read, wait until).
    _outbox: collections.deque[tuple[Record, Pending | None, float]]


def _has_params_probe(probe_set: ProbeSet) -> bool:
    return any(p.kind == "module_params" for p in probe_set.probes)


def _raw_record(ev: Event, clock: TraceClock) -> Record:
    return {
        "v": 1,
        "type": "event",
        "event": ev.kind,
        "time": clock.iso(ev.ts_us),
        "cpu": ev.cpu,
        "tid": ev.tid,
        "compat": ev.compat,
        "args": ev.fields,
        "escaped": None,
    }
