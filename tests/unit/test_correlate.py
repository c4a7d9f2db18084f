"""correlate: events of one operation joined into one record, in RECORD_KEYS order."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import Future

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modwatch import correlate
from modwatch.correlate import (
    RECORD_KEYS,
    Caller,
    Correlator,
    FileRequest,
    Record,
    TraceClock,
)
from modwatch.modfile import FILE_KEYS, FileFacts
from modwatch.parser import Event, Lost
from modwatch.pathsearch import Target

OFFSET_US = 1_795_896_899_778_149  # the fixture's clock offset
# A record's keys when /proc was not asked, and when no module file was read.
NOTHING_FROM_PROC = {**dict.fromkeys(correlate.CALLER_KEYS), "proc_gone": None, "reasons": None}
NO_FILE_READ = dict.fromkeys(FILE_KEYS)
CLOCK = TraceClock(OFFSET_US)


def ev(
    kind: str,
    tid: int,
    ts_us: int,
    *,
    compat: bool = False,
    tgid: int | None = None,
    **fields: int | str | None,
) -> Event:
    return Event(kind, compat, tid, tgid, 0, ts_us, "task", dict(fields))


class FakeEnricher:
    """Answers like ProcEnricher and remembers what it was asked."""

    def __init__(self, answers: dict[int, Caller] | None = None) -> None:
        self.answers = answers or {}
        self.asked: list[tuple[int, int, int | None]] = []
        self.files: list[FileRequest] = []
        self.file_jobs: dict[int, Future[FileFacts]] = {}

    def caller(self, tid: int, ts_us: int, fd: int | None) -> Caller:
        self.asked.append((tid, ts_us, fd))
        return self.answers.get(tid, Caller(None, None, None))

    def module_file(self, request: FileRequest) -> Future[FileFacts] | None:
        self.files.append(request)
        return self.file_jobs.get(request.tid)


def feed(correlator: Correlator, events: list[Event]) -> list[Record]:
    records: list[Record] = []
    for event in events:
        records += correlator.event(event)
    return records


def finit(tid: int, ts: int, comm: str = "insmod", flags: int = 0, fd: int = 3) -> Event:
    return ev("finit_module", tid, ts, fd=fd, param_values=0x55AAE7F7C2A0, flags=flags, comm=comm)


def load_events(tid: int = 244) -> list[Event]:
    return [
        finit(tid, 248_977_428),
        ev("load_module", tid, 248_992_439),
        ev("find_module", tid, 248_994_174, name="mwtest"),
        ev("module_params", tid, 249_029_286, params='note=hello "q" world'),
        ev("module_load", tid, 249_037_054, name="mwtest", taints="OE"),
        ev("do_init_module", tid, 249_037_317, name="mwtest"),
        ev("do_init_module_ret", tid, 249_073_987, ret=0),
        ev("finit_module_ret", tid, 249_074_633, ret=0),
    ]


def test_do_init_module_without_a_name_keeps_the_one_found() -> None:
    # Without BTF, do_init_module fetches no name: the record has find_module_all's.
    events = [
        ev("do_init_module", e.tid, e.ts_us) if e.kind == "do_init_module" else e
        for e in load_events()
        if e.kind != "module_load"
    ]
    [record] = feed(Correlator(CLOCK), events)
    assert (record["module"], record["init_ret"], record["ok"]) == ("mwtest", 0, True)


def test_successful_load() -> None:
    enricher = FakeEnricher({244: Caller(244, 0, "/lib/modules/mwtest.ko")})
    correlator = Correlator(CLOCK, enricher)
    records = feed(correlator, load_events())
    assert records == [
        {
            "v": 1,
            "type": "load",
            "time": "2026-11-28T20:19:08.755577Z",
            "syscall": "finit_module",
            "module": "mwtest",
            "path": "/lib/modules/mwtest.ko",
            "path_source": "proc",
            **NO_FILE_READ,
            "params": 'note=hello "q" world',
            "flags": [],
            "flags_raw": 0,
            "ret": 0,
            "errno": None,
            "ok": True,
            "stage": None,
            "incomplete": None,
            "init_ret": 0,
            "taints": ["O", "E"],
            "pid": 244,
            "tid": 244,
            "uid": 0,
            "comm": "insmod",
            **NOTHING_FROM_PROC,
            "escaped": None,
        }
    ]
    assert tuple(records[0]) == RECORD_KEYS
    assert enricher.asked == [(244, 248_977_428, 3)]
    assert correlator.open == {}
    assert correlator.unmatched == 0


def test_record_is_emitted_by_the_return_only() -> None:
    correlator = Correlator(CLOCK)
    events = load_events()
    assert feed(correlator, events[:-1]) == []
    assert len(correlator.event(events[-1])) == 1


def test_duplicate_load_eexist_takes_the_name_from_find_module() -> None:
    records = feed(
        Correlator(CLOCK),
        [
            finit(245, 250_498_573),
            ev("load_module", 245, 250_505_840),
            ev("find_module", 245, 250_506_598, name="mwtest"),
            ev("finit_module_ret", 245, 250_522_666, ret=-17),
        ],
    )
    assert len(records) == 1
    rec = records[0]
    assert (rec["module"], rec["ret"], rec["errno"], rec["ok"], rec["stage"]) == (
        "mwtest",
        -17,
        "EEXIST",
        False,
        "load",
    )
    assert (rec["init_ret"], rec["taints"], rec["params"], rec["pid"], rec["uid"]) == (
        None,
        None,
        None,
        None,
        None,
    )


def test_init_failure() -> None:
    records = feed(
        Correlator(CLOCK),
        [
            finit(247, 252_085_280),
            ev("load_module", 247, 252_095_983),
            ev("find_module", 247, 252_101_011, name="mwtest"),
            ev("module_params", 247, 252_167_856, params="fail=22"),
            ev("module_load", 247, 252_172_681, name="mwtest", taints="OE"),
            ev("do_init_module", 247, 252_172_761, name="mwtest"),
            ev("module_free", 247, 252_237_330, name="mwtest"),
            ev("do_init_module_ret", 247, 252_286_628, ret=-22),
            ev("finit_module_ret", 247, 252_297_087, ret=-22),
        ],
    )
    rec = records[0]
    assert len(records) == 1
    assert (rec["stage"], rec["init_ret"], rec["ret"], rec["errno"], rec["ok"]) == (
        "init",
        -22,
        -22,
        "EINVAL",
        False,
    )
    assert (rec["module"], rec["params"], rec["taints"]) == ("mwtest", "fail=22", ["O", "E"])


def test_unprivileged_eperm_is_the_permission_stage() -> None:
    enricher = FakeEnricher({250: Caller(250, 65534, None)})
    records = feed(
        Correlator(CLOCK, enricher),
        [finit(250, 256_978_274), ev("finit_module_ret", 250, 256_984_255, ret=-1)],
    )
    rec = records[0]
    assert (rec["stage"], rec["errno"], rec["module"], rec["uid"], rec["pid"]) == (
        "permission",
        "EPERM",
        None,
        65534,
        250,
    )


def test_eperm_after_the_permission_check_is_a_load_failure() -> None:
    records = feed(
        Correlator(CLOCK),
        [
            finit(251, 1),
            ev("load_module", 251, 2),
            ev("finit_module_ret", 251, 3, ret=-1),
        ],
    )
    assert records[0]["stage"] == "load"


def test_init_returning_eperm_is_the_init_stage() -> None:
    records = feed(
        Correlator(CLOCK),
        [
            finit(252, 1),
            ev("do_init_module", 252, 2, name="m"),
            ev("do_init_module_ret", 252, 3, ret=-1),
            ev("finit_module_ret", 252, 4, ret=-1),
        ],
    )
    assert (records[0]["stage"], records[0]["init_ret"]) == ("init", -1)


def test_delete_module_ok() -> None:
    enricher = FakeEnricher({246: Caller(246, 0, None)})
    records = feed(
        Correlator(CLOCK, enricher),
        [
            ev("delete_module", 246, 251_185_064, name=0x55A420898A48, flags=0x800, comm="rmmod"),
            ev("find_module", 246, 251_185_509, name="mwtest"),
            ev("module_free", 246, 251_187_060, name="mwtest"),
            ev("delete_module_ret", 246, 251_225_023, ret=0),
        ],
    )
    assert records == [
        {
            "v": 1,
            "type": "unload",
            "time": "2026-11-28T20:19:10.963213Z",
            "syscall": "delete_module",
            "module": "mwtest",
            "path": None,
            "path_source": None,
            **NO_FILE_READ,
            "params": None,
            "flags": ["O_NONBLOCK"],
            "flags_raw": 0x800,
            "ret": 0,
            "errno": None,
            "ok": True,
            "stage": None,
            "incomplete": None,
            "init_ret": None,
            "taints": None,
            "pid": 246,
            "tid": 246,
            "uid": 0,
            "comm": "rmmod",
            **NOTHING_FROM_PROC,
            "escaped": None,
        }
    ]
    # delete_module has no fd: nothing to resolve.
    assert enricher.asked == [(246, 251_185_064, None)]


def test_delete_module_enoent() -> None:
    records = feed(
        Correlator(CLOCK),
        [
            ev("delete_module", 260, 5, name=0x1000, flags=0xA00, comm="rmmod"),
            ev("find_module", 260, 6, name="nosuch"),
            ev("delete_module_ret", 260, 7, ret=-2),
        ],
    )
    rec = records[0]
    assert (rec["module"], rec["errno"], rec["stage"], rec["flags"], rec["flags_raw"]) == (
        "nosuch",
        "ENOENT",
        "unload",
        ["O_NONBLOCK", "O_TRUNC"],
        0xA00,
    )


def test_module_free_names_an_unload_without_find_module() -> None:
    records = feed(
        Correlator(CLOCK),
        [
            ev("delete_module", 261, 5, name=0x1000, flags=0x800, comm="rmmod"),
            ev("module_free", 261, 6, name="gone"),
            ev("delete_module_ret", 261, 7, ret=0),
        ],
    )
    assert records[0]["module"] == "gone"


def test_init_module_has_no_fd_and_no_flags() -> None:
    enricher = FakeEnricher()
    records = feed(
        Correlator(CLOCK, enricher),
        [
            ev("init_module", 270, 1, module_image=0x7F00, len=4096, param_values=0x1, comm="kmod"),
            ev("init_module_ret", 270, 2, ret=-8),
        ],
    )
    rec = records[0]
    assert (rec["syscall"], rec["type"], rec["flags"], rec["flags_raw"], rec["errno"]) == (
        "init_module",
        "load",
        None,
        None,
        "ENOEXEC",
    )
    assert enricher.asked == [(270, 1, None)]


def test_compat_events_make_the_same_record() -> None:
    records = feed(
        Correlator(CLOCK),
        [
            ev("finit_module", 280, 1, compat=True, fd=4, param_values=0x8000, flags=2, comm="i32"),
            ev("finit_module_ret", 280, 2, compat=True, ret=0),
        ],
    )
    rec = records[0]
    assert (rec["syscall"], rec["flags"], rec["ok"], rec["comm"]) == (
        "finit_module",
        ["MODULE_INIT_IGNORE_VERMAGIC"],
        True,
        "i32",
    )


def test_tgid_of_the_prefix_is_the_pid_when_proc_knows_nothing() -> None:
    records = feed(
        Correlator(CLOCK),
        [
            ev("finit_module", 301, 1, tgid=300, fd=3, param_values=0, flags=0, comm="t"),
            ev("finit_module_ret", 301, 2, ret=0),
        ],
    )
    assert (records[0]["pid"], records[0]["tid"]) == (300, 301)


def test_proc_pid_wins_over_the_prefix_tgid() -> None:
    enricher = FakeEnricher({301: Caller(299, 0, None)})
    records = feed(
        Correlator(CLOCK, enricher),
        [
            ev("finit_module", 301, 1, tgid=300, fd=3, param_values=0, flags=0, comm="t"),
            ev("finit_module_ret", 301, 2, ret=0),
        ],
    )
    assert records[0]["pid"] == 299


def test_return_without_entry() -> None:
    correlator = Correlator(CLOCK)
    records = correlator.event(ev("finit_module_ret", 290, 1_000_000, ret=-17))
    assert records == [
        {
            "v": 1,
            "type": "load",
            "time": CLOCK.iso(1_000_000),
            "syscall": "finit_module",
            "module": None,
            "path": None,
            "path_source": None,
            **NO_FILE_READ,
            "params": None,
            "flags": None,
            "flags_raw": None,
            "ret": -17,
            "errno": "EEXIST",
            "ok": False,
            "stage": "load",
            "incomplete": "entry_missed",
            "init_ret": None,
            "taints": None,
            "pid": None,
            "tid": 290,
            "uid": None,
            "comm": None,
            **NOTHING_FROM_PROC,
            "escaped": None,
        }
    ]


def test_entry_without_return_is_emitted_by_finish() -> None:
    correlator = Correlator(CLOCK)
    assert feed(correlator, load_events()[:-1]) == []
    records = correlator.finish()
    assert len(records) == 1
    rec = records[0]
    assert tuple(rec) == RECORD_KEYS
    assert (rec["ret"], rec["ok"], rec["errno"], rec["stage"]) == (None, None, None, None)
    assert rec["incomplete"] == "in_flight"
    assert (rec["module"], rec["init_ret"], rec["taints"]) == ("mwtest", 0, ["O", "E"])
    assert correlator.finish() == []


def test_a_second_entry_on_the_same_thread_closes_the_first() -> None:
    correlator = Correlator(CLOCK)
    first = correlator.event(finit(300, 1, comm="first"))
    second = correlator.event(finit(300, 2, comm="second"))
    assert first == []
    assert [(r["comm"], r["ret"], r["incomplete"]) for r in second] == [
        ("first", None, "return_missed")
    ]
    done = correlator.event(ev("finit_module_ret", 300, 3, ret=0))
    assert [(r["comm"], r["ret"]) for r in done] == [("second", 0)]


def test_return_of_another_syscall_closes_the_open_one() -> None:
    correlator = Correlator(CLOCK)
    correlator.event(finit(300, 1))
    records = correlator.event(ev("delete_module_ret", 300, 2, ret=-2))
    assert [(r["syscall"], r["ret"], r["comm"]) for r in records] == [
        ("finit_module", None, "insmod"),
        ("delete_module", -2, None),
    ]


def test_two_threads_interleaved() -> None:
    a, b = (
        load_events(400),
        [
            ev("finit_module", 401, 248_977_500, fd=5, param_values=1, flags=0, comm="other"),
            ev("load_module", 401, 248_992_500),
            ev("find_module", 401, 248_994_500, name="mwtest"),
            ev("finit_module_ret", 401, 249_000_000, ret=-17),
        ],
    )
    merged = sorted(a + b, key=lambda e: e.ts_us)
    records = feed(Correlator(CLOCK), merged)
    assert [(r["tid"], r["comm"], r["ret"], r["stage"], r["params"]) for r in records] == [
        (401, "other", -17, "load", None),
        (400, "insmod", 0, None, 'note=hello "q" world'),
    ]


def test_kernel_side_events_outside_an_operation_are_counted() -> None:
    correlator = Correlator(CLOCK)
    assert correlator.event(ev("module_params", 1, 5, params="console=ttyS0")) == []
    assert correlator.event(ev("module_free", 2, 6, name="x")) == []
    assert correlator.unmatched == 2


def test_lost_record() -> None:
    correlator = Correlator(CLOCK)
    assert correlator.lost(Lost(1, 12)) == {
        "v": 1,
        "type": "lost",
        "time": None,
        "cpu": 1,
        "count": 12,
    }
    correlator.event(finit(300, 248_977_428))
    assert correlator.lost(Lost(0, 3)) == {
        "v": 1,
        "type": "lost",
        "time": "2026-11-28T20:19:08.755577Z",
        "cpu": 0,
        "count": 3,
    }


def test_max_open_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(correlate, "MAX_OPEN", 2)
    correlator = Correlator(CLOCK)
    assert correlator.event(finit(1, 10, comm="one")) == []
    assert correlator.event(finit(2, 11, comm="two")) == []
    evicted = correlator.event(finit(3, 12, comm="three"))
    assert [(r["tid"], r["comm"], r["ret"], r["incomplete"]) for r in evicted] == [
        (1, "one", None, "evicted")
    ]
    assert list(correlator.open) == [2, 3]
    late = correlator.event(ev("finit_module_ret", 1, 13, ret=0))
    assert [(r["tid"], r["comm"], r["ret"], r["incomplete"]) for r in late] == [
        (1, None, 0, "entry_missed")
    ]


# -- event order and missed returns ---------------------------------------------------


def on_cpus(events: list[Event], cpus: list[int]) -> list[Event]:
    return [e._replace(cpu=cpu) for e, cpu in zip(events, cpus, strict=True)]


def test_an_operation_whose_thread_migrated_between_cpus_is_one_record() -> None:
    events = on_cpus(load_events(), [0, 0, 1, 1, 0, 1, 0, 1])
    records = feed(Correlator(CLOCK), events)
    assert len(records) == 1
    assert (records[0]["module"], records[0]["ret"], records[0]["incomplete"]) == (
        "mwtest",
        0,
        None,
    )
    assert records[0]["params"] == 'note=hello "q" world'


def test_two_operations_of_one_thread_back_to_back() -> None:
    unload = [
        ev("delete_module", 244, 250_000_000, name=0x1000, flags=0x800, comm="insmod"),
        ev("find_module", 244, 250_000_100, name="mwtest"),
        ev("module_free", 244, 250_000_200, name="mwtest"),
        ev("delete_module_ret", 244, 250_000_300, ret=0),
    ]
    records = feed(Correlator(CLOCK), load_events() + unload)
    assert [(r["type"], r["module"], r["ret"], r["incomplete"]) for r in records] == [
        ("load", "mwtest", 0, None),
        ("unload", "mwtest", 0, None),
    ]
    assert records[1]["params"] is None and records[1]["taints"] is None


def test_a_tid_reused_by_a_new_process_gets_its_own_callers_facts() -> None:
    enricher = FakeEnricher({244: Caller(244, 0, "/a.ko")})
    correlator = Correlator(CLOCK, enricher)
    first = feed(correlator, load_events())
    enricher.answers[244] = Caller(244, 1000, None)  # the first process exited; tid reused
    second = feed(
        correlator,
        [finit(244, 300_000_000, comm="other"), ev("finit_module_ret", 244, 300_000_100, ret=-1)],
    )
    assert [(r["comm"], r["uid"], r["path"], r["module"]) for r in first + second] == [
        ("insmod", 0, "/a.ko", "mwtest"),
        ("other", 1000, None, None),
    ]


def test_sweep_lets_go_of_a_call_whose_thread_left_it_at_the_second_look() -> None:
    correlator = Correlator(CLOCK)
    feed(correlator, [finit(1, 10, comm="missed"), finit(2, 11, comm="blocked")])
    correlator.event(
        ev("finit_module", 3, 12, compat=True, fd=3, param_values=0, flags=0, comm="c")
    )
    inside = {2: True, 1: False, 3: None}  # 3 runs on a CPU: it cannot be told
    asked: list[tuple[int, str, bool]] = []

    def in_call(tid: int, syscall: str, compat: bool) -> bool | None:
        asked.append((tid, syscall, compat))
        return inside[tid]

    assert correlator.sweep(in_call) == []  # first look: marked, not let go
    assert asked == [
        (1, "finit_module", False),
        (2, "finit_module", False),
        (3, "finit_module", True),
    ]
    swept = correlator.sweep(in_call)
    assert [(r["comm"], r["ret"], r["incomplete"]) for r in swept] == [
        ("missed", None, "return_missed")
    ]
    assert list(correlator.open) == [2, 3]
    done = correlator.event(ev("finit_module_ret", 2, 20, ret=0))
    assert [(r["comm"], r["ret"], r["incomplete"]) for r in done] == [("blocked", 0, None)]
    assert [(r["comm"], r["incomplete"]) for r in correlator.finish()] == [("c", "in_flight")]


def test_a_return_read_after_the_first_look_still_closes_its_call() -> None:
    correlator = Correlator(CLOCK)
    correlator.event(finit(1, 10))
    assert correlator.sweep(lambda tid, syscall, compat: False) == []
    # The thread had returned; its event was still in the buffer at the first look.
    done = correlator.event(ev("finit_module_ret", 1, 11, ret=0))
    assert [(r["ret"], r["incomplete"]) for r in done] == [(0, None)]
    assert correlator.sweep(lambda tid, syscall, compat: False) == []


def test_a_call_found_outside_is_let_go_once_everything_until_then_was_read() -> None:
    correlator = Correlator(CLOCK)
    correlator.event(finit(1, 10))
    clock = iter([500])  # read once, after looking at the threads
    outside = correlator.sweep(lambda tid, syscall, compat: False, 100, lambda: next(clock))
    assert outside == [] and correlator.leaving()
    # Not yet: the return may have been written between 100 and 500 and not be read.
    assert correlator.sweep(None, 499) == []
    [record] = correlator.sweep(None, 500)
    assert (record["incomplete"], correlator.leaving(), correlator.open) == (
        "return_missed",
        False,
        {},
    )


def test_a_sweep_that_does_not_look_marks_nothing() -> None:
    correlator = Correlator(CLOCK)
    correlator.event(finit(1, 10))
    assert correlator.sweep(None) == [] and not correlator.leaving()
    assert correlator.sweep(None) == [] and list(correlator.open) == [1]


def test_finish_names_a_call_marked_by_a_sweep_as_missed() -> None:
    correlator = Correlator(CLOCK)
    correlator.event(finit(1, 10))
    correlator.sweep(lambda tid, syscall, compat: False)
    assert [r["incomplete"] for r in correlator.finish()] == ["return_missed"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 5),
            st.sampled_from(
                [
                    "finit_module",
                    "delete_module",
                    "finit_module_ret",
                    "delete_module_ret",
                    "module_load",
                    "sweep",
                ]
            ),
        ),
        max_size=80,
    )
)
def test_every_entry_is_in_exactly_one_record_and_open_calls_stay_bounded(
    steps: list[tuple[int, str]],
) -> None:
    correlator = Correlator(CLOCK)
    records: list[Record] = []
    entries = returns = 0
    for ts, (tid, kind) in enumerate(steps):
        if kind == "sweep":
            records += correlator.sweep(lambda t, s, c: t % 2 == 0)
            continue
        fields: dict[str, int | str | None] = {"comm": f"t{ts}"}
        if kind.endswith("_ret"):
            fields = {"ret": 0}
            returns += 1
        elif kind == "module_load":
            fields = {"name": "m", "taints": ""}
        else:
            entries += 1
        records += correlator.event(ev(kind, tid, ts, **fields))
        assert len(correlator.open) <= 5
    records += correlator.finish()
    assert sorted(r["comm"] for r in records if r["comm"] is not None) == sorted(
        f"t{ts}" for ts, (_, kind) in enumerate(steps) if kind in ("finit_module", "delete_module")
    )
    assert sum(r["ret"] is not None for r in records) == returns
    assert all(
        (r["ret"] is None) == (r["incomplete"] in ("return_missed", "in_flight")) for r in records
    )


# -- flags and clock --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (0, []),
        (1, ["MODULE_INIT_IGNORE_MODVERSIONS"]),
        (
            1 | 2 | 4,
            [
                "MODULE_INIT_IGNORE_MODVERSIONS",
                "MODULE_INIT_IGNORE_VERMAGIC",
                "MODULE_INIT_COMPRESSED_FILE",
            ],
        ),
        (0x8, ["0x8"]),
        (0x80000002, ["MODULE_INIT_IGNORE_VERMAGIC", "0x80000000"]),
    ],
)
def test_load_flags_in_records(flags: int, names: list[str]) -> None:
    records = feed(
        Correlator(CLOCK), [finit(5, 1, flags=flags), ev("finit_module_ret", 5, 2, ret=-22)]
    )
    assert (records[0]["flags"], records[0]["flags_raw"]) == (names, flags)


@pytest.mark.parametrize(
    ("flags", "names"),
    [(0x800, ["O_NONBLOCK"]), (0x200, ["O_TRUNC"]), (0, []), (0x801, ["O_NONBLOCK", "0x1"])],
)
def test_unload_flags_in_records(flags: int, names: list[str]) -> None:
    records = feed(
        Correlator(CLOCK),
        [
            ev("delete_module", 5, 1, name=0x10, flags=flags, comm="rmmod"),
            ev("delete_module_ret", 5, 2, ret=0),
        ],
    )
    assert records[0]["flags"] == names


@pytest.mark.parametrize(
    ("offset", "ts", "iso"),
    [
        (0, 0, "1970-01-01T00:00:00.000000Z"),
        (0, 1, "1970-01-01T00:00:00.000001Z"),
        (OFFSET_US, 248_977_428, "2026-11-28T20:19:08.755577Z"),
        (1_700_000_000_000_000, 999_999, "2023-11-14T22:13:20.999999Z"),
        (1_700_000_000_000_000, 1_000_000, "2023-11-14T22:13:21.000000Z"),
    ],
)
def test_trace_clock_iso(offset: int, ts: int, iso: str) -> None:
    assert TraceClock(offset).iso(ts) == iso


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4_102_444_800_000_000 - 1))  # 1970 .. 2100
def test_trace_clock_iso_is_exact_to_the_microsecond(wall_us: int) -> None:
    offset = wall_us // 2
    expected = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=wall_us)
    assert TraceClock(offset).iso(wall_us - offset) == expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_uid_of_the_permission_check_wins_over_proc_and_stays_the_first() -> None:
    # /proc answers with the thread's uid later (after a setuid, or a reused tid); the
    # kernel's credentials at the permission check are the caller's.
    enricher = FakeEnricher({250: Caller(250, 0, None)})
    records = feed(
        Correlator(CLOCK, enricher),
        [
            finit(250, 256_978_274),
            ev("caller_cred", 250, 256_978_300, cap=16, uid=65534, euid=65534),
            ev("caller_cred", 250, 256_978_400, cap=16, uid=0, euid=0),
            ev("finit_module_ret", 250, 256_984_255, ret=-1),
        ],
    )
    assert [(r["uid"], r["stage"]) for r in records] == [(65534, "permission")]


def test_uid_from_the_kernel_when_the_caller_is_gone() -> None:
    records = feed(
        Correlator(CLOCK, FakeEnricher()),
        [
            finit(251, 1_000),
            ev("caller_cred", 251, 1_010, cap=16, uid=1000, euid=0),
            ev("finit_module_ret", 251, 1_020, ret=-1),
        ],
    )
    assert records[0]["uid"] == 1000


# -- parameter strings at the limits ----------------------------------------------------


def test_parameters_lost_to_a_too_long_event_are_said_so() -> None:
    # The kernel dropped module_params (too long for a ring buffer event); module_load
    # shows that parse_args ran.
    events = [e for e in load_events() if e.kind != "module_params"]
    records = feed(Correlator(CLOCK), events)
    assert [(r["params"], r["ok"], r["incomplete"]) for r in records] == [
        (None, True, "params_lost")
    ]


def test_without_a_parameters_probe_nothing_is_lost() -> None:
    events = [e for e in load_events() if e.kind != "module_params"]
    records = feed(Correlator(CLOCK, params_probe=False), events)
    assert [(r["params"], r["incomplete"]) for r in records] == [(None, None)]


def test_a_load_refused_before_parse_args_lost_no_parameters() -> None:
    events = [*load_events()[:3], ev("finit_module_ret", 244, 249_074_633, ret=-17)]
    records = feed(Correlator(CLOCK), events)
    assert [(r["errno"], r["incomplete"]) for r in records] == [("EEXIST", None)]


@pytest.mark.parametrize(
    ("length", "incomplete"), [(4094, None), (4095, "params_truncated"), (3000, None)]
)
def test_parameters_as_long_as_a_probe_fetches_may_be_cut(
    length: int, incomplete: str | None
) -> None:
    params = "n=" + "\u00e9" * ((length - 2) // 2) + "x" * ((length - 2) % 2)  # bytes, not chars
    events = [
        e._replace(fields={"params": params}) if e.kind == "module_params" else e
        for e in load_events()
    ]
    records = feed(Correlator(CLOCK), events)
    assert len(records[0]["params"].encode()) == length
    assert records[0]["incomplete"] == incomplete


# -- the caller's facts ------------------------------------------------------------------


def test_caller_facts_from_proc_with_the_euid_of_the_kernel() -> None:
    facts = Caller(
        244,
        1000,
        None,
        ppid=240,
        euid=1000,
        loginuid=1000,
        exe="/usr/sbin/insmod",
        cmdline=["insmod", "x.ko"],
        cgroup="/user.slice",
        ancestry=[{"pid": 240, "name": "sh"}, {"pid": 1, "name": "init"}],
        gone=False,
        reasons={"container": "never said"},
    )
    correlator = Correlator(CLOCK, FakeEnricher({244: facts}))
    events = load_events()
    events.insert(1, ev("caller_cred", 244, 248_977_430, cap=16, uid=1000, euid=0))
    rec = feed(correlator, events)[0]
    assert {k: rec[k] for k in (*correlate.CALLER_KEYS, "uid", "proc_gone", "reasons")} == {
        "ppid": 240,
        "euid": 0,  # the permission check's, not /proc's
        "loginuid": 1000,
        "exe": "/usr/sbin/insmod",
        "cmdline": ["insmod", "x.ko"],
        "cgroup": "/user.slice",
        "container": None,
        "ancestry": [{"pid": 240, "name": "sh"}, {"pid": 1, "name": "init"}],
        "uid": 1000,
        "proc_gone": False,
        "reasons": {"container": "never said"},
    }


def test_a_caller_gone_has_the_kernels_facts_and_a_reason_for_every_other() -> None:
    correlator = Correlator(CLOCK, FakeEnricher({244: Caller(None, None, None, gone=True)}))
    events = load_events()
    events.insert(1, ev("caller_cred", 244, 248_977_430, cap=16, uid=0, euid=0))
    rec = feed(correlator, events)[0]
    assert (rec["uid"], rec["euid"], rec["proc_gone"]) == (0, 0, True)
    assert rec["reasons"] == {
        key: correlate.GONE
        for key in ("ppid", "loginuid", "exe", "cmdline", "cgroup", "container", "ancestry")
    }


# -- the module file ----------------------------------------------------------------------


def test_the_module_file_is_read_only_once_the_permission_check_passed() -> None:
    enricher = FakeEnricher({244: Caller(244, 0, "/m.ko")})
    job: Future[FileFacts] = Future()
    enricher.file_jobs[244] = job
    correlator = Correlator(CLOCK, enricher)
    records = feed(correlator, load_events())
    wall_ns = (248_977_428 + OFFSET_US) * 1000
    assert enricher.files == [
        correlate.FileRequest(244, 248_977_428, 244, 3, "/m.ko", wall_ns, None)
    ]
    assert records[0]["_pending"] == correlate.Pending(244, 248_977_428, job)
    # Refused at the permission check: nothing is read.
    refused = [finit(245, 1), ev("finit_module_ret", 245, 2, ret=-1)]
    assert "_pending" not in feed(correlator, refused)[0]
    assert len(enricher.files) == 1


def test_apply_file_facts_merges_reasons() -> None:
    rec = feed(Correlator(CLOCK), load_events())[0]
    rec["reasons"] = {"exe": "gone"}
    correlate.apply_file_facts(
        rec, FileFacts(sha256="ab", size=2, hash_source="fd", reasons={"vermagic": "none"})
    )
    assert (rec["sha256"], rec["size"], rec["hash_source"]) == ("ab", 2, "fd")
    assert rec["reasons"] == {"exe": "gone", "vermagic": "none"}


# The kernel's names of a file on a mount at /run: cut after the file's own name.
CUT_FILE = {"id": 2, "hash": 1, "ino": 5, "r0": 1, "d0_0": 2, "n0_0": "mw.ko", "d0_1": 3}
CUT_FILE |= {"r1": 9, "d1_0": 10, "n1_0": "run", "d1_1": 9, "p1": 7, "p2": 7}


@pytest.mark.parametrize(
    ("proc", "search"),
    [
        (None, Target(("mw.ko",), 5, "/run")),
        ("/run/deep/mw.ko", None),  # /proc agrees with the kernel's names: no search
    ],
)
def test_a_path_the_kernel_cut_is_searched_for_unless_proc_had_it(
    proc: str | None, search: Target | None
) -> None:
    enricher = FakeEnricher({244: Caller(244, 0, proc)})
    enricher.file_jobs[244] = Future()
    correlator = Correlator(CLOCK, enricher)
    events = load_events()
    events.insert(1, ev("module_file", 244, 248_980_000, **CUT_FILE))
    [record] = feed(correlator, events)
    [request] = enricher.files
    assert (request.path, request.ino, request.search) == (proc or "[truncated]/mw.ko", 5, search)
    assert (record["path"], record["path_source"]) == (request.path, "proc" if proc else "kernel")
    correlate.apply_file_facts(record, FileFacts(path="/run/deep/mw.ko"))
    assert (record["path"], record["path_source"]) == ("/run/deep/mw.ko", "search")


# -- operations whose syscall entry was lost (a flood overran the main instance) -------

# A module file's event: /tmp/mwtest.ko, on one mount.
MODULE_FILE = {
    "id": correlate.READING_MODULE,
    "hash": 1,
    "ino": 5,
    "r0": 1,
    "d0_0": 2,
    "n0_0": "mwtest.ko",
    "d0_1": 3,
    "n0_1": "tmp",
    "d0_2": 1,
    "r1": 9,
    "d1_0": 9,
    "p1": 7,
    "p2": 7,
}


def rare_load(tid: int = 300) -> list[Event]:
    """A load's events in the rare instance: what is left when its entry and return
    were lost in the main one."""
    return [
        ev("module_file", tid, 10, tgid=299, **MODULE_FILE),
        ev("load_module", tid, 11, tgid=299, flags=2),
        ev("find_module", tid, 12, tgid=299, name="mwtest"),
        ev("module_params", tid, 13, tgid=299, params="note=x"),
        ev("module_load", tid, 14, tgid=299, name="mwtest", taints="OE"),
        ev("do_init_module", tid, 15, tgid=299, name="mwtest"),
        ev("do_init_module_ret", tid, 16, tgid=299, ret=0),
    ]


def after_a_loss(correlator: Correlator) -> Correlator:
    correlator.lost(Lost(0, 100))
    return correlator


def test_a_load_whose_entry_and_return_were_lost_is_whole_but_for_them() -> None:
    enricher = FakeEnricher({300: Caller(299, 0, None)})
    enricher.file_jobs[300] = Future()
    correlator = after_a_loss(Correlator(CLOCK, enricher))
    assert feed(correlator, rare_load()) == []
    # The thread has left the call: two sweeps later the record goes out.
    assert correlator.sweep(lambda tid, syscall, compat: False) == []
    [record] = correlator.sweep(lambda tid, syscall, compat: False)
    assert {k: record[k] for k in ("syscall", "module", "path", "path_source", "params")} == {
        "syscall": "finit_module",
        "module": "mwtest",
        "path": "/tmp/mwtest.ko",
        "path_source": "kernel",
        "params": "note=x",
    }
    assert (record["flags"], record["ret"], record["ok"], record["init_ret"]) == (
        ["MODULE_INIT_IGNORE_VERMAGIC"],
        0,
        True,
        0,
    )
    assert (record["incomplete"], record["pid"], record["tid"], record["comm"]) == (
        "entry_missed",
        299,
        300,
        "task",
    )
    # /proc was asked without an fd; the file is read by the kernel's path.
    assert enricher.asked == [(300, 10, None)]
    assert [(r.fd, r.path, r.ino) for r in enricher.files] == [(None, "/tmp/mwtest.ko", 5)]
    assert correlator.unmatched == 0


def test_a_load_whose_entry_was_lost_takes_the_return_that_came() -> None:
    correlator = after_a_loss(Correlator(CLOCK))
    events = [*rare_load(), ev("finit_module_ret", 300, 17, ret=0)]
    [record] = feed(correlator, events)
    assert (record["ret"], record["incomplete"], record["module"]) == (0, "entry_missed", "mwtest")
    assert correlator.open == {}


def test_a_failed_init_whose_entry_was_lost_has_its_errno() -> None:
    events = [e for e in rare_load() if e.kind != "do_init_module_ret"]
    events.append(ev("do_init_module_ret", 300, 16, ret=-22))
    correlator = after_a_loss(Correlator(CLOCK))
    feed(correlator, events)
    [record] = correlator.finish()
    assert (record["ret"], record["errno"], record["stage"]) == (-22, "EINVAL", "init")


def test_init_module_and_delete_module_whose_entries_were_lost() -> None:
    correlator = after_a_loss(Correlator(CLOCK))
    events = [
        ev("load_module", 301, 20, flags=0),
        ev("find_module", 301, 21, name="mwtest"),
        ev("do_init_module", 301, 22, name="mwtest"),
        ev("do_init_module_ret", 301, 23, ret=0),
        ev("find_module", 302, 30, name="mwtest"),
        ev("module_free", 302, 31, name="mwtest"),
        ev("find_module", 303, 40, name="busy"),
    ]
    feed(correlator, events)
    records = correlator.finish()
    summary = [(r["syscall"], r["module"], r["ret"], r["incomplete"]) for r in records]
    assert summary == [
        ("init_module", "mwtest", 0, "entry_missed"),
        ("delete_module", "mwtest", 0, "entry_missed"),
        # An unload that did not free the module: its outcome is unknown.
        ("delete_module", "busy", None, "entry_missed"),
    ]


def test_without_a_loss_kernel_side_events_make_no_record() -> None:
    # Without a loss, an operation opened by kernel-side events was the kernel's own
    # doing (a lookup by module name, say): its events are counted, no record comes.
    correlator = Correlator(CLOCK)
    events = [ev("find_module", 320, 1, name="mwtest"), *rare_load()]
    assert feed(correlator, events) == []
    for _ in range(2):
        assert correlator.sweep(lambda tid, syscall, compat: False) == []
    assert correlator.open == {} and correlator.unmatched == len(events)


def test_a_loss_read_after_the_kernel_side_events_still_makes_the_record() -> None:
    # The two instances' events are merged by time; the main one's LOST line has no time
    # of its own and may come after the rare events of a load whose entry it took.
    correlator = Correlator(CLOCK)
    feed(correlator, rare_load())
    correlator.lost(Lost(1, 7))
    assert correlator.sweep(lambda tid, syscall, compat: False) == []
    [record] = correlator.sweep(lambda tid, syscall, compat: False)
    assert (record["module"], record["ret"], record["incomplete"]) == ("mwtest", 0, "entry_missed")
    assert correlator.unmatched == 0


def test_a_firmware_read_opens_no_load() -> None:
    correlator = after_a_loss(Correlator(CLOCK))
    firmware = {**MODULE_FILE, "id": 1}  # READING_FIRMWARE
    assert feed(correlator, [ev("module_file", 310, 1, **firmware)]) == []
    assert correlator.open == {} and correlator.unmatched == 1


def test_load_module_gives_the_flags_the_entry_did_not() -> None:
    # An entry that came has the flags already: load_module's are the same.
    records = feed(Correlator(CLOCK), load_events())
    assert records[0]["flags_raw"] == 0


def test_a_load_and_an_unload_on_one_thread_both_entries_and_returns_lost() -> None:
    correlator = after_a_loss(Correlator(CLOCK))
    unload = [ev("find_module", 300, 30, name="mwtest"), ev("module_free", 300, 31, name="mwtest")]
    second = [ev("module_file", 300, 40, **MODULE_FILE), ev("load_module", 300, 41, flags=0)]
    [load] = feed(correlator, [*rare_load(), *unload])
    assert (load["syscall"], load["ret"], load["init_ret"]) == ("finit_module", 0, 0)
    [deleted] = feed(correlator, second)
    assert (deleted["syscall"], deleted["module"], deleted["ret"]) == ("delete_module", "mwtest", 0)
    [again] = correlator.finish()
    assert (again["syscall"], again["ret"], again["incomplete"]) == (
        "finit_module",
        None,
        "entry_missed",
    )


def test_a_firmware_read_by_the_modules_init_belongs_to_its_load() -> None:
    correlator = after_a_loss(Correlator(CLOCK))
    events = rare_load()
    firmware = ev("module_file", 300, 15, **{**MODULE_FILE, "id": 1})
    assert feed(correlator, [*events[:-1], firmware, events[-1]]) == []
    [record] = correlator.finish()
    assert (record["path"], record["ret"]) == ("/tmp/mwtest.ko", 0)
