"""The in-kernel path: fetch-args within the kernel's limits, the parser's cut of names by
their length, and the path rebuilt from a model of dentries and mounts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modwatch import filepath, probes
from modwatch.correlate import Correlator, TraceClock
from modwatch.parser import Event, Parser, Unparsed
from modwatch.probes import ProbeSet, ProbeSpec

from . import kernel_text as kt

OFFSETS = kt.BTF_OFFSETS


def probe_set(offsets: dict[str, int] = OFFSETS) -> ProbeSet:
    return kt.probe_set(offsets=offsets)


def file_spec(pset: ProbeSet | None = None) -> ProbeSpec:
    return next(p for p in (pset or probe_set()).probes if p.kind == "module_file")


def names_per_mount(spec: ProbeSpec) -> list[int]:
    return [
        sum(1 for a in spec.args if a.name.startswith(f"n{m}_")) for m in range(filepath.MOUNTS)
    ]


def model(mounts: list[list[str]], *, deleted: bool = False) -> dict[str, object]:
    """Fetch-arg values for a file whose path is given mount by mount, top mount last:
    mounts[0] holds the names from the file up to its mount's root, mounts[m] the names
    from the mountpoint of mount m-1 up to mount m's root."""
    values: dict[str, object] = {"id": 2, "hash": 0 if deleted else 0xFFFF8880}
    top = len(mounts) - 1
    for m in range(filepath.MOUNTS):
        own = min(m, top)
        chain = mounts[m] if m <= top else []
        root = 0x1000 * (own + 1)
        values[f"r{m}"] = root
        if m:
            values[f"p{m}"] = 0x100000 * min(m, top)  # the mount above mount m-1
        for k in range(16):
            values[f"d{m}_{k}"] = root + 1 + k if k < len(chain) else root
            name = chain[k] if k < len(chain) else "/"
            values[f"n{m}_{k}"] = name
            values[f"l{m}_{k}"] = len(name.encode("utf-8", "surrogateescape"))
    values[f"p{filepath.MOUNTS}"] = 0x100000 * min(filepath.MOUNTS, top)
    return values


def parse_file_event(values: dict[str, object], pset: ProbeSet | None = None) -> list[object]:
    pset = pset or probe_set()
    text = kt.line("module_file", values, task="insmod", tid=7, ts_us=1_000_000, pset=pset)
    parser = Parser(pset.by_event())
    return [*parser.feed(text), *parser.flush()]


def test_every_fetch_arg_fits_the_kernel() -> None:
    spec = file_spec()
    assert all(len(f"{a.fetch}:{a.type}") <= filepath.MAX_ARG_TEXT for a in spec.args)
    assert len(spec.args) <= 128  # MAX_TRACE_ARGS
    assert len(spec.definition()) < 4096  # the kernel's line buffer for kprobe_events
    assert names_per_mount(spec) == [8, 8, 6, 0]
    assert spec.symbol == "security_kernel_read_file"


def test_longer_offsets_give_fewer_levels_never_a_longer_arg() -> None:
    wide = {**OFFSETS, "file.f_path.dentry": 152, "file.f_path.mnt": 144, "dentry.d_parent": 124}
    spec = file_spec(probe_set(wide))
    assert all(len(f"{a.fetch}:{a.type}") <= filepath.MAX_ARG_TEXT for a in spec.args)
    assert names_per_mount(spec)[0] == 7


def test_without_btf_offsets_no_file_probe() -> None:
    pset = probes.build_probe_set(
        kt.GROUP, probes.ARCHES["x86_64"], lambda s: "x", lambda sys, ev: True
    )
    assert "module_file" not in {p.kind for p in pset.probes}
    assert "module_file: struct offsets not in BTF, path from /proc/PID/fd" in pset.choices


@pytest.mark.parametrize(
    ("mounts", "path"),
    [
        (
            [["mwtest.ko"], ["modules", "modwatch-testbed"], ["run"]],
            "/run/modwatch-testbed/modules/mwtest.ko",
        ),
        ([["x.ko", "lib"]], "/lib/x.ko"),
        ([["x.ko"], []], "/x.ko"),
        # The real root mounted on the initramfs's rootfs, the top of the tree.
        (
            [["mwtest.ko"], ["modules", "modwatch-testbed"], ["run"], []],
            "/run/modwatch-testbed/modules/mwtest.ko",
        ),
        ([["a b.ko", "d i r"], ["mnt"]], "/mnt/d i r/a b.ko"),
    ],
)
def test_path_across_mounts(mounts: list[list[str]], path: str) -> None:
    (event,) = parse_file_event(model(mounts))
    assert isinstance(event, Event)
    rebuilt = filepath.rebuild(event.fields)
    assert rebuilt is not None and rebuilt.complete
    assert rebuilt.text() == path


def test_more_mounts_than_fetched_is_truncated() -> None:
    (event,) = parse_file_event(model([["x.ko"], ["a"], ["b"], ["c"], []]))
    assert isinstance(event, Event)
    rebuilt = filepath.rebuild(event.fields)
    assert rebuilt is not None and rebuilt.text() == "[truncated]/b/a/x.ko"


def test_deleted_file() -> None:
    (event,) = parse_file_event(model([["gone.ko", "tmp"]], deleted=True))
    assert isinstance(event, Event)
    rebuilt = filepath.rebuild(event.fields)
    assert rebuilt is not None and rebuilt.text() == "/tmp/gone.ko (deleted)"


def test_deeper_than_the_names_fetched_is_truncated() -> None:
    names = [f"d{i}" for i in range(10)]
    (event,) = parse_file_event(model([names]))
    assert isinstance(event, Event)
    rebuilt = filepath.rebuild(event.fields)
    assert rebuilt is not None and not rebuilt.complete
    assert rebuilt.text() == "[truncated]/" + "/".join(reversed(names[:8]))
    full = "/" + "/".join(reversed(names))
    assert filepath.choose(rebuilt, full) == (full, "proc")
    assert filepath.choose(rebuilt, "/elsewhere/d1/d0") == (rebuilt.text(), "kernel")
    assert filepath.choose(rebuilt, None) == (rebuilt.text(), "kernel")


@pytest.mark.parametrize(
    ("upper", "mount"),
    [
        ([["run"], []], "/run"),
        ([["b", "a"], ["mnt"]], "/mnt/a/b"),
        ([[]], "/"),
        # Mounts above beyond reach: where the file's mount is stays unknown.
        ([[f"u{i}" for i in range(10)]], None),
        ([["a"], ["b"], ["c"], []], None),
    ],
)
def test_a_cut_chain_keeps_where_its_mount_is(upper: list[list[str]], mount: str | None) -> None:
    names = [f"d{i}" for i in range(10)]
    (event,) = parse_file_event(model([names, *upper]))
    assert isinstance(event, Event)
    rebuilt = filepath.rebuild(event.fields)
    assert rebuilt is not None and not rebuilt.complete
    assert (rebuilt.names, rebuilt.mount) == (tuple(reversed(names[:8])), mount)


def test_choose() -> None:
    complete = filepath.KernelPath(("lib", "x.ko"), True, False)
    assert filepath.choose(complete, "/other") == ("/lib/x.ko", "kernel")
    assert filepath.choose(None, "/proc/path") == ("/proc/path", "proc")
    assert filepath.choose(None, None) == (None, None)


def test_unreadable_name_gives_no_kernel_path() -> None:
    values = model([["x.ko", "lib"]])
    values["n0_1"] = None  # printed (fault)
    (event,) = parse_file_event(values)
    assert isinstance(event, Event)
    assert filepath.rebuild(event.fields) is None


# Any byte but "/" and NUL may be in a name: quotes, newlines, fake fields and lines.
_name = st.text(
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40
) | st.sampled_from(['" n0_1="x', '"\nCPU:0 [LOST 9 EVENTS]\n', 'x" l0_0=1 n0_0="', "\udcff\udc80"])


@given(st.lists(_name, min_size=1, max_size=7), st.lists(_name, max_size=5))
def test_any_names_parse_back_exactly(leaf_mount: list[str], upper: list[str]) -> None:
    mounts = [leaf_mount, upper]
    (event,) = parse_file_event(model(mounts))
    assert isinstance(event, Event)
    rebuilt = filepath.rebuild(event.fields)
    assert rebuilt is not None and rebuilt.complete
    assert rebuilt.names == (*reversed(upper), *reversed(leaf_mount))


def test_a_length_that_disagrees_is_unparsed_not_misread() -> None:
    values = model([["x.ko", "lib"]])
    values["l0_0"] = 3  # a rename raced the read: the name is not 3 bytes long
    items = parse_file_event(values)
    assert items and all(isinstance(i, Unparsed) for i in items)


def test_correlator_takes_the_first_file_read_of_a_finit_module() -> None:
    pset = probe_set()
    parser = Parser(pset.by_event())
    events = [
        ("finit_module", {"fd": 3, "param_values": 0, "flags": 0, "comm": "insmod"}),
        ("module_file", model([["x.ko", "lib"]])),
        ("do_init_module", {"name": "x"}),
        # Firmware read by the module's init, on the same thread: not the module's file.
        ("module_file", {**model([["fw.bin", "firmware"]]), "id": 1}),  # READING_FIRMWARE
        ("finit_module_ret", {"ret": 0}),
    ]
    text = "".join(
        kt.line(kind, values, task="insmod", tid=7, ts_us=1_000_000 + 10 * i, pset=pset)
        for i, (kind, values) in enumerate(events)
    )
    correlator = Correlator(TraceClock(0))
    records = [
        r
        for item in [*parser.feed(text), *parser.flush()]
        if isinstance(item, Event)
        for r in correlator.event(item)
    ]
    assert [(r["path"], r["path_source"]) for r in records] == [("/lib/x.ko", "kernel")]


def test_the_inode_number_is_fetched_where_btf_has_it() -> None:
    plain = file_spec()
    assert "ino" not in [a.name for a in plain.args]  # kt.BTF_OFFSETS lacks the members
    with_ino = file_spec(probe_set({**OFFSETS, "dentry.d_inode": 48, "inode.i_ino": 64}))
    ino = next(a for a in with_ino.args if a.name == "ino")
    dentry = OFFSETS["file.f_path.dentry"]
    assert (ino.fetch, ino.type) == (f"+64(+48(+{dentry}(%di)))", "u64")
    values = {**model([["x.ko", "lib"], []]), "ino": 4242}
    pset = probe_set({**OFFSETS, "dentry.d_inode": 48, "inode.i_ino": 64})
    events = parse_file_event(values, pset)
    assert len(events) == 1
    path = filepath.rebuild(events[0].fields)  # type: ignore[attr-defined]
    assert path is not None and (path.text(), path.ino) == ("/lib/x.ko", 4242)


def test_proc_naming_another_inode_is_not_used() -> None:
    part = filepath.KernelPath(("j", "mw.ko"), False, False, ino=7)
    assert filepath.choose(part, "/a/j/mw.ko", 7) == ("/a/j/mw.ko", "proc")
    assert filepath.choose(part, "/a/j/mw.ko", 8) == ("[truncated]/j/mw.ko", "kernel")
    assert filepath.choose(part, "/a/j/mw.ko", None) == ("/a/j/mw.ko", "proc")
