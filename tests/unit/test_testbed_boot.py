"""scripts/testbed.py: which dead guests are booted once more (a fake boot: no QEMU)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import testbed


def fake_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcomes: list[tuple[int | None, str, bool]]
) -> list[int]:
    """boot_once gives, in turn, runs with (status, console text, stdout written)."""
    booted: list[int] = []

    def boot_once(
        kernel: Any,
        command: str,
        timeout: float,
        stream: str | None,
        append: Any = (),
        cpus: int = testbed.EXEC_CPUS,
    ) -> Any:
        status, console, started = outcomes[len(booted)]
        directory = tmp_path / f"run{len(booted)}"
        (directory / "results").mkdir(parents=True)
        (directory / "console.log").write_text(console)
        if started:
            (directory / "results" / "stdout").write_text("")
        booted.append(len(booted))
        return testbed.GuestRun(None, status, False, directory, 1.0)  # type: ignore[arg-type]

    monkeypatch.setattr(testbed, "boot_once", boot_once)
    monkeypatch.setattr(testbed, "log", lambda message: None)
    return booted


OOPS = "[  268.733240] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\nRIP: 0010:__schedule+0x339\n"
PANIC = "[  12.0] BUG: kernel NULL pointer dereference\nKernel panic - not syncing\n"


@pytest.mark.parametrize(
    ("outcomes", "boots", "status"),
    [
        ([(0, "", True)], 1, 0),  # a normal run
        ([(1, "", True)], 1, 1),  # failed tests: not booted again
        ([(None, "", False), (0, "", True)], 2, 0),  # died before the command started
        ([(None, OOPS, True), (0, "", True)], 2, 0),  # the emulator's int3 oops mid-run
        ([(None, OOPS, True), (None, OOPS, True)], 2, None),  # twice: a failure
        ([(None, PANIC, True)], 1, None),  # any other death: a failure
    ],
)
def test_which_dead_guests_boot_again(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outcomes: list[tuple[int | None, str, bool]],
    boots: int,
    status: int | None,
) -> None:
    booted = fake_runs(tmp_path, monkeypatch, outcomes)
    kernel = SimpleNamespace(release="6.12.0-test")
    run = testbed.boot(kernel, "true", 60)  # type: ignore[arg-type]
    assert (len(booted), run.status) == (boots, status)


def run_tests_with(monkeypatch: pytest.MonkeyPatch, boot: Any, pytest_args: list[str]) -> int:
    """run_tests on both series, with `boot` in place of booting a guest."""
    monkeypatch.setattr(testbed, "boot", boot)
    monkeypatch.setattr(testbed, "compile_on_host", lambda args: None)
    monkeypatch.setattr(testbed, "log", lambda message: None)
    kernels = [
        testbed.Kernel("6.1", "linux-image-6.1.0-56-amd64", "1"),
        testbed.Kernel("6.12", "linux-image-6.12.117+deb12-amd64", "1"),
    ]
    return testbed.run_tests(kernels, pytest_args)


@pytest.mark.parametrize(
    ("pytest_args", "expected"),
    [
        ([], ["6.1 kernel", "6.12 kernel", "6.12 lockdown lockdown=confidentiality"]),
        (["-k", "stalled"], ["6.1 kernel", "6.12 kernel"]),
    ],
)
def test_a_full_run_boots_the_newest_kernel_locked_down_too(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    pytest_args: list[str],
    expected: list[str],
) -> None:
    booted: list[str] = []
    cpus_of_guests: set[int] = set()

    def boot(
        kernel: Any, command: str, timeout: float, stream: str, append: Any = (), cpus: int = 0
    ) -> Any:
        markers = command.rsplit(" -m ", 1)[1].split(" ", 1)[0]
        booted.append(" ".join([kernel.series, markers, *append]))
        cpus_of_guests.add(cpus)
        directory = tmp_path / f"run{len(booted)}"
        (directory / "results").mkdir(parents=True)
        (directory / "results" / "junit.xml").write_text(
            '<testsuite><testcase file="tests/kernel/t.py" name="test_x"/></testsuite>'
        )
        return testbed.GuestRun(kernel, 0, False, directory, 1.0)

    assert run_tests_with(monkeypatch, boot, pytest_args) == 0
    assert sorted(booted) == expected
    assert cpus_of_guests == {testbed.TEST_CPUS}
    summary = capsys.readouterr().out
    assert f"testbed: {len(expected)} passed, 0 failed" in summary


def test_the_locked_down_boot_waits_for_a_full_run_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two slots and three guests: the short locked-down boot must not make a full run wait."""
    events: list[str] = []
    lock = threading.Lock()

    def boot(
        kernel: Any, command: str, timeout: float, stream: str, append: Any = (), cpus: int = 0
    ) -> Any:
        label = kernel.series + (" lockdown" if append else "")
        with lock:
            events.append(f"start {label}")
        if not append:
            time.sleep(0.3 if kernel.series == "6.12" else 0.6)
        with lock:
            events.append(f"end {label}")
        directory = tmp_path / label.replace(" ", "-")
        (directory / "results").mkdir(parents=True)
        (directory / "results" / "junit.xml").write_text("<testsuite/>")
        return testbed.GuestRun(kernel, 0, False, directory, 1.0)

    monkeypatch.setattr(testbed.os, "cpu_count", lambda: 2)
    assert run_tests_with(monkeypatch, boot, []) == 0
    assert events.index("start 6.12 lockdown") > events.index("end 6.12")
    assert events.index("end 6.1") > events.index("start 6.12 lockdown")
    assert "6.12+lockdown" in capsys.readouterr().out
