"""Facts about a module file: its hash and size as loaded, whether it is signed,
compressed, shipped with the running kernel, and its `.modinfo` (vermagic,
srcversion), read with the standard library only.

The file is read through the loader's own open file where possible (`/proc/PID/fd/FD`,
opened while the call is in flight: the very file the kernel read, even if it was
renamed or unlinked since), else by its path, which may by then name other content:
a path whose file was modified after the load is marked stale.
"""

from __future__ import annotations

import importlib
import lzma
import os
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from modwatch.filepath import DELETED
from modwatch.pathsearch import Finder, Target

SIGNATURE_MAGIC = b"~Module signature appended~\n"
MAX_DECOMPRESSED = 512 << 20  # a bound against a decompression bomb
_MAGIC = ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zst"), (b"\x1f\x8b", "gz"))

FILE_KEYS = (
    "sha256",
    "size",
    "hash_source",
    "stale",
    "signed",
    "compressed",
    "in_tree",
    "vermagic",
    "srcversion",
)


class FileFacts(NamedTuple):
    sha256: str | None = None
    size: int | None = None
    hash_source: str | None = None  # "fd" or "path"
    stale: bool | None = None  # read by path, and the file was modified after the load
    signed: bool | None = None  # an appended module signature is present
    compressed: str | None = None  # "xz", "zst", "gz", or None for a plain ELF file
    in_tree: bool | None = None  # under /lib/modules/$(uname -r)/
    vermagic: str | None = None
    srcversion: str | None = None
    reasons: dict[str, str] | None = None  # why a fact is None where it could be known
    path: str | None = None  # the path found where the kernel's names were cut


def compression(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def decompress(data: bytes, kind: str) -> bytes:
    """The module inside a compressed file; ValueError with the reason if it cannot be
    had (zstd: the standard library has no decompressor before Python 3.14)."""
    if kind == "xz":
        try:
            out = lzma.LZMADecompressor().decompress(data, max_length=MAX_DECOMPRESSED)
        except lzma.LZMAError as err:
            raise ValueError(f"xz: {err}") from err
    elif kind == "gz":
        try:
            out = zlib.decompressobj(wbits=31).decompress(data, MAX_DECOMPRESSED)
        except zlib.error as err:
            raise ValueError(f"gz: {err}") from err
    else:
        raise ValueError(f"{kind}-compressed: no decompressor in Python's standard library")
    if len(out) >= MAX_DECOMPRESSED:
        raise ValueError(f"{kind}: more than {MAX_DECOMPRESSED >> 20} MiB decompressed")
    return out


def modinfo(elf: bytes) -> dict[str, str]:
    """The key=value entries of an ELF file's .modinfo section (the first of each key);
    ValueError if it is not an ELF file or has no such section."""
    if elf[:4] != b"\x7fELF" or elf[4] not in (1, 2) or elf[5] not in (1, 2):
        raise ValueError("not an ELF file")
    wide, order = elf[4] == 2, "<" if elf[5] == 1 else ">"
    try:
        if wide:
            (shoff,) = struct.unpack_from(order + "Q", elf, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", elf, 0x3A)
            header = order + "IIQQQQ"
        else:
            (shoff,) = struct.unpack_from(order + "I", elf, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", elf, 0x2E)
            header = order + "IIIIII"
        sections = [struct.unpack_from(header, elf, shoff + i * shentsize) for i in range(shnum)]
        names_offset, names_size = sections[shstrndx][4], sections[shstrndx][5]
        names = elf[names_offset : names_offset + names_size]
    except (struct.error, IndexError) as err:
        raise ValueError(f"damaged ELF section headers ({err})") from err
    for name, _type, _flags, _addr, offset, size in sections:
        if names[name : names.index(b"\0", name)] == b".modinfo":
            info: dict[str, str] = {}
            for entry in elf[offset : offset + size].split(b"\0"):
                key, sep, value = entry.partition(b"=")
                if sep:
                    info.setdefault(key.decode("ascii", "replace"), os.fsdecode(value))
            return info
    raise ValueError("no .modinfo section")


def in_tree(path: str, release: str | None = None) -> bool:
    """Whether `path` lies under the running kernel's module directory (or where that
    directory's symlinks lead, e.g. /usr/lib/modules)."""
    release = release or os.uname().release
    tree = f"/lib/modules/{release}"
    roots = {tree, os.path.realpath(tree), f"/usr{tree}"}
    return any(path.startswith(root + "/") for root in roots)


def inspect(data: bytes) -> FileFacts:
    """Hash, size, compression, signature and .modinfo of a module file's content."""
    reasons: dict[str, str] = {}
    kind = compression(data)
    elf: bytes | None = data
    if kind is not None:
        try:
            elf = decompress(data, kind)
        except ValueError as err:
            elf = None
            for key in ("signed", "vermagic", "srcversion"):
                reasons[key] = str(err)
    info: dict[str, str] = {}
    if elf is not None:
        try:
            info = modinfo(elf)
        except ValueError as err:
            reasons["vermagic"] = reasons["srcversion"] = str(err)
    for key in ("vermagic", "srcversion"):
        if elf is not None and key not in info and key not in reasons:
            reasons[key] = "not in .modinfo"
    import hashlib  # here, in a worker (FileReader.prepare): OpenSSL is slow to load

    return FileFacts(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        signed=None if elf is None else elf.endswith(SIGNATURE_MAGIC),
        compressed=kind,
        vermagic=info.get("vermagic"),
        srcversion=info.get("srcversion"),
        reasons=reasons or None,
    )


def read_fd(fd: int, load_wall_ns: int | None = None, ino: int | None = None) -> FileFacts:
    """Facts of the file open as `fd` (closed here), read from its start."""
    try:
        with os.fdopen(fd, "rb") as f:
            stat = os.fstat(f.fileno())
            f.seek(0)
            data = f.read()
    except OSError as err:
        return FileFacts(reasons={"sha256": f"reading the loader's file: {err.strerror}"})
    return inspect(data)._replace(hash_source="fd", stale=_stale(stat, load_wall_ns, ino))


def read_path(path: str, load_wall_ns: int | None = None, ino: int | None = None) -> FileFacts:
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read()
    except OSError as err:
        return FileFacts(reasons={"sha256": f"reading {path}: {err.strerror}"})
    facts = inspect(data)._replace(hash_source="path", stale=_stale(stat, load_wall_ns, ino))
    if ino is not None and stat.st_ino != ino:
        reasons = {**(facts.reasons or {}), "stale": f"{path} is another file than the one loaded"}
        facts = facts._replace(reasons=reasons)
    return facts


def _ino(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def _stale(stat: os.stat_result, load_wall_ns: int | None, ino: int | None) -> bool | None:
    """Whether what is read now may not be what was loaded: the file was modified after
    the load, or it is another file (another inode) than the kernel read."""
    if ino is not None and stat.st_ino != ino:
        return True
    return None if load_wall_ns is None else stat.st_mtime_ns > load_wall_ns


# The facts that need the file read.
READ_KEYS = ("sha256", "size", "signed", "compressed", "vermagic", "srcversion")


def done(facts: FileFacts) -> Future[FileFacts]:
    future: Future[FileFacts] = Future()
    future.set_result(facts)
    return future


class FileReader:
    """Reads module files off the reader's path, in worker threads, and finds the top of
    a path the kernel could only give in part."""

    def __init__(self, hashing: bool = True, workers: int = 2) -> None:
        self.hashing = hashing
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._finder: Finder | None = None

    def start(
        self,
        fd: int | None,
        path: str | None,
        wall_ns: int,
        ino: int | None = None,
        search: Target | None = None,
    ) -> Future[FileFacts]:
        """Read the file open as `fd` (taken over: closed when read), else at `path`, else
        where `search` finds it. With `ino`, a file with another inode number is not the
        one loaded: an fd holding one is not read, and a path naming one is read but
        marked stale."""
        if not self.hashing:
            if fd is not None:
                os.close(fd)
            if search is None:
                return done(_not_read(path))
        return self._workers().submit(self._job, fd, path, wall_ns, ino, search)

    def prepare(self) -> None:
        """Start the workers and load what hashing needs (OpenSSL) now, not at the first
        load, whose record waits for its file at most a few seconds."""
        if self.hashing:
            self._workers().submit(importlib.import_module, "hashlib")

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="modwatch-file")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _job(
        self,
        fd: int | None,
        path: str | None,
        wall_ns: int,
        ino: int | None,
        search: Target | None,
    ) -> FileFacts:
        if self._finder is None:
            self._finder = Finder()
        found = None
        if search is not None:
            path = found = self._finder.find(search)
        if path is not None and not path.endswith(DELETED):
            self._finder.remember(path)  # where later module files may be found
        if not self.hashing:
            return _not_read(path)._replace(path=found)
        return _read(fd, path, wall_ns, ino)._replace(path=found)


def _tree(path: str | None) -> bool | None:
    return in_tree(path) if path is not None and path.startswith("/") else None


def _not_read(path: str | None) -> FileFacts:
    return FileFacts(in_tree=_tree(path), reasons=dict.fromkeys(READ_KEYS, "not read: --no-hash"))


def _read(fd: int | None, path: str | None, wall_ns: int, ino: int | None) -> FileFacts:
    if fd is not None and ino is not None and _ino(fd) != ino:
        os.close(fd)  # the loader's fd number holds another file by now
        fd = None
    if fd is not None:
        facts = read_fd(fd, wall_ns, ino)
    elif path is not None:
        facts = read_path(path.removesuffix(DELETED), wall_ns, ino)
    else:
        facts = FileFacts(
            reasons={"sha256": "the loader's file was closed and its path is unknown"}
        )
    return facts._replace(in_tree=_tree(path))
