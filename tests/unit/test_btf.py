"""The BTF reader, on hand-built BTF and on the running kernel's own."""

from __future__ import annotations

import os
import struct

import pytest

from modwatch import btf
from modwatch.btf import BTF, BTFError


class Builder:
    """Minimal BTF writer: enough kinds to exercise the reader."""

    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def s(self, text: str) -> int:
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(
        self,
        kind: int,
        name: str,
        size_or_type: int,
        extra: bytes = b"",
        vlen: int = 0,
        kind_flag: int = 0,
    ) -> int:
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int) -> int:
        return self.add(btf.INT, name, size, struct.pack("<I", size * 8))

    def struct_(
        self,
        name: str,
        size: int,
        members: list[tuple[str, int, int]],
        union: bool = False,
        bitfields: bool = False,
    ) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        kind = btf.UNION if union else btf.STRUCT
        return self.add(kind, name, size, extra, len(members), int(bitfields))

    def blob(self) -> bytes:
        header = struct.pack(
            "<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return header + self.types + self.strings


def sample() -> BTF:
    b = Builder()
    u32 = b.int_("unsigned int", 4)
    ptr = b.add(btf.PTR, "", u32)
    name_t = b.add(btf.TYPEDEF, "name_t", ptr)
    const_name = b.add(btf.CONST, "", name_t)
    inner = b.struct_("qstr", 16, [("hash", u32, 0), ("name", const_name, 64)])
    # An anonymous union holding an anonymous struct, as the kernel's headers do.
    anon_s = b.struct_("", 8, [("lo", u32, 0), ("hi", u32, 32)])
    anon_u = b.struct_("", 8, [("whole", ptr, 0), ("", anon_s, 0)], union=True)
    flags = b.struct_(
        "flags", 4, [("a", u32, (3 << 24) | 0), ("b", u32, (5 << 24) | 8)], bitfields=True
    )
    b.struct_(
        "outer",
        64,
        [
            ("state", u32, 0),
            ("", anon_u, 64),
            ("d_name", inner, 128),
            ("f", flags, 256),
            ("tail", u32, 288),
        ],
    )
    return BTF(b.blob())


def test_nested_and_anonymous_members() -> None:
    t = sample()
    assert t.offset("outer.state") == 0
    assert t.offset("outer.whole") == 8
    assert t.offset("outer.hi") == 12  # inside an anonymous struct inside an anonymous union
    assert t.offset("outer.d_name.name") == 16 + 8
    assert t.offset("qstr.name") == 8
    assert t.offset("outer.tail") == 36


def test_typedef_and_const_resolve_to_the_pointer() -> None:
    t = sample()
    qstr = t.resolve(t.struct_id("qstr"))
    name = next(m for m in qstr.members if m.name == "name")
    assert t.resolve(name.type_id).kind == btf.PTR


def test_bitfields_have_no_byte_offset() -> None:
    t = sample()
    assert t.offset("outer.f") == 32
    with pytest.raises(BTFError, match="bitfield"):
        t.offset("flags.b")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nosuch.x", "no struct nosuch"),
        ("outer.nope", "no member nope in outer"),
        ("outer", "give a member path"),
    ],
)
def test_errors_name_what_is_missing(path: str, message: str) -> None:
    with pytest.raises(BTFError, match=message):
        sample().offset(path)


def test_the_walk_stops_at_the_types_asked_for() -> None:
    b = Builder()
    u32 = b.int_("unsigned int", 4)
    b.struct_("early", 8, [("a", u32, 0), ("b", u32, 32)])
    # A struct whose record claims more members than the section holds: the section
    # ends inside it, which is found only by a walk that gets that far.
    b.add(btf.STRUCT, "broken", 8, struct.pack("<III", 0, u32, 0), vlen=5)
    t = BTF(b.blob())
    assert t.offset("early.b") == 4
    with pytest.raises(BTFError, match="ends inside a type"):
        len(t)


def test_not_btf() -> None:
    with pytest.raises(BTFError, match="not BTF"):
        BTF(b"\0" * 64)
    with pytest.raises(BTFError, match="too short"):
        BTF(b"\x9f\xeb")
    with pytest.raises(BTFError, match="cannot read"):
        BTF.load("/nonexistent/vmlinux")


@pytest.mark.skipif(not os.path.exists(btf.VMLINUX), reason="this kernel exposes no BTF")
def test_running_kernel() -> None:
    t = BTF.load()
    # Stable on 64-bit kernels (see the kernel notes): after `state` and `list`.
    assert t.offset("module.name") == 24
    assert t.offset("qstr.name") == 8
    assert t.offset("dentry.d_name.name") == t.offset("dentry.d_name") + 8
    assert t.offset("file.f_path.dentry") == t.offset("file.f_path") + t.offset("path.dentry")
