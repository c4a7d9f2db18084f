"""`modwatch doctor`: can capture run here, and what will each record field come from?

Every check a capture makes before it arms, made all at once and reported rather than
stopping at the first: privileges, tracefs, kprobe events, lockdown, BTF, the
features tracefs offers, each symbol the probe set would use. Nothing is written to
tracefs; tracefs is mounted where capture would mount it, as capture would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from modwatch import btf, capture, tracefs
from modwatch.errors import ModwatchError
from modwatch.probes import ProbeSet, new_group

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"
WORKS, DEGRADED, IMPOSSIBLE = "works", "degraded", "impossible"

# tracefs README text that shows a feature (the kernel notes list which kernels have it).
FEATURES = (
    ("BTF-typed arguments", "->field"),
    ("%pd/%pD (dentry and file names)", "%pd"),
    ("ustring (user-space strings)", "ustring"),
    ("$arg<N> (function arguments by position)", "$arg<N>"),
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn (capture runs, something is missing), fail (capture cannot run), info
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)  # record field -> where it comes from

    @property
    def verdict(self) -> str:
        statuses = {c.status for c in self.checks}
        return IMPOSSIBLE if FAIL in statuses else DEGRADED if WARN in statuses else WORKS

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))


def examine() -> Report:
    """Every check, in the order a capture meets them."""
    report = Report()
    root = os.geteuid() == 0
    report.add(
        "privileges",
        OK if root else FAIL,
        "root" if root else f"uid {os.geteuid()}: capture needs root (tracefs is root-only)",
    )
    mode = tracefs.lockdown_mode()
    if mode == "confidentiality":
        report.add(
            "lockdown",
            FAIL,
            "confidentiality: the kernel forbids kprobes and tracefs (boot with "
            "lockdown=integrity or none)",
        )
    else:
        report.add("lockdown", OK, mode or f"no lockdown LSM ({tracefs.LOCKDOWN_PATH} missing)")
    fs = _tracefs(report, root)
    _btf(report)
    if fs is None or mode == "confidentiality":
        return report
    if fs.exists("kprobe_events"):
        report.add("kprobe events", OK, fs.path("kprobe_events"))
    else:
        report.add(
            "kprobe events",
            WARN,
            f"{fs.path('kprobe_events')} missing: kernel built without CONFIG_KPROBE_EVENTS; "
            "capture falls back to tracepoints",
        )
    try:
        readme = fs.read("README")
    except OSError as err:
        readme = ""
        report.add("tracefs features", WARN, f"cannot read README: {err.strerror}")
    for feature, marker in FEATURES:
        report.add(f"feature {feature}", INFO, "yes" if marker in readme else "no")
    try:
        probe_set = capture.plan(fs, new_group(os.getpid()))
    except ModwatchError as err:
        report.add("probes", FAIL, err.message.removeprefix("modwatch: "))
        return report
    for choice in probe_set.choices:
        name, _, detail = choice.partition(": ")
        if name == "BTF":
            continue  # checked above
        missing = "not found" in detail or "not in BTF" in detail or detail.startswith("none")
        report.add(name, WARN if missing else OK, detail)
    record_tgid = fs.exists("options", "record-tgid")
    report.fields = fields_from(probe_set, record_tgid)
    return report


def _tracefs(report: Report, root: bool) -> tracefs.Tracefs | None:
    where = tracefs.find_mount()
    if where is not None:
        report.add("tracefs", OK, f"mounted at {where}")
        return tracefs.Tracefs(where)
    if not root:
        report.add("tracefs", FAIL, "not mounted, and only root can mount it")
        return None
    try:
        tracefs.mount()
    except OSError as err:
        report.add(
            "tracefs",
            FAIL,
            f"not mounted, and mounting it at {tracefs.DEFAULT_MOUNTPOINT} failed ({err.strerror})",
        )
        return None
    report.add("tracefs", OK, f"was not mounted: mounted it at {tracefs.DEFAULT_MOUNTPOINT}")
    return tracefs.Tracefs(tracefs.DEFAULT_MOUNTPOINT)


def _btf(report: Report) -> None:
    # The same read capture.plan uses below: once per process.
    types = capture.kernel_btf(btf.VMLINUX)
    if isinstance(types, btf.BTFError):
        report.add("BTF", WARN, f"{types}: module paths from /proc only")
        return
    report.add("BTF", OK, f"{btf.VMLINUX}: {len(types)} types")


def fields_from(probe_set: ProbeSet, record_tgid: bool) -> dict[str, str]:
    """Where each record field will come from with this probe set."""
    kinds = {p.kind for p in probe_set.probes} | {t.kind for t in probe_set.tracepoints}

    def source(kind: str, text: str, otherwise: str = "unavailable") -> str:
        return text if kind in kinds else otherwise

    if not probe_set.kprobes:
        return {
            "syscall, flags, ret, errno, ok, tid": "kernel (syscall tracepoints)",
            "comm": "the trace line's task name (may be <...>)",
            "module": source("module_load", "kernel (module:module_load), successful loads only"),
            "taints": source("module_load", "kernel (tracepoint module:module_load)"),
            "path": "/proc/PID/fd/FD while the call is in flight (racy)",
            "pid": "kernel (record-tgid), /proc" if record_tgid else "/proc/PID/status",
            "uid": "/proc/PID/status while the caller lives",
            "params, init_ret": "unavailable without kprobe events",
        }
    return {
        "syscall, flags, ret, errno, ok, tid, comm": "kernel (syscall entry and return probes)",
        "module": source("find_module", "kernel (find_module_all, do_init_module)"),
        "path": source(
            "module_file",
            "kernel (security_kernel_read_file, BTF offsets);"
            " deeper: /proc, else a search by inode",
            "/proc/PID/fd/FD while the call is in flight (racy)",
        ),
        "params": source("module_params", "kernel (parse_args, the intact copy)"),
        "stage": source("load_module", "kernel (load_module, do_init_module)", "partly"),
        "init_ret": source("do_init_module_ret", "kernel (do_init_module return)"),
        "taints": source("module_load", "kernel (tracepoint module:module_load)"),
        "pid": "kernel (record-tgid), /proc" if record_tgid else "/proc/PID/status",
        "uid": source(
            "caller_cred",
            "kernel (security_capable: the permission check's credentials)",
            "/proc/PID/status while the caller lives",
        ),
    }
