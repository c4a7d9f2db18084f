"""Finding the top of a path the kernel could only give in part: by earlier paths, then
by a bounded walk of the file's mount, and only a directory that leads to the same inode."""

from __future__ import annotations

from pathlib import Path

import pytest

from modwatch.pathsearch import Finder, Target, ancestors

DEEP = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "mw.ko")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A module file 11 names below `tmp_path`, and decoys with its last 8 names."""
    deep = tmp_path.joinpath(*DEEP)
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"module")
    decoy = tmp_path.joinpath("x", *DEEP[3:])  # the same last names, another file
    decoy.parent.mkdir(parents=True)
    decoy.write_bytes(b"other")
    return tmp_path


def target(tree: Path, mount: str | None = None) -> Target:
    ino = tree.joinpath(*DEEP).stat().st_ino
    return Target(DEEP[3:], ino, str(tree) if mount is None else mount)


def finder(max_dirs: int = 1000) -> Finder:
    return Finder(max_dirs, module_dir="/no/such/directory")


def test_ancestors() -> None:
    assert list(ancestors("/a/b")) == ["/a/b", "/a", "/"]


def test_found_by_walking_the_mount_not_by_a_decoy(tree: Path) -> None:
    assert finder().find(target(tree)) == str(tree.joinpath(*DEEP))


def test_found_above_an_earlier_path_without_a_walk(tree: Path) -> None:
    f = finder(max_dirs=0)
    assert f.find(target(tree)) is None  # no directory may be read
    f.remember(str(tree / "a" / "b" / "c" / "other" / "other.ko"))
    assert f.find(target(tree)) == str(tree.joinpath(*DEEP))


def test_found_above_the_running_kernels_module_directory(tree: Path) -> None:
    # As in the test bed's guests: /lib/modules/RELEASE leads elsewhere by a symlink.
    modules = tree / "lib" / "modules"
    modules.mkdir(parents=True)
    (modules / "rel").symlink_to(tree / "a" / "b" / "c" / "d")
    assert Finder(0, module_dir=str(modules / "rel")).find(target(tree)) == str(
        tree.joinpath(*DEEP)
    )


def test_a_file_replaced_since_is_not_found(tree: Path) -> None:
    t = target(tree)
    deep = tree.joinpath(*DEEP)
    deep.rename(tree / "moved.ko")  # the loaded inode lives on, elsewhere
    deep.write_bytes(b"module")
    f = finder()
    f.remember(str(deep))
    assert f.find(t) is None


def test_the_walk_is_bounded(tree: Path) -> None:
    assert finder(max_dirs=3).find(target(tree)) is None
    assert finder(max_dirs=20).find(target(tree)) is not None
    out_of_time = Finder(20, module_dir="/no/such/directory", max_seconds=0)
    assert out_of_time.find(target(tree)) is None


def test_a_mount_modwatch_cannot_see_gives_nothing(tree: Path) -> None:
    assert finder().find(target(tree, mount=str(tree / "no" / "such"))) is None


def test_without_the_mount_only_earlier_paths_are_tried(tree: Path) -> None:
    t = target(tree)._replace(mount=None)
    f = finder()
    assert f.find(t) is None
    f.remember(str(tree.joinpath(*DEEP)))
    assert f.find(t) == str(tree.joinpath(*DEEP))


def test_symlinked_directories_are_not_walked(tree: Path) -> None:
    (tree / "loop").symlink_to(tree)
    assert finder().find(target(tree)) == str(tree.joinpath(*DEEP))
