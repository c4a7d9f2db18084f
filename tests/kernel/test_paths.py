"""The module file's path, read in the kernel (`path_source: kernel`).

One capture session loads the test module from files placed to test the dentry chain:
on a tmpfs mount of its own, with spaces, through a symlink, unlinked after open, with
a file name that holds quotes, a newline and fake trace text, deeper than the kernel's
names reach (completed from /proc, or found on the file system), and a Debian module
under /lib/modules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from modwatch.capture import Capture, Options

from .helpers import HOLD_MS, MARKER, Releaser, callers_seen, script

pytestmark = pytest.mark.kernel

TOP = Path("/run/mwpath")  # a tmpfs of its own, on the guest's /run (another tmpfs)
SPACED = TOP / "dir with space" / "mw test.ko"
LINK = TOP / "link.ko"
GONE = TOP / "gone.ko"
# Quotes, a newline, fake fields and a fake lost-events line: cut by its length.
EVIL = TOP / 'q" n0_1="x\nCPU:0 [LOST 9 EVENTS]\nz.ko'
DEEP = TOP.joinpath(*"abcdefghij", "mw.ko")  # 11 names on its mount: beyond the 8 fetched
WALKED = TOP.joinpath(*"klmnopqrs", "mw.ko")  # as deep, where no earlier path leads

Record = dict[str, Any]


class PathSession(NamedTuple):
    loads: list[Record]
    proc_paths: list[str | None]  # of each load: what /proc/PID/fd gave when it was asked


@pytest.fixture(scope="module")
def files(mwtest_ko: Path) -> Iterator[None]:
    TOP.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "mwpath", str(TOP)], check=True)
    try:
        for target in (SPACED, GONE, EVIL, DEEP, WALKED):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mwtest_ko, target)
        LINK.symlink_to(SPACED.relative_to(TOP))
        yield
    finally:
        subprocess.run(["umount", str(TOP)], check=True)


def debian_module() -> Path:
    """A Debian module without dependencies, as shipped (.ko on 6.1, .ko.xz on 6.12)."""
    nls = Path("/lib/modules", os.uname().release, "kernel", "fs", "nls")
    return next(p for p in (nls / "nls_cp737.ko", nls / "nls_cp737.ko.xz") if p.exists())


@pytest.fixture(scope="module")
def paths(files: None, mwload: str, tmp_path_factory: pytest.TempPathFactory) -> PathSession:
    tmp = tmp_path_factory.mktemp("paths")
    ops = ["finit", str(SPACED), "", "delete", "mwtest"]
    ops += ["finit", str(LINK), "", "finit", str(LINK), "", "delete", "mwtest"]
    ops += ["unlinked", str(GONE), "", "delete", "mwtest"]
    ops += ["finit", str(EVIL), "", "delete", "mwtest"]
    # These inits wait until the capture has handled their entries: /proc was read while
    # the call was in flight, to compare with (however far the reader lags behind).
    hold = f"hold_ms={HOLD_MS}"
    ops += ["finit", str(DEEP), hold, "delete", "mwtest"]
    ops += ["finit", str(SPACED), hold, "delete", "mwtest"]
    # Loads on 6.1; on 6.12 the .ko.xz fails (no MODULE_INIT_COMPRESSED_FILE flag) after
    # the kernel has read the file: either way the path was read.
    ops += ["finit", str(debian_module()), "", "delete", "nls_cp737"]
    # The capture (this process) stopped while a load comes and goes: /proc, read when
    # the capture handles its entry, no longer has the caller.
    me = str(os.getpid())
    stopped = [["kill", "-STOP", me], [mwload, "finit", str(WALKED), ""], ["kill", "-CONT", me]]
    command = script(tmp, [mwload, *ops], *stopped, [mwload, "delete", "mwtest"])
    trace = tmp / "paths.trace"
    with open(trace, "w", encoding="utf-8", errors="surrogateescape") as saved:
        releaser = Releaser(trace, mwload, loads=2)
        cap = Capture(Options(command=command, save_trace=saved))
        records = list(cap.run())
    markers = releaser.done()
    assert cap.stats.unparsed == 0
    assert cap.stats.command_status == 0  # the last unload's
    # The saved trace notes what /proc gave for each syscall entry, in order.
    asked = [c.get("path") for c in callers_seen(trace) if c["tid"] not in markers]
    ops_records = [r for r in records if r["type"] in ("load", "unload")]
    ops_records = [r for r in ops_records if r["module"] != MARKER]
    assert len(asked) == len(ops_records)
    loads = [r for r in ops_records if r["type"] == "load"]
    proc_paths = [path for r, path in zip(ops_records, asked, strict=True) if r["type"] == "load"]
    return PathSession(loads, proc_paths)


def test_path_with_spaces_on_a_tmpfs_mount(paths: PathSession) -> None:
    load = paths.loads[0]
    assert (load["path"], load["path_source"], load["ok"]) == (str(SPACED), "kernel", True)


def test_symlink_gives_the_real_file(paths: PathSession) -> None:
    load = paths.loads[1]
    assert (load["path"], load["path_source"], load["ok"]) == (str(SPACED), "kernel", True)


def test_duplicate_load_failing_at_once_still_has_its_path(paths: PathSession) -> None:
    dup = paths.loads[2]
    assert (dup["errno"], dup["path"], dup["path_source"]) == ("EEXIST", str(SPACED), "kernel")


def test_unlinked_file_is_marked_deleted(paths: PathSession) -> None:
    load = paths.loads[3]
    assert (load["path"], load["path_source"]) == (f"{GONE} (deleted)", "kernel")


def test_name_with_quotes_newline_and_fake_trace_text(paths: PathSession) -> None:
    load = paths.loads[4]
    assert (load["path"], load["path_source"], load["ok"]) == (str(EVIL), "kernel", True)


def test_deeper_than_the_kernel_names_reach(paths: PathSession) -> None:
    # The kernel's names end below the top; /proc, read while the call was in flight,
    # agrees with every one of them and completes the path.
    load = paths.loads[5]
    assert paths.proc_paths[5] == str(DEEP)
    assert (load["path"], load["path_source"]) == (str(DEEP), "proc")


def test_kernel_and_proc_agree(paths: PathSession) -> None:
    load = paths.loads[6]
    assert paths.proc_paths[6] == str(SPACED)
    assert (load["path"], load["path_source"]) == (str(SPACED), "kernel")


def test_debian_module_under_lib_modules(paths: PathSession) -> None:
    # In the guest, /lib/modules/VERSION leads into the test bed's cache, 11 names deep
    # on one mount: deeper than the kernel's 8. The kernel's names are the end of the
    # real path; /proc completes it if it was read in time, else the directory above
    # where /lib/modules/VERSION really is leads to the kernel's inode.
    load = paths.loads[7]
    real = os.path.realpath(debian_module())
    got = (load["path"], load["path_source"])
    expected = (real, "proc") if paths.proc_paths[7] else (real, "search")
    assert got == expected, paths.proc_paths[7]
    assert paths.proc_paths[7] in (real, None)


def test_deep_path_of_a_caller_gone_is_found_on_its_mount(paths: PathSession) -> None:
    # Neither the kernel's names reach the top nor could /proc be read: the top is found
    # by walking the file's mount for the directory the names lead from to its inode.
    load = paths.loads[8]
    assert paths.proc_paths[8] is None
    assert (load["path"], load["path_source"], load["ok"]) == (str(WALKED), "search", True)
    assert load["sha256"] is not None and load["hash_source"] == "path"


def test_every_load_was_one_record(paths: PathSession) -> None:
    assert [r["ok"] for r in paths.loads[:7]] == [True, True, False, True, True, True, True]
    assert len(paths.loads) == 9
    assert os.path.ismount(TOP)
