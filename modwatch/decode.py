"""Turning kernel numbers into names: module flags, errno values, taint letters."""

from __future__ import annotations

import errno
import os

# include/uapi/linux/module.h
LOAD_FLAGS = {
    0x1: "MODULE_INIT_IGNORE_MODVERSIONS",
    0x2: "MODULE_INIT_IGNORE_VERMAGIC",
    0x4: "MODULE_INIT_COMPRESSED_FILE",
}
# delete_module(2) takes open(2) flags: rmmod passes O_NONBLOCK, `rmmod -f` adds O_TRUNC.
UNLOAD_FLAGS = {os.O_NONBLOCK: "O_NONBLOCK", os.O_TRUNC: "O_TRUNC"}

# The letters of show_module_flags() in module_load, and what they mean.
MODULE_TAINTS = {
    "P": "proprietary module",
    "O": "out-of-tree module",
    "F": "module was force-loaded",
    "C": "staging driver",
    "E": "unsigned module",
}


def flag_names(value: int, table: dict[int, str]) -> list[str]:
    """Names of the bits set in `value`; bits without a name as one hex string."""
    names = [name for bit, name in table.items() if value & bit]
    unknown = value & ~sum(table)
    if unknown:
        names.append(hex(unknown))
    return names


def errno_name(ret: int | None) -> str | None:
    """`EEXIST` for -17; None for success, unknown values and no value."""
    if ret is None or ret >= 0:
        return None
    return errno.errorcode.get(-ret)


def errno_message(ret: int | None) -> str | None:
    if ret is None or ret >= 0 or -ret not in errno.errorcode:
        return None
    return os.strerror(-ret)
