"""The kernel this runs on, when it is one without kprobe events (as the build hosts'
kernel is): modwatch must say so, with its own status, and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modwatch import tracefs
from modwatch.errors import ExitStatus

ROOT = tracefs.find_mount()


@pytest.mark.skipif(
    os.geteuid() != 0 or ROOT is None or Path(ROOT, "kprobe_events").exists(),
    reason="needs root and a mounted tracefs on a kernel without kprobe events",
)
def test_kernel_without_kprobe_events_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modwatch", "capture", "-d", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ExitStatus.NO_KPROBES
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "CONFIG_KPROBE_EVENTS" in proc.stderr
    assert not any(n.startswith("modwatch_") for n in os.listdir(Path(str(ROOT), "instances")))


@pytest.mark.skipif(
    os.geteuid() != 0 or ROOT is None or Path(ROOT, "kprobe_events").exists(),
    reason="needs root and a mounted tracefs on a kernel without kprobe events",
)
def test_doctor_says_why_capture_cannot_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modwatch", "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ExitStatus.IMPOSSIBLE, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "ok    privileges: root"
    assert any(
        line.startswith("warn  kprobe events:") and "CONFIG_KPROBE_EVENTS" in line for line in lines
    )
    # Nor the module syscalls' tracepoints: this kernel has no modules at all.
    assert any(line.startswith("fail  probes:") for line in lines)
    assert lines[-1] == "verdict: impossible"
