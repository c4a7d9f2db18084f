"""merge: the items of the two instances' trace_pipes in one timestamp order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modwatch.merge import ALL, MAIN, RARE, Merge
from modwatch.parser import Event, Item, Lost, Unparsed


def ev(ts: int, kind: str = "finit_module") -> Event:
    return Event(kind, False, 7, None, 0, ts, "task", {})


def stamps(items: list[Item]) -> list[object]:
    return [i.ts_us if isinstance(i, Event) else i for i in items]


def test_both_streams_in_timestamp_order_once_both_were_read_to_the_end() -> None:
    merge = Merge()
    merge.add(RARE, [ev(15, "load_module"), ev(25, "do_init_module")])
    merge.add(MAIN, [ev(10), ev(20), ev(30)])
    assert stamps(merge.release(ALL, (True, True))) == [10, 15, 20, 25, 30]
    assert merge.held() == 0


def test_nothing_past_the_watermark_goes_out() -> None:
    merge = Merge()
    merge.add(MAIN, [ev(10), ev(20), ev(30)])
    merge.add(RARE, [ev(15, "load_module"), ev(35, "do_init_module")])
    assert stamps(merge.release(25, (True, True))) == [10, 15, 20]
    assert (merge.held(MAIN), merge.held(RARE)) == (1, 1)
    # The next read brings an event of the main stream older than the rare one held.
    merge.add(MAIN, [ev(33)])
    assert stamps(merge.release(40, (True, True))) == [30, 33, 35]


def test_a_stream_not_read_to_its_end_holds_back_the_other() -> None:
    # The main pipe had more to read: a rare event waits until the main stream has passed
    # it, for a main event older than it may still come.
    merge = Merge()
    merge.add(RARE, [ev(15, "load_module")])
    merge.add(MAIN, [ev(10)])
    assert stamps(merge.release(100, (False, True))) == [10]
    assert merge.held(RARE) == 1
    merge.add(MAIN, [ev(12), ev(18)])
    # The rare stream was read to its end: the main one goes on up to the watermark.
    assert stamps(merge.release(100, (False, True))) == [12, 15, 18]
    # A rare stream not read since: the main stream waits for it.
    merge.add(MAIN, [ev(20)])
    assert stamps(merge.release(100, (True, False))) == []
    assert stamps(merge.release(100, (True, True))) == [20]


def test_lost_and_unparsed_keep_their_place_in_their_stream() -> None:
    merge = Merge()
    lost, junk = Lost(0, 5), Unparsed("?")
    merge.add(MAIN, [lost, ev(10), junk, ev(30)])
    merge.add(RARE, [ev(5, "load_module"), ev(20, "module_load")])
    # The loss came before anything of the main stream: it goes first; the unparsed text
    # follows the event before it.
    assert stamps(merge.release(ALL, (True, True))) == [lost, 5, 10, junk, 20, 30]
    merge.add(MAIN, [Lost(1, None)])
    assert merge.last_ts(MAIN) == 30


@given(
    st.lists(st.integers(0, 1000), max_size=30),
    st.lists(st.integers(0, 1000), max_size=30),
    st.lists(st.integers(0, 1000), max_size=5),
)
def test_released_in_order_and_nothing_lost_whatever_the_watermarks(
    main: list[int], rare: list[int], marks: list[int]
) -> None:
    merge = Merge()
    merge.add(MAIN, [ev(t) for t in sorted(main)])
    merge.add(RARE, [ev(t, "load_module") for t in sorted(rare)])
    out: list[Item] = []
    for mark in sorted(marks):
        out += merge.release(mark, (True, True))
    out += merge.release(ALL, (True, True))
    assert stamps(out) == sorted(main + rare)
