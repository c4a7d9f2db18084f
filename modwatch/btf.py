"""A reader of the kernel's BTF type information (`/sys/kernel/btf/vmlinux`).

Standard library only. It answers one question: at which byte offset does a member
path such as `file.f_path.dentry` or `module.name` lie, on the running kernel. Struct
layouts move between kernels (struct file's f_path went from 16 to about 152 to 64
between 6.4 and 6.12), so probe fetch-args take offsets from here, never from a table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

# enum btf_kind (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT = 9, 10, 11, 12, 13, 14, 15, 16
DECL_TAG, TYPE_TAG, ENUM64 = 17, 18, 19

# Bytes that follow `struct btf_type` for each kind: fixed, or per vlen entry.
_FIXED = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_ENTRY = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
# Kinds that only qualify another type.
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


class BTFError(Exception):
    """The BTF data is missing, damaged, or lacks what was asked for."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 when not a bitfield


@dataclass(frozen=True)
class BTFType:
    kind: int
    name: str
    size_or_type: int  # size for INT, STRUCT, UNION, ENUM...; target type for PTR, TYPEDEF...
    members: tuple[Member, ...] = ()


class BTF:
    """Parsed BTF: types by id (id 0 is `void`)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("BTF data too short for its header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BTFError(f"not BTF data (magic {magic:#x}) or not little-endian")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self.types: list[BTFType] = [BTFType(0, "void", 0)]
        self._by_name: dict[tuple[int, str], int] = {}
        pos = 0
        while pos < len(types):
            name_off, info, size_or_type = struct.unpack_from("<III", types, pos)
            pos += 12
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            members: tuple[Member, ...] = ()
            if kind in (STRUCT, UNION):
                entries = struct.iter_unpack("<III", types[pos : pos + 12 * vlen])
                members = tuple(
                    Member(
                        self._str(m_name),
                        m_type,
                        m_off & 0xFFFFFF if kind_flag else m_off,
                        m_off >> 24 if kind_flag else 0,
                    )
                    for m_name, m_type, m_off in entries
                )
            if kind in _PER_ENTRY:
                pos += _PER_ENTRY[kind] * vlen
            else:
                pos += _FIXED.get(kind, 0)
            name = self._str(name_off)
            self.types.append(BTFType(kind, name, size_or_type, members))
            if name:
                self._by_name.setdefault((kind, name), len(self.types) - 1)

    @classmethod
    def load(cls, path: str = VMLINUX) -> BTF:
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as err:
            raise BTFError(f"cannot read {path}: {err.strerror}") from err

    def _str(self, offset: int) -> str:
        end = self._strings.find(b"\0", offset)
        return self._strings[offset:end].decode("ascii", "replace")

    def struct_id(self, name: str) -> int:
        for kind in (STRUCT, UNION):
            if (kind, name) in self._by_name:
                return self._by_name[(kind, name)]
        raise BTFError(f"no struct {name} in BTF")

    def resolve(self, type_id: int) -> BTFType:
        """The type behind typedefs and qualifiers."""
        t = self.types[type_id]
        while t.kind in _QUALIFIERS:
            t = self.types[t.size_or_type]
        return t

    def _find(self, type_id: int, name: str) -> tuple[int, Member] | None:
        """Bit offset and member `name` in a struct or union, looking through anonymous
        struct and union members."""
        for member in self.resolve(type_id).members:
            if member.name == name:
                return member.bit_offset, member
            if not member.name and self.resolve(member.type_id).kind in (STRUCT, UNION):
                inner = self._find(member.type_id, name)
                if inner is not None:
                    return member.bit_offset + inner[0], inner[1]
        return None

    def offset(self, path: str) -> int:
        """Byte offset of `struct.member[.member...]`, e.g. `file.f_path.dentry`. Members
        are followed inside the struct, not through pointers."""
        struct_name, *names = path.split(".")
        if not names:
            raise BTFError(f"{path}: give a member path, STRUCT.MEMBER[.MEMBER...]")
        type_id, bits = self.struct_id(struct_name), 0
        for name in names:
            found = self._find(type_id, name)
            if found is None:
                where = self.resolve(type_id).name or "(anonymous)"
                raise BTFError(f"{path}: no member {name} in {where}")
            bit_offset, member = found
            if member.bitfield_size or bit_offset % 8:
                raise BTFError(f"{path}: {name} is a bitfield, it has no byte offset")
            bits += bit_offset
            type_id = member.type_id
        return bits // 8
