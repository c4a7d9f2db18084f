"""A reader of the kernel's BTF type information (`/sys/kernel/btf/vmlinux`).

Standard library only. It answers one question: at which byte offset does a member
path such as `file.f_path.dentry` or `module.name` lie, on the running kernel. Struct
layouts move between kernels (struct file's f_path went from 16 to about 152 to 64
between 6.4 and 6.12), so probe fetch-args take offsets from here, never from a table.
"""

from __future__ import annotations

import array
import bisect
import struct
from dataclasses import dataclass

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

# enum btf_kind (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT = 9, 10, 11, 12, 13, 14, 15, 16
DECL_TAG, TYPE_TAG, ENUM64 = 17, 18, 19

# Size of each kind's record in 32-bit words: `struct btf_type` (3) and what follows it,
# fixed or per vlen entry. Indexed by kind (5 bits).
_WORDS_FIXED = [3] * 32
_WORDS_PER_ENTRY = [0] * 32
for _kind, _extra in {INT: 1, ARRAY: 3, VAR: 1, DECL_TAG: 1}.items():
    _WORDS_FIXED[_kind] += _extra
for _kind, _per in {STRUCT: 3, UNION: 3, ENUM: 2, FUNC_PROTO: 2, DATASEC: 3, ENUM64: 3}.items():
    _WORDS_PER_ENTRY[_kind] = _per
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
    """BTF data, decoded lazily: types by id (id 0 is `void`).

    vmlinux holds over 100,000 types and a capture needs a handful of structs, so the
    type section is walked (to find where each type starts) only as far as the types
    asked for, and a type is decoded when it is first asked for. The structs a capture
    needs come early (about a fifth of the walk on the kernels measured).
    """

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("BTF data too short for its header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BTFError(f"not BTF data (magic {magic:#x}) or not little-endian")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        if len(types) != type_len or len(self._strings) != str_len or type_len % 4:
            raise BTFError("BTF data truncated or misaligned")
        self._types = types
        self._words = memoryview(types).cast("I")
        self._starts = array.array("I", [0])  # word index of each type; id 0 (void) has none
        self._walked = 0  # word index where the walk goes on
        # A record's length follows from its info word alone, and vmlinux's 100,000 types
        # have a few hundred distinct info words: their lengths are remembered.
        self._lengths: dict[int, int] = {}
        self._decoded: dict[int, BTFType] = {0: BTFType(0, "void", 0)}

    def _walk(self, past_word: int = -1, past_id: int = -1) -> None:
        """Find where types start, word by word, until the type holding word `past_word`
        and the type `past_id` are known (or the section ends)."""
        words, lengths = self._words, self._lengths
        append = self._starts.append
        index, count = self._walked, len(words)
        missing = past_id + 1 - len(self._starts)
        try:
            while index < count and (index <= past_word or missing > 0):
                append(index)
                missing -= 1
                info = words[index + 1]
                try:
                    index += lengths[info]
                except KeyError:
                    kind = (info >> 24) & 0x1F
                    lengths[info] = _WORDS_FIXED[kind] + _WORDS_PER_ENTRY[kind] * (info & 0xFFFF)
                    index += lengths[info]
        except IndexError:
            raise BTFError("BTF type section ends inside a type") from None
        self._walked = index
        if index > count:
            raise BTFError("BTF type section ends inside a type")

    def __len__(self) -> int:
        """Number of type ids, void included."""
        self._walk(past_word=len(self._words))
        return len(self._starts)

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

    def type(self, type_id: int) -> BTFType:
        """The type with this id, decoded on first use."""
        found = self._decoded.get(type_id)
        if found is not None:
            return found
        if type_id >= len(self._starts):
            self._walk(past_id=type_id)
        if not 0 < type_id < len(self._starts):
            raise BTFError(f"no BTF type {type_id}")
        words, index = self._words, self._starts[type_id]
        name_off, info, size_or_type = words[index], words[index + 1], words[index + 2]
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        members: tuple[Member, ...] = ()
        if kind in (STRUCT, UNION):
            entries = words[index + 3 : index + 3 + 3 * vlen]
            members = tuple(
                Member(
                    self._str(entries[i]),
                    entries[i + 1],
                    entries[i + 2] & 0xFFFFFF if kind_flag else entries[i + 2],
                    entries[i + 2] >> 24 if kind_flag else 0,
                )
                for i in range(0, 3 * vlen, 3)
            )
        found = BTFType(kind, self._str(name_off), size_or_type, members)
        self._decoded[type_id] = found
        return found

    def struct_id(self, name: str) -> int:
        """Id of the struct (or union) called `name`.

        BTF stores each string once: find the name's offset in the string section, then
        the type records that start with it.
        """
        encoded = name.encode()
        strings = self._strings
        at = strings.find(b"\0" + encoded + b"\0")
        if name and at >= 0:
            needle = struct.pack("<I", at + 1)
            pos = self._types.find(needle)
            while pos >= 0:
                word = pos // 4
                self._walk(past_word=word)
                type_id = bisect.bisect_left(self._starts, word, 1)
                if (
                    pos % 4 == 0
                    and type_id < len(self._starts)
                    and self._starts[type_id] == word
                    and self.type(type_id).kind in (STRUCT, UNION)
                ):
                    return type_id
                pos = self._types.find(needle, pos + 1)
        raise BTFError(f"no struct {name} in BTF")

    def resolve(self, type_id: int) -> BTFType:
        """The type behind typedefs and qualifiers."""
        t = self.type(type_id)
        while t.kind in _QUALIFIERS:
            t = self.type(t.size_or_type)
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
