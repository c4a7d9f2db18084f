"""decode: flag names, errno names and messages, taint letters."""

from __future__ import annotations

import pytest

from modwatch.decode import (
    LOAD_FLAGS,
    MODULE_TAINTS,
    UNLOAD_FLAGS,
    errno_message,
    errno_name,
    flag_names,
)


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (0, []),
        (1, ["MODULE_INIT_IGNORE_MODVERSIONS"]),
        (2, ["MODULE_INIT_IGNORE_VERMAGIC"]),
        (4, ["MODULE_INIT_COMPRESSED_FILE"]),
        (
            1 | 2 | 4,
            [
                "MODULE_INIT_IGNORE_MODVERSIONS",
                "MODULE_INIT_IGNORE_VERMAGIC",
                "MODULE_INIT_COMPRESSED_FILE",
            ],
        ),
        (8, ["0x8"]),
        (0x5 | 0x30, ["MODULE_INIT_IGNORE_MODVERSIONS", "MODULE_INIT_COMPRESSED_FILE", "0x30"]),
        (0xFFFFFFFF, [*LOAD_FLAGS.values(), "0xfffffff8"]),
    ],
)
def test_load_flags(value: int, names: list[str]) -> None:
    assert flag_names(value, LOAD_FLAGS) == names


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (0x800, ["O_NONBLOCK"]),
        (0x200, ["O_TRUNC"]),
        (0xA00, ["O_NONBLOCK", "O_TRUNC"]),
        (0, []),
        (0x1, ["0x1"]),
        (0x80800, ["O_NONBLOCK", "0x80000"]),
    ],
)
def test_unload_flags(value: int, names: list[str]) -> None:
    assert flag_names(value, UNLOAD_FLAGS) == names


@pytest.mark.parametrize(
    ("ret", "name"),
    [
        (-1, "EPERM"),
        (-2, "ENOENT"),
        (-8, "ENOEXEC"),
        (-16, "EBUSY"),
        (-17, "EEXIST"),
        (-22, "EINVAL"),
        (-11, "EAGAIN"),
        (0, None),
        (5, None),
        (None, None),
        (-4095, None),
    ],
)
def test_errno_name(ret: int | None, name: str | None) -> None:
    assert errno_name(ret) == name


@pytest.mark.parametrize(
    ("ret", "message"),
    [
        (-2, "No such file or directory"),
        (-17, "File exists"),
        (-8, "Exec format error"),
        (0, None),
        (None, None),
        (-4095, None),
    ],
)
def test_errno_message(ret: int | None, message: str | None) -> None:
    assert errno_message(ret) == message


def test_module_taint_letters() -> None:
    assert sorted(MODULE_TAINTS) == ["C", "E", "F", "O", "P"]
    assert MODULE_TAINTS["O"] == "out-of-tree module"
    assert MODULE_TAINTS["E"] == "unsigned module"
