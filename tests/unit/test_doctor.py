"""`modwatch doctor` on a fake tracefs tree: each check, the fields and the verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modwatch import btf, cli, doctor, tracefs
from modwatch.errors import ExitStatus
from modwatch.probes import ARCHES

SYMBOLS = (
    "__x64_sys_finit_module",
    "__x64_sys_init_module",
    "__x64_sys_delete_module",
    "__ia32_sys_finit_module",
    "__ia32_sys_init_module",
    "__ia32_sys_delete_module",
    "load_module",
    "parse_args",
    "find_module_all",
    "do_init_module",
    "security_kernel_read_file",
    "security_capable",
)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tracefs of a kernel like Debian's 6.12, root, no lockdown, no BTF."""
    root = tmp_path / "tracing"
    for event in ("module_load", "module_free"):
        (root / "events" / "module" / event).mkdir(parents=True)
    (root / "options").mkdir()
    (root / "options" / "record-tgid").write_text("0\n")
    (root / "kprobe_events").write_text("")
    (root / "README").write_text("<argname>[->field[->field|.field...]] %pd ustring $arg<N>\n")
    (root / "available_filter_functions").write_text("\n".join(SYMBOLS) + "\n")
    monkeypatch.setattr(tracefs, "find_mount", lambda: str(root))
    monkeypatch.setattr(tracefs, "lockdown_mode", lambda: "none")
    monkeypatch.setattr(tracefs, "kallsyms_text_symbols", lambda: set())
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(btf, "VMLINUX", str(tmp_path / "no-btf"))
    monkeypatch.setattr("modwatch.capture.current_arch", lambda: ARCHES["x86_64"])
    return root


def statuses(report: doctor.Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_without_btf_capture_is_degraded_and_paths_come_from_proc(fake: Path) -> None:
    report = doctor.examine()
    assert report.verdict == doctor.DEGRADED
    checks = statuses(report)
    assert checks["BTF"] == doctor.WARN
    assert checks["module_file"] == doctor.WARN
    assert checks["finit_module"] == checks["kprobe events"] == doctor.OK
    assert checks["feature BTF-typed arguments"] == doctor.INFO
    assert report.fields["path"].startswith("/proc/PID/fd/FD")
    assert report.fields["pid"] == "kernel (record-tgid), /proc"


@pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="this kernel exposes no BTF")
def test_with_btf_everything_works(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(btf, "VMLINUX", "/sys/kernel/btf/vmlinux")
    report = doctor.examine()
    assert [c for c in report.checks if c.status in (doctor.WARN, doctor.FAIL)] == []
    assert report.verdict == doctor.WORKS
    assert report.fields["path"].startswith("kernel (security_kernel_read_file")
    assert report.fields["uid"].startswith("kernel (security_capable")


def test_missing_symbol_is_degraded_missing_syscall_impossible(fake: Path) -> None:
    (fake / "available_filter_functions").write_text("\n".join(SYMBOLS[:5]) + "\n")
    report = doctor.examine()
    assert statuses(report)["delete_module (32-bit)"] == doctor.WARN
    assert report.fields["params"] == "unavailable"
    (fake / "available_filter_functions").write_text("load_module\n")
    report = doctor.examine()
    assert statuses(report)["probes"] == doctor.FAIL
    assert report.verdict == doctor.IMPOSSIBLE


def test_lockdown_and_not_root_are_impossible(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracefs, "lockdown_mode", lambda: "confidentiality")
    report = doctor.examine()
    assert statuses(report)["lockdown"] == doctor.FAIL
    assert report.verdict == doctor.IMPOSSIBLE
    assert "kprobe events" not in statuses(report)  # tracefs refuses reads: not tried
    monkeypatch.setattr(tracefs, "lockdown_mode", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(tracefs, "find_mount", lambda: None)
    report = doctor.examine()
    assert statuses(report)["privileges"] == statuses(report)["tracefs"] == doctor.FAIL


def test_kernel_without_kprobe_events_nor_syscall_tracepoints(fake: Path) -> None:
    (fake / "kprobe_events").unlink()
    report = doctor.examine()
    assert statuses(report)["kprobe events"] == doctor.WARN
    assert report.checks[-1].name == "probes"
    assert "CONFIG_KPROBE_EVENTS" in report.checks[-1].detail
    assert report.verdict == doctor.IMPOSSIBLE


def test_kernel_without_kprobe_events_falls_back_to_tracepoints(fake: Path) -> None:
    (fake / "kprobe_events").unlink()
    for name in ("finit_module", "init_module", "delete_module"):
        for side in ("enter", "exit"):
            (fake / "events" / "syscalls" / f"sys_{side}_{name}").mkdir(parents=True)
    report = doctor.examine()
    assert report.verdict == doctor.DEGRADED
    assert statuses(report)["finit_module"] == doctor.OK
    assert report.fields["params, init_ret"] == "unavailable without kprobe events"
    assert report.fields["path"].startswith("/proc/PID/fd/FD")


def test_cli_text_json_and_exit_status(fake: Path) -> None:
    result = CliRunner().invoke(cli.app, ["doctor"])
    assert result.exit_code == ExitStatus.DEGRADED
    lines = result.stdout.splitlines()
    assert lines[0] == "ok    privileges: root"
    assert "warn  module_file: struct offsets not in BTF, path from /proc/PID/fd" in lines
    assert lines[-1] == "verdict: degraded"
    result = CliRunner().invoke(cli.app, ["doctor", "--json"])
    assert result.exit_code == ExitStatus.DEGRADED
    document = json.loads(result.stdout)
    assert document["v"] == 1 and document["verdict"] == "degraded"
    assert {"check": "privileges", "status": "ok", "detail": "root"} in document["checks"]
    assert document["fields"]["params"] == "kernel (parse_args, the intact copy)"
