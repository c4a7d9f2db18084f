"""procfs: caller facts from a fake /proc tree; whatever vanished is None, never an error."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from modwatch import procfs
from modwatch.correlate import Caller
from modwatch.probes import ARCHES

STATUS = (
    "Name:\tinsmod\n"
    "Umask:\t0022\n"
    "State:\tR (running)\n"
    "Tgid:\t1200\n"
    "Ngid:\t0\n"
    "Pid:\t1234\n"
    "PPid:\t1100\n"
    "Uid:\t1000\t0\t0\t0\n"
    "Gid:\t1000\t1000\t1000\t1000\n"
    "Groups:\t4 27\n"
    "Cpus_allowed_list:\t0-3\n"
)


CONTAINER = "4f" * 32


def status(name: str, tgid: int, pid: int, ppid: int, uid: str = "1000\t0\t0\t0") -> str:
    return (
        STATUS.replace("insmod", name)
        .replace("Tgid:\t1200", f"Tgid:\t{tgid}")
        .replace("Pid:\t1234", f"Pid:\t{pid}")
        .replace("PPid:\t1100", f"PPid:\t{ppid}")
        .replace("Uid:\t1000\t0\t0\t0", f"Uid:\t{uid}")
    )


def stat(name: str, pid: int, ppid: int) -> str:
    return f"{pid} ({name}) S {ppid} {pid} {pid} 0 -1 4194560 1 0 0 0 0 0\n"


@pytest.fixture
def proc(tmp_path: Path) -> str:
    """Thread 1234 of process 1200 (insmod, in a container), which has fd 3 open on a
    module file; its parent 1100 (bash) is a child of pid 1 (init)."""
    root = tmp_path / "proc"
    (root / "1234").mkdir(parents=True)
    (root / "1234" / "status").write_text(STATUS)
    p = root / "1200"
    (p / "fd").mkdir(parents=True)
    (p / "status").write_text(status("insmod", 1200, 1200, 1100))
    os.symlink("/lib/modules/6.1.0/extra/mwtest.ko", p / "fd" / "3")
    os.symlink("/home/u/my module\n.ko (deleted)", p / "fd" / "4")
    os.symlink("/usr/sbin/insmod", p / "exe")
    (p / "loginuid").write_text("1000")
    (p / "cmdline").write_bytes(b"insmod\0/x y.ko\0note=a b\0")
    (p / "cgroup").write_text(f"0::/system.slice/docker-{CONTAINER}.scope\n")
    for pid, name, ppid in ((1100, "bash", 1), (1, "init", 0)):
        (root / str(pid)).mkdir()
        (root / str(pid) / "stat").write_text(stat(name, pid, ppid))
    return str(root)


def caller_1200(**changes: Any) -> Caller:
    facts = Caller(
        1200,
        1000,
        "/lib/modules/6.1.0/extra/mwtest.ko",
        ppid=1100,
        euid=0,
        loginuid=1000,
        exe="/usr/sbin/insmod",
        cmdline=["insmod", "/x y.ko", "note=a b"],
        cgroup=f"/system.slice/docker-{CONTAINER}.scope",
        container=CONTAINER,
        ancestry=[{"pid": 1100, "name": "bash"}, {"pid": 1, "name": "init"}],
        gone=False,
    )
    return facts._replace(**changes)


def test_read_status(proc: str) -> None:
    # Only the fields modwatch uses.
    assert procfs.read_status(1234, proc) == {
        "Name": "insmod",
        "Tgid": "1200",
        "PPid": "1100",
        "Uid": "1000\t0\t0\t0",
    }


def test_read_status_of_a_gone_thread(proc: str) -> None:
    assert procfs.read_status(99999, proc) == {}


def test_read_status_value_with_a_colon(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\ta:b\nTgid:\t7\nno colon line\nPPid:\t1")
    assert procfs.read_status(7, str(tmp_path)) == {"Name": "a:b", "Tgid": "7", "PPid": "1"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1100 (bash) S 1 1100 1100 0 -1 4194560\n", ("bash", 1)),
        ("7 (a) (b)) R 5 7 7\n", ("a) (b)", 5)),  # the last ")" ends the name
        ("7 (x", None),
    ],
)
def test_read_stat(tmp_path: Path, text: str, expected: tuple[str, int] | None) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_text(text)
    assert procfs.read_stat(7, str(tmp_path)) == expected
    assert procfs.read_stat(8, str(tmp_path)) is None


def test_fd_path(proc: str) -> None:
    assert procfs.fd_path(1200, 3, proc) == "/lib/modules/6.1.0/extra/mwtest.ko"
    assert procfs.fd_path(1200, 4, proc) == "/home/u/my module\n.ko (deleted)"


@pytest.mark.parametrize(("pid", "fd"), [(1200, 9), (99999, 3), (1200, -1)])
def test_fd_path_gone_is_none(proc: str, pid: int, fd: int) -> None:
    assert procfs.fd_path(pid, fd, proc) is None


def test_caller_reads_the_fd_of_the_process_not_the_thread(proc: str) -> None:
    # Real uid (first of four): 1000, though the effective uid is 0.
    assert procfs.caller(1234, 3, proc) == caller_1200()


def test_caller_without_fd(proc: str) -> None:
    assert procfs.caller(1234, None, proc) == caller_1200(path=None)


def test_caller_fd_closed(proc: str) -> None:
    assert procfs.caller(1234, 5, proc) == caller_1200(path=None)


def test_caller_thread_gone(proc: str) -> None:
    assert procfs.caller(4321, 3, proc) == Caller(None, None, None, gone=True)


def test_caller_whose_status_vanished_still_tries_the_fd_by_tid(tmp_path: Path) -> None:
    (tmp_path / "55" / "fd").mkdir(parents=True)
    os.symlink("/x.ko", tmp_path / "55" / "fd" / "3")
    assert procfs.caller(55, 3, str(tmp_path)) == Caller(None, None, "/x.ko", gone=True)


def test_caller_facts_that_cannot_be_had_say_why(proc: str) -> None:
    p = Path(proc) / "1200"
    (p / "loginuid").write_text("4294967295")
    (p / "exe").unlink()
    (p / "cmdline").write_bytes(b"")  # a kernel thread, or a zombie
    (p / "cgroup").write_text("12:cpu,cpuacct:/user.slice\n")  # cgroup v1 only
    (Path(proc) / "1" / "stat").unlink()  # gone while the chain was read
    assert procfs.caller(1234, 3, proc) == caller_1200(
        loginuid=None,
        exe=None,
        cmdline=[],
        cgroup=None,
        container=None,
        ancestry=[{"pid": 1100, "name": "bash"}],
        reasons={
            "loginuid": "unset: not from a login session",
            "exe": "No such file or directory",
            "cgroup": "no unified (cgroup v2) hierarchy",
        },
    )


def test_ancestry_stops_at_a_cycle(proc: str) -> None:
    (Path(proc) / "1" / "stat").write_text(stat("init", 1, 1100))
    assert procfs.ancestry(1100, proc) == [
        {"pid": 1100, "name": "bash"},
        {"pid": 1, "name": "init"},
    ]


@pytest.mark.parametrize(
    ("cgroup", "container"),
    [
        (f"/system.slice/docker-{CONTAINER}.scope", CONTAINER),
        (f"/docker/{CONTAINER}", CONTAINER),
        (f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{CONTAINER}.scope", CONTAINER),
        (f"/machine.slice/libpod-{CONTAINER}.scope/container", CONTAINER),
        ("/user.slice/user-1000.slice/session-3.scope", None),
        (f"/x/{CONTAINER[:-1]}", None),  # 63 digits
        ("/", None),
    ],
)
def test_container_id(cgroup: str, container: str | None) -> None:
    assert procfs.container_id(cgroup) == container


def test_proc_enricher_records_what_it_read(proc: str) -> None:
    seen: list[tuple[int, int, Caller]] = []
    enricher = procfs.ProcEnricher(
        proc, record=lambda tid, ts, facts: seen.append((tid, ts, facts))
    )
    facts = enricher.caller(1234, 248_977_428, 3)
    assert facts == caller_1200()
    assert seen == [(1234, 248_977_428, facts)]
    assert enricher.caller(77, 5, None) == Caller(None, None, None, gone=True)
    assert seen[-1] == (77, 5, Caller(None, None, None, gone=True))


def test_proc_enricher_asks_the_kernels_map_for_the_pid_of_a_caller_gone() -> None:
    asked: list[int] = []

    def tgid_of(tid: int, gone_at: float) -> int | None:
        assert gone_at <= time.monotonic()  # when /proc was asked, before the answer
        asked.append(tid)
        return {77: 70}.get(tid)

    seen: list[Caller] = []
    enricher = procfs.ProcEnricher(
        "/nonexistent", record=lambda tid, ts, facts: seen.append(facts), tgid_of=tgid_of
    )
    assert enricher.caller(77, 5, None) == Caller(70, None, None, gone=True)
    assert enricher.caller(78, 6, None) == Caller(None, None, None, gone=True)
    assert seen == [Caller(70, None, None, gone=True), Caller(None, None, None, gone=True)]
    assert asked == [77, 78]


def test_proc_enricher_does_not_ask_the_map_for_a_caller_still_there(proc: str) -> None:
    enricher = procfs.ProcEnricher(proc, tgid_of=lambda tid, at: pytest.fail("asked"))
    assert enricher.caller(1234, 248_977_428, 3) == caller_1200()


@pytest.mark.parametrize(
    ("text", "nr"),
    [
        ("313 0x3 0x55aae7f7c2a0 0x0 0x0 0x0 0x0 0x7ffd1c0 0x7f11\n", 313),
        ("-1 0x7ffd1c0 0x7f11\n", -1),
        ("running\n", "running"),
        ("", None),
    ],
)
def test_syscall_nr(tmp_path: Path, text: str, nr: int | str | None) -> None:
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "syscall").write_text(text)
    assert procfs.syscall_nr(9, str(tmp_path)) == nr
    assert procfs.syscall_nr(10, str(tmp_path)) is None  # gone


@pytest.mark.parametrize(
    ("text", "syscall", "compat", "inside"),
    [
        ("313 0x3 0x0 0x0\n", "finit_module", False, True),
        ("350 0x3 0x0 0x0\n", "finit_module", True, True),
        ("313 0x3 0x0 0x0\n", "finit_module", True, False),  # 313 is another 32-bit call
        ("176 0x1000 0x800\n", "delete_module", False, True),
        ("175 0x1000 0x10 0x0\n", "delete_module", False, False),
        ("-1 0x7ffd1c0 0x7f11\n", "init_module", False, False),
        ("running\n", "finit_module", False, None),
        (None, "finit_module", False, False),  # the thread is gone
    ],
)
def test_in_call_checker_on_x86_64(
    tmp_path: Path, text: str | None, syscall: str, compat: bool, inside: bool | None
) -> None:
    if text is not None:
        (tmp_path / "9").mkdir()
        (tmp_path / "9" / "syscall").write_text(text)
    in_call = procfs.in_call_checker(ARCHES["x86_64"], str(tmp_path))
    assert in_call(9, syscall, compat) is inside


def test_arm64_syscall_numbers() -> None:
    arm64 = ARCHES["aarch64"]
    assert [
        arm64.syscall_nr(s, False) for s in ("init_module", "delete_module", "finit_module")
    ] == [105, 106, 273]
    assert arm64.syscall_nr("finit_module", True) == 379


def test_ancestry_cache_reuses_a_chain_for_its_ttl(proc: str) -> None:
    now = [100.0]
    cache = procfs.AncestryCache(proc, ttl=1.0, clock=lambda: now[0])
    chain = [{"pid": 1100, "name": "bash"}, {"pid": 1, "name": "init"}]
    assert cache(1100) == chain
    (Path(proc) / "1100" / "stat").write_text(stat("zsh", 1100, 1))  # the parent exec'd
    now[0] += 0.5
    assert cache(1100) == chain  # within the TTL: as read
    now[0] += 0.6
    assert cache(1100) == [{"pid": 1100, "name": "zsh"}, {"pid": 1, "name": "init"}]
    assert cache(None) == [] and cache(0) == []
    assert cache(4242) == []  # gone: an empty chain, cached like any other


def test_proc_enricher_reads_an_ancestry_once_per_ttl(proc: str) -> None:
    enricher = procfs.ProcEnricher(proc)
    enricher.ancestors.clock = lambda: 5.0  # no time passes
    first = enricher.caller(1234, 1, None)
    (Path(proc) / "1100" / "stat").unlink()
    assert enricher.caller(1234, 2, None).ancestry == first.ancestry == caller_1200().ancestry
    assert procfs.caller(1234, None, proc).ancestry == []  # read afresh without a cache
