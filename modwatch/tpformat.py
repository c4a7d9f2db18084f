"""A tracepoint's print format, from the `print fmt:` line of its tracefs `format` file.

trace_pipe prints a tracepoint's fields through its TP_printk format, which a kernel
may change (a field added, one reordered). modwatch reads the format the running
kernel uses: where it has the shape modwatch knows, the event is parsed as always;
where it differs, a pattern is built from the format itself, so the event still
parses, and every field, known or not, is kept by its name (for `--raw`).

    print fmt: "%s %s", __get_str(name), __print_flags(REC->taints, "", { (1UL << 0), "P" }, ...)
"""

from __future__ import annotations

import re
from typing import NamedTuple

_SPEC = re.compile(
    r"%(?P<flags>[-+ #0]*)\d*(?:\.\d+)?(?:hh|h|ll|l|z|j|t)?(?P<conv>[diouxXcs%]|p[a-zA-Z]*)"
)
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
_VALUES = {
    "d": r"-?\d+",
    "i": r"-?\d+",
    "u": r"\d+",
    "o": r"[0-7]+",
    "x": r"[0-9a-fA-F]+",
    "X": r"[0-9a-fA-F]+",
    "c": r"(?s:.)",
}
_BASES = {"d": 10, "i": 10, "u": 10, "o": 8, "x": 16, "X": 16}


class PrintFormat(NamedTuple):
    """The format string (C escapes resolved), the name of each argument, and for an
    argument printed by `__print_flags` or `__print_symbolic`, a pattern of what it
    can print (else None)."""

    text: str
    names: tuple[str, ...]
    values: tuple[str | None, ...] = ()

    @property
    def shape(self) -> tuple[str, tuple[str, ...]]:
        return self.text, self.names


def print_fmt_line(format_file_text: str) -> str | None:
    """The `print fmt:` value of a tracefs `format` file, or None without one."""
    for line in format_file_text.splitlines():
        if line.startswith("print fmt: "):
            return line[len("print fmt: ") :]
    return None


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments (commas inside (), {} or strings don't split)."""
    args, depth, quoted, start = [], 0, False, 0
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    args.append(text[start:].strip())
    return [a for a in args if a]


def _c_strings(text: str) -> list[str]:
    return [re.sub(r"\\(.)", r"\1", m) for m in re.findall(r'"((?:[^"\\]|\\.)*)"', text)]


def _arg_values(arg: str) -> str | None:
    """What `__print_flags(x, "DELIM", {v, "A"}, ...)` or `__print_symbolic(x, {v, "A"},
    ...)` can print: names from the table, or the bits it has no name for in hex."""
    kind = re.match(r"\s*__print_(flags|symbolic)(?:_u64)?\(", arg)
    if kind is None:
        return None
    strings = _c_strings(arg)
    hex_ = "0x[0-9a-f]+"
    if kind[1] == "symbolic":
        return "(?:" + "|".join([*map(re.escape, strings), hex_]) + ")"
    delim, names = re.escape(strings[0]) if strings else "", strings[1:]
    one = "(?:" + "|".join([*map(re.escape, names), hex_]) + ")"
    return f"(?:{one}(?:{delim}{one})*)?"


def _arg_name(arg: str, index: int) -> str:
    got = re.search(r"__get_(?:str|bitmask|dynamic_array)\((\w+)\)", arg)
    if got is None:
        refs = re.findall(r"REC->(\w+)", arg)
        return refs[0] if refs else f"arg{index}"
    return got[1]


def parse(print_fmt: str) -> PrintFormat | None:
    """The format string and argument names of a `print fmt:` value; None if it does
    not start with a C string."""
    if not print_fmt.startswith('"'):
        return None
    text = []
    i = 1
    while i < len(print_fmt) and print_fmt[i] != '"':
        c = print_fmt[i]
        if c == "\\" and i + 1 < len(print_fmt):
            i += 1
            c = _ESCAPES.get(print_fmt[i], "\\" + print_fmt[i])
        text.append(c)
        i += 1
    if i >= len(print_fmt):
        return None
    names: list[str] = []
    args = _split_args(print_fmt[i + 1 :].lstrip(", "))
    for index, arg in enumerate(args):
        name = _arg_name(arg, index)
        while name in names:
            name += "_"
        names.append(name)
    return PrintFormat("".join(text), tuple(names), tuple(map(_arg_values, args)))


def pattern(fmt: PrintFormat) -> tuple[re.Pattern[str], dict[str, int]] | None:
    """A pattern for text printed by `fmt`, with a group per argument, and the base of
    each numeric one; None when the format's conversions and arguments do not match."""
    parts: list[str] = []
    bases: dict[str, int] = {}
    specs = [m for m in _SPEC.finditer(fmt.text) if m["conv"] != "%"]
    if len(specs) != len(fmt.names):
        return None
    pos = 0
    last = len(specs) - 1
    groups = iter(enumerate(fmt.names))
    for m in _SPEC.finditer(fmt.text):
        parts.append(re.escape(fmt.text[pos : m.start()]))
        pos = m.end()
        conv = m["conv"]
        if conv == "%":
            parts.append("%")
            continue
        index, name = next(groups)
        group = re.sub(r"\W", "_", name)
        if conv == "s" and fmt.values[index] is not None:
            value = str(fmt.values[index])
        elif conv == "s":
            value = r"(?s:.*)" if index == last else r"(?s:.*?)"
        elif conv.startswith("p"):
            value = r"\S+"
        else:
            value = _VALUES[conv]
            if "#" in m["flags"] and conv in "xX":
                value = "(?:0x)?" + value
            if conv in _BASES:
                bases[group] = _BASES[conv]
        parts.append(f"(?P<{group}>{value})")
    parts.append(re.escape(fmt.text[pos:]))
    try:
        return re.compile("".join(parts)), bases
    except re.error:
        return None
