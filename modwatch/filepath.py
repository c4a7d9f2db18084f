"""The module file's path, read in the kernel while the file is open.

`/proc/PID/fd/FD` races with the loader (a failing load returns within microseconds,
and the fd and the process are gone). The kernel has the file: modwatch probes a
function that receives the module's `struct file *` and fetches, in the same event,
the names along its dentry chain and across the mounts above it. Offsets come from
the running kernel's BTF (`modwatch.btf`), never from a table of versions.

What one event carries, for mount m = 0 (the file's own) and the mounts above it:

- `r{m}`: the mount's root dentry; `d{m}_{k}`: the k-th dentry of its chain (for m = 0
  the file's dentry and its parents, for m > 0 the mountpoint of the mount below and
  its parents). The chain ends where `d{m}_{k} == r{m}`.
- `l{m}_{k}`, `n{m}_{k}`: the length and the name of `d{m}_{k}`. Names are printed raw
  and may hold any byte but `/` and NUL (quotes, newlines): the parser cuts each one
  by its length, fetched before it, so no name can be read as another field.
- `p{m}` (m >= 1): the mount above mount m-1; a mount whose parent is itself (`p{m+1}
  == p{m}`) is the top of the tree.
- `hash`: `d_hash.pprev` of the file's dentry, 0 once the file was unlinked.
- `ino`: the file's inode number (where BTF has it), to recognise the loaded file later.

The kernel accepts a fetch-arg of at most 63 characters (MAX_ARGSTR_LEN), and each
level of the chain adds one dereference to the text: a mount shows as many names as fit
(8 for the file's own mount with two-digit offsets). A path whose top lies beyond them
is completed from /proc when /proc's path agrees with every name the kernel gave, else
found on the file system (`modwatch.pathsearch`: the directory those names lead from to
the kernel's inode), else marked truncated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from modwatch.pathsearch import Target

# Names fetched for the file's own mount and the mounts above it (as many as fit).
# The last mount gets no names: it is there to recognise the top of the tree. A system
# that switched root from an initramfs keeps the initramfs's rootfs as the top mount,
# with the real root mounted on its "/": a path ends there without another name.
NAMES = (64, 64, 64, 0)
MOUNTS = len(NAMES)
MAX_ARG_TEXT = 63  # MAX_ARGSTR_LEN: the longest fetch-arg text the kernel takes
TRUNCATED = "[truncated]"  # leads a path whose top could not be reached: never absolute
DELETED = " (deleted)"  # as the kernel's d_path and /proc/PID/fd write it
# path_source of a path whose top the kernel's names did not reach, found on the file
# system as the directory those names lead from to the kernel's inode (modwatch.pathsearch)
SEARCH = "search"

# Struct members whose offsets the probe needs, as BTF member paths.
MEMBERS = (
    "file.f_path.dentry",
    "file.f_path.mnt",
    "dentry.d_parent",
    "dentry.d_name.name",
    "dentry.d_name.len",
    "dentry.d_hash.pprev",
    "vfsmount.mnt_root",
    "mount.mnt",
    "mount.mnt_parent",
    "mount.mnt_mountpoint",
)
# The file's inode number, to tell the loaded file from another one that later takes its
# fd number or its path (optional: the path is fetched without it).
INODE_MEMBERS = ("dentry.d_inode", "inode.i_ino")


@dataclass(frozen=True)
class FileArg:
    """One fetch-arg of the file probe (the caller turns it into a probes.FetchArg)."""

    name: str
    fetch: str
    type: str


def _deref(offset: int, inner: str) -> str:
    return f"{offset:+d}({inner})"


def fetch_args(file_reg: str, offset: Callable[[str], int | None]) -> tuple[FileArg, ...] | None:
    """The fetch-args that read the path of the `struct file *` in `file_reg`, or None
    when a member's offset is unknown (no BTF, or a kernel whose structs differ)."""
    off: dict[str, int] = {}
    for member in MEMBERS:
        value = offset(member)
        if value is None:
            return None
        off[member] = value
    parent, name_ptr, name_len = (
        off["dentry.d_parent"],
        off["dentry.d_name.name"],
        off["dentry.d_name.len"],
    )
    m_mnt = off["mount.mnt"]
    vfsmount = _deref(off["file.f_path.mnt"], file_reg)
    # struct mount embeds the vfsmount at `mnt`: from a vfsmount, the mount's own fields
    # lie at their offset minus that one. mounts[m] is p{m+1}, the mount above mount m.
    mounts = [_deref(off["mount.mnt_parent"] - m_mnt, vfsmount)]
    for _ in range(MOUNTS - 1):
        mounts.append(_deref(off["mount.mnt_parent"], mounts[-1]))
    roots = [_deref(off["vfsmount.mnt_root"], vfsmount)]
    roots += [_deref(m_mnt + off["vfsmount.mnt_root"], p) for p in mounts[: MOUNTS - 1]]
    starts = [
        _deref(off["file.f_path.dentry"], file_reg),
        _deref(off["mount.mnt_mountpoint"] - m_mnt, vfsmount),
        *(_deref(off["mount.mnt_mountpoint"], p) for p in mounts[: MOUNTS - 2]),
    ]
    args = [FileArg("hash", _deref(off["dentry.d_hash.pprev"], starts[0]), "x64")]
    d_inode, i_ino = (offset(member) for member in INODE_MEMBERS)
    if d_inode is not None and i_ino is not None:
        args.append(FileArg("ino", _deref(i_ino, _deref(d_inode, starts[0])), "u64"))
    lengths: list[FileArg] = []
    names: list[FileArg] = []
    for m in range(MOUNTS):
        args.append(FileArg(f"r{m}", roots[m], "x64"))
        if m:
            args.append(FileArg(f"p{m}", mounts[m - 1], "x64"))
        dentry = starts[m]
        for k in range(NAMES[m] + 1):
            # A pointer one level beyond the last name: is that level the mount's root?
            args.append(FileArg(f"d{m}_{k}", dentry, "x64"))
            name = FileArg(f"n{m}_{k}", f"+0({_deref(name_ptr, dentry)})", "string")
            if k == NAMES[m] or len(f"{name.fetch}:{name.type}") > MAX_ARG_TEXT:
                break
            lengths.append(FileArg(f"l{m}_{k}", _deref(name_len, dentry), "u32"))
            names.append(name)
            dentry = _deref(parent, dentry)
    args.append(FileArg(f"p{MOUNTS}", mounts[-1], "x64"))
    for arg in (*args, *lengths, *names):
        if len(f"{arg.fetch}:{arg.type}") > MAX_ARG_TEXT:
            return None  # offsets too long to spell even the first level
    return (*args, *lengths, *names)


class KernelPath(NamedTuple):
    """A path as the kernel's names give it."""

    names: tuple[str, ...]  # components, top first
    complete: bool  # False: the top lies beyond the levels fetched
    deleted: bool
    ino: int | None = None  # the file's inode number, where the kernel's BTF gave it
    # Not complete: where the file's own mount is mounted, when the mounts above were
    # within reach (the names are then all on that mount).
    mount: str | None = None

    def text(self) -> str:
        path = "/" + "/".join(self.names)
        return (path if self.complete else TRUNCATED + path) + (DELETED if self.deleted else "")

    def target(self) -> Target | None:
        """What to find the whole path by on the file system, where the kernel's names
        did not reach its top (and the file was not unlinked)."""
        if self.complete or self.deleted or self.ino is None:
            return None
        return Target(self.names, self.ino, self.mount)


class _Cut(Exception):
    """A mount's chain goes on beyond the names fetched."""


class _Unreadable(Exception):
    """A name the kernel could not read."""


def _chain(fields: Mapping[str, int | str | None], m: int) -> list[str]:
    """Mount m's names, leaf first."""
    names: list[str] = []
    root = fields.get(f"r{m}")
    while fields.get(f"d{m}_{len(names)}") != root:
        key = f"n{m}_{len(names)}"
        if key not in fields:
            raise _Cut(names)
        name = fields[key]
        if not isinstance(name, str):
            raise _Unreadable
        names.append(name)
    return names


def rebuild(fields: Mapping[str, int | str | None]) -> KernelPath | None:
    """The path from one file event's fields; None if a name could not be read."""
    parts: list[str] = []  # leaf first
    ino = fields.get("ino")
    ino = ino if isinstance(ino, int) else None
    gone = fields.get("hash") == 0
    own: list[str] | None = None  # the file's own mount's names, when cut
    for m in range(MOUNTS):
        try:
            names = _chain(fields, m)
        except _Cut as cut:
            if m:  # a mount above is cut too: where the file's mount is stays unknown
                return KernelPath(tuple(reversed(own or parts + cut.args[0])), False, gone, ino)
            names = own = cut.args[0]
        except _Unreadable:
            return None
        parts += names
        if m and fields.get(f"p{m + 1}") == fields.get(f"p{m}"):
            if own is not None:  # the mounts above are whole: where the file's mount is
                mount = "/" + "/".join(reversed(parts[len(own) :]))
                return KernelPath(tuple(reversed(own)), False, gone, ino, mount)
            return KernelPath(tuple(reversed(parts)), True, gone and bool(parts), ino)
    return KernelPath(tuple(reversed(own or parts)), False, gone and bool(own or parts), ino)


def choose(
    kernel: KernelPath | None, proc: str | None, proc_ino: int | None = None
) -> tuple[str | None, str | None]:
    """The path to report and where it came from (`kernel`, `proc` or None).

    The kernel's path is race-free; /proc's is read after the event and may be gone, or
    name another file by then (the loader's fd number reused): it is not used when its
    inode is not the one the kernel read. A path the kernel could only give in part is
    completed from /proc when /proc's path ends with every name the kernel gave, else
    reported truncated.
    """
    if kernel is not None and kernel.complete:
        return kernel.text(), "kernel"
    if kernel is not None and None not in (kernel.ino, proc_ino) and kernel.ino != proc_ino:
        proc = None
    if proc is not None and (kernel is None or _ends_with(proc, kernel)):
        return proc, "proc"
    if kernel is not None:
        return kernel.text(), "kernel"
    return None, None


def _ends_with(proc: str, kernel: KernelPath) -> bool:
    names = proc.removesuffix(DELETED).split("/")
    return bool(kernel.names) and tuple(names[-len(kernel.names) :]) == kernel.names
