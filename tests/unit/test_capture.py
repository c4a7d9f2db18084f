"""capture: replaying saved traces (the golden fixture), filters, stats, session names.

Arming probes and reading trace_pipe need a kernel: tests/kernel covers them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from modwatch import capture, output
from modwatch.capture import Capture, Options
from modwatch.correlate import Caller, Pending
from modwatch.modfile import FileFacts
from modwatch.tracefile import TraceWriter

from . import kernel_text as kt


def fixture_records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in kt.JSONL_FIXTURE.read_text().splitlines()]


def replay(
    path: Path | str = kt.TRACE_FIXTURE, **options: Any
) -> tuple[list[dict[str, Any]], Capture]:
    cap = Capture(Options(**options))
    return list(cap.replay(str(path))), cap


def test_replay_gives_exactly_the_records_of_live_capture() -> None:
    records, cap = replay()
    assert records == fixture_records()
    assert b"".join(output.dumps(r) for r in records) == kt.JSONL_FIXTURE.read_bytes()
    assert (cap.stats.unparsed, cap.stats.lost, cap.stats.unmatched) == (0, 0, 0)
    assert cap.probe_set is not None and cap.probe_set.group == kt.GROUP


def test_replay_failed_only() -> None:
    records, _ = replay(failed_only=True)
    assert records == [r for r in fixture_records() if r["ok"] is False]
    assert [r["errno"] for r in records] == ["EEXIST", "EINVAL", "EPERM"]


@pytest.mark.parametrize(("pid", "tids"), [(246, [246]), (250, [250]), (1, [])])
def test_replay_pid(pid: int, tids: list[int]) -> None:
    records, _ = replay(pid=pid)
    assert [r["tid"] for r in records] == tids


def test_replay_raw() -> None:
    records, _ = replay(raw=True)
    assert len(records) == 27
    assert {r["type"] for r in records} == {"event"}
    assert records[0] == {
        "v": 1,
        "type": "event",
        "event": "finit_module",
        "time": "2026-11-28T20:19:08.755577Z",
        "cpu": 0,
        "tid": 244,
        "compat": False,
        "args": {"fd": 3, "param_values": 0x55AAE7F7C2A0, "flags": 0, "comm": "insmod"},
        "escaped": None,
    }
    assert records[4] == {
        "v": 1,
        "type": "event",
        "event": "module_load",
        "time": "2026-11-28T20:19:08.815203Z",
        "cpu": 0,
        "tid": 244,
        "compat": False,
        "args": {"name": "mwtest", "taints": "OE"},
        "escaped": None,
    }
    assert [r["event"] for r in records[-2:]] == ["finit_module", "finit_module_ret"]


def test_replay_raw_ignores_failed_only_but_not_pid() -> None:
    assert len(replay(raw=True, failed_only=True)[0]) == 27
    assert [r["event"] for r in replay(raw=True, pid=246)[0]] == [
        "delete_module",
        "find_module",
        "module_free",
        "delete_module_ret",
    ]


def write_trace(path: Path, text: str, callers: tuple[tuple[int, int, Caller], ...] = ()) -> None:
    with open(path, "w") as stream:
        writer = TraceWriter(stream, kt.probe_set(), 1_000_000_000_000_000)
        writer.text(text)
        for tid, ts, facts in callers:
            writer.caller(tid, ts, facts)


def test_replay_counts_unparsed_lost_and_unmatched(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    finit = {"fd": 3, "param_values": 1, "flags": 0, "comm": "insmod"}
    write_trace(
        path,
        "stray text\n"
        + kt.line("module_params", {"params": "console=ttyS0"}, task="swapper", tid=1, ts_us=5)
        + kt.line("finit_module", finit, task="insmod", tid=9, ts_us=1_000_000)
        + "CPU:1 [LOST 9 EVENTS]\n"
        + kt.line("finit_module_ret", {"ret": 0}, task="insmod", tid=9, ts_us=2_000_000)
        + kt.line("finit_module", finit, task="insmod", tid=10, ts_us=3_000_000),
        ((9, 1_000_000, Caller(9, 0, "/m.ko")),),
    )
    records, cap = replay(path)
    assert [(r["type"], r.get("tid"), r.get("ret"), r["time"]) for r in records] == [
        ("lost", None, None, "2001-09-09T01:46:41.000000Z"),
        ("load", 9, 0, "2001-09-09T01:46:41.000000Z"),
        ("load", 10, None, "2001-09-09T01:46:43.000000Z"),
    ]
    assert records[1]["path"] == "/m.ko"
    assert records[2]["path"] is None
    assert cap.stats.unparsed == 1
    assert cap.stats.unparsed_samples == ["stray text"]
    assert cap.stats.lost == 9
    assert cap.stats.unmatched == 1


def test_replay_keeps_three_unparsed_samples(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write_trace(path, "".join(f"junk {i}\n" for i in range(5)))
    records, cap = replay(path)
    assert records == []
    assert cap.stats.unparsed == 5
    assert cap.stats.unparsed_samples == ["junk 0", "junk 1", "junk 2"]


@pytest.mark.parametrize(
    ("name", "pid"),
    [
        ("modwatch_242_d864c37967", 242),
        ("modwatch_1_a", 1),
        ("modwatch_x_1", None),
        ("modwatch_", None),
        ("modwatch__1", None),
        ("other_242_ab", None),
        ("kprobes", None),
    ],
)
def test_session_pid(name: str, pid: int | None) -> None:
    assert capture._session_pid(name) == pid


def test_owner_alive(tmp_path: Path) -> None:
    (tmp_path / "242").mkdir()
    (tmp_path / "242" / "cmdline").write_bytes(b"/usr/bin/python3\0-m\0modwatch\0capture\0")
    (tmp_path / "243").mkdir()
    (tmp_path / "243" / "cmdline").write_bytes(b"/usr/sbin/sshd\0-D\0")
    (tmp_path / "244").mkdir()
    (tmp_path / "244" / "cmdline").write_bytes(b"")  # a zombie
    assert capture._owner_alive(242, str(tmp_path))
    assert not capture._owner_alive(243, str(tmp_path))
    assert not capture._owner_alive(244, str(tmp_path))
    assert not capture._owner_alive(245, str(tmp_path))


def test_records_wait_in_order_for_their_module_files_at_most_file_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(capture, "FILE_WAIT", 0.2)
    slow: Future[FileFacts] = Future()
    quick: Future[FileFacts] = Future()
    quick.set_result(FileFacts(sha256="ab", size=2))
    base = fixture_records()[0]

    def rec(n: int, future: Future[FileFacts] | None) -> dict[str, Any]:
        r = {**base, "tid": n}
        if future is not None:
            r["_pending"] = Pending(n, n, future)
        return r

    def source() -> Iterator[dict[str, Any] | None]:
        yield rec(1, slow)
        yield rec(2, quick)
        yield rec(3, None)
        yield None

    cap = Capture(Options())
    started = time.monotonic()
    out = list(cap._delivered(source()))
    assert 0.2 <= time.monotonic() - started < 5
    assert [(r["tid"], r["sha256"]) for r in out] == [(1, None), (2, "ab"), (3, None)]
    assert out[0]["reasons"] == {"sha256": "still being read after 0.2 s"}
    assert all("_pending" not in r for r in out)
    assert slow.cancelled()


def test_module_file_facts_travel_in_a_saved_trace(tmp_path: Path) -> None:
    facts = FileFacts(sha256="ab" * 32, size=9, hash_source="fd", signed=False, in_tree=False)
    trace = tmp_path / "t.trace"
    with open(trace, "w", encoding="utf-8") as stream:
        stream.write(kt.TRACE_FIXTURE.read_text())
        stream.write(
            f"#mw-file-{kt.GROUP} "
            + json.dumps({"tid": 244, "ts_us": 248_977_428, **facts._asdict()})
            + "\n"
        )
    records, _ = replay(trace)
    load = records[0]
    assert (load["sha256"], load["size"], load["hash_source"], load["signed"]) == (
        "ab" * 32,
        9,
        "fd",
        False,
    )
    assert all(r.get("sha256") is None for r in records[1:])


@pytest.mark.parametrize(
    ("text", "kb"), [("1408\n", 1408), ("7 (expanded: 1408)\n", 1408), ("16384\n", 16384)]
)
def test_buffer_size_as_tracefs_shows_it(text: str, kb: int) -> None:
    assert capture._buffer_kb(text) == kb


def test_replay_merges_the_rare_instances_text_by_timestamp(tmp_path: Path) -> None:
    # As a live session saves it: the rare instance's reads in marked lines, the main
    # instance's text as read, each in the order read (not in timestamp order).
    pset = kt.probe_set()
    finit = {"fd": 3, "param_values": 0x1000, "flags": 0, "comm": "insmod"}

    def line(kind: str, values: dict[str, Any], tid: int, ts_us: int) -> str:
        return kt.line(kind, values, task="insmod", tid=tid, ts_us=ts_us, pset=pset)

    rare = [
        line("load_module", {"flags": 0}, 7, 1_000_010)
        + line("find_module", {"name": "mwtest"}, 7, 1_000_011),
        line("do_init_module", {"name": "mwtest"}, 7, 1_000_012)
        + line("do_init_module_ret", {"ret": 0}, 7, 1_000_013),
    ]
    main = [
        line("finit_module", finit, 7, 1_000_000),
        line("finit_module_ret", {"ret": 0}, 7, 1_000_020)
        + line("finit_module", finit, 8, 1_000_030)
        + line("finit_module_ret", {"ret": -1}, 8, 1_000_031),
    ]
    path = tmp_path / "two.trace"
    with open(path, "w", encoding="utf-8") as stream:
        writer = TraceWriter(stream, pset, 0)
        writer.text(rare[0], rare=True)
        writer.text(main[0])
        writer.text(main[1])
        writer.text(rare[1], rare=True)
    records, cap = replay(path)
    assert [(r["tid"], r["module"], r["ret"], r["init_ret"]) for r in records] == [
        (7, "mwtest", 0, 0),
        (8, None, -1, None),
    ]
    assert cap.stats.unparsed == 0
