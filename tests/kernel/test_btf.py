"""modwatch's BTF reader on the guest kernel's own /sys/kernel/btf/vmlinux, checked against
the kernel itself: where the kernel takes BTF-typed probe arguments (6.12), one event
fetches each member both ways and the values must be equal."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modwatch import btf, filepath
from modwatch import tracefs as tracefs_mod

pytestmark = pytest.mark.kernel

GROUP = "modwatch_test_btf"

# (BTF-typed argument, the same through modwatch's offsets from `file` in %di)
CHECKS = {
    "dentry": ("file->f_path.dentry", ["file.f_path.dentry"]),
    "mnt": ("file->f_path.mnt", ["file.f_path.mnt"]),
    "parent": ("file->f_path.dentry->d_parent", ["file.f_path.dentry", "dentry.d_parent"]),
    "root": ("file->f_path.mnt->mnt_root", ["file.f_path.mnt", "vfsmount.mnt_root"]),
    "len": ("file->f_path.dentry->d_name.len", ["file.f_path.dentry", "dentry.d_name.len"]),
    "name": ("file->f_path.dentry->d_name.name", ["file.f_path.dentry", "dentry.d_name.name"]),
}


def test_offsets_of_every_member_modwatch_uses() -> None:
    types = btf.BTF.load()
    assert types.offset("module.name") == 24  # stable on 64-bit kernels (kernel notes)
    offsets = {member: types.offset(member) for member in filepath.MEMBERS}
    # Layout facts that hold on every kernel: qstr's hash then len, then the name pointer.
    assert offsets["dentry.d_name.len"] + 4 == offsets["dentry.d_name.name"]
    assert offsets["file.f_path.dentry"] == offsets["file.f_path.mnt"] + 8


def _offset_fetch(members: list[str], types: btf.BTF) -> str:
    fetch = "%di"
    for member in members:
        fetch = f"+{types.offset(member)}({fetch})"
    return fetch


def test_offsets_agree_with_the_kernels_typed_arguments(
    tracefs: Path, mwtest_ko: Path, finit_module: Callable[[Path, str], int]
) -> None:
    readme = (tracefs / "README").read_text()
    if "->field" not in readme:
        pytest.skip("this kernel has no BTF-typed probe arguments (tracefs README)")
    types = btf.BTF.load()
    args = []
    for name, (typed, members) in CHECKS.items():
        kind = "u32" if name == "len" else "x64"
        args += [f"t_{name}={typed}:{kind}", f"o_{name}={_offset_fetch(members, types)}:{kind}"]
    fs = tracefs_mod.Tracefs(str(tracefs))
    fs.add_probe(f"p:{GROUP}/file security_kernel_read_file {' '.join(args)}")
    instance = f"{GROUP}_{os.getpid()}"
    try:
        fs.make_instance(instance)
        fs.write(f"instances/{instance}/events/{GROUP}/enable", "1")
        assert finit_module(mwtest_ko, "") == 0
        deadline = time.monotonic() + 30
        text = ""
        while "o_name=" not in text and time.monotonic() < deadline:
            text = fs.read(f"instances/{instance}/trace")
            time.sleep(0.2)
    finally:
        fs.remove_instance(instance)
        fs.remove_probe(f"-:{GROUP}/file", GROUP)
    fields = dict(re.findall(r"([to]_\w+)=(\S+)", text))
    assert fields, text
    for name in CHECKS:
        assert fields[f"t_{name}"] == fields[f"o_{name}"], name
