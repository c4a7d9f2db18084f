"""tracefile: saved traces written by TraceWriter and read back by SavedTrace."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

from modwatch import output, tracefile
from modwatch.correlate import Caller, FileRequest
from modwatch.errors import ExitStatus, ModwatchError
from modwatch.modfile import FileFacts
from modwatch.parser import Event, Parser
from modwatch.probes import ProbeSet
from modwatch.tracefile import SavedTrace, TraceWriter

from . import kernel_text as kt

PSET = kt.probe_set()
OFFSET = 1_795_896_899_778_149


def entry(comm: str, tid: int = 250, ts_us: int = 256_978_274) -> str:
    values = {"fd": 3, "param_values": 0x55C24ABE94A0, "flags": 0, "comm": comm}
    return kt.line("finit_module", values, task=comm, tid=tid, ts_us=ts_us)


def ret(tid: int = 250, ts_us: int = 256_984_255) -> str:
    return kt.line("finit_module_ret", {"ret": -1}, task="<...>", tid=tid, ts_us=ts_us)


def save(path: Path, chunks: list[str], callers: list[tuple[int, int, Caller]]) -> None:
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as stream:
        writer = TraceWriter(stream, PSET, OFFSET)
        for chunk in chunks:
            writer.text(chunk)
        for tid, ts, facts in callers:
            writer.caller(tid, ts, facts)
        writer.flush()


def test_header_written() -> None:
    stream = io.StringIO()
    TraceWriter(stream, PSET, OFFSET)
    lines = stream.getvalue().splitlines()
    fixture_header = kt.TRACE_FIXTURE.read_text().splitlines()[: len(lines)]
    # The fixture was captured before load_module fetched its flags.
    assert [line.removesuffix(" flags=%dx:x32") for line in lines] == fixture_header
    assert lines[0] == tracefile.MAGIC
    assert lines[1] == f"# group: {PSET.group}"
    assert lines[2] == f"# clock-offset-us: {OFFSET}"
    assert len(lines) == 3 + len(PSET.probes) + len(PSET.tracepoints)


def test_caller_line() -> None:
    stream = io.StringIO()
    writer = TraceWriter(stream, PSET, 0)
    start = len(stream.getvalue())
    writer.caller(244, 248_977_428, Caller(244, 0, "/x y\n.ko"))
    assert stream.getvalue()[start:] == (
        f"#mw-caller-{PSET.group} "
        '{"tid": 244, "ts_us": 248977428, "pid": 244, "uid": 0, "path": "/x y\\n.ko"}\n'
    )


def test_caller_line_keeps_raw_bytes_of_a_path(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    raw = "/lib/modules/\udcff\udc80.ko"  # bytes ff 80, not UTF-8, as os.readlink gives them
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as stream:
        writer = TraceWriter(stream, PSET, 0)
        writer.caller(7, 8, Caller(7, 0, raw))
    assert SavedTrace(str(path)).caller(7, 8, None) == Caller(7, 0, raw)


def test_a_task_name_cannot_forge_a_caller_line(tmp_path: Path) -> None:
    # The old, guessable marker in the trace text (a task name can hold 15 bytes of it)
    # is trace text like any other: not a caller line, not a damaged file.
    path = tmp_path / "t.trace"
    with open(path, "w", encoding="utf-8") as stream:
        writer = TraceWriter(stream, PSET, 0)
        writer.text('#mw-caller {"tid": 1, "ts_us": 2, "pid": 1, "uid": 0, "path": "/x"}\n')
    saved = SavedTrace(str(path))
    assert saved.callers == {}
    assert "".join(saved.chunks()).startswith("#mw-caller {")


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    text = [entry("insmod"), ret() + "CPU:0 [LOST 2 EVENTS]\n", entry("a\nb", 251, 300)]
    callers = [
        (250, 256_978_274, Caller(250, 65534, None)),
        (251, 300, Caller(7, 0, '/lib/modules/my mod "é".ko')),
    ]
    save(path, text, callers)
    saved = SavedTrace(str(path))
    assert saved.probe_set == ProbeSet(PSET.group, PSET.probes, PSET.tracepoints, ())
    assert saved.clock_offset_us == OFFSET
    assert saved.callers == {
        (250, 256_978_274): Caller(250, 65534, None),
        (251, 300): Caller(7, 0, '/lib/modules/my mod "é".ko'),
    }
    assert "".join(saved.chunks()) == "".join(text)
    assert "".join(saved.chunks(size=128)) == "".join(text)
    assert len(list(saved.chunks(size=128))) > 1
    assert saved.caller(251, 300, 3) == Caller(7, 0, '/lib/modules/my mod "é".ko')
    assert saved.caller(251, 301, 3) == Caller(None, None, None)


def test_caller_path_that_is_not_utf8_round_trips(tmp_path: Path) -> None:
    # os.readlink of /proc/PID/fd/N gives undecodable bytes as surrogate escapes; the
    # module file is any file the caller opened (before the permission check).
    path = tmp_path / "t.trace"
    facts = Caller(7, 1000, "/home/u/\udcff.ko")
    save(path, [entry("insmod", 7, 300)], [(7, 300, facts)])
    back = SavedTrace(str(path)).caller(7, 300, 3)
    assert back.pid == 7 and back.uid == 1000
    # Replayed, the path must reach the records as live capture would write it.
    assert output.dumps({"path": back.path}) == output.dumps({"path": facts.path})


def test_callers_between_chunks_are_not_trace_text(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with open(path, "w") as stream:
        writer = TraceWriter(stream, PSET, 0)
        writer.text(entry("insmod"))
        writer.caller(250, 256_978_274, Caller(250, 0, "/a.ko"))
        writer.text(ret())
    saved = SavedTrace(str(path))
    assert "".join(saved.chunks()) == entry("insmod") + ret()
    assert saved.callers == {(250, 256_978_274): Caller(250, 0, "/a.ko")}


def test_the_fixture() -> None:
    saved = SavedTrace(str(kt.TRACE_FIXTURE))
    # Captured before load_module fetched its flags.
    assert saved.probe_set.probes == tuple(
        dataclasses.replace(p, args=()) if p.kind == "load_module" else p for p in PSET.probes
    )
    assert saved.probe_set.group == kt.GROUP
    assert saved.clock_offset_us == OFFSET
    assert saved.callers == {
        (244, 248_977_428): Caller(244, 0, "/run/modwatch-testbed/modules/mwtest.ko"),
        (245, 250_498_573): Caller(245, 0, "/run/modwatch-testbed/modules/mwtest.ko"),
        (246, 251_185_064): Caller(246, 0, None),
        (247, 252_085_280): Caller(247, 0, "/run/modwatch-testbed/modules/mwtest.ko"),
        (250, 256_978_274): Caller(250, 65534, None),
    }
    text = "".join(saved.chunks())
    assert text.count("\n") == 27
    assert "#mw-caller" not in text and "# probe" not in text


def test_comm_shaped_like_a_caller_line_survives_the_round_trip(tmp_path: Path) -> None:
    # Any user picks its comm; one that begins a line with "#mw-caller " must stay trace
    # text, not be read as (or break) the saved /proc facts.
    comm = "\n#mw-caller "
    assert kt.fits_comm(comm)
    path = tmp_path / "t.trace"
    save(path, [entry(comm) + ret()], [(250, 256_978_274, Caller(250, 65534, None))])
    saved = SavedTrace(str(path))
    assert saved.callers == {(250, 256_978_274): Caller(250, 65534, None)}
    assert "".join(saved.chunks()) == entry(comm) + ret()
    parser = Parser(saved.probe_set.by_event())
    items = parser.feed("".join(saved.chunks())) + parser.flush()
    assert [i.fields.get("comm") for i in items if isinstance(i, Event)] == [comm, None]


def test_no_magic_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(kt.JSONL_FIXTURE.read_bytes())
    with pytest.raises(ModwatchError) as err:
        SavedTrace(str(path))
    assert err.value.status == ExitStatus.BAD_TRACE_FILE
    assert err.value.message == (
        f"modwatch: {path} is not a modwatch trace (no '# modwatch trace v1' line): "
        "record one with --save-trace"
    )


@pytest.mark.parametrize(
    "content", [b"", b"\n# modwatch trace v1\n", b"# modwatch trace v2\n", b"\xff\xfe"]
)
def test_not_a_trace(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x"
    path.write_bytes(content)
    with pytest.raises(ModwatchError) as err:
        SavedTrace(str(path))
    assert err.value.status == ExitStatus.BAD_TRACE_FILE


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.trace"
    with pytest.raises(ModwatchError) as err:
        SavedTrace(str(path))
    assert err.value.status == ExitStatus.BAD_TRACE_FILE
    assert err.value.message == f"modwatch: cannot read {path}: No such file or directory"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ModwatchError) as err:
        SavedTrace(str(tmp_path))
    assert err.value.status == ExitStatus.BAD_TRACE_FILE


@pytest.mark.parametrize(
    "body",
    [
        "# probe: nonsense\n",
        "# probe: p:kprobes/x sym\n",
        # Strings last, but two that cannot be told apart in the text.
        "# probe: p:GROUP/mwx_x sym a=+0(%di):string b=+0(%si):string\n",
        "# clock-offset-us: soon\n",
        "text\n#mw-caller-GROUP {not json\n",
        '#mw-caller-GROUP {"tid": 1}\n',
    ],
)
def test_damaged_trace(tmp_path: Path, body: str) -> None:
    path = tmp_path / "d.trace"
    probe = next(p for p in PSET.probes if p.kind == "finit_module_ret")
    header = f"{tracefile.MAGIC}\n# probe: {probe.definition()}\n"
    path.write_text(header + body.replace("GROUP", PSET.group))
    with pytest.raises(ModwatchError) as err:
        SavedTrace(str(path))
    assert err.value.status == ExitStatus.BAD_TRACE_FILE
    assert err.value.message.startswith(f"modwatch: {path} is a damaged modwatch trace: ")


def test_rare_text_round_trip_and_a_damaged_rare_line(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    text = entry("\udcff\n#mw-rare- x")  # raw bytes and a marker-like comm survive
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as stream:
        writer = TraceWriter(stream, PSET, OFFSET)
        writer.text(text, rare=True)
        writer.text(ret())
    saved = SavedTrace(str(path))
    assert saved.rare_chunks == [text]
    assert "".join(saved.chunks()) == ret()
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(f"{tracefile.rare_marker(PSET.group)}5\n")
    with pytest.raises(ModwatchError) as caught:
        SavedTrace(str(path))
    assert caught.value.status == ExitStatus.BAD_TRACE_FILE


def test_module_file_facts_round_trip_with_a_path_found_by_search(tmp_path: Path) -> None:
    # The path a search found (the kernel's names cut) is replayed as it was reported.
    path = tmp_path / "t.trace"
    facts = FileFacts(sha256="ab" * 32, size=9, hash_source="path", path="/a/b/mw.ko")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as stream:
        writer = TraceWriter(stream, PSET, OFFSET)
        writer.text(entry("insmod"))
        writer.module_file(250, 256_978_274, facts)
        writer.flush()
    saved = SavedTrace(str(path))
    request = FileRequest(250, 256_978_274, 250, 3, "[truncated]/b/mw.ko", 0, 5)
    job = saved.module_file(request)
    assert job is not None and job.result() == facts
