"""probes: the definitions modwatch would write to kprobe_events, as plain data."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest

from modwatch import probes
from modwatch.errors import ExitStatus, ModwatchError
from modwatch.probes import ARCHES, FetchArg, ProbeSpec, Tracepoint, build_probe_set

from . import kernel_text as kt

G = kt.GROUP
E = f"{G}/mw{kt.TOKEN}"  # GROUP/EVENT-prefix of every definition
COMM = "comm=$comm:string comm2=$comm:string"


def definitions(pset: probes.ProbeSet) -> dict[str, str]:
    return {p.event.split("_", 1)[1]: p.definition() for p in pset.probes}


def test_x86_64_definitions_are_the_ones_the_fixture_was_captured_with() -> None:
    # But for load_module's flags, fetched since (for a load whose entry was lost).
    header = kt.TRACE_FIXTURE.read_text().splitlines()
    saved = [line.removeprefix("# probe: ") for line in header if line.startswith("# probe: ")]
    pset = kt.probe_set("x86_64")
    grown = [d + " flags=%dx:x32" if d.endswith("_load_module load_module") else d for d in saved]
    assert [p.definition() for p in pset.probes] == grown
    assert pset.tracepoints == (
        Tracepoint("module", "module_load"),
        Tracepoint("module", "module_free"),
    )


def test_x86_64_syscall_probes() -> None:
    defs = definitions(kt.probe_set("x86_64"))
    assert defs["finit_module"] == (
        f"p:{E}_finit_module __x64_sys_finit_module "
        f"fd=+112(%di):s32 param_values=+104(%di):x64 flags=+96(%di):x32 {COMM}"
    )
    assert (
        defs["finit_module_ret"] == f"r:{E}_finit_module_ret __x64_sys_finit_module ret=$retval:s64"
    )
    # ia32: bx, cx, dx at 40, 88, 96; a 32-bit caller's pointers are 32 bits wide.
    assert defs["finit_module32"] == (
        f"p:{E}_finit_module32 __ia32_sys_finit_module "
        f"fd=+40(%di):s32 param_values=+88(%di):x32 flags=+96(%di):x32 {COMM}"
    )
    assert defs["finit_module_ret32"] == (
        f"r:{E}_finit_module_ret32 __ia32_sys_finit_module ret=$retval:s32"
    )
    assert defs["init_module32"] == (
        f"p:{E}_init_module32 __ia32_sys_init_module "
        f"module_image=+40(%di):x32 len=+88(%di):u64 param_values=+96(%di):x32 {COMM}"
    )
    assert defs["delete_module"] == (
        f"p:{E}_delete_module __x64_sys_delete_module name=+112(%di):x64 flags=+104(%di):x32 {COMM}"
    )
    assert defs["delete_module32"] == (
        f"p:{E}_delete_module32 __ia32_sys_delete_module "
        f"name=+40(%di):x32 flags=+88(%di):x32 {COMM}"
    )


def test_without_btf_do_init_module_fetches_no_name() -> None:
    # struct module's name moves under a randomized layout: no offset is guessed.
    probe_set = kt.probe_set("x86_64", offsets={})
    assert definitions(probe_set)["do_init_module"] == f"p:{E}_do_init_module do_init_module"
    assert "module.name: not in BTF, no name from do_init_module" in probe_set.choices
    assert "module.name: offset 24 (BTF)" in kt.probe_set("x86_64").choices


def test_x86_64_kernel_side_probes() -> None:
    defs = definitions(kt.probe_set("x86_64"))
    assert defs["load_module"] == f"p:{E}_load_module load_module flags=%dx:x32"
    assert defs["module_params"] == f"p:{E}_module_params parse_args params=+0(%si):string"
    assert defs["find_module"] == f"p:{E}_find_module find_module_all name=+0(%di):string"
    assert defs["do_init_module"] == f"p:{E}_do_init_module do_init_module name=+24(%di):string"
    assert defs["do_init_module_ret"] == (
        f"r:{E}_do_init_module_ret do_init_module ret=$retval:s32"
    )


def test_arm64_definitions() -> None:
    pset = kt.probe_set("aarch64", group="modwatch_1_abc")
    defs = definitions(pset)
    e = "modwatch_1_abc/mwabc"
    assert defs["finit_module"] == (
        f"p:{e}_finit_module __arm64_sys_finit_module "
        f"fd=+0(%x0):s32 param_values=+8(%x0):x64 flags=+16(%x0):x32 {COMM}"
    )
    assert defs["finit_module32"] == (
        f"p:{e}_finit_module32 __arm64_compat_sys_finit_module "
        f"fd=+0(%x0):s32 param_values=+8(%x0):x32 flags=+16(%x0):x32 {COMM}"
    )
    assert defs["delete_module_ret"] == (
        f"r:{e}_delete_module_ret __arm64_sys_delete_module ret=$retval:s64"
    )
    assert defs["module_params"] == f"p:{e}_module_params parse_args params=+0(%x1):string"
    assert defs["find_module"] == f"p:{e}_find_module find_module_all name=+0(%x0):string"
    assert defs["do_init_module"] == f"p:{e}_do_init_module do_init_module name=+24(%x0):string"
    assert len(pset.probes) == 17


def test_choices_name_where_each_symbol_was_found() -> None:
    where = {
        "__x64_sys_finit_module": "available_filter_functions",
        "load_module": "/proc/kallsyms",
    }
    pset = build_probe_set(
        G, ARCHES["x86_64"], lambda s: where.get(s, "available_filter_functions"), lambda s, e: True
    )
    assert pset.choices[0] == "finit_module: __x64_sys_finit_module (available_filter_functions)"
    assert (
        pset.choices[1]
        == "finit_module (32-bit): __ia32_sys_finit_module (available_filter_functions)"
    )
    assert "load_module: load_module (/proc/kallsyms)" in pset.choices
    assert pset.choices[-2:] == (
        "module_load: tracepoint module:module_load",
        "module_free: tracepoint module:module_free",
    )


@pytest.mark.parametrize(
    "missing", ["__x64_sys_finit_module", "__x64_sys_init_module", "__x64_sys_delete_module"]
)
def test_missing_required_symbol(missing: str) -> None:
    with pytest.raises(ModwatchError) as err:
        build_probe_set(
            G,
            ARCHES["x86_64"],
            lambda s: None if s == missing else "available_filter_functions",
            lambda s, e: True,
        )
    assert err.value.status == ExitStatus.NO_KPROBES
    assert missing in err.value.message
    assert err.value.message.startswith("modwatch: ")


@pytest.mark.parametrize(
    ("missing", "kind", "note"),
    [
        (
            "load_module",
            "load_module",
            "load_module: load_module not found, no permission-stage detection",
        ),
        ("parse_args", "module_params", "module_params: parse_args not found, no params"),
        (
            "find_module_all",
            "find_module",
            "find_module: find_module_all not found, no module name of failed loads and of unloads",
        ),
    ],
)
def test_missing_optional_symbol_is_a_note(missing: str, kind: str, note: str) -> None:
    pset = build_probe_set(
        G,
        ARCHES["x86_64"],
        lambda s: None if s == missing else "available_filter_functions",
        lambda s, e: True,
    )
    assert note in pset.choices
    assert kind not in [p.kind for p in pset.probes]
    assert len(pset.probes) == 16


def test_missing_do_init_module_drops_both_of_its_probes() -> None:
    pset = build_probe_set(
        G, ARCHES["x86_64"], lambda s: None if s == "do_init_module" else "x", lambda s, e: True
    )
    assert {"do_init_module", "do_init_module_ret"}.isdisjoint(p.kind for p in pset.probes)
    assert (
        "do_init_module: do_init_module not found, no whether the module's init ran" in pset.choices
    )
    assert "do_init_module_ret: do_init_module not found, no init_ret" in pset.choices


def test_missing_compat_entry_point_is_a_note() -> None:
    pset = build_probe_set(
        G,
        ARCHES["x86_64"],
        lambda s: None if s.startswith("__ia32_") else "available_filter_functions",
        lambda s, e: True,
    )
    assert "finit_module (32-bit): __ia32_sys_finit_module not found, 32-bit callers unseen" in (
        pset.choices
    )
    assert not any(p.compat for p in pset.probes)
    assert len(pset.probes) == 11


def test_missing_tracepoint_is_a_note() -> None:
    pset = build_probe_set(G, ARCHES["x86_64"], lambda s: "x", lambda s, e: e != "module_load")
    assert pset.tracepoints == (Tracepoint("module", "module_free"),)
    assert "module_load: tracepoint module:module_load not found, no taints" in pset.choices


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_definition_parse_round_trip(arch: str) -> None:
    for spec in kt.probe_set(arch).probes:
        assert ProbeSpec.parse(spec.definition()) == spec


def test_parse_of_a_maxactive_return_probe() -> None:
    spec = ProbeSpec.parse(f"r10:{E}_finit_module_ret __x64_sys_finit_module ret=$retval:s64")
    assert spec == ProbeSpec(
        "finit_module_ret",
        G,
        f"mw{kt.TOKEN}_finit_module_ret",
        "__x64_sys_finit_module",
        True,
        (FetchArg("ret", "$retval", "s64"),),
        False,
    )


@pytest.mark.parametrize(
    "definition",
    ["p:kprobes/myprobe do_sys_open", "x:modwatch_1_a/mwa_x sym", "p:modwatch_1_a/ sym"],
)
def test_parse_refuses_other_definitions(definition: str) -> None:
    with pytest.raises(ValueError):
        ProbeSpec.parse(definition)


def test_removal() -> None:
    spec = kt.probe_set().probes[0]
    assert spec.removal() == f"-:{E}_finit_module"


def test_strings_must_come_last() -> None:
    with pytest.raises(ValueError, match="string fetch-args must come last"):
        ProbeSpec(
            "x",
            G,
            "mwx_x",
            "sym",
            False,
            (FetchArg("s", "+0(%di)", "string"), FetchArg("n", "%si", "u32")),
        )
    with pytest.raises(ValueError, match="string fetch-args must come last"):
        ProbeSpec(
            "x",
            G,
            "mwx_x",
            "sym",
            False,
            (
                FetchArg("s", "+0(%di)", "ustring"),
                FetchArg("t", "+0(%si)", "string"),
                FetchArg("n", "%dx", "x64"),
            ),
        )
    # Several trailing strings are allowed.
    ok = ProbeSpec(
        "x",
        G,
        "mwx_x",
        "sym",
        False,
        (FetchArg("n", "%dx", "x64"), *[FetchArg(c, "$comm", "string") for c in "ab"]),
    )
    assert ok.definition() == "p:" + G + "/mwx_x sym n=%dx:x64 a=$comm:string b=$comm:string"


def test_new_group_is_named_after_the_pid_and_unguessable() -> None:
    a, b = probes.new_group(123), probes.new_group(123)
    assert re.fullmatch(r"modwatch_123_[0-9a-f]{10}", a)
    assert a != b


def test_event_names_carry_the_group_token() -> None:
    pset = kt.probe_set(group="modwatch_7_0123456789")
    assert {p.event.split("_", 1)[0] for p in pset.probes} == {"mw0123456789"}
    assert set(pset.by_event()) == {p.event for p in pset.probes} | {"module_load", "module_free"}


def test_current_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    def machine(name: str) -> Callable[[], os.uname_result]:
        return lambda: os.uname_result(("Linux", "host", "6.12", "#1", name))

    monkeypatch.setattr(os, "uname", machine("aarch64"))
    assert probes.current_arch() is ARCHES["aarch64"]
    monkeypatch.setattr(os, "uname", machine("riscv64"))
    with pytest.raises(ModwatchError) as err:
        probes.current_arch()
    assert err.value.status == ExitStatus.NO_KPROBES
    assert "riscv64" in err.value.message


def test_caller_cred_probe_is_filtered_to_cap_sys_module() -> None:
    spec = next(p for p in kt.probe_set(offsets=kt.BTF_OFFSETS).probes if p.kind == "caller_cred")
    assert spec.symbol == "security_capable"
    assert spec.filter == "cap == 16"
    assert [a.text() for a in spec.args] == ["cap=%dx:s32", "uid=+8(%di):u32", "euid=+24(%di):u32"]
