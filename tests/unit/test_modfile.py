"""modfile: a module file's hash, compression, signature and .modinfo, and its reading
off the reader's path."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import lzma
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from modwatch import modfile
from modwatch.modfile import FileFacts, FileReader
from modwatch.pathsearch import Target

INFO = (
    b"version=1.0\0license=GPL\0srcversion=0123456789ABCDEF012345\0"
    b"vermagic=6.1.0-56-amd64 SMP preempt mod_unload modversions \0"
)


def elf(modinfo: bytes = INFO, wide: bool = True, order: str = "<") -> bytes:
    """A minimal relocatable ELF file: a null section, .modinfo and .shstrtab."""
    names = b"\0.modinfo\0.shstrtab\0"
    ehsize, shentsize = (64, 64) if wide else (52, 40)
    body = modinfo + names
    shoff = ehsize + len(body)
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if order == "<" else 2, 1]) + bytes(9)
    if wide:
        header = ident + struct.pack(
            order + "HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, 3, 2
        )
        section = order + "IIQQQQIIQQ"
    else:
        header = ident + struct.pack(
            order + "HHIIIIIHHHHHH", 1, 3, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, 3, 2
        )
        section = order + "IIIIIIIIII"
    sections = [
        struct.pack(section, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack(section, 1, 1, 0, 0, ehsize, len(modinfo), 0, 0, 1, 0),
        struct.pack(section, 10, 3, 0, 0, ehsize + len(modinfo), len(names), 0, 0, 1, 0),
    ]
    return header + body + b"".join(sections)


@pytest.mark.parametrize(("wide", "order"), [(True, "<"), (False, "<"), (True, ">")])
def test_modinfo(wide: bool, order: str) -> None:
    info = modfile.modinfo(elf(wide=wide, order=order))
    assert info["srcversion"] == "0123456789ABCDEF012345"
    assert info["vermagic"] == "6.1.0-56-amd64 SMP preempt mod_unload modversions "
    assert info["license"] == "GPL"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not an elf", "not an ELF file"),
        (elf()[:80], "damaged ELF section headers"),
        (elf().replace(b".modinfo", b".notinfo"), "no .modinfo section"),
    ],
)
def test_modinfo_refuses(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        modfile.modinfo(data)


def test_inspect_a_plain_signed_module() -> None:
    data = elf() + b"SIGNATURE BYTES" + modfile.SIGNATURE_MAGIC
    assert modfile.inspect(data) == FileFacts(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        signed=True,
        compressed=None,
        vermagic="6.1.0-56-amd64 SMP preempt mod_unload modversions ",
        srcversion="0123456789ABCDEF012345",
    )


@pytest.mark.parametrize(("kind", "compress"), [("xz", lzma.compress), ("gz", gzip.compress)])
def test_inspect_compressed_modules(kind: str, compress: object) -> None:
    inner = elf() + modfile.SIGNATURE_MAGIC
    data = compress(inner)  # type: ignore[operator]
    facts = modfile.inspect(data)
    assert (facts.compressed, facts.signed, facts.srcversion) == (
        kind,
        True,
        "0123456789ABCDEF012345",
    )
    assert facts.sha256 == hashlib.sha256(data).hexdigest()  # of the file, as loaded
    assert facts.size == len(data)


def test_inspect_zstd_says_why_it_cannot_look_inside() -> None:
    data = b"\x28\xb5\x2f\xfd" + bytes(32)
    facts = modfile.inspect(data)
    assert (facts.compressed, facts.signed, facts.vermagic, facts.sha256) == (
        "zst",
        None,
        None,
        hashlib.sha256(data).hexdigest(),
    )
    assert facts.reasons == dict.fromkeys(
        ("signed", "vermagic", "srcversion"),
        "zst-compressed: no decompressor in Python's standard library",
    )


def test_inspect_unsigned_without_srcversion() -> None:
    facts = modfile.inspect(elf(b"license=GPL\0vermagic=6.12.117 SMP\0"))
    assert (facts.signed, facts.vermagic, facts.srcversion) == (False, "6.12.117 SMP", None)
    assert facts.reasons == {"srcversion": "not in .modinfo"}


def test_a_damaged_xz_file() -> None:
    facts = modfile.inspect(b"\xfd7zXZ\x00" + b"garbage")
    assert facts.compressed == "xz" and facts.signed is None
    assert facts.reasons is not None and facts.reasons["signed"].startswith("xz: ")


@pytest.mark.parametrize(
    ("path", "inside"),
    [
        ("/lib/modules/6.1.0-56-amd64/kernel/fs/fat/fat.ko.xz", True),
        ("/usr/lib/modules/6.1.0-56-amd64/kernel/fs/fat/fat.ko.xz", True),
        ("/lib/modules/6.1.0-56-amd64", False),
        ("/lib/modules/6.12.117/kernel/x.ko", False),
        ("/home/u/mwtest.ko", False),
    ],
)
def test_in_tree(path: str, inside: bool) -> None:
    assert modfile.in_tree(path, "6.1.0-56-amd64") is inside


def test_reader_reads_the_loaders_file_and_closes_it(tmp_path: Path) -> None:
    path = tmp_path / "m.ko"
    path.write_bytes(elf())
    fd = os.open(path, os.O_RDONLY)
    os.lseek(fd, 7, os.SEEK_SET)  # wherever the loader left it: read from the start
    path.unlink()  # the file was unlinked after it was opened: still read
    reader = FileReader()
    try:
        facts = reader.start(fd, str(path), time.time_ns()).result(timeout=10)
    finally:
        reader.close()
    assert (facts.hash_source, facts.stale, facts.size) == ("fd", False, len(elf()))
    assert facts.srcversion == "0123456789ABCDEF012345" and facts.in_tree is False
    with pytest.raises(OSError):
        os.fstat(fd)


def test_reader_by_path_marks_a_file_changed_after_the_load(tmp_path: Path) -> None:
    path = tmp_path / "m.ko"
    path.write_bytes(elf())
    loaded_ns = time.time_ns()
    os.utime(path, ns=(loaded_ns + 10**9, loaded_ns + 10**9))  # rewritten a second later
    reader = FileReader()
    try:
        facts = reader.start(None, str(path) + " (deleted)", loaded_ns).result(timeout=10)
        gone = reader.start(None, str(tmp_path / "gone.ko"), loaded_ns).result(timeout=10)
        unknown = reader.start(None, None, loaded_ns).result(timeout=10)
    finally:
        reader.close()
    assert (facts.hash_source, facts.stale) == ("path", True)
    assert gone.sha256 is None and gone.reasons is not None
    assert gone.reasons["sha256"].startswith(f"reading {tmp_path}/gone.ko: No such file")
    assert unknown.reasons == {"sha256": "the loader's file was closed and its path is unknown"}


def test_prepare_loads_hashlib_in_a_worker_only_when_hashing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    imported: list[tuple[str, str]] = []
    monkeypatch.setattr(
        importlib,
        "import_module",
        lambda name: imported.append((name, threading.current_thread().name)),
    )
    reader, idle = FileReader(workers=1), FileReader(hashing=False)
    try:
        reader.prepare()
        idle.prepare()
        reader._workers().submit(lambda: None).result(timeout=10)  # after prepare's job
    finally:
        reader.close()
    assert idle._pool is None
    assert [(name, thread.startswith("modwatch-file")) for name, thread in imported] == [
        ("hashlib", True)
    ]


def test_no_hash_reads_nothing_but_says_where_the_file_is(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    release = os.uname().release
    future = FileReader(hashing=False).start(fd, f"/lib/modules/{release}/x.ko", 0)
    facts = future.result(timeout=0)
    assert facts.in_tree is True and facts.sha256 is None
    assert facts.reasons == dict.fromkeys(modfile.READ_KEYS, "not read: --no-hash")
    with pytest.raises(OSError):
        os.fstat(fd)


def test_an_fd_holding_another_file_is_not_read(tmp_path: Path) -> None:
    loaded, other = tmp_path / "loaded.ko", tmp_path / "other.ko"
    loaded.write_bytes(elf())
    other.write_bytes(elf(b"srcversion=OTHER\0"))
    fd = os.open(other, os.O_RDONLY)  # the loader's fd number, reused for the next file
    reader = FileReader()
    try:
        ino = loaded.stat().st_ino
        facts = reader.start(fd, str(loaded), time.time_ns(), ino).result(timeout=10)
        renamed = reader.start(None, str(other), time.time_ns(), ino).result(timeout=10)
    finally:
        reader.close()
    assert (facts.hash_source, facts.srcversion, facts.stale) == (
        "path",
        "0123456789ABCDEF012345",
        False,
    )
    with pytest.raises(OSError):
        os.fstat(fd)
    # By path, another file than the kernel read: read, but marked stale, and why.
    assert (renamed.hash_source, renamed.stale) == ("path", True)
    assert renamed.reasons is not None
    assert renamed.reasons["stale"] == f"{other} is another file than the one loaded"


@pytest.mark.parametrize("hashing", [True, False])
def test_a_path_the_kernel_cut_is_found_and_then_read(tmp_path: Path, hashing: bool) -> None:
    deep = tmp_path.joinpath(*"abcdefghij", "m.ko")
    deep.parent.mkdir(parents=True)
    deep.write_bytes(elf())
    names = deep.parts[-8:]
    search = Target(names, deep.stat().st_ino, str(tmp_path))
    reader = FileReader(hashing=hashing)
    try:
        cut = "[truncated]/" + "/".join(names)
        facts = reader.start(None, cut, time.time_ns(), search.ino, search).result(timeout=10)
        # Where one file was found, the next one is looked for first, without a walk.
        assert reader._finder is not None
        reader._finder.max_dirs = 0
        again = reader.start(None, cut, time.time_ns(), search.ino, search).result(timeout=10)
    finally:
        reader.close()
    assert facts.path == again.path == str(deep)
    expected = ("path", len(elf())) if hashing else (None, None)
    assert (facts.hash_source, facts.size) == expected
