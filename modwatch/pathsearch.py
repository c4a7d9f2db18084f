"""The top of a module file's path, where the kernel's names could not reach it.

The kernel spells at most 8 names of the file's own mount (`modwatch.filepath`), and a
module under /usr/lib/modules is often deeper. What the kernel gave still identifies the
file: its last names, its inode number, and, where the mounts above were within reach,
where the file's mount is mounted. This module finds a directory under which those names
lead to that inode on that file system, without trusting any path it did not check:

- first the directories above places module files were found before (the paths of
  earlier loads, and where /lib/modules/$(uname -r) really is), one stat each;
- then a breadth-first walk of the file's mount, not crossing into other mounts, bounded
  in directories read and in time.

A file that was unlinked, renamed or replaced since has no such directory: the path then
stays as the kernel gave it, marked truncated.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

MAX_DIRS = 20_000  # directories read by one walk, at most
# And for at most this long: a record waits that long for its file's facts (the
# capture's FILE_WAIT), and a walk in Python takes the interpreter from the reader.
MAX_SECONDS = 2.0
MAX_HINTS = 64  # directories remembered from earlier paths


class Target(NamedTuple):
    """What the kernel gave of a file whose path it could not spell to the top."""

    names: tuple[str, ...]  # the last names of its path, top first
    ino: int  # its inode number
    mount: str | None  # where its mount is mounted, when the mounts above were in reach


def ancestors(path: str) -> Iterator[str]:
    """`path` and each directory above it, up to "/"."""
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


class Finder:
    """Finds targets, remembering where module files were (thread-safe)."""

    def __init__(
        self,
        max_dirs: int = MAX_DIRS,
        module_dir: str | None = None,
        max_seconds: float = MAX_SECONDS,
    ) -> None:
        self.max_dirs = max_dirs
        self.max_seconds = max_seconds
        self._lock = threading.Lock()
        self._hints: dict[str, None] = {}  # directories, oldest first
        self._add(os.path.realpath(module_dir or f"/lib/modules/{os.uname().release}"))

    def remember(self, path: str) -> None:
        """Note the directory of a module file's absolute, real path."""
        if path.startswith("/"):
            self._add(os.path.dirname(path))

    def _add(self, directory: str) -> None:
        with self._lock:
            self._hints.pop(directory, None)
            self._hints[directory] = None
            while len(self._hints) > MAX_HINTS:
                del self._hints[next(iter(self._hints))]

    def find(self, target: Target) -> str | None:
        """The file's absolute path, or None when no directory leads to it."""
        if not target.names:
            return None
        dev: int | None = None
        if target.mount is not None:
            try:
                dev = os.stat(target.mount).st_dev
            except OSError:
                return None  # modwatch does not see the caller's mount there
        with self._lock:
            hints = list(reversed(self._hints))  # newest first
        tried: set[str] = set()
        for hint in hints:
            for directory in ancestors(hint):
                if directory in tried:
                    break  # and every directory above it
                tried.add(directory)
                if _leads_to(directory, target, dev):
                    return os.path.join(directory, *target.names)
        if dev is None:  # no mount to walk
            return None
        found = _walk(target, dev, self.max_dirs, time.monotonic() + self.max_seconds)
        return None if found is None else os.path.join(found, *target.names)


def _leads_to(directory: str, target: Target, dev: int | None) -> bool:
    try:
        st = os.stat(os.path.join(directory, *target.names), follow_symlinks=False)
    except (OSError, ValueError):
        return False
    return st.st_ino == target.ino and (dev is None or st.st_dev == dev)


def _walk(target: Target, dev: int, max_dirs: int, deadline: float) -> str | None:
    """Breadth-first from the mount's top: a directory holding the first name that
    leads to the file. Directories on other file systems are not entered."""
    top = target.names[0]
    queue: deque[str] = deque([target.mount or "/"])
    read = 0
    while queue and read < max_dirs and time.monotonic() < deadline:
        directory = queue.popleft()
        read += 1
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name == top and _leads_to(directory, target, dev):
                return directory
            try:
                same_fs = entry.is_dir(follow_symlinks=False) and (
                    entry.stat(follow_symlinks=False).st_dev == dev
                )
            except OSError:
                continue
            if same_fs:
                queue.append(entry.path)
    return None
