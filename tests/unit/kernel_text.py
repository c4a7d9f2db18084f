"""trace_pipe text rendered the way the kernel prints it, for the parser and capture tests.

The shape is the one of tests/unit/fixtures/load-unload-6.1.trace (Debian 6.1):
`%16s-%-7d [%03d] FLAGS %5lu.%06lu: EVENT: BODY`. The kernel pads the task name to 16
*bytes*, prints strings raw between quotes (`(fault)` unquoted when unreadable), numbers
as `%d`/`%u`, hex types as `0x%x`. Text is built as bytes and decoded the way capture
decodes what it reads (UTF-8, surrogateescape).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modwatch import probes
from modwatch.probes import ProbeSet, ProbeSpec

FIXTURES = Path(__file__).parent / "fixtures"
TRACE_FIXTURE = FIXTURES / "load-unload-6.1.trace"
JSONL_FIXTURE = FIXTURES / "load-unload-6.1.jsonl"

# The group of the fixture's session, so that rendered text and the fixture agree.
GROUP = "modwatch_242_d864c37967"
TOKEN = "d864c37967"
TASK_COMM_LEN = 16  # the kernel's comm buffer, NUL included


# Struct offsets as the 6.12 guest's BTF gives them (6.1's file.f_path lies elsewhere).
BTF_OFFSETS = {
    "file.f_path.dentry": 72,
    "file.f_path.mnt": 64,
    "dentry.d_parent": 24,
    "dentry.d_name.name": 40,
    "dentry.d_name.len": 36,
    "dentry.d_hash.pprev": 16,
    "vfsmount.mnt_root": 0,
    "mount.mnt": 32,
    "mount.mnt_parent": 16,
    "mount.mnt_mountpoint": 24,
    "module.name": 24,
    "cred.uid": 8,
    "cred.euid": 24,
}


# The BTF offsets the fixture's session used (it read no struct file or cred offsets).
FIXTURE_OFFSETS = {"module.name": 24}


def probe_set(
    arch: str = "x86_64", group: str = GROUP, offsets: Mapping[str, int] = FIXTURE_OFFSETS
) -> ProbeSet:
    """The probe set of a kernel with every symbol and these BTF offsets ({}: no BTF)."""
    return probes.build_probe_set(
        group,
        probes.ARCHES[arch],
        lambda s: "available_filter_functions",
        lambda sys, ev: True,
        offsets.get,
    )


def event_name(kind: str) -> str:
    """`finit_module` -> `mwd864c37967_finit_module`; tracepoints keep their own name."""
    return kind if kind in ("module_load", "module_free") else f"mw{TOKEN}_{kind}"


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def prefix(
    task: str,
    tid: int,
    ts_us: int,
    *,
    cpu: int = 0,
    tgid: int | None = None,
    record_tgid: bool = False,
    flags: str | None = ".....",
) -> bytes:
    """Everything before the event name: `trace_print_context()` of kernel/trace."""
    out = b" " * max(0, 16 - len(_raw(task))) + _raw(task)
    out += b"-" + str(tid).encode().ljust(7) + b" "
    if record_tgid:
        out += b"(-------) " if tgid is None else b"(%7d) " % tgid
    out += b"[%03d] " % cpu
    if flags is not None:
        out += flags.encode() + b" "
    sec, usec = divmod(ts_us, 1_000_000)
    return out + b"%5d.%06d: " % (sec, usec)


def _value(type_: str, value: object) -> bytes:
    if type_ in ("string", "ustring"):
        return b"(fault)" if value is None else b'"' + _raw(str(value)) + b'"'
    assert isinstance(value, int)
    if type_[0] == "x":
        return b"0x%x" % value
    return b"%d" % value


def probe_body(spec: ProbeSpec, values: Mapping[str, object]) -> bytes:
    """`(SYM+0x0/0x20) a=1 b="x"`, or `(caller+0x5d/0xb0 <- SYM) ret=-22` for a return."""
    if spec.is_return:
        loc = b"(do_syscall_64+0x5d/0xb0 <- " + spec.symbol.encode() + b")"
    else:
        loc = b"(" + spec.symbol.encode() + b"+0x0/0x20)"
    args = dict(values)
    if "comm" in args:
        args.setdefault("comm2", args["comm"])
    parts = [loc] + [a.name.encode() + b"=" + _value(a.type, args[a.name]) for a in spec.args]
    return b" ".join(parts)


def line(
    kind: str,
    values: Mapping[str, object] | str,
    *,
    task: str,
    tid: int,
    ts_us: int,
    pset: ProbeSet | None = None,
    **context: Any,
) -> str:
    """One event as trace_pipe prints it, with its final newline. `kind` is an event of the
    probe set without its token (`finit_module`, `finit_module_ret32`, `module_load`);
    `values` is the fetch-args by name, or the body text of a tracepoint."""
    name = event_name(kind)
    head = prefix(task, tid, ts_us, **context)
    if isinstance(values, str):
        body = _raw(values)
    else:
        spec = (pset or probe_set()).by_event()[name]
        assert isinstance(spec, ProbeSpec)
        body = probe_body(spec, values)
    return (head + name.encode() + b": " + body + b"\n").decode("utf-8", "surrogateescape")


def fits_comm(comm: str) -> bool:
    """Whether the kernel could hold this task name: at most 15 bytes, no NUL."""
    return "\0" not in comm and len(_raw(comm)) < TASK_COMM_LEN
