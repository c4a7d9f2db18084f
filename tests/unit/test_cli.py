"""cli: the command line, with exit status, stdout and stderr checked separately."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from modwatch import btf, capture, cli, output, tracefs
from modwatch.cli import app
from modwatch.errors import ExitStatus, ModwatchError
from modwatch.probes import ARCHES
from modwatch.tracefile import TraceWriter

from . import kernel_text as kt

FIXTURE = str(kt.TRACE_FIXTURE)
JSONL = kt.JSONL_FIXTURE.read_text()
RECORDS = JSONL.splitlines(keepends=True)
# The fixture's probes, but without BTF (as these tests run): no name at do_init_module.
DEFINITIONS = [
    line.removeprefix("# probe: ").removesuffix(" name=+24(%di):string")
    # load_module's flags were fetched after the fixture was captured.
    + (" flags=%dx:x32" if line.endswith("_load_module load_module") else "")
    for line in kt.TRACE_FIXTURE.read_text().splitlines()
    if line.startswith("# probe: ")
]
# What each instance enables: the syscalls in the main one, the rest in the rare one.
SYSCALL_EVENTS = " ".join(
    f"{kt.GROUP}:mw{kt.TOKEN}_{call}{suffix}"
    for call in ("finit_module", "init_module", "delete_module")
    for suffix in ("", "_ret", "32", "_ret32")
)
RARE_EVENTS = (
    " ".join(
        f"{kt.GROUP}:mw{kt.TOKEN}_{kind}"
        for kind in ("load_module", "module_params", "find_module", "do_init_module")
    )
    + f" {kt.GROUP}:mw{kt.TOKEN}_do_init_module_ret"
)
INSTANCES = (
    f"# probe group: {kt.GROUP}; instances: {kt.GROUP}, and {kt.GROUP}_rare for the rare events"
)


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """The installed entry point: ModwatchError becomes one stderr line and its status."""
    monkeypatch.setattr(sys, "argv", ["modwatch", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out, err = capsys.readouterr()
    code = exit_.value.code
    assert isinstance(code, int)
    return code, out, err


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def fixed_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """x86_64, and the fixture's group name, whatever machine runs the tests."""
    monkeypatch.setattr(capture, "current_arch", lambda: ARCHES["x86_64"])
    monkeypatch.setattr(cli, "new_group", lambda pid: kt.GROUP)
    monkeypatch.setattr(btf, "VMLINUX", "/nonexistent/vmlinux")


# -- capture --dry-run ------------------------------------------------------------------


# As Debian's 6.1 and 6.12 have it (fields elided).
MODULE_LOAD_FORMAT = """name: module_load
ID: 395
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;

\tfield:unsigned int taints;\toffset:8;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:12;\tsize:4;\tsigned:0;

print fmt: "%s %s", __get_str(name), __print_flags(REC->taints, "", { (1UL << 0), "P" }, \
{ (1UL << 12), "O" }, { (1UL << 1), "F" }, { (1UL << 10), "C" }, { (1UL << 13), "E" })
""".replace("\\\n", "")


def test_dry_run_checked_against_a_fake_tracefs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixed_plan: None
) -> None:
    root = tmp_path / "tracing"
    (root / "events" / "module" / "module_load").mkdir(parents=True)
    (root / "events" / "module" / "module_load" / "format").write_text(MODULE_LOAD_FORMAT)
    (root / "kprobe_events").write_text("")
    (root / "available_filter_functions").write_text(
        "__x64_sys_finit_module\n__x64_sys_init_module\n__x64_sys_delete_module\n"
        "load_module\nparse_args\nfind_module_all\ndo_init_module\nmwtest_init [mwtest]\n"
    )
    opened: list[str] = []

    def open_fake() -> tracefs.Tracefs:
        opened.append(str(root))
        return tracefs.Tracefs(str(root))

    monkeypatch.setattr(capture, "open_tracefs", open_fake)
    monkeypatch.setattr(
        tracefs,
        "kallsyms_text_symbols",
        lambda: {"__ia32_sys_finit_module", "__ia32_sys_init_module", "__ia32_sys_delete_module"},
    )
    result = run("capture", "--dry-run")
    assert result.exit_code == 0
    assert result.stderr == ""
    aff, kall = "(available_filter_functions)", "(/proc/kallsyms)"
    assert result.stdout == "\n".join(
        [
            INSTANCES,
            "# BTF: none (cannot read /nonexistent/vmlinux: No such file or directory): "
            "no struct offsets",
            f"# finit_module: __x64_sys_finit_module {aff}",
            f"# finit_module (32-bit): __ia32_sys_finit_module {kall}",
            f"# init_module: __x64_sys_init_module {aff}",
            f"# init_module (32-bit): __ia32_sys_init_module {kall}",
            f"# delete_module: __x64_sys_delete_module {aff}",
            f"# delete_module (32-bit): __ia32_sys_delete_module {kall}",
            "# module.name: not in BTF, no name from do_init_module",
            f"# load_module: load_module {aff}",
            f"# module_params: parse_args {aff}",
            f"# find_module: find_module_all {aff}",
            f"# do_init_module: do_init_module {aff}",
            f"# do_init_module_ret: do_init_module {aff}",
            "# module_file: struct offsets not in BTF, path from /proc/PID/fd",
            "# caller_cred: cred offsets not in BTF, uid from /proc",
            "# module_load: tracepoint module:module_load",
            "# module_free: tracepoint module:module_free not found, no module frees",
            "# module:module_load: print format as known ('%s %s')",
            *DEFINITIONS,
            f"# enable in {kt.GROUP}: {SYSCALL_EVENTS}",
            f"# enable in {kt.GROUP}_rare: {RARE_EVENTS} module:module_load",
            "",
        ]
    )
    assert opened == [str(root)]


def test_dry_run_without_tracefs_prints_unchecked_defaults(
    monkeypatch: pytest.MonkeyPatch, fixed_plan: None
) -> None:
    def refuse() -> tracefs.Tracefs:
        raise ModwatchError("modwatch: capture needs root", ExitStatus.NOT_ROOT)

    monkeypatch.setattr(capture, "open_tracefs", refuse)
    result = run("capture", "--dry-run")
    assert result.exit_code == 0
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        INSTANCES,
        "# not checked against the running kernel: capture needs root",
        "# BTF: none (cannot read /nonexistent/vmlinux: No such file or directory): "
        "no struct offsets",
        "# finit_module: __x64_sys_finit_module (unchecked)",
    ]
    assert [line for line in lines if not line.startswith("#")] == DEFINITIONS
    assert lines[-2:] == [
        f"# enable in {kt.GROUP}: {SYSCALL_EVENTS}",
        f"# enable in {kt.GROUP}_rare: {RARE_EVENTS} module:module_load module:module_free",
    ]


# -- events, version, help --------------------------------------------------------------


def test_events_lists_finit_module_with_its_tags() -> None:
    result = run("events")
    assert result.exit_code == 0
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    start = lines.index("finit_module  (kprobe __x64_sys_finit_module / __ia32_sys_finit_module)")
    assert lines[start + 1] == "    a finit_module(2) call starts (before the permission check)"
    assert lines[start + 2] == (
        "    fd             int                      U         file descriptor of the module file"
    )
    assert lines[start + 3].startswith(
        "    param_values   const char * (address)   U,TOCTOU  address of the parameter string"
    )
    assert (
        lines[start + 4]
        == "    flags          int                      U         MODULE_INIT_* flags"
    )
    assert lines[start + 5] == (
        "    comm           string                   K         caller's task name ($comm), exact"
    )
    assert lines[start + 6] == ""
    assert (
        "    params         string                   K,OPT     "
        "parameter string, the kernel's intact copy" in lines
    )
    assert sum(1 for line in lines if line and not line.startswith(" ")) == 15


def test_version() -> None:
    result = run("version")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "0.1.0\n", "")


def test_help_documents_every_exit_status() -> None:
    result = run("--help")
    assert result.exit_code == 0
    documented = [line.split(":")[0] for line in result.stdout.splitlines() if line[2:3].isdigit()]
    assert documented == [f"  {int(status)}" for status in ExitStatus]


def test_bad_format_is_a_usage_error() -> None:
    result = run("capture", "--replay", FIXTURE, "--format", "xml")
    assert result.exit_code == ExitStatus.USAGE
    assert result.stdout == ""
    assert "Invalid value for '--format'" in result.stderr


# -- capture --replay -------------------------------------------------------------------


def test_replay_prints_the_fixture_records_as_jsonl() -> None:
    result = run("capture", "--replay", FIXTURE)
    assert result.exit_code == 0
    assert result.stdout == JSONL
    assert result.stderr == ""


def table_of_the_fixture(columns: tuple[str, ...] = output.DEFAULT_COLUMNS) -> str:
    """What TableWriter makes of the fixture's records (tests/unit/test_output.py checks
    that text itself)."""
    stream = io.StringIO()
    writer = output.TableWriter(stream, columns=columns)
    for line in JSONL.splitlines():
        writer.write(json.loads(line))
    return stream.getvalue()


def test_replay_as_a_table(utc: None) -> None:
    result = run("capture", "--replay", FIXTURE, "--format", "table")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert result.stdout == table_of_the_fixture()


@pytest.mark.parametrize(
    ("options", "columns"),
    [
        (["-U"], ("time", "pid", "uid", "comm", "call", "module", "result", "params", "path")),
        (["--columns", "module,sha256, signed"], ("module", "sha256", "signed")),
        (["-U", "--columns", "pid,module"], ("pid", "uid", "module")),
        (["--print-uid", "--columns", "module"], ("uid", "module")),
    ],
)
def test_table_columns(utc: None, options: list[str], columns: tuple[str, ...]) -> None:
    result = run("capture", "--replay", FIXTURE, "--format", "table", *options)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == table_of_the_fixture(columns)


@pytest.mark.parametrize(("columns", "named"), [("module,nope", "nope"), (",", "(none given)")])
def test_unknown_table_column_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], columns: str, named: str
) -> None:
    status, out, err = run_main(
        monkeypatch,
        capsys,
        "capture",
        "--replay",
        FIXTURE,
        "--format",
        "table",
        "--columns",
        columns,
    )
    assert (status, out) == (2, "")
    assert err.startswith(f"modwatch: unknown column {named}: choose from time, pid, tid,")


def test_replay_failed_only() -> None:
    result = run("capture", "-x", "--replay", FIXTURE)
    assert result.exit_code == 0
    assert result.stdout == "".join([RECORDS[1], RECORDS[3], RECORDS[4]])
    assert result.stderr == ""


@pytest.mark.parametrize(("pid", "lines"), [("246", [2]), ("244", [0]), ("9999", [])])
def test_replay_pid(pid: str, lines: list[int]) -> None:
    result = run("capture", "-p", pid, "--replay", FIXTURE)
    assert result.exit_code == 0
    assert result.stdout == "".join(RECORDS[i] for i in lines)


def test_replay_failed_and_pid() -> None:
    result = run("capture", "--failed", "--pid", "247", "--replay", FIXTURE)
    assert result.stdout == RECORDS[3]


def test_replay_raw() -> None:
    result = run("capture", "--raw", "--replay", FIXTURE)
    assert result.exit_code == 0
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 27
    assert [e["event"] for e in events[:3]] == ["finit_module", "load_module", "find_module"]


def test_replay_count() -> None:
    result = run("capture", "-n", "2", "--replay", FIXTURE)
    assert result.exit_code == 0
    assert result.stdout == "".join(RECORDS[:2])


def test_replay_to_an_output_file(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    result = run("capture", "--replay", FIXTURE, "-o", str(out))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    assert out.read_text() == JSONL


def test_replay_reports_lost_and_unparsed_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with open(path, "w") as stream:
        writer = TraceWriter(stream, kt.probe_set(), 0)
        writer.text(
            "stray text\n"
            + kt.line("finit_module_ret", {"ret": -1}, task="x", tid=3, ts_us=1_000_000)
            + "CPU:1 [LOST 9 EVENTS]\n"
            + kt.line("finit_module_ret", {"ret": -1}, task="x", tid=4, ts_us=2_000_000)
        )
    result = run("capture", "--replay", str(path))
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["type"] for r in records] == ["load", "lost", "load"]
    assert records[1] == {
        "v": 1,
        "type": "lost",
        "time": "1970-01-01T00:00:01.000000Z",
        "cpu": 1,
        "count": 9,
    }
    assert result.stderr == (
        "modwatch: warning: lost 9 events on CPU 1 (the kernel's buffer overran)\n"
        "modwatch: 1 lines of trace text could not be parsed: 'stray text'\n"
        "modwatch: 9 events lost in all (kernel buffer overruns)\n"
    )


def test_replay_of_a_non_trace_file_raises_bad_trace_file(tmp_path: Path) -> None:
    result = run("capture", "--replay", str(kt.JSONL_FIXTURE))
    assert isinstance(result.exception, ModwatchError)
    assert result.exception.status == ExitStatus.BAD_TRACE_FILE
    assert result.stdout == ""


def test_main_replay_of_a_non_trace_file_exits_10_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MODWATCH_DEBUG", raising=False)
    code, out, err = run_main(monkeypatch, capsys, "capture", "--replay", str(kt.JSONL_FIXTURE))
    assert code == 10
    assert out == ""
    assert err == (
        f"modwatch: {kt.JSONL_FIXTURE} is not a modwatch trace (no '# modwatch trace v1' line): "
        "record one with --save-trace\n"
    )


def test_main_replay_of_a_missing_file_exits_10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MODWATCH_DEBUG", raising=False)
    missing = tmp_path / "missing.trace"
    code, out, err = run_main(monkeypatch, capsys, "capture", "--replay", str(missing))
    assert (code, out) == (10, "")
    assert err == f"modwatch: cannot read {missing}: No such file or directory\n"


def test_main_unwritable_output_exits_8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MODWATCH_DEBUG", raising=False)
    target = tmp_path / "no" / "such" / "dir.jsonl"
    code, out, err = run_main(
        monkeypatch, capsys, "capture", "--replay", FIXTURE, "-o", str(target)
    )
    assert (code, out) == (8, "")
    assert err == (
        f"modwatch: cannot write {target}: No such file or directory: choose another --output\n"
    )


def test_main_replay_ok_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    copy = tmp_path / "copy.trace"
    shutil.copy(FIXTURE, copy)
    code, out, err = run_main(monkeypatch, capsys, "capture", "--replay", str(copy))
    assert (code, out, err) == (0, JSONL, "")


def test_the_module_entry_point_runs() -> None:
    # The kernel tests run the CLI in forked children; this is the `python -m` path.
    proc = subprocess.run(
        [sys.executable, "-m", "modwatch", "capture", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "--dry-run" in proc.stdout and "-- COMMAND" in proc.stdout
    assert proc.stderr == ""
