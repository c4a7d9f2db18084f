"""The catalogue of raw events (`modwatch events`, `capture --raw`).

Argument tags, as in the seed event model:
  K       read from kernel memory (the kernel's own copy)
  U       read from user space, or a value the caller chose
  TOCTOU  may change between the kernel's check and its use
  OPT     may be absent (the kernel lacks the symbol, or the call ended earlier)

Every event after the permission check (probes.RARE_KINDS) is recorded in the
session's second instance, which a flood of failing calls cannot overrun.
"""

from __future__ import annotations

from typing import NamedTuple


class Arg(NamedTuple):
    name: str
    type: str
    tags: tuple[str, ...]
    meaning: str


class RawEvent(NamedTuple):
    name: str
    probe: str
    args: tuple[Arg, ...]
    meaning: str


_COMM = Arg("comm", "string", ("K",), "caller's task name ($comm), exact")
_RET = Arg("ret", "long", ("K",), "return value: 0 or -errno")

CATALOGUE: tuple[RawEvent, ...] = (
    RawEvent(
        "finit_module",
        "kprobe __x64_sys_finit_module / __ia32_sys_finit_module",
        (
            Arg("fd", "int", ("U",), "file descriptor of the module file"),
            Arg(
                "param_values",
                "const char * (address)",
                ("U", "TOCTOU"),
                "address of the parameter string; its text is read only from the kernel's "
                "copy (module_params), never here, where any user can call",
            ),
            Arg("flags", "int", ("U",), "MODULE_INIT_* flags"),
            _COMM,
        ),
        "a finit_module(2) call starts (before the permission check)",
    ),
    RawEvent("finit_module_ret", "kretprobe of the same", (_RET,), "finit_module(2) returns"),
    RawEvent(
        "init_module",
        "kprobe __x64_sys_init_module / __ia32_sys_init_module",
        (
            Arg("module_image", "void * (address)", ("U", "TOCTOU"), "module image in memory"),
            Arg("len", "unsigned long", ("U",), "image length"),
            Arg("param_values", "const char * (address)", ("U", "TOCTOU"), "as for finit_module"),
            _COMM,
        ),
        "an init_module(2) call starts (before the permission check)",
    ),
    RawEvent("init_module_ret", "kretprobe of the same", (_RET,), "init_module(2) returns"),
    RawEvent(
        "delete_module",
        "kprobe __x64_sys_delete_module / __ia32_sys_delete_module",
        (
            Arg(
                "name",
                "const char * (address)",
                ("U", "TOCTOU"),
                "address of the name; its text comes from find_module",
            ),
            Arg("flags", "unsigned int", ("U",), "O_NONBLOCK, O_TRUNC"),
            _COMM,
        ),
        "a delete_module(2) call starts (before the permission check)",
    ),
    RawEvent("delete_module_ret", "kretprobe of the same", (_RET,), "delete_module(2) returns"),
    RawEvent(
        "load_module",
        "kprobe load_module",
        (Arg("flags", "int", ("U",), "MODULE_INIT_* flags, as the caller passed them"),),
        "a load passed the permission check (OPT)",
    ),
    RawEvent(
        "find_module",
        "kprobe find_module_all",
        (Arg("name", "string", ("K", "OPT"), "module name, the kernel's copy"),),
        "the kernel looks a module up by name: when adding it, or to unload it (OPT)",
    ),
    RawEvent(
        "module_params",
        "kprobe parse_args",
        (Arg("params", "string", ("K", "OPT"), "parameter string, the kernel's intact copy"),),
        "the kernel parses the module's parameters (OPT)",
    ),
    RawEvent(
        "do_init_module",
        "kprobe do_init_module",
        (Arg("name", "string", ("K", "OPT"), "module name (struct module.name, from BTF)"),),
        "the module's init is about to run (OPT)",
    ),
    RawEvent(
        "do_init_module_ret",
        "kretprobe do_init_module",
        (Arg("ret", "int", ("K",), "the init result; 0 or -errno"),),
        "the module's init returned (OPT)",
    ),
    RawEvent(
        "caller_cred",
        "kprobe security_capable, filtered to cap == 16 (CAP_SYS_MODULE)",
        (
            Arg("cap", "int", ("K",), "the capability checked"),
            Arg("uid", "uid_t", ("K",), "the caller's real uid (struct cred)"),
            Arg("euid", "uid_t", ("K",), "the caller's effective uid"),
        ),
        "the permission check of a module syscall, refused callers included (OPT)",
    ),
    RawEvent(
        "module_file",
        "kprobe security_kernel_read_file",
        (
            Arg(
                "id", "enum kernel_read_file_id", ("K",), "why the kernel reads a file (2: module)"
            ),
            Arg(
                "r0, d0_0.., p1..",
                "pointers",
                ("K",),
                "mount roots, the dentry chain of the file and of the mounts above it",
            ),
            Arg("l0_0..", "u32", ("K",), "length of each name, which the parser cuts it by"),
            Arg(
                "n0_0..",
                "string",
                ("K", "TOCTOU"),
                "the names along the chain (a rename may race the read)",
            ),
            Arg("hash", "pointer", ("K",), "d_hash.pprev of the file's dentry: 0 once unlinked"),
            Arg("ino", "u64", ("K", "OPT"), "the file's inode number (with BTF)"),
        ),
        "finit_module's file is read, after the permission check: its path (OPT)",
    ),
    RawEvent(
        "module_load",
        "tracepoint module:module_load",
        (
            Arg("name", "string", ("K",), "module name"),
            Arg("taints", "string", ("K",), "taint letters: P O F C E"),
        ),
        "the module is live and about to be initialised (OPT)",
    ),
    RawEvent(
        "module_free",
        "tracepoint module:module_free",
        (Arg("name", "string", ("K",), "module name"),),
        "the module is freed: after unload, or after a failed init (OPT)",
    ),
)
