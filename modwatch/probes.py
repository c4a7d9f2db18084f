"""Probe definitions as plain data: what modwatch would write to kprobe_events.

Nothing here touches the kernel. `build_probe_set` picks symbols from what the
running kernel offers (passed in as a lookup function) and returns the
definitions, the tracepoints to enable and a note for every choice it made, so
that `--dry-run` can show them and tests can check them without a kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from modwatch import filepath
from modwatch.errors import ExitStatus, ModwatchError

GROUP_PREFIX = "modwatch_"

CAP_SYS_MODULE = 16  # include/uapi/linux/capability.h

# Events only a caller past the permission check (or the kernel itself) can cause: a
# flood of failing calls, which any user can make, never reaches them. A session gives
# them an instance of their own (`rare_instance`), whose ring buffer that flood cannot
# overrun; the syscalls' entries and returns and the permission check go to the other.
RARE_KINDS = frozenset(
    {
        "load_module",
        "module_params",
        "find_module",
        "do_init_module",
        "do_init_module_ret",
        "module_file",
        "module_load",
        "module_free",
    }
)
RARE_SUFFIX = "_rare"


def rare_instance(group: str) -> str:
    """The second instance of the session whose probe group is `group`."""
    return group + RARE_SUFFIX


@dataclass(frozen=True)
class FetchArg:
    """One fetch-arg: NAME=FETCH:TYPE."""

    name: str
    fetch: str
    type: str

    def text(self) -> str:
        return f"{self.name}={self.fetch}:{self.type}"

    @property
    def is_string(self) -> bool:
        return self.type in ("string", "ustring")


@dataclass(frozen=True)
class ProbeSpec:
    """A kprobe (`p`) or kretprobe (`r`) event of modwatch's own group."""

    kind: str  # the raw event name modwatch reports, e.g. "finit_module"
    group: str
    event: str  # the name printed in trace_pipe
    symbol: str
    is_return: bool
    args: tuple[FetchArg, ...]
    compat: bool = False  # a 32-bit syscall entry point
    # An event filter for modwatch's instance: only events that match are recorded.
    filter: str | None = None

    def __post_init__(self) -> None:
        # Strings are printed raw, unescaped: only the trailing fields may be strings,
        # so that the parser can anchor every other field before them.
        strings = [i for i, a in enumerate(self.args) if a.is_string]
        if strings and strings != list(range(len(self.args) - len(strings), len(self.args))):
            raise ValueError(f"{self.event}: string fetch-args must come last")

    def definition(self) -> str:
        head = f"{'r' if self.is_return else 'p'}:{self.group}/{self.event} {self.symbol}"
        return " ".join([head, *(a.text() for a in self.args)])

    @classmethod
    def parse(cls, definition: str) -> ProbeSpec:
        """The inverse of `definition`, for probe sets read back from a saved trace."""
        head, symbol, *rest = definition.split(" ")
        kind_letter, _, name = head.partition(":")
        group, _, event = name.partition("/")
        if kind_letter[:1] not in ("p", "r") or not group.startswith(GROUP_PREFIX) or not event:
            raise ValueError(f"not a modwatch probe definition: {definition!r}")
        # Event names are mw<token>_<kind>, with a 32 suffix for 32-bit entry points.
        kind = event.split("_", 1)[1] if "_" in event else event
        compat = kind.endswith("32")
        args = []
        for text in rest:
            arg_name, _, fetch_type = text.partition("=")
            fetch, _, type_ = fetch_type.rpartition(":")
            args.append(FetchArg(arg_name, fetch, type_))
        return cls(
            kind.removesuffix("32"),
            group,
            event,
            symbol,
            kind_letter[0] == "r",
            tuple(args),
            compat,
        )

    def removal(self) -> str:
        return f"-:{self.group}/{self.event}"


@dataclass(frozen=True)
class Tracepoint:
    """A static tracepoint enabled in modwatch's instance."""

    system: str
    event: str
    # The running kernel's `print fmt:` (from its tracefs format file); None: not read.
    print_fmt: str | None = None

    @property
    def kind(self) -> str:
        """The raw event's name: syscalls:sys_enter_X is X, sys_exit_X is X_ret, as for
        the kprobes on the syscalls."""
        if self.system == "syscalls":
            if self.event.startswith("sys_enter_"):
                return self.event.removeprefix("sys_enter_")
            return self.event.removeprefix("sys_exit_") + "_ret"
        return self.event

    @property
    def printed(self) -> str:
        """The name trace_pipe prints: syscall events print `sys_X(...)` and `sys_X -> R`,
        without the event's own name."""
        if self.system == "syscalls":
            return "sys_" + self.kind.removesuffix("_ret")
        return self.event


@dataclass(frozen=True)
class Arch:
    """Where syscall and function arguments live at a probe, per architecture."""

    name: str
    syscall_prefix: str
    compat_prefix: str | None
    regs_arg: str  # the register holding `struct pt_regs *` at a syscall wrapper's entry
    sys_offsets: tuple[int, ...]  # offsets of syscall args 1..3 inside pt_regs
    compat_offsets: tuple[int, ...]
    func_args: tuple[str, ...]  # registers of plain function args 1..3
    # Syscall numbers (init_module, delete_module, finit_module), as /proc/TID/syscall
    # shows them, for native and for 32-bit callers.
    syscall_nrs: tuple[int, int, int] = (0, 0, 0)
    compat_syscall_nrs: tuple[int, int, int] = (0, 0, 0)

    def syscall_nr(self, syscall: str, compat: bool) -> int:
        nrs = self.compat_syscall_nrs if compat else self.syscall_nrs
        return nrs[("init_module", "delete_module", "finit_module").index(syscall)]


ARCHES = {
    # pt_regs: di at 112, si at 104, dx at 96; ia32 passes bx (40), cx (88), dx (96).
    "x86_64": Arch(
        name="x86_64",
        syscall_prefix="__x64_sys_",
        compat_prefix="__ia32_sys_",
        regs_arg="%di",
        sys_offsets=(112, 104, 96),
        compat_offsets=(40, 88, 96),
        func_args=("%di", "%si", "%dx"),
        # arch/x86/entry/syscalls/syscall_64.tbl and syscall_32.tbl
        syscall_nrs=(175, 176, 313),
        compat_syscall_nrs=(128, 129, 350),
    ),
    # user_pt_regs: regs[N] at 8*N; compat tasks use the same first registers.
    "aarch64": Arch(
        name="aarch64",
        syscall_prefix="__arm64_sys_",
        compat_prefix="__arm64_compat_sys_",
        regs_arg="%x0",
        sys_offsets=(0, 8, 16),
        compat_offsets=(0, 8, 16),
        func_args=("%x0", "%x1", "%x2"),
        # include/uapi/asm-generic/unistd.h and arch/arm64/include/asm/unistd32.h
        syscall_nrs=(105, 106, 273),
        compat_syscall_nrs=(128, 129, 379),
    ),
}


def current_arch() -> Arch:
    machine = os.uname().machine
    try:
        return ARCHES[machine]
    except KeyError:
        raise ModwatchError(
            f"modwatch: architecture {machine} is not supported (known: {', '.join(ARCHES)})",
            ExitStatus.NO_KPROBES,
        ) from None


@dataclass(frozen=True)
class ProbeSet:
    """Everything one capture session defines and enables, and why."""

    group: str
    probes: tuple[ProbeSpec, ...]
    tracepoints: tuple[Tracepoint, ...]
    choices: tuple[str, ...]

    def by_event(self) -> dict[str, ProbeSpec | Tracepoint]:
        table: dict[str, ProbeSpec | Tracepoint] = {p.event: p for p in self.probes}
        table.update({t.event: t for t in self.tracepoints})
        return table

    def split(self) -> tuple[list[ProbeSpec | Tracepoint], list[ProbeSpec | Tracepoint]]:
        """The events of the main instance, and those of the rare one (RARE_KINDS)."""
        main: list[ProbeSpec | Tracepoint] = []
        rare: list[ProbeSpec | Tracepoint] = []
        every: list[ProbeSpec | Tracepoint] = [*self.probes, *self.tracepoints]
        for spec in every:
            (rare if spec.kind in RARE_KINDS else main).append(spec)
        return main, rare

    @property
    def kprobes(self) -> bool:
        """False for the degraded set of a kernel without kprobe events."""
        return bool(self.probes)


def new_group(pid: int) -> str:
    """A group name for one session: the pid finds leftovers of dead sessions, and the
    random part keeps event names unguessable for users who cannot read tracefs."""
    return f"{GROUP_PREFIX}{pid}_{os.urandom(5).hex()}"  # not secrets: it loads OpenSSL


def _comm() -> tuple[FetchArg, FetchArg]:
    # The task name is chosen by the caller (prctl) and printed raw. Fetching it twice
    # lets the parser find its true end: `comm="X" comm2="X"` has only one reading.
    return FetchArg("comm", "$comm", "string"), FetchArg("comm2", "$comm", "string")


# The syscalls: (name, [(arg name, type) for args 1..3]).
_SYSCALLS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("finit_module", (("fd", "s32"), ("param_values", "x64"), ("flags", "x32"))),
    ("init_module", (("module_image", "x64"), ("len", "u64"), ("param_values", "x64"))),
    ("delete_module", (("name", "x64"), ("flags", "x32"))),
)

SymbolLookup = Callable[[str], str | None]
"""Returns where a symbol was found (e.g. "available_filter_functions"), or None."""
# Where the default lookup looks (the kernel's function lists), for the error it gives.
FUNCTION_LISTS = "available_filter_functions and /proc/kallsyms"


def build_probe_set(
    group: str,
    arch: Arch,
    lookup: SymbolLookup,
    tracepoints_available: Callable[[str, str], bool],
    offset: Callable[[str], int | None] = lambda path: None,
    checked: str = FUNCTION_LISTS,
) -> ProbeSet:
    """Choose symbols and build the probe set, or raise ModwatchError if the kernel lacks
    a required symbol. `lookup`, `tracepoints_available` and `offset` (a struct member's
    byte offset from BTF, or None) describe the running kernel; `checked` says where
    `lookup` looks."""
    token = group.rsplit("_", 1)[-1]
    probes: list[ProbeSpec] = []
    choices: list[str] = []

    def event(kind: str, compat: bool) -> str:
        return f"mw{token}_{kind}{'32' if compat else ''}"

    for name, sysargs in _SYSCALLS:
        variants = [(arch.syscall_prefix, arch.sys_offsets, False)]
        if arch.compat_prefix:
            variants.append((arch.compat_prefix, arch.compat_offsets, True))
        for prefix, offsets, compat in variants:
            symbol = prefix + name
            where = lookup(symbol)
            if where is None:
                if not compat:
                    raise ModwatchError(
                        f"modwatch: the kernel has no probe-able {symbol} (checked {checked})",
                        ExitStatus.NO_KPROBES,
                    )
                choices.append(f"{name} (32-bit): {symbol} not found, 32-bit callers unseen")
                continue
            choices.append(f"{name}{' (32-bit)' if compat else ''}: {symbol} ({where})")
            # A 32-bit caller's pointers are 32 bits wide in the 64-bit register slot.
            args = tuple(
                FetchArg(arg, f"+{off}({arch.regs_arg})", "x32" if compat and typ == "x64" else typ)
                for (arg, typ), off in zip(sysargs, offsets, strict=False)
            )
            probes.append(
                ProbeSpec(name, group, event(name, compat), symbol, False, args + _comm(), compat)
            )
            probes.append(
                ProbeSpec(
                    f"{name}_ret",
                    group,
                    event(f"{name}_ret", compat),
                    symbol,
                    True,
                    (FetchArg("ret", "$retval", "s32" if compat else "s64"),),
                    compat,
                )
            )

    a1, a2 = arch.func_args[0], arch.func_args[1]
    # struct module's name has sat at 24 for years, but a randomized layout moves it:
    # without BTF, do_init_module gives no name (find_module_all and module_load do).
    name_offset = offset("module.name")
    init_args: tuple[FetchArg, ...] = ()
    if name_offset is None:
        choices.append("module.name: not in BTF, no name from do_init_module")
    else:
        choices.append(f"module.name: offset {name_offset} (BTF)")
        init_args = (FetchArg("name", f"+{name_offset}({a1})", "string"),)
    optional = (
        # load_module(info, uargs, flags) is reached only once the permission check has
        # passed: a failure after it is a failed load, not a refusal. Its flags are the
        # caller's, for a load whose syscall entry was lost.
        (
            "load_module",
            "load_module",
            False,
            (FetchArg("flags", arch.func_args[2], "x32"),),
            "permission-stage detection",
        ),
        # parse_args(doing, args, ...) receives the kernel's intact copy of the
        # parameter string, after the permission check (load_module splits it in place
        # later, so mod->args at do_init_module no longer holds it).
        (
            "module_params",
            "parse_args",
            False,
            (FetchArg("params", f"+0({a2})", "string"),),
            "params",
        ),
        # find_module_all(name, len, even_unformed) runs with the kernel's copy of the
        # name: for a load when the module is added (so a duplicate load still has a
        # name), for an unload once the permission check has passed.
        (
            "find_module",
            "find_module_all",
            False,
            (FetchArg("name", f"+0({a1})", "string"),),
            "module name of failed loads and of unloads",
        ),
        (
            "do_init_module",
            "do_init_module",
            False,
            init_args,
            "whether the module's init ran",
        ),
        (
            "do_init_module_ret",
            "do_init_module",
            True,
            (FetchArg("ret", "$retval", "s32"),),
            "init_ret",
        ),
    )
    for kind, symbol, is_return, args, gives in optional:
        where = lookup(symbol)
        if where is None:
            choices.append(f"{kind}: {symbol} not found, no {gives}")
            continue
        choices.append(f"{kind}: {symbol} ({where})")
        probes.append(ProbeSpec(kind, group, event(kind, False), symbol, is_return, args))

    # security_kernel_read_file(file, id, contents) gets the module's struct file for
    # finit_module (READING_MODULE), after the permission check, on 6.1 and 6.12 alike.
    symbol = "security_kernel_read_file"
    file_args = filepath.fetch_args(a1, offset)
    where = lookup(symbol)
    if file_args is None:
        choices.append("module_file: struct offsets not in BTF, path from /proc/PID/fd")
    elif where is None:
        choices.append(f"module_file: {symbol} not found, path from /proc/PID/fd")
    else:
        choices.append(f"module_file: {symbol} ({where}), path from the kernel (BTF offsets)")
        args = (FetchArg("id", a2, "s32"), *(FetchArg(a.name, a.fetch, a.type) for a in file_args))
        probes.append(
            ProbeSpec("module_file", group, event("module_file", False), symbol, False, args)
        )

    # The permission check: capable(CAP_SYS_MODULE) reaches security_capable(cred, ns,
    # cap, opts) with the caller's credentials, for every caller of the three syscalls,
    # refused ones included. Filtered in the kernel to that capability: it runs for
    # every capability check on the system.
    symbol = "security_capable"
    uid, euid = offset("cred.uid"), offset("cred.euid")
    where = lookup(symbol)
    if uid is None or euid is None:
        choices.append("caller_cred: cred offsets not in BTF, uid from /proc")
    elif where is None:
        choices.append(f"caller_cred: {symbol} not found, uid from /proc")
    else:
        choices.append(f"caller_cred: {symbol} ({where}), uid from the kernel (BTF offsets)")
        args = (
            FetchArg("cap", arch.func_args[2], "s32"),
            FetchArg("uid", f"+{uid}({a1})", "u32"),
            FetchArg("euid", f"+{euid}({a1})", "u32"),
        )
        probes.append(
            ProbeSpec(
                "caller_cred",
                group,
                event("caller_cred", False),
                symbol,
                False,
                args,
                filter=f"cap == {CAP_SYS_MODULE}",
            )
        )

    tracepoints: list[Tracepoint] = []
    for tp_event, gives in (("module_load", "taints"), ("module_free", "module frees")):
        if tracepoints_available("module", tp_event):
            tracepoints.append(Tracepoint("module", tp_event))
            choices.append(f"{tp_event}: tracepoint module:{tp_event}")
        else:
            choices.append(f"{tp_event}: tracepoint module:{tp_event} not found, no {gives}")
    return ProbeSet(group, tuple(probes), tuple(tracepoints), tuple(choices))


# What a capture from tracepoints alone cannot give (no kprobe events).
DEGRADED_FIELDS = (
    "params",
    "init_ret",
    "path (from /proc only)",
    "uid (from /proc only)",
    "module of failed loads and of unloads",
    "comm exact (the trace prefix's task name, maybe <...>)",
)


def build_tracepoint_set(group: str, tracepoints_available: Callable[[str, str], bool]) -> ProbeSet:
    """The degraded probe set of a kernel without kprobe events: the syscalls' own
    tracepoints and module:module_load/module_free, where present."""
    tracepoints: list[Tracepoint] = []
    choices = ["kprobes: none, capture from tracepoints: no " + ", no ".join(DEGRADED_FIELDS)]
    for name, _ in _SYSCALLS:
        pair = [
            Tracepoint("syscalls", f"sys_enter_{name}"),
            Tracepoint("syscalls", f"sys_exit_{name}"),
        ]
        if all(tracepoints_available(t.system, t.event) for t in pair):
            tracepoints += pair
            choices.append(f"{name}: tracepoints syscalls:sys_enter_{name}, sys_exit_{name}")
        else:
            choices.append(f"{name}: tracepoints syscalls:sys_enter_{name} not found, unseen")
    if not tracepoints:
        raise ModwatchError(
            "modwatch: this kernel has neither kprobe events (CONFIG_KPROBE_EVENTS) nor the "
            "module syscalls' tracepoints (CONFIG_FTRACE_SYSCALLS), which modwatch needs",
            ExitStatus.NO_KPROBES,
        )
    for tp_event in ("module_load", "module_free"):
        if tracepoints_available("module", tp_event):
            tracepoints.append(Tracepoint("module", tp_event))
            choices.append(f"{tp_event}: tracepoint module:{tp_event}")
        else:
            choices.append(f"{tp_event}: tracepoint module:{tp_event} not found")
    return ProbeSet(group, (), tuple(tracepoints), tuple(choices))
