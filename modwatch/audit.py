"""`modwatch audit`: what the running kernel has loaded, checked against itself, against
the previous run's state and against a policy; run from cron, no daemon needed.

A capture sees only what happens while it runs. An audit compares snapshots, so it also
catches what happened between runs: modules added, removed or reloaded, taints that
changed, a reboot. It cross-checks the kernel's own views of its modules
(`/proc/modules`, `/sys/module`, `/proc/kallsyms`) and each module against its file on
disk, which no anchor can do without code in the kernel.

The state file is never half-written (a temporary file in the same directory, fsynced,
renamed) and two overlapping runs never interleave (a lock next to it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import fnmatch
import json
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from modwatch import modfile
from modwatch.errors import ExitStatus, ModwatchError

STATE_VERSION = 1
DOCUMENT_VERSION = 1
LOCK_WAIT = 10.0  # seconds a run waits for an overlapping one before giving up
# A test hook: when set, a run stops itself (SIGSTOP) after the new state is written,
# before it is renamed into place, so that a test can SIGKILL it right there, or let it
# go on (SIGCONT) once it has seen what another run does meanwhile.
PAUSE_BEFORE_RENAME = "MODWATCH_AUDIT_PAUSE_BEFORE_RENAME"
TEMPORARY_PREFIX = ".audit-"

# Kernel taint bits (kernel/panic.c taint_flags): letter and meaning.
KERNEL_TAINTS = (
    ("P", "proprietary module was loaded"),
    ("F", "module was force loaded"),
    ("S", "kernel running on an out-of-specification system"),
    ("R", "module was force unloaded"),
    ("M", "processor reported a machine check exception"),
    ("B", "bad page referenced or unexpected page flags"),
    ("U", "taint requested by a user-space application"),
    ("D", "kernel died recently (oops or BUG)"),
    ("A", "ACPI table overridden by the user"),
    ("W", "kernel issued a warning"),
    ("C", "staging driver was loaded"),
    ("I", "workaround for a platform firmware bug applied"),
    ("O", "externally-built (out-of-tree) module was loaded"),
    ("E", "unsigned module was loaded"),
    ("L", "soft lockup occurred"),
    ("K", "kernel has been live patched"),
    ("X", "auxiliary taint, defined for and used by distributions"),
    ("T", "kernel was built with the struct randomization plugin"),
    ("N", "an in-kernel test has been run"),
    ("J", "userspace used a mutating debug operation in fwctl"),
)


def taint_letters(value: int) -> list[str]:
    """The letters of the set taint bits (a bit without a known letter as `bitN`)."""
    letters = []
    for bit in range(value.bit_length()):
        if value >> bit & 1:
            letters.append(KERNEL_TAINTS[bit][0] if bit < len(KERNEL_TAINTS) else f"bit{bit}")
    return letters


def taint_meanings(letters: list[str]) -> dict[str, str]:
    table = dict(KERNEL_TAINTS)
    return {letter: table.get(letter, "unknown taint bit") for letter in letters}


@dataclass(frozen=True)
class Roots:
    """Where the kernel's files are (a fake tree in the unit tests)."""

    proc: str = "/proc"
    sys: str = "/sys"
    modules: str = "/lib/modules"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def module_files(roots: Roots, release: str, names: Iterable[str]) -> dict[str, str]:
    """Module name -> absolute file path, from modules.dep of the running kernel, for the
    modules `names` (those loaded: a few dozen of its thousands of lines)."""
    base = os.path.join(roots.modules, release)
    text = _read(os.path.join(base, "modules.dep")) or ""
    wanted = "|".join(re.escape(name).replace("_", "[-_]") for name in set(names))
    if not wanted:
        return {}
    # `kernel/fs/fat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz`: the file before the colon, named
    # up to `.ko` (a dash in a file name is an underscore in the module's name). One
    # regular expression over the whole text, which finds its leading slash fast: every
    # line is given one (a module right in the directory has none). Line by line, the
    # text took more than half of the snapshot in a profile of an audit in the guest.
    slashed = "/" + text.replace("\n", "\n/")
    own_file = re.compile(rf"/({wanted})\.ko[^/:\n]*:")
    files: dict[str, str] = {}
    for match in own_file.finditer(slashed):
        path = slashed[slashed.rfind("\n", 0, match.start()) + 2 : match.end() - 1]
        files.setdefault(match[1].replace("-", "_"), os.path.join(base, path))
    return files


def proc_modules(roots: Roots) -> dict[str, dict[str, Any]]:
    """/proc/modules: `name size refcount users, state address [(taints)]`."""
    modules = {}
    for line in (_read(os.path.join(roots.proc, "modules")) or "").splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        taints = fields[6].strip("()") if len(fields) > 6 else ""
        users = [u for u in fields[3].split(",") if u and u != "-"]
        modules[fields[0]] = {
            "size": int(fields[1]),
            "refcnt": int(fields[2]),
            "users": users,
            "state": fields[4],
            "address": fields[5],
            "taints": list(taints),
        }
    return modules


def sys_module(roots: Roots, name: str) -> dict[str, str | None]:
    base = os.path.join(roots.sys, "module", name)

    def value(key: str) -> str | None:
        text = _read(os.path.join(base, key))
        return None if text is None else text.strip()

    return {key: value(key) for key in ("initstate", "taint", "srcversion", "version", "refcnt")}


def loadable_in_sysfs(roots: Roots) -> set[str]:
    """Modules /sys/module lists as loaded: those with an `initstate` (built-in ones
    that only have parameters there have none)."""
    base = os.path.join(roots.sys, "module")
    try:
        names = os.listdir(base)
    except OSError:
        return set()
    return {n for n in names if os.path.exists(os.path.join(base, n, "initstate"))}


# kallsyms also names pseudo-modules, which are not hidden modules: kprobe instruction
# slots (`[__builtin__kprobes]`, left after any kprobe, modwatch's own included), ftrace
# trampolines (`[__builtin__ftrace]`), BPF programs (`[bpf]`).


_KALLSYMS_MODULE = re.compile(rb"\[([^\]\s]+)[^\]\n]*\]$", re.MULTILINE)


def kallsyms_modules(roots: Roots) -> set[str]:
    """Modules that own symbols in /proc/kallsyms (`addr t name [module]`)."""
    # Found by one regular expression over the whole text: some 120,000 lines, nearly
    # all of them the kernel's own, not looked at one by one. Read as bytes: its 7 MB
    # took 0.45 to 0.54 s as text in an emulated guest, 0.37 s as bytes.
    try:
        with open(os.path.join(roots.proc, "kallsyms"), "rb") as f:
            text = f.read()
    except OSError:
        return set()
    names = (n.decode("utf-8", "surrogateescape") for n in set(_KALLSYMS_MODULE.findall(text)))
    return {name for name in names if not (name == "bpf" or name.startswith("__builtin__"))}


def snapshot(roots: Roots, release: str, hashing: bool = True) -> dict[str, Any]:
    """The running kernel's modules, each with its sysfs view and its file on disk."""
    tainted_text = _read(os.path.join(roots.proc, "sys", "kernel", "tainted"))
    tainted = int(tainted_text) if tainted_text and tainted_text.strip().isdigit() else None
    boot_id = (_read(os.path.join(roots.proc, "sys", "kernel", "random", "boot_id")) or "").strip()
    modules = proc_modules(roots)
    files = module_files(roots, release, modules)
    for name, module in modules.items():
        module["sys"] = sys_module(roots, name)
        path = files.get(name)
        module["file"] = path
        facts = None
        if path is not None and os.path.exists(path):
            facts = modfile.read_path(path) if hashing else None
        module["sha256"] = facts.sha256 if facts else None
        module["signed"] = facts.signed if facts else None
        module["file_srcversion"] = facts.srcversion if facts else None
        loaded = module["sys"]["srcversion"]
        module["srcversion_match"] = (
            None
            if facts is None or loaded is None or facts.srcversion is None
            else loaded == facts.srcversion
        )
        module["file_missing"] = path is None or not os.path.exists(path)
    return {
        "release": release,
        "boot_id": boot_id or None,
        "tainted": tainted,
        "taints": taint_letters(tainted) if tainted is not None else None,
        "modules": modules,
        "sysfs": sorted(loadable_in_sysfs(roots)),
        "kallsyms": sorted(kallsyms_modules(roots)),
    }


def _finding(kind: str, module: str | None = None, **details: Any) -> dict[str, Any]:
    return {"kind": kind, "module": module, **details}


def cross_checks(snap: dict[str, Any]) -> list[dict[str, Any]]:
    """What the kernel's views of its modules and the files on disk disagree on."""
    findings = []
    modules: dict[str, dict[str, Any]] = snap["modules"]
    for source in ("sysfs", "kallsyms"):
        for name in snap[source]:
            if name not in modules:
                findings.append(_finding("hidden_module", name, seen_in=source))
    signed = [n for n, m in modules.items() if "E" not in m["taints"]]
    for name, module in sorted(modules.items()):
        if module["file_missing"]:
            findings.append(_finding("file_missing", name, file=module["file"]))
        elif module["srcversion_match"] is False:
            findings.append(
                _finding(
                    "file_differs",
                    name,
                    file=module["file"],
                    loaded_srcversion=module["sys"]["srcversion"],
                    file_srcversion=module["file_srcversion"],
                )
            )
        if "E" in module["taints"] and signed:
            findings.append(_finding("unsigned_module", name, file=module["file"]))
    return findings


def state_of(snap: dict[str, Any]) -> dict[str, Any]:
    """What a run keeps for the next one."""
    return {
        "v": STATE_VERSION,
        "time": _now(),
        "boot_id": snap["boot_id"],
        "release": snap["release"],
        "tainted": snap["tainted"],
        "modules": {
            name: {
                "address": m["address"],
                "srcversion": m["sys"]["srcversion"],
                "taints": m["taints"],
                "sha256": m["sha256"],
            }
            for name, m in snap["modules"].items()
        },
    }


def diff(previous: dict[str, Any], snap: dict[str, Any]) -> list[dict[str, Any]]:
    """What changed since the previous run."""
    findings = []
    rebooted = previous.get("boot_id") != snap["boot_id"]
    if rebooted:
        findings.append(
            _finding("boot_changed", before=previous.get("boot_id"), after=snap["boot_id"])
        )
    before_taint, after_taint = previous.get("tainted"), snap["tainted"]
    if before_taint != after_taint and before_taint is not None and after_taint is not None:
        letters_before, letters_after = taint_letters(before_taint), taint_letters(after_taint)
        added = [t for t in letters_after if t not in letters_before]
        findings.append(
            _finding(
                "kernel_taint_changed",
                before=letters_before,
                after=letters_after,
                added=added,
                meanings=taint_meanings(added),
            )
        )
    old: dict[str, dict[str, Any]] = previous.get("modules", {})
    new: dict[str, dict[str, Any]] = snap["modules"]
    for name in sorted(new.keys() - old.keys()):
        m = new[name]
        findings.append(
            _finding("module_added", name, sha256=m["sha256"], signed=m["signed"], file=m["file"])
        )
    for name in sorted(old.keys() - new.keys()):
        findings.append(_finding("module_removed", name))
    for name in sorted(new.keys() & old.keys()):
        before, now = old[name], new[name]
        changed = []
        if before.get("srcversion") != now["sys"]["srcversion"]:
            changed.append("srcversion")
        if not rebooted and before.get("address") != now["address"]:
            changed.append("address")
        if changed:
            findings.append(_finding("module_reloaded", name, changed=changed))
        if before.get("taints") != now["taints"]:
            findings.append(
                _finding(
                    "module_taint_changed", name, before=before.get("taints"), after=now["taints"]
                )
            )
    return findings


# -- policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    pattern: str
    sha256: str | None
    line: int


POLICY_HELP = """\
An allowlist: one module name pattern (shell glob: *, ?, [...]) per line, optionally
followed by sha256:HEX to pin the module file's hash. # starts a comment.

    # Debian's own modules
    *
    mwtest sha256:0f3a...
"""


def parse_policy(text: str, source: str = "policy") -> list[Rule]:
    rules = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        pin = None
        if len(words) == 2 and re.fullmatch(r"sha256:[0-9a-fA-F]{64}", words[1]):
            pin = words[1][len("sha256:") :].lower()
        elif len(words) != 1:
            raise ModwatchError(
                f"modwatch: {source}:{number}: expected 'PATTERN [sha256:HEX]' "
                f"(64 hex digits), got {raw.strip()!r}",
                ExitStatus.USAGE,
            )
        rules.append(Rule(words[0], pin, number))
    return rules


def check_policy(rules: list[Rule], snap: dict[str, Any]) -> list[dict[str, Any]]:
    """A module no rule allows, or whose file's hash differs from every pin it matches."""
    findings = []
    for name, module in sorted(snap["modules"].items()):
        matching = [r for r in rules if fnmatch.fnmatchcase(name, r.pattern)]
        if not matching:
            findings.append(_finding("not_allowed", name, sha256=module["sha256"]))
        elif all(r.sha256 is not None for r in matching) and module["sha256"] not in {
            r.sha256 for r in matching
        }:
            findings.append(
                _finding(
                    "hash_not_allowed",
                    name,
                    sha256=module["sha256"],
                    allowed=sorted({r.sha256 for r in matching if r.sha256}),
                )
            )
    return findings


# -- state file ---------------------------------------------------------------------------


def _state_error(path: str, why: str) -> ModwatchError:
    return ModwatchError(
        f"modwatch: state file {path}: {why}; it was left as it is: move it away to start "
        "a new baseline",
        ExitStatus.STATE_ERROR,
    )


def load_state(path: str) -> dict[str, Any] | None:
    """The previous run's state; None when there is none (the first run)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise _state_error(path, f"unreadable ({getattr(err, 'strerror', None) or err})") from err
    try:
        state = json.loads(text)
    except ValueError as err:
        raise _state_error(path, f"corrupt ({err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("v"), int):
        raise _state_error(path, "corrupt (not a modwatch audit state)")
    if state["v"] > STATE_VERSION:
        raise _state_error(
            path,
            f"written by a newer modwatch (version {state['v']}, this one reads {STATE_VERSION})",
        )
    if not isinstance(state.get("modules"), dict):
        raise _state_error(path, "corrupt (no modules)")
    return state


def save_state(path: str, state: dict[str, Any]) -> None:
    """Write `state` so that `path` always holds a whole state, old or new."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # What a run killed before its rename left (the caller holds the lock: no other
        # run is writing one now).
        for name in os.listdir(directory):
            if name.startswith(TEMPORARY_PREFIX) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
        fd, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=".tmp", dir=directory)
    except OSError as err:
        raise ModwatchError(
            f"modwatch: cannot write the state file in {directory}: {err.strerror}",
            ExitStatus.OUTPUT_ERROR,
        ) from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(PAUSE_BEFORE_RENAME):
            os.kill(os.getpid(), signal.SIGSTOP)
        os.rename(temporary, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ModwatchError(
            f"modwatch: writing the state file {path} failed: {err.strerror}",
            ExitStatus.OUTPUT_ERROR,
        ) from err


@contextlib.contextmanager
def state_lock(path: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """An exclusive lock on `path`.lock, waited for at most `wait` seconds."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise ModwatchError(
            f"modwatch: cannot lock the state file {path}: {err.strerror}",
            ExitStatus.OUTPUT_ERROR,
        ) from err
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise ModwatchError(
                        f"modwatch: another audit holds {path}.lock (waited {wait:g} s)",
                        ExitStatus.STATE_LOCKED,
                    ) from err
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


# -- the run ---------------------------------------------------------------------------


ROOTS = Roots()


@dataclass
class AuditOptions:
    state: str  # the state file (modwatch audit --state)
    allow: str | None = None
    roots: Roots = field(default_factory=lambda: ROOTS)
    release: str = field(default_factory=lambda: os.uname().release)
    hashing: bool = True


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def run(options: AuditOptions) -> dict[str, Any]:
    """One audit: the versioned document of its findings (state written when it ends)."""
    started = time.monotonic()
    rules = None
    if options.allow is not None:
        try:
            with open(options.allow, encoding="utf-8") as f:
                rules = parse_policy(f.read(), options.allow)
        except OSError as err:
            raise ModwatchError(
                f"modwatch: cannot read --allow {options.allow}: {err.strerror}", ExitStatus.USAGE
            ) from err
    with state_lock(options.state):
        previous = load_state(options.state)
        snap = snapshot(options.roots, options.release, options.hashing)
        findings = cross_checks(snap)
        if previous is not None:
            findings += diff(previous, snap)
        if rules is not None:
            findings += check_policy(rules, snap)
        save_state(options.state, state_of(snap))
    modules = snap["modules"]
    return {
        "v": DOCUMENT_VERSION,
        "type": "audit",
        "time": _now(),
        "duration": round(time.monotonic() - started, 3),
        "state": {"path": options.state, "baseline": previous is None},
        "kernel": {
            "release": snap["release"],
            "boot_id": snap["boot_id"],
            "tainted": snap["tainted"],
            "taints": taint_meanings(snap["taints"] or []),
        },
        "summary": {
            "modules": len(modules),
            "unsigned": sum("E" in m["taints"] for m in modules.values()),
            "out_of_tree": sum("O" in m["taints"] for m in modules.values()),
            "findings": len(findings),
        },
        "findings": findings,
    }


def finding_text(finding: dict[str, Any]) -> str:
    details = ", ".join(f"{k}={v}" for k, v in finding.items() if k not in ("kind", "module"))
    module = f" {finding['module']}" if finding.get("module") else ""
    return f"{finding['kind']}{module}" + (f": {details}" if details else "")


def send_syslog(findings: list[dict[str, Any]], address: str = "/dev/log") -> str | None:
    """One message per finding to the local syslog socket (facility auth, warning);
    the reason when it cannot be sent, else None."""
    pri = 4 * 8 + 4  # LOG_AUTH, LOG_WARNING
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            for finding in findings:
                text = f"<{pri}>modwatch[{os.getpid()}]: audit: {finding_text(finding)}"
                sock.send(text.encode("utf-8", "backslashreplace"))
    except OSError as err:
        return f"{address}: {err.strerror or err}"
    return None
