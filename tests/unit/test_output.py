"""output: JSON Lines and the table, both safe whatever bytes a name holds."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modwatch import output
from modwatch.correlate import RECORD_KEYS
from modwatch.output import JsonlWriter, TableWriter

from . import kernel_text as kt


def fixture_records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in kt.JSONL_FIXTURE.read_text().splitlines()]


def record(**changes: Any) -> dict[str, Any]:
    base = fixture_records()[0]
    assert tuple(base) == RECORD_KEYS
    return {**base, **changes}


# -- JSON Lines -------------------------------------------------------------------------


def test_jsonl_is_the_fixture_byte_for_byte() -> None:
    stream = io.BytesIO()
    writer = JsonlWriter(stream)
    for rec in fixture_records():
        writer.write(rec)
    writer.close()
    assert stream.getvalue() == kt.JSONL_FIXTURE.read_bytes()


def test_one_line_per_record_even_with_newlines_in_strings() -> None:
    line = output.dumps(record(comm="a\nb", params='x="1\n2"'))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line)["comm"] == "a\nb"


def test_bytes_that_are_not_utf8_are_escaped_reversibly_and_listed() -> None:
    raw = b"mw\xfftest\xc3".decode("utf-8", "surrogateescape")
    rec = record(comm=raw, params="é=\udc80 a\\x41", taints=["O", "\udcfe"], path="/ok\\x")
    line = output.dumps(rec)
    back = json.loads(line.decode("utf-8"))  # strict: raises if not valid UTF-8
    assert back["comm"] == "mw\\xfftest\\xc3"
    assert back["params"] == "é=\\x80 a\\\\x41"  # the literal backslash is doubled
    assert back["taints"] == ["O", "\\xfe"]
    assert back["path"] == "/ok\\x"  # valid UTF-8: as it is, not listed
    assert back["escaped"] == ["comm", "params", "taints"]
    assert output.unescape(back["params"]) == "é=\udc80 a\\x41".encode("utf-8", "surrogateescape")
    assert list(back) == list(RECORD_KEYS)


def test_valid_records_are_not_escaped() -> None:
    back = json.loads(output.dumps(record(params="a\\x41")))
    assert (back["params"], back["escaped"]) == ("a\\x41", None)


def test_raw_event_args_with_surrogates() -> None:
    rec = {"v": 1, "type": "event", "args": {"comm": "\udcff", "fd": 3}, "escaped": None}
    assert json.loads(output.dumps(rec)) == {
        "v": 1,
        "type": "event",
        "args": {"comm": "\\xff", "fd": 3},
        "escaped": ["args.comm"],
    }


@given(st.binary(max_size=64))
def test_escape_round_trips_any_bytes(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    escaped = output.escape(text)
    escaped.encode("utf-8")  # valid UTF-8 whatever the bytes
    assert output.unescape(escaped) == data


def test_valid_non_ascii_is_kept_as_is() -> None:
    assert json.loads(output.dumps(record(comm="naïve€")))["comm"] == "naïve€"


# -- table ------------------------------------------------------------------------------

HEADER = (
    "TIME            PID     COMM            CALL   MODULE          RESULT       "
    "PARAMS         PATH\n"
)


def table(*records: dict[str, Any]) -> str:
    stream = io.StringIO()
    writer = TableWriter(stream, utc=True)
    for rec in records:
        writer.write(rec)
    writer.close()
    return stream.getvalue()


def test_table_of_the_fixture() -> None:
    assert table(*fixture_records()) == HEADER + (
        "20:19:08.755577 244     insmod          finit  mwtest          ok           "
        'note=hello "q~ /run/modwatch-testbed/modules/mwtest.ko\n'
        "    taints O out-of-tree module, E unsigned module\n"
        "20:19:10.276722 245     insmod          finit  mwtest          EEXIST       "
        "-              /run/modwatch-testbed/modules/mwtest.ko\n"
        "    EEXIST: File exists, stage load\n"
        "20:19:10.963213 246     rmmod           delete mwtest          ok           "
        "-              -\n"
        "20:19:11.863429 247     insmod          finit  mwtest          EINVAL init  "
        "fail=22        /run/modwatch-testbed/modules/mwtest.ko\n"
        "    EINVAL: Invalid argument, stage init; taints O out-of-tree module, E unsigned module\n"
        "20:19:16.756423 250     insmod          finit  -               EPERM        "
        "-              -\n"
        "    EPERM: Operation not permitted, stage permission\n"
    )


def test_table_columns_chosen() -> None:
    stream = io.StringIO()
    writer = TableWriter(
        stream, utc=True, columns=("pid", "uid", "euid", "module", "signed", "sha256")
    )
    writer.write(record(uid=1000, euid=0, signed=True, sha256="ab" * 32, taints=[]))
    writer.write(record(uid=None, euid=None, signed=False, sha256=None, taints=["X"]))
    assert stream.getvalue().splitlines() == [
        "PID     UID    EUID   MODULE          SIGNED SHA256",
        "244     1000   0      mwtest          yes    abababababababab",
        "244     -      -      mwtest          no     -",
        "    taints X unknown taint",
    ]


def test_table_header_alone() -> None:
    assert table() == HEADER


def test_table_width_before_path() -> None:
    text = table(
        record(
            comm="c" * 15,
            module="m" * 56,
            params="p" * 200,
            pid=4_194_304,
            ret=-4095,
            errno=None,
            ok=False,
            stage="init",
            init_ret=-4095,
            path="/" + "x" * 300,
        )
    )
    line = text.splitlines()[1]
    before_path = line[: line.index(" /xxx") + 1]
    assert len(before_path) < 100
    assert len(before_path) == HEADER.index("PATH") == 91
    assert line.endswith("x" * 300)


def test_table_escapes_control_characters() -> None:
    text = table(
        record(
            comm="a\nb\x1b[2J",
            module="m\tx",
            params="p\r\x7f\x9b",
            path="/tmp/evil\n\x1b]0;title\x07.ko",
        )
    )
    lines = text.split("\n")
    assert len(lines) == 4 and lines[3] == ""  # header, row, its taints, end
    row = lines[1]
    assert "\x1b" not in row and "\r" not in row and "\t" not in row and "\x07" not in row
    assert "a\\nb\\x1b[2J" in row
    assert "m\\tx" in row
    assert "p\\r\\x7f\\x9b" in row
    assert row.endswith(" /tmp/evil\\n\\x1b]0;title\\x07.ko")


def test_table_escapes_raw_bytes() -> None:
    row = table(record(comm="\udcff\udcfe", path="/m\udc80.ko")).splitlines()[1]
    assert row.encode("utf-8")  # writable as strict UTF-8
    assert "\\xff\\xfe" in row
    assert row.endswith(" /m\\x80.ko")


def test_table_clips_long_cells() -> None:
    row = table(record(module="a_very_long_module_name")).splitlines()[1]
    assert " a_very_long_mo~ " in row


@pytest.mark.parametrize(
    ("changes", "result"),
    [
        ({"ret": None, "ok": None, "errno": None, "stage": None}, "?"),
        ({"ret": None, "ok": None, "incomplete": "return_missed"}, "? no return"),
        ({"ret": None, "ok": None, "incomplete": "in_flight"}, "? in flight"),
        ({"ret": 0, "ok": True}, "ok"),
        ({"ret": -17, "ok": False, "errno": "EEXIST", "stage": "load"}, "EEXIST"),
        (
            {"ret": -22, "ok": False, "errno": "EINVAL", "stage": "init", "init_ret": -22},
            "EINVAL init",
        ),
        ({"ret": -22, "ok": False, "errno": "EINVAL", "stage": "init", "init_ret": None}, "EINVAL"),
        ({"ret": -4095, "ok": False, "errno": None, "stage": "load"}, "-4095"),
    ],
)
def test_result_text(changes: dict[str, Any], result: str) -> None:
    assert output.result_text(record(**changes)) == result


def test_table_pid_falls_back_to_tid_and_missing_cells_are_dashes() -> None:
    row = table(record(pid=None, tid=77, comm=None, module=None, params=None, path=None))
    assert row.splitlines()[1] == (
        "20:19:08.755577 77      -               finit  -               ok           "
        "-              -"
    )


def test_table_lost_record() -> None:
    rec = {"v": 1, "type": "lost", "time": "2026-11-28T20:19:08.755577Z", "cpu": 1, "count": 12}
    assert table(rec).splitlines()[1] == "20:19:08.755577 LOST 12 events on CPU 1"
    rec["time"] = None
    assert table(rec).splitlines()[1] == "-               LOST 12 events on CPU 1"


def test_table_raw_event() -> None:
    rec = {
        "v": 1,
        "type": "event",
        "event": "finit_module",
        "time": "2026-11-28T20:19:08.755577Z",
        "cpu": 0,
        "tid": 244,
        "compat": False,
        "args": {"fd": 3, "comm": "in\x1bsmod\n"},
    }
    assert (
        table(rec).splitlines()[1]
        == "20:19:08.755577 244     finit_module fd=3 comm=in\\x1bsmod\\n"
    )


def test_printable() -> None:
    assert output.printable("ok é €") == "ok é €"
    assert output.printable("\x00\x1f\x7f\x85\x9f") == "\\x00\\x1f\\x7f\\x85\\x9f"
    assert output.printable("\n\t\r") == "\\n\\t\\r"


def test_a_full_disk_leaves_whole_lines_only(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k", "mwfull", str(full)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with open(full / "out.jsonl", "wb") as stream:
            writer = JsonlWriter(stream)
            with pytest.raises(OSError, match="No space left"):
                for _ in range(1000):
                    writer.write(record(params="x" * 300))
        data = (full / "out.jsonl").read_bytes()
        assert data.endswith(b"\n") and data.count(b"\n") > 1
        assert [json.loads(line)["params"] for line in data.splitlines()] == ["x" * 300] * (
            data.count(b"\n")
        )
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_bytes_inside_lists_of_objects_are_escaped_too() -> None:
    ancestry = [{"pid": 9, "name": "sh"}, {"pid": 1, "name": "in\udcffit"}]
    back = json.loads(output.dumps(record(ancestry=ancestry, cmdline=["a", "\udcfe"])))
    assert back["ancestry"] == [{"pid": 9, "name": "sh"}, {"pid": 1, "name": "in\\xffit"}]
    assert back["cmdline"] == ["a", "\\xfe"]
    assert back["escaped"] == ["ancestry.1.name", "cmdline"]
