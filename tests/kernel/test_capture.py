"""`modwatch capture` against the real kernel: records, security, teardown, errors.

Most cases share one capture session (a Python start costs seconds in an emulated
guest): one scripted run of loads and unloads whose records the tests below
check one by one. The command-line tests run modwatch as a process.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from typer.testing import CliRunner

from modwatch import btf, capture, cli, probes, procfs
from modwatch import tracefs as tracefs_mod
from modwatch.capture import Capture, Options
from modwatch.errors import ExitStatus, ModwatchError

from .helpers import (
    CHILDREN,
    HOLD_MS,
    MARKER,
    Child,
    Releaser,
    held,
    release,
    script,
    stat_fields,
    wait_until,
)

pytestmark = pytest.mark.kernel

TRACEFS = Path("/sys/kernel/tracing")
COMM = 'my "ld" r'  # chosen by the caller: spaces and quotes
PARAMS = "note=\"hello world\" fail=0 x='it''s'"
# Everything an unprivileged caller controls: its task name (15 bytes at most) and the
# strings it passes, here with quotes, newlines and whole fake event lines.
EVIL_COMM = 'e"v\nCPU:0 [L'
EVIL = (
    '"\n           insmod-1     [000] .....   1.000000: module_load: evil OE\n'
    "CPU:0 [LOST 99 EVENTS]\n"
    '          insmod-1 [000] ..... 1.0: finit_module_ret: (x <- y) ret=0 name="'
)

Record = dict[str, Any]


def leftovers() -> set[str]:
    """modwatch probe groups and instances that exist right now."""
    groups = {
        line.split(":", 1)[1].split("/", 1)[0]
        for line in (TRACEFS / "kprobe_events").read_text().splitlines()
        if ":modwatch_" in line.split(" ", 1)[0]
    }
    instances = {n for n in os.listdir(TRACEFS / "instances") if n.startswith("modwatch_")}
    return {f"group {g}" for g in groups} | {f"instance {i}" for i in instances}


@pytest.fixture(scope="module", autouse=True)
def kernel_btf_read_once() -> None:
    """Read the kernel's BTF in pytest's process, and find where all its types start, so
    that the sessions forked from it neither read it again nor walk its types to their
    structs (0.4 to 0.7 s a session under emulation; modwatch does both once a process)."""
    types = capture.kernel_btf(btf.VMLINUX)
    if not isinstance(types, btf.BTFError):
        len(types)  # walks every type


@pytest.fixture(autouse=True)
def nothing_left_behind(tracefs: Path) -> Iterator[None]:
    yield
    for child in CHILDREN:  # a failed test may leave its sessions running
        if child.status is None:
            child.kill()
            child.wait()
    CHILDREN.clear()
    left = leftovers()
    if left:
        # Clean up so that one failure does not fail every test after it.
        fs = tracefs_mod.Tracefs(str(tracefs))
        for name in [i.split()[1] for i in left if i.startswith("instance")]:
            fs.remove_instance(name)
        for group, removals in fs.groups("modwatch_").items():
            for removal in removals:
                fs.remove_probe(removal, group)
    assert left == set(), "modwatch state was left behind"


class Session(NamedTuple):
    records: list[Record]
    capture: Capture
    trace: Path
    foreign_probe_kept: bool


@pytest.fixture(scope="module")
def session(
    tmp_path_factory: pytest.TempPathFactory,
    tracefs: Path,
    mwload: str,
    mwtest_ko: Path,
    mwtest_b_ko: Path,
) -> Session:
    tmp = tmp_path_factory.mktemp("session")
    ko, ko_b = str(mwtest_ko), str(mwtest_b_ko)
    fs = tracefs_mod.Tracefs(str(tracefs))
    fs.add_probe("p:foreign_mwtest/fprobe do_init_module")
    try:
        first = ["finit", ko, PARAMS, "finit", ko, "note=again", "delete", "mwtest"]
        first += ["init", ko, "note=mem", "delete", "mwtest"]
        first += ["finit", ko, "fail=22", "delete", "mw_not_loaded"]
        # The caller exits at once: its uid and pid must come from the kernel.
        evil = ["finit", "/dev/null", EVIL, "delete", EVIL, "init", "/dev/null", EVIL]
        # Two loaders at once, each init sleeping so that both are in flight.
        both = f"{mwload} finit {ko} delay_ms=300 & {mwload} finit {ko_b} 'delay_ms=300 note=b'"
        command = script(
            tmp,
            [mwload, "--comm", COMM, *first],
            [mwload, "--comm", EVIL_COMM, "--uid", "65534", *evil],
            ["insmod", ko, 'note="a b"'],
            ["rmmod", "mwtest"],
            ["sh", "-c", both + " & wait"],
            [mwload, "delete", "mwtest", "delete", "mwtest_b"],
        )
        trace = tmp / "session.trace"
        with open(trace, "w", encoding="utf-8", errors="surrogateescape") as saved:
            cap = Capture(Options(command=command, save_trace=saved))
            records = list(cap.run())
        kept = any("foreign_mwtest/fprobe" in line for line in fs.probe_lines())
    finally:
        fs.remove_probe("-:foreign_mwtest/fprobe", "foreign_mwtest")
    return Session(records, cap, trace, kept)


def ops(session: Session) -> list[Record]:
    return [r for r in session.records if r["type"] in ("load", "unload")]


def test_every_operation_has_one_record(session: Session) -> None:
    assert [(r["type"], r["syscall"]) for r in ops(session)] == [
        ("load", "finit_module"),
        ("load", "finit_module"),
        ("unload", "delete_module"),
        ("load", "init_module"),
        ("unload", "delete_module"),
        ("load", "finit_module"),
        ("unload", "delete_module"),
        ("load", "finit_module"),
        ("unload", "delete_module"),
        ("load", "init_module"),
        ("load", "finit_module"),
        ("unload", "delete_module"),
        ("load", "finit_module"),
        ("load", "finit_module"),
        ("unload", "delete_module"),
        ("unload", "delete_module"),
    ]
    assert session.capture.stats.unparsed == 0
    assert session.capture.stats.lost == 0
    assert session.capture.stats.command_status == 0


def test_load_with_spaces_and_quotes(session: Session, mwtest_ko: Path) -> None:
    load = ops(session)[0]
    assert load == {
        **load,
        "v": 1,
        "module": "mwtest",
        "path": str(mwtest_ko),
        "path_source": "kernel",
        "params": PARAMS,
        "flags": [],
        "flags_raw": 0,
        "ret": 0,
        "errno": None,
        "ok": True,
        "stage": None,
        "init_ret": 0,
        "uid": 0,
        "comm": COMM,
    }
    assert "O" in load["taints"]  # out of tree; E as well where signatures are checked
    assert load["pid"] == load["tid"] and load["pid"] > 1
    when = dt.datetime.fromisoformat(load["time"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 600


def test_duplicate_load_is_eexist_at_stage_load(session: Session, mwtest_ko: Path) -> None:
    dup = ops(session)[1]
    assert dup == {
        **dup,
        "module": "mwtest",
        "ret": -17,
        "errno": "EEXIST",
        "ok": False,
        "stage": "load",
        "init_ret": None,
        "params": None,  # refused before the kernel copied the parameters
        "comm": COMM,
        # Failed within microseconds, after the kernel read the file.
        "path": str(mwtest_ko),
        "path_source": "kernel",
    }


def test_unload(session: Session) -> None:
    unload = ops(session)[2]
    assert unload == {
        **unload,
        "module": "mwtest",
        "path": None,
        "flags": ["O_NONBLOCK"],
        "flags_raw": os.O_NONBLOCK,
        "ret": 0,
        "ok": True,
        "stage": None,
        "pid": ops(session)[0]["pid"],
    }


def test_init_module_from_memory(session: Session) -> None:
    load = ops(session)[3]
    assert (load["module"], load["params"], load["path"], load["ok"]) == (
        "mwtest",
        "note=mem",
        None,
        True,
    )


def test_init_failure_is_stage_init(session: Session) -> None:
    load = ops(session)[5]
    assert load == {
        **load,
        "module": "mwtest",
        "params": "fail=22",
        "ret": -22,
        "errno": "EINVAL",
        "ok": False,
        "stage": "init",
        "init_ret": -22,
    }


def test_delete_of_a_module_not_loaded(session: Session) -> None:
    unload = ops(session)[6]
    assert unload == {
        **unload,
        "module": "mw_not_loaded",
        "ret": -2,
        "errno": "ENOENT",
        "ok": False,
        "stage": "unload",
    }


def test_unprivileged_caller_cannot_forge_or_hide(session: Session) -> None:
    evil = ops(session)[7:10]
    assert [r["syscall"] for r in evil] == ["finit_module", "delete_module", "init_module"]
    for record in evil:
        assert record == {
            **record,
            "module": None,
            "params": None,
            "ret": -1,
            "errno": "EPERM",
            "ok": False,
            "stage": "permission",
            "taints": None,
            "uid": 65534,
            "comm": EVIL_COMM,
        }
        # pid: from /proc, else from record-tgid, whose map the kernel fills when the task
        # is switched out: a caller gone before either can be asked leaves it null.
        assert record["pid"] in (record["tid"], None)  # mwload is one thread


def test_insmod_and_rmmod(session: Session) -> None:
    load, unload = ops(session)[10:12]
    assert (load["comm"], load["module"], load["params"], load["ok"]) == (
        "insmod",
        "mwtest",
        'note="a b"',
        True,
    )
    assert (unload["comm"], unload["module"], unload["flags"], unload["ok"]) == (
        "rmmod",
        "mwtest",
        ["O_NONBLOCK"],
        True,
    )


def test_two_loads_at_once(session: Session, mwtest_b_ko: Path) -> None:
    by_module = {r["module"]: r for r in ops(session)[12:14]}
    assert set(by_module) == {"mwtest", "mwtest_b"}
    assert by_module["mwtest"]["params"] == "delay_ms=300"
    assert by_module["mwtest_b"]["params"] == "delay_ms=300 note=b"
    assert by_module["mwtest_b"]["path"] == str(mwtest_b_ko)
    assert {r["path_source"] for r in by_module.values()} == {"kernel"}
    assert by_module["mwtest"]["pid"] != by_module["mwtest_b"]["pid"]
    assert all(r["ok"] for r in by_module.values())


def test_foreign_probe_is_left_alone(session: Session) -> None:
    assert session.foreign_probe_kept


def test_saved_trace_replays_to_the_same_records(session: Session) -> None:
    replayed = list(Capture(Options()).replay(str(session.trace)))
    assert replayed == session.records


def test_raw_events_of_the_saved_trace(session: Session) -> None:
    raw = list(Capture(Options(raw=True)).replay(str(session.trace)))
    events = [r["event"] for r in raw]
    for name in ("finit_module", "module_params", "do_init_module", "finit_module_ret"):
        assert name in events
    first_params = next(r for r in raw if r["event"] == "module_params")
    assert first_params["args"] == {"params": PARAMS}


# -- the command line ------------------------------------------------------------------
#
# The CLI runs in a forked child of this interpreter: the code path of `modwatch ...`
# without an interpreter start, which costs tens of seconds in an emulated guest.
# (`python -m modwatch` itself is exercised by the host tests.)


def capture_child(out: Path) -> Child:
    child = Child("capture", "-o", str(out))
    banner = child.readline()
    assert "tracing" in banner, banner
    return child


def cpu_seconds(pid: int) -> float:
    """User and system time of a process, from /proc/PID/stat (fields 14 and 15)."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_records(out: Path, count: int) -> list[Record]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines()
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.2)
    raise AssertionError(f"{out}: fewer than {count} records after 60 s")


# What the kernel told (and the file's content): the same for every session. What /proc
# gave depends on how soon each session asked.
KERNEL_KEYS = (
    *("type", "syscall", "module", "path_source", "params", "flags", "ret"),
    *("errno", "stage", "incomplete", "init_ret", "taints", "tid", "comm"),
)


def test_sessions_at_once_signals_and_sigkill_leftovers(
    tmp_path: Path, mwload: str, mwtest_ko: Path
) -> None:
    stops = {"int": signal.SIGINT, "term": signal.SIGTERM, "hup": signal.SIGHUP}
    children = {name: capture_child(tmp_path / f"{name}.jsonl") for name in [*stops, "killed"]}
    killed = children.pop("killed")
    killed.kill()
    killed.wait()
    dead = {item for item in leftovers() if f"modwatch_{killed.pid}_" in item}
    assert {item.split()[0] for item in dead} == {"group", "instance"}

    # Idle, a session blocks in poll(2) on trace_pipe: it does not spin.
    before = cpu_seconds(children["int"].pid)
    time.sleep(3)
    assert cpu_seconds(children["int"].pid) - before < 0.5

    subprocess.run([mwload, "finit", str(mwtest_ko), "", "delete", "mwtest"], check=True)
    got = {name: wait_for_records(tmp_path / f"{name}.jsonl", 2) for name in stops}
    for name, signum in stops.items():
        children[name].send_signal(signum)
        assert children[name].wait() == 0, name
        assert "Traceback" not in children[name].rest_of_stderr()
    # Three sessions at once saw the same two operations. What /proc tells depends on
    # how soon each session read it, and each maps the trace clock to wall time itself.
    kernel_side = [[{k: r[k] for k in KERNEL_KEYS} for r in rs] for rs in got.values()]
    assert kernel_side[0] == kernel_side[1] == kernel_side[2]
    for i in range(2):
        times = [dt.datetime.fromisoformat(rs[i]["time"][:-1]) for rs in got.values()]
        assert (max(times) - min(times)).total_seconds() < 0.05
    assert [(r["type"], r["module"]) for r in got["int"]] == [
        ("load", "mwtest"),
        ("unload", "mwtest"),
    ]

    # The next session removes what the SIGKILLed one left, and only that; it exits
    # with its COMMAND's status.
    out = tmp_path / "next.jsonl"
    child = Child("capture", "-o", str(out), "--", "sh", "-c", "exit 7")
    assert child.wait() == 7
    stderr = child.rest_of_stderr()
    assert "removed leftovers of dead sessions" in stderr
    assert f"modwatch_{killed.pid}_" in stderr
    assert out.read_text() == ""


def test_closed_pipe_tears_down(mwload: str, mwtest_ko: Path) -> None:
    loads = [op for _ in range(3) for op in ("finit", str(mwtest_ko), "", "delete", "mwtest")]
    read_end, write_end = os.pipe()
    child = Child("capture", "--", mwload, *loads, stdout=write_end)
    os.close(write_end)
    with os.fdopen(read_end) as records:
        first = records.readline()  # like `| head -1`: one line, then the pipe is closed
    assert child.wait() == 0
    assert json.loads(first)["module"] == "mwtest"
    assert "Traceback" not in child.rest_of_stderr()


def test_not_root_is_a_clear_error() -> None:
    # typer imports parts of itself only while parsing: parse once as root,
    # so that the child can still run the CLI once it has given root up (the venv's
    # interpreter lives under /root, which uid 65534 cannot read).
    assert CliRunner().invoke(cli.app, ["capture", "--help"]).exit_code == 0

    def drop_root() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    child = Child("capture", setup=drop_root)
    assert child.wait() == ExitStatus.NOT_ROOT
    stderr = child.rest_of_stderr()
    assert stderr.count("\n") == 1 and "root" in stderr


CLONE_NEWNS = 0x20000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
CAP_SYS_ADMIN = 21


def without_tracefs_and_sys_admin() -> None:
    """In a mount namespace of its own, unmount tracefs (and debugfs), then give up
    CAP_SYS_ADMIN so that it cannot be mounted again."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.unshare(CLONE_NEWNS) == 0
    assert libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
    for path in (b"/sys/kernel/debug/tracing", b"/sys/kernel/tracing", b"/sys/kernel/debug"):
        libc.umount2(path, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}
    assert libc.capget(header, data) == 0
    data[0] &= ~(1 << CAP_SYS_ADMIN)
    data[1] &= ~(1 << CAP_SYS_ADMIN)
    assert libc.capset(header, data) == 0


def test_tracefs_not_mounted_and_not_mountable() -> None:
    child = Child("capture", setup=without_tracefs_and_sys_admin)
    status, stderr = child.wait(), child.rest_of_stderr()
    assert status == ExitStatus.NO_TRACEFS, stderr
    assert stderr.count("\n") == 1
    assert "tracefs is not mounted" in stderr and "mount -t tracefs" in stderr


def test_rejected_probe_quotes_the_kernel_reason(tracefs: Path) -> None:
    fs = tracefs_mod.Tracefs(str(tracefs))
    with pytest.raises(ModwatchError) as caught:
        fs.add_probe("p:modwatch_test/bad do_init_module x=+0(%nosuchreg):u32")
    reason = tracefs_mod.parse_error_log(fs.read("error_log"))
    assert reason is not None
    assert caught.value.status == ExitStatus.PROBE_REJECTED
    assert str(reason) in caught.value.message
    assert "kprobe_events" in caught.value.message


def test_doctor_finds_everything_capture_uses(tmp_path: Path) -> None:
    out = tmp_path / "doctor.json"
    with out.open("w") as stdout:
        child = Child("doctor", "--json", stdout=stdout.fileno())
    assert child.wait() == ExitStatus.OK, child.rest_of_stderr()
    document = json.loads(out.read_text())
    assert document["verdict"] == "works"
    assert {c["status"] for c in document["checks"]} <= {"ok", "info"}, document["checks"]
    assert document["fields"]["path"].startswith("kernel (security_kernel_read_file")
    assert document["fields"]["pid"] == "kernel (record-tgid), /proc"
    assert leftovers() == set()  # it wrote nothing to tracefs


def test_tracepoints_only(tmp_path: Path, mwload: str, mwtest_ko: Path) -> None:
    # What a kernel without kprobe events gives: the syscalls' own tracepoints and
    # module:module_load/module_free, read here from this kernel for real.
    out = tmp_path / "tp.jsonl"
    ops = ["finit", str(mwtest_ko), "note=x", "finit", str(mwtest_ko), "", "delete", "mwtest"]
    child = Child("capture", "--no-kprobes", "-o", str(out), "--", mwload, *ops)
    assert child.wait() == 1, child.rest_of_stderr()  # the duplicate load fails
    records = [json.loads(line) for line in out.read_text().splitlines()]
    got = [
        (r["syscall"], r["module"], r["ret"], r["errno"], r["stage"], r["params"], r["init_ret"])
        for r in records
    ]
    assert got == [
        ("finit_module", "mwtest", 0, None, None, None, None),
        ("finit_module", None, -17, "EEXIST", "load", None, None),
        ("delete_module", "mwtest", 0, None, None, None, None),
    ]
    assert "O" in records[0]["taints"]
    assert records[0]["flags"] == [] and records[2]["flags"] == ["O_NONBLOCK"]
    # mwload is one thread. Its pid may be null where it exited before /proc was read and
    # before the kernel noted its tgid (README, Known limits), never another number.
    pids = {r["pid"] for r in records}
    assert records[0]["tid"] in pids and pids <= {records[0]["tid"], None}
    assert {r["tid"] for r in records} == {records[0]["tid"]}
    assert leftovers() == set()


# A second thread of a Python process calls delete_module (x86_64: 176) for a module
# that is not there, and says its process and thread ids; then the process exits.
THREADED_CALL = f"""
import ctypes, os, threading
def call():
    print(os.getpid(), threading.get_native_id(), flush=True)
    ctypes.CDLL(None, use_errno=True).syscall(176, b"{MARKER}", 0)
thread = threading.Thread(target=call)
thread.start()
thread.join()
"""


def test_the_kernels_map_gives_the_process_of_a_thread_gone(tmp_path: Path) -> None:
    # The pid of a caller that exited before /proc was read comes from the kernel's map
    # (tracefs.TaskGroups): once a thread with an event in a session has exited, the
    # map has its process, here not its own thread id.
    out = tmp_path / "gone.jsonl"
    child = Child("capture", "-o", str(out))
    child.instance()  # armed
    done = subprocess.run(
        [sys.executable, "-c", THREADED_CALL], capture_output=True, text=True, check=True
    )
    pid, tid = (int(n) for n in done.stdout.split())
    assert tid != pid
    gone_at = time.monotonic()
    assert tracefs_mod.TaskGroups(tracefs_mod.Tracefs(str(TRACEFS))).tgid(tid, gone_at) == pid
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0, child.rest_of_stderr()
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["module"], record["tid"], record["pid"]) == (MARKER, tid, pid)
    assert record["errno"] == "ENOENT"


def without_btf() -> None:
    """modwatch in this child finds no kernel BTF, as on a kernel built without it."""
    btf.VMLINUX = "/nonexistent/vmlinux"
    capture.kernel_btf.cache_clear()


def test_without_btf_no_offset_is_guessed(tmp_path: Path, mwload: str, mwtest_ko: Path) -> None:
    # No struct offsets: no name fetched at do_init_module, no path or credentials from
    # the kernel; the module's name, parameters and init result still come from it.
    out = tmp_path / "nobtf.jsonl"
    ops = ["finit", str(mwtest_ko), "note=x", "delete", "mwtest"]
    child = Child("capture", "-o", str(out), "--", mwload, *ops, setup=without_btf)
    assert child.wait() == 0, child.rest_of_stderr()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    got = [(r["syscall"], r["module"], r["ret"], r["params"], r["init_ret"]) for r in records]
    assert got == [
        ("finit_module", "mwtest", 0, "note=x", 0),
        ("delete_module", "mwtest", 0, None, None),
    ]
    assert records[0]["path_source"] != "kernel" and records[0]["incomplete"] is None
    assert leftovers() == set()


def symbol_renamed(symbol: str) -> Callable[[], None]:
    """A child setup: modwatch's probes on `symbol` name a function no kernel has."""

    def setup() -> None:
        add = tracefs_mod.Tracefs.add_probe

        def renamed(self: tracefs_mod.Tracefs, definition: str) -> None:
            add(self, definition.replace(f" {symbol} ", " mw_no_such_function "))

        tracefs_mod.Tracefs.add_probe = renamed  # type: ignore[method-assign]

    return setup


def test_an_optional_symbol_the_kernel_rejects_is_left_out(
    tmp_path: Path, mwload: str, mwtest_ko: Path
) -> None:
    # The kernel checks each symbol as its probe is added: parse_args rejected, the
    # capture runs without the params probe and still reports the load.
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace"
    ops = ["finit", str(mwtest_ko), "note=x", "delete", "mwtest"]
    child = Child(
        "capture", "-o", str(out), "--save-trace", str(trace), "--", mwload, *ops,
        setup=symbol_renamed("parse_args"),
    )  # fmt: skip
    status, stderr = child.wait(), child.rest_of_stderr()
    assert status == 0, stderr
    assert "teardown step failed" not in stderr, stderr  # the rejected probe's undo
    probes = [line for line in trace.read_text().splitlines() if line.startswith("# probe: ")]
    assert probes and not any(" parse_args " in p or "module_params" in p for p in probes)
    assert any(" load_module " in p for p in probes)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    got = [(r["syscall"], r["module"], r["ret"], r["init_ret"]) for r in records]
    assert got == [("finit_module", "mwtest", 0, 0), ("delete_module", "mwtest", 0, None)]
    assert leftovers() == set()


def test_a_required_symbol_the_kernel_rejects_ends_the_capture() -> None:
    child = Child("capture", setup=symbol_renamed("__x64_sys_finit_module"))
    status, stderr = child.wait(), child.rest_of_stderr()
    assert status == ExitStatus.NO_KPROBES, stderr
    assert "no probe-able __x64_sys_finit_module (checked kprobe_events: " in stderr
    assert "Invalid probed address or symbol" in stderr and "Traceback" not in stderr
    assert leftovers() == set()


def test_disk_full_keeps_whole_lines_and_tears_down(
    tmp_path: Path, mwload: str, mwtest_ko: Path
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    # Room for a few records (each a few KiB: the caller's argument list is long).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "mwfull", str(full)], check=True)
    try:
        out = full / "out.jsonl"
        ops = [op for _ in range(30) for op in ("finit", str(mwtest_ko), "", "delete", "mwtest")]
        child = Child("capture", "-o", str(out), "--", mwload, *ops)
        status, stderr = child.wait(), child.rest_of_stderr()
        assert status == ExitStatus.OUTPUT_ERROR, stderr
        assert "No space left on device" in stderr and "Traceback" not in stderr
        data = out.read_bytes()
        assert data.endswith(b"\n") and data.count(b"\n") >= 5
        assert all(json.loads(line)["type"] in ("load", "unload") for line in data.splitlines())
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert leftovers() == set()


def checked_often() -> None:
    """A child setup: the session looks at its instance and at the threads of open calls
    every 0.5 s instead of every CHECK_INTERVAL. For tests of what those looks find (it
    is found at the first one, whenever that comes), not of how often they come."""
    capture.CHECK_INTERVAL = 0.5


@pytest.mark.parametrize("undone", ["probes removed", "one tracepoint disabled"])
def test_probes_removed_by_someone_else_end_the_capture(tracefs: Path, undone: str) -> None:
    child = Child("capture", setup=checked_often)
    group = child.instance()
    fs = tracefs_mod.Tracefs(str(tracefs))
    # What another root process could do: disable the session's events, remove its probes;
    # or disable one event in the session's instance.
    if undone == "probes removed":
        fs.write(f"instances/{group}/events/{group}/enable", "0")
        for removal in fs.groups(group)[group]:
            fs.remove_probe(removal, group)
    else:
        fs.write(f"instances/{group}_rare/events/module/module_load/enable", "0")
    status, stderr = child.wait(timeout=120), child.rest_of_stderr()
    assert status == ExitStatus.TRACE_GONE, stderr
    assert "removed by someone else" in stderr and "Traceback" not in stderr
    assert leftovers() == set()


def test_tracefs_unmounted_under_a_capture(tracefs: Path) -> None:
    child = Child("capture", setup=checked_often)
    child.instance()
    # A lazy unmount: the session's open trace_pipe keeps working, its paths do not.
    subprocess.run(["umount", "-l", str(tracefs)], check=True)
    try:
        status, stderr = child.wait(timeout=120), child.rest_of_stderr()
    finally:
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)], check=True)
    assert status == ExitStatus.TRACE_GONE, stderr
    assert f"tracefs was unmounted from {tracefs}" in stderr and "Traceback" not in stderr
    assert "teardown step failed" not in stderr, stderr
    # Teardown mounted tracefs again where only it looked, removed everything, and left.
    assert leftovers() == set()
    assert "modwatch-tracefs-" not in Path("/proc/mounts").read_text()


SYS_INIT_MODULE, SYS_DELETE_MODULE = 175, 176  # x86_64


def test_init_module_through_ctypes(mwtest_ko: Path) -> None:
    # A load from memory made by this very process, once the probes are armed.
    libc = ctypes.CDLL(None, use_errno=True)
    image = mwtest_ko.read_bytes()
    calls: list[int] = []

    def load_and_unload(cap: Capture) -> None:
        calls.append(libc.syscall(SYS_INIT_MODULE, image, len(image), b"note=ctypes"))
        calls.append(libc.syscall(SYS_DELETE_MODULE, b"mwtest", os.O_NONBLOCK))

    cap = Capture(Options(count=2, duration=120))
    cap.on_armed = load_and_unload
    records = list(cap.run())
    assert calls == [0, 0]
    assert [(r["syscall"], r["module"], r["params"], r["path"], r["ok"]) for r in records] == [
        ("init_module", "mwtest", "note=ctypes", None, True),
        ("delete_module", "mwtest", None, None, True),
    ]
    assert {r["pid"] for r in records} == {os.getpid()}
    assert {r["uid"] for r in records} == {0}


def instance_losses(tracefs: Path, instance: str) -> int:
    """The kernel's own count of the events an instance lost: overruns and drops, per CPU."""
    total = 0
    for stats in (tracefs / "instances" / instance / "per_cpu").glob("cpu*/stats"):
        for line in stats.read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("overrun", "dropped events"):
                total += int(value)
    return total


def session_losses(tracefs: Path, instance: str) -> tuple[int, int]:
    """The losses of a session's main instance and of its rare one."""
    return instance_losses(tracefs, instance), instance_losses(tracefs, instance + "_rare")


def buffer_kb(tracefs: Path, instance: str | None = None) -> int:
    """An instance's ring buffer per CPU (the top level's, without an instance), in KiB.
    The kernel rounds a size up to whole pages, and shows the data they hold (4,080
    bytes of 4,096 each)."""
    base = tracefs if instance is None else tracefs / "instances" / instance
    return capture._buffer_kb((base / "buffer_size_kb").read_text())


def test_ring_buffer_size_default_and_refused(tmp_path: Path, tracefs: Path) -> None:
    # The default: 32 MiB shared out over the CPUs, or the kernel's default if larger.
    child = Child("capture", "-o", str(tmp_path / "default.jsonl"))
    instance = child.instance()
    cpus = os.cpu_count() or 1
    wanted = max(buffer_kb(tracefs), capture.BUFFER_BUDGET_KB // cpus)
    assert wanted <= buffer_kb(tracefs, instance) < wanted + 4
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0
    # More than the machine has: a clear error, and nothing left behind.
    child = Child("capture", "--buffer-kb", str(1 << 40), "-o", str(tmp_path / "huge.jsonl"))
    assert child.wait() == ExitStatus.PROBE_REJECTED
    stderr = child.rest_of_stderr()
    assert "the kernel refused a ring buffer of 1099511627776 KiB per CPU" in stderr, stderr
    assert not leftovers()


def test_stalled_reader_reports_exactly_what_the_kernel_lost_and_every_real_load(
    tmp_path: Path, tracefs: Path, mwload: str, mwtest_ko: Path
) -> None:
    out = tmp_path / "storm.jsonl"
    # A small buffer, then bursts far larger than it while the reader is stopped, with a
    # real load and unload between them: the flood overruns the main instance and takes
    # their syscall entries and returns; the rare instance keeps the rest.
    child = Child("capture", "--buffer-kb", "16", "-o", str(out))
    instance = child.instance()
    assert 16 <= buffer_kb(tracefs, instance) < 20
    os.kill(child.pid, signal.SIGSTOP)
    try:
        ops = ["storm", "1500", "finit", str(mwtest_ko), "note=flood", "delete", "mwtest"]
        # On one CPU: the second burst overwrites that CPU's buffer, the load's and
        # unload's syscall events with it.
        loader = subprocess.Popen(["taskset", "-c", "0", mwload, *ops, "storm", "1500"])
        assert loader.wait(timeout=300) == 0
        lost_main, lost_rare = session_losses(tracefs, instance)
    finally:
        os.kill(child.pid, signal.SIGCONT)
    assert lost_main > 0 and lost_rare == 0, (lost_main, lost_rare)
    # Until the reader has caught up, and the real load and unload have come out (those
    # whose entries were lost wait for the thread to be seen out of the call twice).
    wait_until(
        lambda: sum('"mwtest"' in line for line in out.read_text().splitlines()) >= 2,
        120,
        "the load and the unload",
    )
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0
    stderr = child.rest_of_stderr()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    lost = [r for r in records if r["type"] == "lost"]
    assert lost and all(r["count"] is not None for r in lost), lost
    assert sum(r["count"] for r in lost) == lost_main, (lost, lost_main)
    assert f"{lost_main} events lost in all" in stderr
    # The real load and unload, whole: all the kernel-side facts, and the outcome.
    [load] = [r for r in records if r["type"] == "load" and r["module"] == "mwtest"]
    assert load["incomplete"] == "entry_missed", load
    assert (load["syscall"], load["ok"], load["ret"], load["init_ret"]) == (
        "finit_module",
        True,
        0,
        0,
    ), load
    assert (load["path"], load["path_source"], load["params"]) == (
        os.path.realpath(mwtest_ko),
        "kernel",
        "note=flood",
    ), load
    assert (load["flags"], load["comm"], load["pid"]) == ([], "mwload", loader.pid), load
    # The permission check's event (the uid) went with the flood, and the loader had
    # exited before the stopped reader could ask /proc.
    assert (load["uid"], load["proc_gone"]) == (None, True), load
    assert load["sha256"] is not None and load["taints"] is not None, load
    [unload] = [r for r in records if r["type"] == "unload"]
    assert (unload["module"], unload["ok"], unload["ret"], unload["incomplete"]) == (
        "mwtest",
        True,
        0,
        "entry_missed",
    ), unload
    # Whatever else was not lost made whole records: every one an EBADF after the check.
    calls = [r for r in records if r["type"] == "load" and r is not load]
    assert calls and all(r["errno"] == "EBADF" or r["ret"] is None for r in calls)


@pytest.mark.parametrize("stage", ["setup", "teardown"])
def test_sigkill_at_any_point_leaves_only_what_the_next_session_removes(
    stage: str, tracefs: Path
) -> None:
    # Setup and teardown take a second or so under emulation: kills at several delays
    # land in different steps (probes half written, instance made, events half enabled,
    # ...), the last one after them (a session reading, or one that has exited).
    fs = tracefs_mod.Tracefs(str(tracefs))
    for delay in (0.05, 0.2, 0.5, 1.0, 2.0):
        child = Child("capture")
        if stage == "teardown":
            assert "tracing" in child.readline()
            child.send_signal(signal.SIGINT)
        time.sleep(delay)
        child.kill()
        child.wait()
        removed = capture.remove_leftovers(fs)  # what the next session does first
        assert all(f"modwatch_{child.pid}_" in item for item in removed), removed
        assert leftovers() == set(), (stage, delay)


def in_finit_module(pid: int) -> bool:
    """The process is inside finit_module (blocked in it, as /proc/PID/syscall says)."""
    return procfs.syscall_nr(pid) == probes.current_arch().syscall_nr("finit_module", False)


def test_returns_the_kernel_missed_make_incomplete_records_counted_by_kprobe_profile(
    tmp_path: Path, tracefs: Path, mwload: str, mwtest_ko: Path
) -> None:
    # Sixteen loads of one module at once: the first one's init waits until all sixteen
    # are in the call, the others wait for it inside finit_module. More threads in the
    # call than the return probe has instances (its MAXACTIVE: 10, or 2 per CPU where
    # that is more): the kernel misses some returns.
    loaders = 16
    out = tmp_path / "missed.jsonl"
    child = Child("capture", "-o", str(out), setup=checked_often)
    instance = child.instance()
    ko = str(mwtest_ko)
    procs = [
        subprocess.Popen([mwload, "finit", ko, f"hold_ms={HOLD_MS}"], stdout=subprocess.DEVNULL)
        for _ in range(loaders)
    ]
    wait_until(lambda: held() and all(in_finit_module(p.pid) for p in procs), 120, "16 in")
    release()
    for proc in procs:
        proc.wait(timeout=120)
    # kprobe_profile: event, hits, misses. The session's events are mwTOKEN_NAME.
    prefix = "mw" + instance.rsplit("_", 1)[1] + "_"
    profile = [line.split() for line in (tracefs / "kprobe_profile").read_text().splitlines()]
    missed_returns = sum(int(f[2]) for f in profile if f[0] == prefix + "finit_module_ret")
    assert missed_returns > 0, profile
    # Each load is one record; those whose return the kernel missed are let go once
    # their threads are seen outside the call and the reads have passed that moment.
    wait_until(lambda: len(out.read_text().splitlines()) >= loaders, 60, f"{loaders} records")
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0
    stderr = child.rest_of_stderr()
    subprocess.run([mwload, "delete", "mwtest"], check=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == loaders, records
    missed = [r for r in records if r["incomplete"] == "return_missed"]
    assert len(missed) == missed_returns
    assert all(r["ret"] is None and r["comm"] == "mwload" and r["pid"] for r in missed), missed
    complete = [r for r in records if r["incomplete"] is None]
    assert len(complete) == loaders - missed_returns
    assert all(r["ret"] is not None for r in complete)
    # One init ran. The others got EEXIST (6.1), or waited for that load of the same
    # file and got its result without reading anything (6.12: idempotent_init_module).
    assert [r["module"] for r in records if r["init_ret"] is not None] == ["mwtest"]
    assert f"the kernel missed {missed_returns} probe hits" in stderr, stderr


def test_a_call_in_flight_at_ctrl_c_is_a_record(
    tmp_path: Path, mwload: str, mwtest_ko: Path
) -> None:
    out = tmp_path / "inflight.jsonl"
    child = Child("capture", "-o", str(out))
    child.instance()
    hold = f"hold_ms={HOLD_MS}"
    loader = subprocess.Popen([mwload, "finit", str(mwtest_ko), hold])
    try:
        wait_until(held, 60, "mwtest's init running")
        child.send_signal(signal.SIGINT)
        assert child.wait() == 0
    finally:
        release()
        assert loader.wait(timeout=60) == 0
        subprocess.run([mwload, "delete", "mwtest"], check=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1, records
    rec = records[0]
    assert (rec["module"], rec["ret"], rec["incomplete"]) == ("mwtest", None, "in_flight")
    assert rec["params"] == hold and rec["pid"] == loader.pid


def test_module_tracepoints_are_read_by_the_kernels_own_print_format(tracefs: Path) -> None:
    probe_set = capture.plan(tracefs_mod.Tracefs(str(tracefs)), "modwatch_1_check")
    fmts = {t.event: t.print_fmt for t in probe_set.tracepoints if t.system == "module"}
    assert set(fmts) == {"module_load", "module_free"}
    assert all(fmt and fmt.startswith('"%s') for fmt in fmts.values()), fmts
    assert "module:module_load: print format as known ('%s %s')" in probe_set.choices
    assert "module:module_free: print format as known ('%s')" in probe_set.choices


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:", 1)[1].split()[0])


def test_soak_every_cycle_one_record_each_memory_flat(
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    mwload: str,
    mwtest_ko: Path,
) -> None:
    cycles = int(request.config.getoption("--soak-cycles"))
    out = tmp_path / "soak.jsonl"

    def written() -> int:
        return out.read_text().count("\n")

    child = Child("capture", "-o", str(out))
    child.instance()
    rss_start = rss_kib(child.pid)
    started = time.monotonic()
    # mwload runs up to 50 cycles per process (a load, then an unload); a script runs it
    # again until all are done.
    chunks = [min(50, cycles - done) for done in range(0, cycles, 50)]
    cycle = ["finit", str(mwtest_ko), "", "delete", "mwtest"]
    loop = tmp_path / "soak.sh"
    loop.write_text(
        "set -e\n" + "".join(shlex.join([mwload, *cycle * n]) + " 2>/dev/null\n" for n in chunks)
    )
    loader = subprocess.Popen(["sh", str(loop)])
    try:
        # Two unrelated sessions start and stop meanwhile.
        for n, stop in ((1, signal.SIGTERM), (2, signal.SIGINT)):
            wait_until(lambda n=n: written() >= cycles * 2 * n // 3, 3600, "soak progress")
            other = Child("capture", "-o", str(tmp_path / f"other{n}.jsonl"))
            other.instance()
            other.send_signal(stop)
            assert other.wait() == 0, n
    finally:
        assert loader.wait(timeout=3600) == 0
    wait_until(lambda: written() >= 2 * cycles, 600, f"{2 * cycles} records")
    rss_end = rss_kib(child.pid)
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0
    elapsed = time.monotonic() - started
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * cycles
    assert [(r["type"], r["module"], r["ok"]) for r in records] == [
        ("load", "mwtest", True),
        ("unload", "mwtest", True),
    ] * cycles
    assert all(r["incomplete"] is None for r in records)
    with capsys.disabled():
        print(
            f"\nsoak: {cycles} load/unload cycles in {elapsed:.0f} s, "
            f"capture RSS {rss_start} KiB at start, {rss_end} KiB at the end"
        )
    assert rss_end - rss_start < 8 * 1024, (rss_start, rss_end)


def test_limits_long_parameters_longest_module_name_and_a_32_bit_caller(
    tmp_path: Path, mwload: str, mwload32: str, mwtest_ko: Path, long_name_ko: Path
) -> None:
    long_name = long_name_ko.stem
    # Unknown parameters are ignored by the kernel (with a warning): any length loads.
    whole = "note=w " + " ".join(f"p{i}={'y' * 90}" for i in range(30))  # 2,800 bytes
    longest = "note=l " + " ".join(f"p{i}={'z' * 90}" for i in range(90))  # 8,400 bytes
    ko = str(mwtest_ko)
    out = tmp_path / "limits.jsonl"
    command = script(
        tmp_path,
        [mwload, "finit", ko, whole, "delete", "mwtest"],
        [mwload, "finit", ko, longest, "delete", "mwtest"],
        [mwload, "finit", str(long_name_ko), "note=long", "delete", long_name],
        [mwload32, "finit", ko, "note=32"],
        [mwload32, "finit", ko, "note=again"],
        [mwload32, "delete", "mwtest"],
        [mwload32, "delete", "mwtest"],
    )
    child = Child("capture", "-o", str(out), "--", *command)
    assert child.wait() == 2  # the last call fails with ENOENT: mwtest is not loaded
    records = [json.loads(line) for line in out.read_text().splitlines()]
    got = [(r["syscall"], r["module"], r["errno"], r["comm"]) for r in records]
    assert got == [
        ("finit_module", "mwtest", None, "mwload"),
        ("delete_module", "mwtest", None, "mwload"),
        ("finit_module", "mwtest", None, "mwload"),
        ("delete_module", "mwtest", None, "mwload"),
        ("finit_module", long_name, None, "mwload"),
        ("delete_module", long_name, None, "mwload"),
        ("finit_module", "mwtest", None, "mwload32"),
        ("finit_module", "mwtest", "EEXIST", "mwload32"),
        ("delete_module", "mwtest", None, "mwload32"),
        ("delete_module", "mwtest", "ENOENT", "mwload32"),
    ], records
    assert (records[0]["params"], records[0]["incomplete"]) == (whole, None)
    # 8,400 bytes: the event that would carry them does not fit the ring buffer, and the
    # kernel drops it (on 6.12 too with an 8 KiB sub-buffer: tried); the record says so.
    assert (records[2]["params"], records[2]["incomplete"]) == (None, "params_lost")
    assert records[2]["ok"] is True and records[2]["init_ret"] == 0
    assert records[4]["params"] == "note=long" and len(long_name) == 55
    # The 32-bit caller's calls entered at __ia32_sys_*: the same records.
    assert [r["params"] for r in records[6:8]] == ["note=32", None]
    assert [r["stage"] for r in records[6:]] == [None, "load", None, "unload"]
    assert all(r["path"] == ko for r in records[6:8])


def test_caller_facts_cgroup_ancestry_and_another_euid(
    tmp_path: Path, mwload: str, mwtest_ko: Path
) -> None:
    cgroup_root = Path("/sys/fs/cgroup")
    if not (cgroup_root / "cgroup.procs").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(cgroup_root)], check=True)
    cgroup = cgroup_root / "modwatch-test"
    cgroup.mkdir(exist_ok=True)
    ko = str(mwtest_ko)
    comm = 'a b"c\nd'
    # Each loader stops after its call until the capture has seen it: /proc still has it.
    in_cgroup = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
    command = script(
        tmp_path,
        ["sh", "-c", in_cgroup, "sh", mwload, "--comm", comm, "finit", ko, "", "stop"],
        ["setpriv", "--euid=65534", mwload, "finit", ko, "", "stop"],
        [mwload, "delete", "mwtest"],
    )
    out, trace = tmp_path / "facts.jsonl", tmp_path / "facts.trace"
    releaser = Releaser(trace, mwload, loads=2, stopped=True)
    child = Child(
        "capture", "--no-hash", "-o", str(out), "--save-trace", str(trace), "--", *command
    )
    try:
        assert child.wait() == 0  # the script's status: its last command's
        releaser.done()
    finally:
        for pid in (cgroup / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        wait_until(lambda: not (cgroup / "cgroup.procs").read_text(), 30, "cgroup empty")
        cgroup.rmdir()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    loaded, refused, _ = (r for r in records if r["module"] != MARKER)
    assert (loaded["comm"], loaded["ok"], loaded["proc_gone"]) == (comm, True, False)
    assert loaded["exe"] == mwload
    assert loaded["cmdline"] == [mwload, "--comm", comm, "finit", ko, "", "stop"]
    assert loaded["cgroup"] == "/modwatch-test" and loaded["container"] is None
    ancestry = [a["pid"] for a in loaded["ancestry"]]
    assert child.pid in ancestry and ancestry[-1] == 1, loaded["ancestry"]
    assert loaded["ancestry"][0]["name"] == "sh"  # the script that ran it
    assert loaded["ppid"] == ancestry[0]
    # No login session in the guest: loginuid unset, and said so.
    assert loaded["loginuid"] is None
    assert loaded["reasons"]["loginuid"] == "unset: not from a login session"
    # setpriv --euid: the real uid stays 0, the effective one is 65534, so the
    # permission check refuses.
    assert (refused["uid"], refused["euid"], refused["errno"]) == (0, 65534, "EPERM")
    assert refused["exe"] == mwload and refused["cgroup"] != "/modwatch-test"
    # --no-hash: the file is not read; where it lies is still known.
    assert (loaded["sha256"], loaded["signed"], loaded["in_tree"]) == (None, None, False)
    assert loaded["reasons"]["sha256"] == "not read: --no-hash"


def test_a_caller_gone_before_proc_is_read(tmp_path: Path, mwload: str, mwtest_ko: Path) -> None:
    out = tmp_path / "gone.jsonl"
    child = Child("capture", "-o", str(out))
    child.instance()
    os.kill(child.pid, signal.SIGSTOP)  # the capture reads nothing until the loader is gone
    try:
        subprocess.run([mwload, "finit", str(mwtest_ko), "note=gone", "delete", "mwtest"])
    finally:
        os.kill(child.pid, signal.SIGCONT)
    wait_until(lambda: out.read_text().count("\n") >= 2, 60, "two records")
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0
    load, unload = (json.loads(line) for line in out.read_text().splitlines())
    for rec in (load, unload):
        assert rec["proc_gone"] is True and rec["ok"] is True
        # What the kernel told is there: uid and euid (permission check), comm, module.
        assert (rec["uid"], rec["euid"], rec["comm"], rec["module"]) == (0, 0, "mwload", "mwtest")
        # And its pid: the kernel noted its process when it was switched out for the last
        # time (saved_tgids), before the capture read its events. mwload is one thread.
        assert rec["pid"] == rec["tid"]
        assert rec["exe"] is None and rec["ancestry"] is None
        assert rec["reasons"]["exe"] == "the process had exited when /proc was read"
    assert load["params"] == "note=gone" and load["path"] == str(mwtest_ko)


def modinfo_field(path: Path, field: str) -> str | None:
    """A .modinfo field as kmod's modinfo reads it (None when the file has none)."""
    got = subprocess.run(["modinfo", "-F", field, str(path)], capture_output=True, text=True)
    return got.stdout.removesuffix("\n") or None


def test_module_file_facts(tmp_path: Path, mwload: str, mwtest_ko: Path) -> None:
    kernel = os.uname().release
    ko = tmp_path / "mwtest.ko"
    ko.write_bytes(mwtest_ko.read_bytes())
    # A Debian module without dependencies: crc7.ko on 6.1, crc7.ko.xz on 6.12, which the
    # kernel decompresses itself when asked (MODULE_INIT_COMPRESSED_FILE).
    debian = next(Path(f"/lib/modules/{kernel}/kernel/lib").glob("crc7.ko*"))
    xz = debian.suffix == ".xz"
    out, trace = tmp_path / "files.jsonl", tmp_path / "files.trace"
    child = Child("capture", "-o", str(out), "--save-trace", str(trace))
    child.instance()
    loaded = ko.read_bytes()
    # The init waits until the capture has seen the load: the loader is still in its call
    # while modwatch opens its file (a loader gone by then: read by path).
    releaser = Releaser(trace, mwload, loads=1)
    hold = f"hold_ms={HOLD_MS}"
    subprocess.run([mwload, "finit", str(ko), hold, "delete", "mwtest"], check=True)
    releaser.done()
    # The loader stops after its call, its file still open, until the capture has seen it.
    releaser = Releaser(trace, mwload, loads=1, stopped=True)
    finit = "finitc" if xz else "finit"
    subprocess.run([mwload, finit, str(debian), "", "stop", "delete", "crc7"], check=True)
    releaser.done()
    wait_until(lambda: out.read_text().count("\n") >= 6, 60, "four records and two markers")
    # A file rewritten after the load, before modwatch could read it: stale.
    os.kill(child.pid, signal.SIGSTOP)
    try:
        subprocess.run([mwload, "finit", str(ko), "", "delete", "mwtest"], check=True)
        with open(ko, "ab") as f:
            f.write(b"rewritten")
    finally:
        os.kill(child.pid, signal.SIGCONT)
    wait_until(lambda: out.read_text().count("\n") >= 8, 60, "six records and two markers")
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    records = [r for r in records if r["module"] != MARKER]
    test, crc7, stale = records[0], records[2], records[4]
    assert [r["module"] for r in (test, crc7, stale)] == ["mwtest", "crc7", "mwtest"]
    assert all(r["sha256"] is None for r in records[1::2])  # unloads read no file

    assert test["sha256"] == hashlib.sha256(loaded).hexdigest(), test
    assert (test["size"], test["hash_source"], test["stale"]) == (len(loaded), "fd", False)
    assert (test["signed"], test["compressed"], test["in_tree"]) == (False, None, False)
    assert test["vermagic"] == modinfo_field(ko, "vermagic")
    assert test["vermagic"].startswith(kernel + " ")
    assert test["srcversion"] == modinfo_field(ko, "srcversion")
    assert test["taints"] == ["O", "E"]

    assert crc7["ok"] is True, crc7
    assert crc7["sha256"] == hashlib.sha256(debian.read_bytes()).hexdigest(), crc7
    assert (crc7["hash_source"], crc7["stale"]) == ("fd", False)
    assert (crc7["signed"], crc7["in_tree"]) == (True, True)
    assert crc7["compressed"] == ("xz" if xz else None)
    assert crc7["flags"] == (["MODULE_INIT_COMPRESSED_FILE"] if xz else [])
    assert crc7["vermagic"] == modinfo_field(debian, "vermagic")
    assert crc7["srcversion"] == modinfo_field(debian, "srcversion")
    assert crc7["taints"] == []

    assert stale["stale"] is True
    assert stale["sha256"] == hashlib.sha256(loaded + b"rewritten").hexdigest()


def test_a_reused_fd_number_does_not_lend_its_file_to_an_earlier_load(
    tmp_path: Path, mwload: str, mwtest_ko: Path
) -> None:
    first, second = tmp_path / "first.ko", tmp_path / "second.ko"
    first.write_bytes(mwtest_ko.read_bytes())
    second.write_bytes(mwtest_ko.read_bytes() + b"\0second")
    out, trace = tmp_path / "reuse.jsonl", tmp_path / "reuse.trace"
    child = Child("capture", "-o", str(out), "--save-trace", str(trace))
    child.instance()
    # The capture reads nothing while the loader loads the first file and opens the
    # second with the same fd number, whose load then stays in flight until the capture
    # has seen it.
    os.kill(child.pid, signal.SIGSTOP)
    ops = ["finit", str(first), "", "delete", "mwtest", "finit", str(second), f"hold_ms={HOLD_MS}"]
    loader = subprocess.Popen([mwload, *ops, "delete", "mwtest"])
    try:
        wait_until(held, 60, "the second load in flight")
    finally:
        os.kill(child.pid, signal.SIGCONT)
    Releaser(trace, mwload, loads=1).done()
    assert loader.wait(timeout=120) == 0
    wait_until(lambda: out.read_text().count("\n") >= 5, 60, "four records and a marker")
    child.send_signal(signal.SIGINT)
    assert child.wait() == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    load1, _, load2, _ = (r for r in records if r["module"] != MARKER)
    assert (load1["path"], load1["path_source"]) == (str(first), "kernel")
    assert load1["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert load1["hash_source"] == "path"  # the fd held the second file by then
    assert load2["sha256"] == hashlib.sha256(second.read_bytes()).hexdigest()
    assert load2["hash_source"] == "fd"
