"""parser: trace_pipe text (as the kernel prints it) into Event, Lost and Unparsed items."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modwatch import probes
from modwatch.errors import ExitStatus, ModwatchError
from modwatch.parser import Event, Item, Lost, Parser, Unparsed, body_pattern
from modwatch.probes import FetchArg, ProbeSpec

from . import kernel_text as kt

PSET = kt.probe_set()
Fields = dict[str, int | str | None]
FINIT: Fields = {"fd": 3, "param_values": 0x55AAE7F7C2A0, "flags": 0}


def parse(text: str) -> list[Item]:
    parser = Parser(PSET.by_event())
    return parser.feed(text) + parser.flush()


def finit_line(comm: str, *, task: str | None = None, tid: int = 244, **ctx: Any) -> str:
    return kt.line(
        "finit_module",
        {**FINIT, "comm": comm},
        task=comm if task is None else task,
        tid=tid,
        ts_us=248_977_428,
        **ctx,
    )


def finit_event(
    comm: str, *, task: str | None = None, tid: int = 244, cpu: int = 0, tgid: int | None = None
) -> Event:
    return Event(
        "finit_module",
        False,
        tid,
        tgid,
        cpu,
        248_977_428,
        comm if task is None else task,
        {**FINIT, "comm": comm},
    )


def params_line(params: str | None, *, task: str = "insmod", tid: int = 244) -> str:
    return kt.line("module_params", {"params": params}, task=task, tid=tid, ts_us=249_029_286)


def params_event(params: str | None, *, task: str = "insmod", tid: int = 244) -> Event:
    return Event("module_params", False, tid, None, 0, 249_029_286, task, {"params": params})


def ret_line(
    ret: int, *, task: str = "insmod", tid: int = 244, kind: str = "finit_module_ret"
) -> str:
    return kt.line(kind, {"ret": ret}, task=task, tid=tid, ts_us=249_074_633)


def ret_event(ret: int, *, task: str = "insmod", tid: int = 244) -> Event:
    return Event("finit_module_ret", False, tid, None, 0, 249_074_633, task, {"ret": ret})


# -- the helper renders what the kernel printed -----------------------------------------


def test_rendered_lines_are_byte_identical_to_the_fixture() -> None:
    fixture = kt.TRACE_FIXTURE.read_text().splitlines(keepends=True)
    entry = finit_line("insmod")
    ret = kt.line(
        "finit_module_ret",
        {"ret": 0},
        task="insmod",
        tid=244,
        ts_us=249_074_633,
        cpu=1,
        flags=".N...",
    )
    assert entry in fixture
    assert ret in fixture


# -- the line prefix --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "cpu", "tgid"),
    [
        pytest.param({}, 0, None, id="6.1-five-char-flags"),
        pytest.param({"flags": "d..1"}, 0, None, id="four-char-flags"),
        pytest.param({"flags": "dNs1."}, 0, None, id="five-char-flags-set"),
        pytest.param({"flags": None}, 0, None, id="no-flags-column"),
        pytest.param({"record_tgid": True, "tgid": 240}, 0, 240, id="tgid"),
        pytest.param({"record_tgid": True, "tgid": 1234567}, 0, 1234567, id="tgid-7-digits"),
        pytest.param({"record_tgid": True}, 0, None, id="tgid-unknown-dashes"),
        pytest.param({"record_tgid": True, "tgid": 9, "flags": None}, 0, 9, id="tgid-no-flags"),
        pytest.param({"cpu": 127}, 127, None, id="cpu-127"),
    ],
)
def test_header_variants(context: dict[str, Any], cpu: int, tgid: int | None) -> None:
    assert parse(finit_line("insmod", **context)) == [finit_event("insmod", cpu=cpu, tgid=tgid)]


def test_tid_wider_than_its_column() -> None:
    assert parse(finit_line("insmod", tid=12345678)) == [finit_event("insmod", tid=12345678)]


@pytest.mark.parametrize(
    "task",
    [
        "<...>",
        "kworker/u4:2",
        "my-task-1",
        "a--244",
        "a-12 [3] b",
        "x -1 [",
        "with spaces",
        "trailing-dash-",
        "-",
        "-1 [0] 1.000000",  # 15 characters shaped like the start of a prefix
        "fifteen-chars-x",
    ],
)
def test_task_names_in_the_prefix(task: str) -> None:
    assert kt.fits_comm(task)
    assert parse(finit_line("insmod", task=task, tid=4242)) == [
        finit_event("insmod", task=task, tid=4242)
    ]


# -- bodies -----------------------------------------------------------------------------


def test_real_kretprobe_body() -> None:
    text = (
        "          insmod-247     [000] .....   252.286628: mwd864c37967_do_init_module_ret: "
        "(__do_sys_finit_module+0xac/0x120 <- do_init_module) ret=-22\n"
    )
    assert parse(text) == [
        Event("do_init_module_ret", False, 247, None, 0, 252_286_628, "insmod", {"ret": -22})
    ]


def test_syscall_return_values() -> None:
    text = ret_line(-17) + ret_line(0) + ret_line(-1, kind="finit_module_ret32")
    items = parse(text)
    assert items == [
        ret_event(-17),
        ret_event(0),
        Event("finit_module_ret", True, 244, None, 0, 249_074_633, "insmod", {"ret": -1}),
    ]


def test_compat_entry_is_the_same_kind_with_compat_set() -> None:
    values: Fields = {"fd": -1, "param_values": 0xFFD0A000, "flags": 0x4, "comm": "insmod32"}
    text = kt.line("finit_module32", values, task="insmod32", tid=7, ts_us=1_000_001)
    assert parse(text) == [Event("finit_module", True, 7, None, 0, 1_000_001, "insmod32", values)]


def test_all_numeric_types() -> None:
    values: Fields = {
        "module_image": 0xFFFFFFFFFFFFFFFF,
        "len": 18446744073709551615,
        "param_values": 0x7F00DEADBEEF,
        "comm": "loader",
    }
    text = kt.line("init_module", values, task="loader", tid=5, ts_us=3)
    assert parse(text) == [Event("init_module", False, 5, None, 0, 3, "loader", values)]


def test_delete_module_entry() -> None:
    values: Fields = {"name": 0x55A420898A48, "flags": 0x800, "comm": "rmmod"}
    text = kt.line("delete_module", values, task="rmmod", tid=246, ts_us=251_185_064)
    assert parse(text) == [
        Event("delete_module", False, 246, None, 0, 251_185_064, "rmmod", values)
    ]


def test_probe_without_arguments() -> None:
    # do_init_module fetches nothing on a kernel without BTF.
    parser = Parser(kt.probe_set(offsets={}).by_event())
    text = (
        "          insmod-244     [000] .....   249.037317: mwd864c37967_do_init_module: "
        "(do_init_module+0x0/0x1f0)\n"
    )
    items = parser.feed(text) + parser.flush()
    assert items == [Event("do_init_module", False, 244, None, 0, 249_037_317, "insmod", {})]


def test_load_module_flags() -> None:
    text = (
        "          insmod-244     [000] .....   248.992439: mwd864c37967_load_module: "
        "(load_module+0x0/0x21a0) flags=0x3\n"
    )
    assert parse(text) == [
        Event("load_module", False, 244, None, 0, 248_992_439, "insmod", {"flags": 3})
    ]


@pytest.mark.parametrize(
    ("kind", "field"),
    [("do_init_module", "name"), ("find_module", "name"), ("module_params", "params")],
)
def test_fault_is_none(kind: str, field: str) -> None:
    text = kt.line(kind, {field: None}, task="insmod", tid=1, ts_us=2)
    assert "=(fault)" in text
    assert parse(text) == [Event(kind, False, 1, None, 0, 2, "insmod", {field: None})]


def test_quoted_fault_text_is_a_string() -> None:
    assert parse(params_line("(fault)")) == [params_event("(fault)")]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ("mwtest OE", {"name": "mwtest", "taints": "OE"}),
        ("mwtest ", {"name": "mwtest", "taints": ""}),
        ("mw test POFCE", {"name": "mw test", "taints": "POFCE"}),
    ],
)
def test_module_load_tracepoint(body: str, fields: Fields) -> None:
    text = kt.line("module_load", body, task="insmod", tid=244, ts_us=249_037_054)
    assert parse(text) == [Event("module_load", False, 244, None, 0, 249_037_054, "insmod", fields)]


def test_module_free_tracepoint() -> None:
    text = kt.line("module_free", "mwtest", task="rmmod", tid=246, ts_us=251_187_060)
    assert parse(text) == [
        Event("module_free", False, 246, None, 0, 251_187_060, "rmmod", {"name": "mwtest"})
    ]


# -- lost events and text that fits nothing --------------------------------------------


def test_lost_line_between_events() -> None:
    text = finit_line("insmod") + "CPU:1 [LOST 12 EVENTS]\n" + ret_line(0)
    assert parse(text) == [finit_event("insmod"), Lost(1, 12), ret_event(0)]


def test_lost_line_after_a_string_event_keeps_the_string_whole() -> None:
    # The kernel prints a LOST line right before the next event of that CPU.
    text = params_line("a=1\nb=2") + "CPU:0 [LOST 3 EVENTS]\n" + ret_line(0)
    assert parse(text) == [params_event("a=1\nb=2"), Lost(0, 3), ret_event(0)]


def test_lost_line_first() -> None:
    text = "CPU:3 [LOST 9001 EVENTS]\n" + ret_line(0)
    assert parse(text) == [Lost(3, 9001), ret_event(0)]


def test_lost_line_without_a_count() -> None:
    text = "CPU:2 [LOST EVENTS]\n" + ret_line(0)
    assert parse(text) == [Lost(2, None), ret_event(0)]


@pytest.mark.parametrize("after", ["", "b=2", "b=2\nCPU:1 [LOST 4 EVENTS]"])
def test_lost_line_inside_a_string_is_text(after: str) -> None:
    # Not followed by an event: a parameter string holding the text of a LOST line.
    params = f"a=1\nCPU:0 [LOST 9 EVENTS]\n{after}".rstrip("\n")
    assert parse(params_line(params) + ret_line(0)) == [params_event(params), ret_event(0)]
    assert parse(params_line(params)) == [params_event(params)]


def test_junk_before_any_event_is_unparsed() -> None:
    assert parse("garbage here\n" + ret_line(0)) == [Unparsed("garbage here"), ret_event(0)]


def test_junk_after_a_numeric_event_is_unparsed() -> None:
    assert parse(ret_line(0) + "junk\n\n") == [ret_event(0), Unparsed("junk"), Unparsed("")]


def test_junk_after_a_string_event_is_unparsed_not_joined() -> None:
    assert parse(params_line("a=1") + "junk\n") == [params_event("a=1"), Unparsed("junk")]


def test_event_of_another_tracer_is_unparsed() -> None:
    other = "            bash-1     [000] .....     1.000000: sched_switch: prev_comm=bash\n"
    assert parse(other + ret_line(0)) == [Unparsed(other.rstrip("\n")), ret_event(0)]


def test_known_event_with_a_body_that_does_not_fit_is_unparsed_whole() -> None:
    broken = finit_line("insmod").replace(' comm2="insmod"', "")
    assert parse(broken + "more\n" + ret_line(0)) == [
        Unparsed(broken.rstrip("\n") + "\nmore"),
        ret_event(0),
    ]


def test_a_partial_line_waits_for_the_rest() -> None:
    text = finit_line("insmod")
    parser = Parser(PSET.by_event())
    assert parser.feed(text[:50]) == []
    assert parser.feed(text[50:-1]) == []
    assert parser.flush() == [finit_event("insmod")]
    assert parser.flush() == []


@pytest.mark.parametrize(
    ("first", "event", "short"),
    [
        (finit_line("insmod"), finit_event("insmod"), 1),
        (finit_line("insmod"), finit_event("insmod"), 10),  # anywhere in its last line
        # Lines of its own: the task name and the comm strings hold a newline.
        (finit_line('e"v\nCPU:0 [L'), finit_event('e"v\nCPU:0 [L'), 1),
        (params_line('a\n"b"\n'), params_event('a\n"b"\n'), 1),
    ],
)
def test_a_read_cut_short_holds_its_last_line_until_the_next(
    first: str, event: Event, short: int
) -> None:
    # A read of trace_pipe can stop a byte short of the kernel's text buffer: the last
    # event's newline comes first in the next read.
    assert "\n" not in first[-short:-1]
    parser = Parser(PSET.by_event())
    assert parser.read(first[:-short]) == []
    assert parser.read(first[-short:] + ret_line(0)) == [event, ret_event(0)]
    assert parser.flush() == []


def test_a_read_ending_with_a_whole_line_gives_its_last_event_at_once() -> None:
    parser = Parser(PSET.by_event())
    assert parser.read(finit_line("insmod")) == [finit_event("insmod")]


# -- strings are raw: quotes, key=value text, newlines ------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        'note=hello "q" world',
        'note="hello world" fail=0',
        'a=1 params="x" ret=0',
        'comm="x" comm2="x"',
        "",
        '"',
        '""',
        "x=\ny=2",
        "\n",
        "\n\n",
        'line1\nline2\n"quoted"\n',
        'tail "\n "',
        'ends with quote"\n',
        "key=value\n          insmod-244     [000] .....",
        "key=value\n          insmod-244     [000] .....   249.029286: nothing_known: x",
        "(fault)\n(fault)",
        "dé\u2028jà vu\t\x1b[31m",
    ],
)
def test_parameter_strings_come_back_whole(params: str) -> None:
    text = params_line(params) + ret_line(0)
    assert parse(text) == [params_event(params), ret_event(0)]


@pytest.mark.parametrize(
    "comm",
    [
        'a" comm2="a',
        '" comm2="',
        '" comm2="" comm',
        '"',
        '""',
        " comm2=",
        'comm="x"',
        "\n",
        '"\n"',
        '\n" comm2="\n',
        'x" comm2="\n"',
        "ab\ncd\nef",
        "\n\n\n\n\n\n\n",
        "fifteen chars!!",
    ],
)
@pytest.mark.parametrize("in_prefix", [False, True], ids=["prefix-<...>", "prefix-comm"])
def test_comm_pair_has_one_reading(comm: str, in_prefix: bool) -> None:
    assert kt.fits_comm(comm)
    task = comm if in_prefix else "<...>"
    text = (
        params_line("a=1") + finit_line(comm, task=task, tid=250) + ret_line(-1, task=task, tid=250)
    )
    items = parse(text)
    assert [i for i in items if not isinstance(i, Event)] == []
    assert [i.fields for i in items if isinstance(i, Event)] == [
        {"params": "a=1"},
        {**FINIT, "comm": comm},
        {"ret": -1},
    ]
    assert [(i.kind, i.tid) for i in items if isinstance(i, Event)] == [
        ("module_params", 244),
        ("finit_module", 250),
        ("finit_module_ret", 250),
    ]


# -- a task name holding newlines in the line prefix ------------------------------------
#
# The kernel prints the prefix task `%16s`: a name "ab\ncd" makes a line of its own
# ("           ab") before the header ("cd-250 ..."). That line must not be taken as the
# continuation of the previous event's last string.


@pytest.mark.parametrize(
    "comm", ["ab\ncd", 'Z"\nW', "\n", "x\n", "\nx", '"\n"', "\n\n\n", '"\n" comm2="', 'q"\n\n"']
)
@pytest.mark.parametrize("params", ["note=1", "a\nb", 'x"'])
def test_prefix_task_with_newline_is_not_glued_to_the_previous_string(
    comm: str, params: str
) -> None:
    assert kt.fits_comm(comm)
    text = params_line(params) + finit_line(comm, tid=250) + ret_line(-1, task=comm, tid=250)
    items = parse(text)
    assert [i for i in items if not isinstance(i, Event)] == []
    assert [i.fields for i in items if isinstance(i, Event)] == [
        {"params": params},
        {**FINIT, "comm": comm},
        {"ret": -1},
    ]


@pytest.mark.parametrize("comm", ['é"\nx', '€\n"', 'naïve\nq"', "日本\n"])
def test_prefix_task_with_newline_and_multibyte_characters_is_not_glued(comm: str) -> None:
    # The kernel pads %16s by bytes, not characters: "é" is two bytes on one column.
    assert kt.fits_comm(comm)
    text = params_line("note=1") + finit_line(comm, tid=250)
    items = parse(text)
    assert [i for i in items if not isinstance(i, Event)] == []
    assert [(i.kind, i.tid, i.fields) for i in items if isinstance(i, Event)] == [
        ("module_params", 244, {"params": "note=1"}),
        ("finit_module", 250, {**FINIT, "comm": comm}),
    ]


def test_prefix_task_with_multibyte_characters_does_not_cut_the_previous_string() -> None:
    # No newline in the name at all: "€" is 3 bytes, so the prefix holds 13 spaces and
    # the header's task part is 14 characters wide, not 16.
    text = params_line('x"\n') + ret_line(-1, task="€", tid=250)
    assert parse(text) == [params_event('x"\n'), ret_event(-1, task="€", tid=250)]


def test_prefix_task_with_newline_is_reported_whole() -> None:
    # The lines before the header are the start of its task name; the event should carry
    # the whole name instead of dropping them.
    assert parse(finit_line("ab\ncd", tid=250)) == [finit_event("ab\ncd", tid=250)]


# -- an unprivileged caller chooses its comm: it must forge nothing ---------------------


@pytest.mark.parametrize(
    "comm",
    [
        "\nCPU:0 [LOST 9",
        "CPU:0 [LOST 9\n",
        "EVENTS]\nCPU:0 ",
        "[LOST 9 EVENTS]",
        "\n[LOST 9 EVENTS",
        "S]\nCPU:0 [LOST",
        "-1 [0] 1.000000",
        "\n-1 [0] 1.00000",
        "\nmodule_free: x",
        "\n: module_load:",
        "\n\nmodule_free:\n",
        "1.000000: x\n\n",
    ],
)
def test_attacker_comm_forges_no_event_and_no_lost_record(comm: str) -> None:
    # "CPU:0 [LOST 9 EVENTS]" (21 characters) cannot fit in a 15-byte comm, and every line
    # a comm makes carries `" comm2="` or the padding of the prefix: these come closest.
    assert kt.fits_comm(comm)
    text = (
        params_line("note=1")
        + finit_line(comm, tid=250)
        + ret_line(-1, task=comm, tid=250)
        + kt.line("module_free", "mwtest", task="rmmod", tid=246, ts_us=251_187_060)
    )
    items = parse(text)
    assert [type(i).__name__ for i in items] == ["Event"] * 4
    assert [(i.kind, i.tid, i.fields) for i in items if isinstance(i, Event)] == [
        ("module_params", 244, {"params": "note=1"}),
        ("finit_module", 250, {**FINIT, "comm": comm}),
        ("finit_module_ret", 250, {"ret": -1}),
        ("module_free", 246, {"name": "mwtest"}),
    ]


def test_parameter_string_holding_a_lost_line_is_not_a_lost_record() -> None:
    # A real LOST line is followed by a header; inside a string it is followed by the rest
    # of the string (at least the closing quote).
    params = "a=1\nCPU:0 [LOST 9 EVENTS]\nb=2"
    assert parse(params_line(params) + ret_line(0)) == [params_event(params), ret_event(0)]


# -- body patterns ----------------------------------------------------------------------


def test_body_pattern_refuses_two_trailing_strings() -> None:
    spec = ProbeSpec(
        "x",
        kt.GROUP,
        "mwx_x",
        "sym",
        False,
        (FetchArg("a", "+0(%di)", "string"), FetchArg("b", "+0(%si)", "string")),
    )
    with pytest.raises(ValueError, match="only one trailing string"):
        body_pattern(spec)


def test_body_pattern_of_finit_module_matches_only_whole_bodies() -> None:
    spec = PSET.by_event()[kt.event_name("finit_module")]
    assert isinstance(spec, ProbeSpec)
    pattern = body_pattern(spec)
    good = '(s+0x0/0x20) fd=3 param_values=0x1 flags=0x0 comm="a" comm2="a"'
    assert pattern.fullmatch(good) is not None
    assert pattern.fullmatch(good.replace('comm2="a"', 'comm2="b"')) is None
    assert pattern.fullmatch(good.replace("fd=3", "fd=x")) is None
    assert pattern.fullmatch(good.replace("flags=0x0", "flags=0")) is None


# -- properties -------------------------------------------------------------------------

_NO_NUL = st.characters(codec="utf-8", exclude_characters="\0")
_PARAMS = st.text(alphabet=_NO_NUL, max_size=40)
_ASCII_COMM = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\0"), max_size=15)
# Any character but NUL, with the ones that make trouble (newline, quote, space, dash, a
# multi-byte character) drawn more often; at most 15 bytes, as the kernel keeps them.


def _kernel_comm(chars: list[str]) -> str:
    """The first characters that fit in 15 bytes, as the kernel truncates a task name."""
    comm = ""
    for c in chars:
        if not kt.fits_comm(comm + c):
            break
        comm += c
    return comm


_ANY_COMM = st.lists(
    st.one_of(_NO_NUL, st.sampled_from(["\n", '"', " ", "-", "é", "€"])), max_size=15
).map(_kernel_comm)
_PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _round_trip(
    comm: str, params: str, fd: int, uargs: int, flags: int, ret: int, cached: bool
) -> None:
    task = "<...>" if cached else comm
    entry = {"fd": fd, "param_values": uargs, "flags": flags, "comm": comm}
    text = (
        kt.line("finit_module", entry, task=task, tid=300, ts_us=10_000_001)
        + kt.line("module_params", {"params": params}, task=task, tid=300, ts_us=10_000_002)
        + kt.line("finit_module_ret", {"ret": ret}, task=task, tid=300, ts_us=10_000_003)
    )
    items = parse(text)
    assert [i for i in items if not isinstance(i, Event)] == []
    assert [(i.kind, i.tid, i.ts_us, i.fields) for i in items if isinstance(i, Event)] == [
        ("finit_module", 300, 10_000_001, entry),
        ("module_params", 300, 10_000_002, {"params": params}),
        ("finit_module_ret", 300, 10_000_003, {"ret": ret}),
    ]


_NUMBERS = (
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(-4095, 0),
    st.booleans(),
)


@_PROPERTY
@given(_ASCII_COMM, _PARAMS, *_NUMBERS)
@example(comm='a"\n" comm2="b', params='x"\n', fd=-1, uargs=0, flags=0, ret=-1, cached=False)
def test_property_round_trip_ascii_comm(
    comm: str, params: str, fd: int, uargs: int, flags: int, ret: int, cached: bool
) -> None:
    _round_trip(comm, params, fd, uargs, flags, ret, cached)


@_PROPERTY
@given(_ANY_COMM, _PARAMS, *_NUMBERS)
# What the search finds first (U+0080 is two bytes): checked before anything is generated.
@example(comm="\n\x80", params="", fd=0, uargs=0, flags=0, ret=0, cached=False)
def test_property_round_trip_any_comm(
    comm: str, params: str, fd: int, uargs: int, flags: int, ret: int, cached: bool
) -> None:
    _round_trip(comm, params, fd, uargs, flags, ret, cached)


_LINE_FREE = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n"), max_size=30)
_FLAT_TASK = st.one_of(
    st.just("<...>"),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=15),
)


@st.composite
def _segment(draw: st.DrawFn) -> tuple[str, int]:
    """A piece of trace text and how many lines it is. Prefix tasks hold no newline."""
    what = draw(st.sampled_from(["finit", "params", "ret", "load", "lost", "junk"]))
    task = draw(_FLAT_TASK)
    tid = draw(st.integers(1, 4_000_000))
    ts = draw(st.integers(0, 10**12))
    if what == "finit":
        comm = draw(_ASCII_COMM)
        entry = {**FINIT, "comm": comm}
        return kt.line("finit_module", entry, task=task, tid=tid, ts_us=ts), 1 + 2 * comm.count(
            "\n"
        )
    if what == "params":
        params = draw(_PARAMS)
        return kt.line("module_params", {"params": params}, task=task, tid=tid, ts_us=ts), (
            1 + params.count("\n")
        )
    if what == "ret":
        return kt.line("finit_module_ret", {"ret": -1}, task=task, tid=tid, ts_us=ts), 1
    if what == "load":
        return kt.line("module_load", "mwtest OE", task=task, tid=tid, ts_us=ts), 1
    if what == "lost":
        return f"CPU:{draw(st.integers(0, 512))} [LOST {draw(st.integers(1, 10**6))} EVENTS]\n", 1
    return draw(_LINE_FREE) + "\n", 1


def _lines_in(item: Item) -> int:
    if isinstance(item, Lost):
        return 1
    if isinstance(item, Unparsed):
        return item.text.count("\n") + 1
    strings = [v for v in item.fields.values() if isinstance(v, str)]
    comm_twice = item.fields.get("comm")
    extra = comm_twice.count("\n") if isinstance(comm_twice, str) else 0
    return 1 + sum(s.count("\n") for s in strings) + extra


@_PROPERTY
@given(st.lists(_segment(), max_size=12), st.data())
def test_property_every_line_lands_in_exactly_one_item(
    segments: list[tuple[str, int]], data: st.DataObject
) -> None:
    text = "".join(s for s, _ in segments)
    items = parse(text)
    assert sum(_lines_in(i) for i in items) == text.count("\n")
    # Fed in arbitrary pieces, the same items come out.
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    parser = Parser(PSET.by_event())
    pieces: list[Item] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        pieces += parser.feed(text[start:end])
    assert pieces + parser.flush() == items


_FRAGMENTS = st.sampled_from(
    [
        "\n",
        '"',
        ' comm2="',
        ' comm="',
        "CPU:0 [LOST 1 EVENTS]",
        "           <...>-1       [000] .....     1.000001: ",
        "    x-12 [001] d..1  2.000000: ",
        kt.event_name("finit_module") + ": ",
        kt.event_name("module_params") + ": (parse_args+0x0/0x390) params=",
        "module_load: ",
        "module_free: ",
        "(fault)",
        "(do_syscall_64+0x5d/0xb0 <- __x64_sys_finit_module) ret=-1",
        "fd=3 param_values=0x0 flags=0x0",
        "é",
        "\udcff",
    ]
)


@_PROPERTY
@given(st.lists(st.one_of(st.text(max_size=20), _FRAGMENTS), max_size=30), st.data())
def test_property_parser_never_raises(pieces: list[str], data: st.DataObject) -> None:
    text = "".join(pieces)
    items = parse(text)
    assert all(isinstance(i, Event | Lost | Unparsed) for i in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=4)))
    parser = Parser(PSET.by_event())
    chunked: list[Item] = []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        chunked += parser.feed(text[start:end])
    assert chunked + parser.flush() == items


# -- the syscalls' own tracepoints (a kernel without kprobe events) ---------------------


def tracepoint_parser() -> Parser:
    """A parser of the tracepoint-only set (a kernel without kprobe events)."""
    return Parser(probes.build_tracepoint_set(kt.GROUP, lambda system, event: True).by_event())


def test_syscall_tracepoints_entry_and_exit_share_a_printed_name() -> None:
    # As printed by Debian's 6.12 (kernel test tests/kernel/test_capture.py, --no-kprobes).
    parser = tracepoint_parser()
    text = (
        kt.prefix("insmod", 112, 2_439_966).decode()
        + "sys_finit_module(fd: ffffffffffffffff, uargs: 55aae7f7c2a0, flags: 4)\n"
        + kt.prefix("insmod", 112, 2_463_225).decode()
        + "sys_finit_module -> 0xffffffffffffffef\n"
        + kt.prefix("rmmod", 113, 2_500_000).decode()
        + "sys_delete_module(name_user: 7ffd1234, flags: 800)\n"
        + kt.prefix("rmmod", 113, 2_500_100).decode()
        + "sys_delete_module -> 0x0\n"
    )
    items = [*parser.feed(text), *parser.flush()]
    assert [(i.kind, i.fields) for i in items if isinstance(i, Event)] == [
        ("finit_module", {"fd": -1, "param_values": 0x55AAE7F7C2A0, "flags": 4}),
        ("finit_module_ret", {"ret": -17}),
        ("delete_module", {"name": 0x7FFD1234, "flags": 0x800}),
        ("delete_module_ret", {"ret": 0}),
    ]
    assert len(items) == 4


def test_tracepoint_set_without_syscall_tracepoints_is_an_error() -> None:
    with pytest.raises(ModwatchError, match="CONFIG_KPROBE_EVENTS") as caught:
        probes.build_tracepoint_set(kt.GROUP, lambda system, event: system == "module")
    assert caught.value.status == ExitStatus.NO_KPROBES


def test_a_syscall_argument_modwatch_does_not_know_is_kept() -> None:
    # A kernel whose syscall gained an argument (or prints one more): the event still
    # parses, with the extra argument under its printed name, for --raw.
    parser = tracepoint_parser()
    text = (
        kt.prefix("insmod", 112, 2_439_966).decode()
        + "sys_finit_module(fd: 3, uargs: 55aae7f7c2a0, flags: 0, cookie: 2a)\n"
        + kt.prefix("insmod", 112, 2_439_970).decode()
        + "sys_finit_module(fd: 3, flags: 0)\n"  # one modwatch needs is missing
    )
    items = [*parser.feed(text), *parser.flush()]
    assert isinstance(items[0], Event)
    assert items[0].fields == {"fd": 3, "param_values": 0x55AAE7F7C2A0, "flags": 0, "cookie": 42}
    assert isinstance(items[1], Unparsed)
    assert len(items) == 2
