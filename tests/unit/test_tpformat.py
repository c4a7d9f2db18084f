"""tpformat: a tracepoint's print format read from its format file, and events of a
kernel whose format modwatch does not know parsed through it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modwatch import tpformat
from modwatch.capture import Capture, Options
from modwatch.parser import Event, Item, Parser, tracepoint_note
from modwatch.probes import ProbeSet, Tracepoint
from modwatch.tracefile import SavedTrace, TraceWriter

from . import kernel_text as kt

# As Debian's 6.1 and 6.12 print them (tracefs events/module/*/format).
MODULE_LOAD = (
    '"%s %s", __get_str(name), __print_flags(REC->taints, "", { (1UL << 0), "P" }, '
    '{ (1UL << 12), "O" }, { (1UL << 1), "F" }, { (1UL << 10), "C" }, { (1UL << 13), "E" })'
)
MODULE_FREE = '"%s", __get_str(name)'
# A kernel that prints one field more, which modwatch does not know.
MODULE_LOAD_MORE = (
    '"%s %s refcnt=%d addr=%#lx", __get_str(name), __print_flags(REC->taints, "", '
    '{ (1UL << 0), "P" }, { (1UL << 12), "O" }, { (1UL << 1), "F" }, { (1UL << 10), "C" }, '
    '{ (1UL << 13), "E" }), REC->refcnt, (unsigned long)REC->addr'
)


def test_print_fmt_line() -> None:
    text = f"name: module_free\nID: 394\nformat:\n\tfield:x;\n\nprint fmt: {MODULE_FREE}\n"
    assert tpformat.print_fmt_line(text) == MODULE_FREE
    assert tpformat.print_fmt_line("name: x\n") is None


def test_parse_known_formats() -> None:
    load, free = tpformat.parse(MODULE_LOAD), tpformat.parse(MODULE_FREE)
    assert load is not None and free is not None
    assert load.shape == ("%s %s", ("name", "taints"))
    assert load.values == (None, "(?:(?:P|O|F|C|E|0x[0-9a-f]+)(?:(?:P|O|F|C|E|0x[0-9a-f]+))*)?")
    assert free == tpformat.PrintFormat("%s", ("name",), (None,))


def test_print_symbolic_and_flags_with_a_delimiter() -> None:
    fmt = tpformat.parse(
        '"%s %s", __print_symbolic(REC->st, { 0, "LIVE" }, { 1, "COMING" }), '
        '__print_flags(REC->f, "|", { 1, "A" }, { 2, "B" })'
    )
    assert fmt is not None
    built = tpformat.pattern(fmt)
    assert built is not None
    m = built[0].fullmatch("COMING A|B|0x8")
    assert m is not None and m.groupdict() == {"st": "COMING", "f": "A|B|0x8"}
    assert built[0].fullmatch("GOING A") is None


@pytest.mark.parametrize(
    ("print_fmt", "parsed"),
    [
        (MODULE_LOAD_MORE, ("%s %s refcnt=%d addr=%#lx", ("name", "taints", "refcnt", "addr"))),
        ('"a\\"b\\n%d", REC->x', ('a"b\n%d', ("x",))),
        ('"%d %d", REC->x, REC->x', ("%d %d", ("x", "x_"))),
        ('"%d", 1', ("%d", ("arg0",))),
        ('"100%% %u"', ("100%% %u", ())),
        ("no string", None),
        ('"unterminated', None),
    ],
)
def test_parse(print_fmt: str, parsed: tuple[str, tuple[str, ...]] | None) -> None:
    fmt = tpformat.parse(print_fmt)
    assert (fmt.shape if fmt is not None else None) == parsed


def test_pattern_reads_every_field() -> None:
    fmt = tpformat.parse(MODULE_LOAD_MORE)
    assert fmt is not None
    built = tpformat.pattern(fmt)
    assert built is not None
    regex, bases = built
    m = regex.fullmatch("mw test OE refcnt=1 addr=0xffffffffc0a01000")
    assert m is not None
    assert m.groupdict() == {
        "name": "mw test",
        "taints": "OE",
        "refcnt": "1",
        "addr": "0xffffffffc0a01000",
    }
    assert bases == {"refcnt": 10, "addr": 16}


def test_pattern_of_a_format_whose_arguments_do_not_match_is_none() -> None:
    assert tpformat.pattern(tpformat.PrintFormat("%d %d", ("x",))) is None


def load_line(body: str) -> str:
    return kt.line("module_load", body, task="insmod", tid=244, ts_us=249_037_054)


def parse(print_fmt: str | None, text: str) -> list[Item]:
    parser = Parser({"module_load": Tracepoint("module", "module_load", print_fmt)})
    return parser.feed(text) + parser.flush()


def test_a_known_format_is_read_as_always() -> None:
    # A module name with a space: the known pattern keeps the taints last.
    for fmt in (None, MODULE_LOAD):
        assert parse(fmt, load_line("mw test OE")) == [
            Event(
                "module_load",
                False,
                244,
                None,
                0,
                249_037_054,
                "insmod",
                {"name": "mw test", "taints": "OE"},
            )
        ]


def test_an_unknown_field_is_kept() -> None:
    items = parse(MODULE_LOAD_MORE, load_line("mwtest OE refcnt=1 addr=0xffffffffc0a01000"))
    assert [i.fields for i in items if isinstance(i, Event)] == [
        {"name": "mwtest", "taints": "OE", "refcnt": 1, "addr": 0xFFFFFFFFC0A01000}
    ]


def test_notes() -> None:
    tp = Tracepoint("module", "module_load")
    assert (
        tracepoint_note(tp) == "module:module_load: print format not read; the known one is assumed"
    )
    assert tracepoint_note(dataclasses.replace(tp, print_fmt=MODULE_LOAD)) == (
        "module:module_load: print format as known ('%s %s')"
    )
    assert tracepoint_note(dataclasses.replace(tp, print_fmt=MODULE_LOAD_MORE)) == (
        "module:module_load: print format '%s %s refcnt=%d addr=%#lx' differs from the known "
        "one: read by it, fields name, taints, refcnt, addr"
    )
    assert "not understood" in tracepoint_note(dataclasses.replace(tp, print_fmt="x"))


def test_records_still_come_and_raw_keeps_the_unknown_field(tmp_path: Path) -> None:
    # A saved trace of the tracepoint-only mode from a kernel whose module_load prints
    # one field more: the print format travels in the trace's header.
    pset = ProbeSet(
        kt.GROUP,
        (),
        (
            Tracepoint("syscalls", "sys_enter_finit_module"),
            Tracepoint("syscalls", "sys_exit_finit_module"),
            Tracepoint("module", "module_load", MODULE_LOAD_MORE),
        ),
        (),
    )
    path = tmp_path / "more.trace"
    with open(path, "w", encoding="utf-8") as stream:
        writer = TraceWriter(stream, pset, 0)
        writer.text(
            kt.prefix("insmod", 244, 1_000).decode()
            + "sys_finit_module(fd: 3, uargs: 55aae7f7c2a0, flags: 0)\n"
            + load_line("mwtest OE refcnt=1 addr=0xffffffffc0a01000")
            + kt.prefix("insmod", 244, 2_000).decode()
            + "sys_finit_module -> 0x0\n"
        )
    assert SavedTrace(str(path)).probe_set == pset
    records = list(Capture(Options()).replay(str(path)))
    assert [(r["module"], r["taints"], r["ret"], r["incomplete"]) for r in records] == [
        ("mwtest", ["O", "E"], 0, None)
    ]
    raw = [r["args"] for r in Capture(Options(raw=True)).replay(str(path))]
    assert raw[1] == {"name": "mwtest", "taints": "OE", "refcnt": 1, "addr": 0xFFFFFFFFC0A01000}
