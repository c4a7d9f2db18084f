"""procfs: caller facts from a fake /proc tree; whatever vanished is None, never an error."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture
def proc(tmp_path: Path) -> str:
    """Thread 1234 of process 1200, which has fd 3 open on a module file."""
    root = tmp_path / "proc"
    (root / "1234").mkdir(parents=True)
    (root / "1234" / "status").write_text(STATUS)
    (root / "1200" / "fd").mkdir(parents=True)
    (root / "1200" / "status").write_text(STATUS.replace("Pid:\t1234", "Pid:\t1200"))
    os.symlink("/lib/modules/6.1.0/extra/mwtest.ko", root / "1200" / "fd" / "3")
    os.symlink("/home/u/my module\n.ko (deleted)", root / "1200" / "fd" / "4")
    return str(root)


def test_read_status(proc: str) -> None:
    status = procfs.read_status(1234, proc)
    assert status["Name"] == "insmod"
    assert status["Tgid"] == "1200"
    assert status["Uid"] == "1000\t0\t0\t0"
    assert status["State"] == "R (running)"
    assert status["Cpus_allowed_list"] == "0-3"
    assert len(status) == 11


def test_read_status_of_a_gone_thread(proc: str) -> None:
    assert procfs.read_status(99999, proc) == {}


def test_read_status_value_with_a_colon(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Name:\ta:b\nTgid:\t7\nno colon line\n")
    assert procfs.read_status(7, str(tmp_path)) == {"Name": "a:b", "Tgid": "7"}


def test_fd_path(proc: str) -> None:
    assert procfs.fd_path(1200, 3, proc) == "/lib/modules/6.1.0/extra/mwtest.ko"
    assert procfs.fd_path(1200, 4, proc) == "/home/u/my module\n.ko (deleted)"


@pytest.mark.parametrize(("pid", "fd"), [(1200, 9), (99999, 3), (1200, -1)])
def test_fd_path_gone_is_none(proc: str, pid: int, fd: int) -> None:
    assert procfs.fd_path(pid, fd, proc) is None


def test_caller_reads_the_fd_of_the_process_not_the_thread(proc: str) -> None:
    # Real uid (first of four): 1000, though the effective uid is 0.
    assert procfs.caller(1234, 3, proc) == Caller(1200, 1000, "/lib/modules/6.1.0/extra/mwtest.ko")


def test_caller_without_fd(proc: str) -> None:
    assert procfs.caller(1234, None, proc) == Caller(1200, 1000, None)


def test_caller_fd_closed(proc: str) -> None:
    assert procfs.caller(1234, 5, proc) == Caller(1200, 1000, None)


def test_caller_thread_gone(proc: str) -> None:
    assert procfs.caller(4321, 3, proc) == Caller(None, None, None)


def test_caller_whose_status_vanished_still_tries_the_fd_by_tid(tmp_path: Path) -> None:
    (tmp_path / "55" / "fd").mkdir(parents=True)
    os.symlink("/x.ko", tmp_path / "55" / "fd" / "3")
    assert procfs.caller(55, 3, str(tmp_path)) == Caller(None, None, "/x.ko")


def test_proc_enricher_records_what_it_read(proc: str) -> None:
    seen: list[tuple[int, int, Caller]] = []
    enricher = procfs.ProcEnricher(
        proc, record=lambda tid, ts, facts: seen.append((tid, ts, facts))
    )
    facts = enricher.caller(1234, 248_977_428, 3)
    assert facts == Caller(1200, 1000, "/lib/modules/6.1.0/extra/mwtest.ko")
    assert seen == [(1234, 248_977_428, facts)]
    assert enricher.caller(1, 5, None) == Caller(None, None, None)
    assert seen[-1] == (1, 5, Caller(None, None, None))


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
