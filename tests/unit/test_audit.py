"""audit: snapshots of fake /proc, /sys and /lib/modules trees, every finding kind, the
policy format, and every state-file failure."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from modwatch import audit, modfile
from modwatch.audit import AuditOptions, Roots
from modwatch.errors import ExitStatus, ModwatchError

from .test_cli import run_main
from .test_modfile import elf

RELEASE = "6.1.0-56-amd64"
BOOT = "3c5e8a3e-0000-4000-8000-000000000001"
SIGNED = elf(b"srcversion=AAAA\0vermagic=6.1.0-56-amd64 SMP\0") + modfile.SIGNATURE_MAGIC
UNSIGNED = elf(b"srcversion=BBBB\0vermagic=6.1.0-56-amd64 SMP\0")


class Tree:
    """A fake kernel: /proc, /sys/module and /lib/modules/RELEASE under one directory."""

    def __init__(self, root: Path, release: str = RELEASE) -> None:
        self.root = root
        self.release = release
        self.roots = Roots(str(root / "proc"), str(root / "sys"), str(root / "lib" / "modules"))
        (root / "proc" / "sys" / "kernel" / "random").mkdir(parents=True)
        (root / "sys" / "module").mkdir(parents=True)
        (root / "lib" / "modules" / release).mkdir(parents=True)
        self.modules: dict[str, str] = {}
        self.dep: list[str] = []
        self.kallsyms: list[str] = []
        self.tainted(0)
        self.boot(BOOT)

    def tainted(self, value: int) -> None:
        (self.root / "proc" / "sys" / "kernel" / "tainted").write_text(f"{value}\n")

    def boot(self, boot_id: str) -> None:
        (self.root / "proc" / "sys" / "kernel" / "random" / "boot_id").write_text(boot_id + "\n")

    def file(self, rel: str, data: bytes) -> Path:
        path = self.root / "lib" / "modules" / self.release / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.dep.append(f"{rel}:")
        self.write()
        return path

    def load(
        self,
        name: str,
        taints: str = "",
        address: str = "0xffffffffc0a00000",
        srcversion: str = "AAAA",
    ) -> None:
        suffix = f" ({taints})" if taints else ""
        self.modules[name] = f"{name} 16384 0 - Live {address}{suffix}"
        base = self.root / "sys" / "module" / name
        base.mkdir(exist_ok=True)
        for key, value in (
            ("initstate", "live"),
            ("taint", taints),
            ("srcversion", srcversion),
            ("refcnt", "0"),
        ):
            (base / key).write_text(value + "\n")
        self.kallsyms.append(f"ffffffffc0a00010 t {name}_init\t[{name}]")
        self.write()

    def unload(self, name: str) -> None:
        del self.modules[name]
        self.kallsyms = [k for k in self.kallsyms if not k.endswith(f"[{name}]")]
        for entry in (self.root / "sys" / "module" / name).iterdir():
            entry.unlink()
        (self.root / "sys" / "module" / name).rmdir()
        self.write()

    def write(self) -> None:
        (self.root / "proc" / "modules").write_text(
            "".join(m + "\n" for m in self.modules.values())
        )
        (self.root / "proc" / "kallsyms").write_text("".join(k + "\n" for k in self.kallsyms))
        (self.root / "lib" / "modules" / self.release / "modules.dep").write_text(
            "".join(d + "\n" for d in self.dep)
        )


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path / "kernel")
    t.file("kernel/lib/crc7.ko", SIGNED)
    t.file("kernel/fs/fat/vfat.ko", SIGNED)
    t.load("crc7")
    t.load("vfat")
    return t


def run(tree: Tree, tmp_path: Path, allow: str | None = None) -> dict[str, Any]:
    options = AuditOptions(
        state=str(tmp_path / "state" / "audit.json"), allow=allow, roots=tree.roots, release=RELEASE
    )
    return audit.run(options)


def kinds(document: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(f["kind"], f["module"]) for f in document["findings"]]


def test_first_run_is_a_baseline_without_findings(tree: Tree, tmp_path: Path) -> None:
    doc = run(tree, tmp_path)
    assert doc["v"] == 1 and doc["type"] == "audit"
    assert doc["state"] == {"path": str(tmp_path / "state" / "audit.json"), "baseline": True}
    assert doc["findings"] == []
    assert doc["summary"] == {"modules": 2, "unsigned": 0, "out_of_tree": 0, "findings": 0}
    assert doc["kernel"] == {"release": RELEASE, "boot_id": BOOT, "tainted": 0, "taints": {}}
    state = json.loads((tmp_path / "state" / "audit.json").read_text())
    assert set(state["modules"]) == {"crc7", "vfat"} and state["v"] == 1
    assert run(tree, tmp_path)["state"]["baseline"] is False


def test_added_module_is_found_with_its_hash_and_signature(tree: Tree, tmp_path: Path) -> None:
    run(tree, tmp_path)
    path = tree.file("extra/mwtest.ko", UNSIGNED)
    tree.load("mwtest", taints="OE", srcversion="BBBB")
    tree.tainted(1 << 12 | 1 << 13)
    doc = run(tree, tmp_path)
    assert kinds(doc) == [
        ("unsigned_module", "mwtest"),
        ("kernel_taint_changed", None),
        ("module_added", "mwtest"),
    ]
    added = doc["findings"][2]
    assert added["sha256"] == modfile.inspect(UNSIGNED).sha256
    assert (added["signed"], added["file"]) == (False, str(path))
    taint = doc["findings"][1]
    assert (taint["before"], taint["after"], taint["added"]) == ([], ["O", "E"], ["O", "E"])
    assert taint["meanings"]["E"] == "unsigned module was loaded"
    assert doc["kernel"]["taints"] == {
        "O": "externally-built (out-of-tree) module was loaded",
        "E": "unsigned module was loaded",
    }
    assert doc["summary"]["unsigned"] == 1 and doc["summary"]["out_of_tree"] == 1


def test_removed_and_reloaded(tree: Tree, tmp_path: Path) -> None:
    run(tree, tmp_path)
    tree.unload("crc7")
    tree.load("vfat", address="0xffffffffc0b00000")
    assert kinds(run(tree, tmp_path)) == [("module_removed", "crc7"), ("module_reloaded", "vfat")]
    tree.load("vfat", address="0xffffffffc0b00000", srcversion="CCCC")
    doc = run(tree, tmp_path)
    assert [(f["kind"], f.get("changed")) for f in doc["findings"]] == [
        ("file_differs", None),
        ("module_reloaded", ["srcversion"]),
    ]
    assert doc["findings"][0]["loaded_srcversion"] == "CCCC"
    assert doc["findings"][0]["file_srcversion"] == "AAAA"


def test_a_reboot_is_found_and_addresses_are_not_compared(tree: Tree, tmp_path: Path) -> None:
    run(tree, tmp_path)
    tree.boot("3c5e8a3e-0000-4000-8000-000000000002")
    tree.load("vfat", address="0xffffffffc0b00000")
    doc = run(tree, tmp_path)
    assert kinds(doc) == [("boot_changed", None)]
    assert doc["findings"][0]["after"].endswith("0002")


def test_module_taint_changed(tree: Tree, tmp_path: Path) -> None:
    run(tree, tmp_path)
    tree.load("vfat", taints="F")
    doc = run(tree, tmp_path)
    assert kinds(doc) == [("module_taint_changed", "vfat")]
    assert (doc["findings"][0]["before"], doc["findings"][0]["after"]) == ([], ["F"])


def test_hidden_module_and_missing_file(tree: Tree, tmp_path: Path) -> None:
    # A module that removed itself from the module list still has its sysfs directory
    # and its symbols.
    tree.load("rootkit")
    del tree.modules["rootkit"]
    tree.load("nofile")
    tree.write()
    doc = run(tree, tmp_path)
    assert kinds(doc) == [
        ("hidden_module", "rootkit"),
        ("hidden_module", "rootkit"),
        ("file_missing", "nofile"),
    ]
    assert [f.get("seen_in") for f in doc["findings"][:2]] == ["sysfs", "kallsyms"]


def test_kallsyms_pseudo_modules_are_not_hidden_modules(tree: Tree, tmp_path: Path) -> None:
    tree.kallsyms += [
        "ffffffffc0200000 t kprobe_insn_page\t[__builtin__kprobes]",
        "ffffffffc0300000 t ftrace_trampoline\t[__builtin__ftrace]",
        "ffffffffc0400000 t bpf_prog_6deef7357e7b4530\t[bpf]",
    ]
    tree.write()
    assert kinds(run(tree, tmp_path)) == []


def test_unsigned_among_unsigned_is_no_finding(tmp_path: Path) -> None:
    tree = Tree(tmp_path / "kernel")
    tree.file("a.ko", UNSIGNED)
    tree.file("b.ko", UNSIGNED)
    tree.load("a", taints="E", srcversion="BBBB")
    tree.load("b", taints="E", srcversion="BBBB")
    assert kinds(run(tree, tmp_path)) == []


def test_policy(tree: Tree, tmp_path: Path) -> None:
    tree.file("extra/mwtest.ko", UNSIGNED)
    tree.load("mwtest", taints="OE", srcversion="BBBB")
    crc7 = modfile.inspect(SIGNED).sha256
    allow = tmp_path / "allow"
    allow.write_text(f"# Debian's\nvfat\ncrc? sha256:{crc7}  # pinned\n")
    doc = run(tree, tmp_path, allow=str(allow))
    assert kinds(doc) == [("unsigned_module", "mwtest"), ("not_allowed", "mwtest")]
    allow.write_text(f"*\ncrc7 sha256:{'0' * 64}\n")  # a glob without a pin allows any hash
    assert ("hash_not_allowed", "crc7") not in kinds(run(tree, tmp_path, allow=str(allow)))
    allow.write_text(f"vfat\nmwtest\ncrc7 sha256:{'0' * 64}\n")
    doc = run(tree, tmp_path, allow=str(allow))
    assert ("hash_not_allowed", "crc7") in kinds(doc)
    assert [f["allowed"] for f in doc["findings"] if f["kind"] == "hash_not_allowed"] == [
        ["0" * 64]
    ]


@pytest.mark.parametrize("line", ["a b", "a sha256:12", "a sha256:" + "0" * 64 + " x"])
def test_policy_errors_name_the_line(line: str) -> None:
    with pytest.raises(ModwatchError, match=r"^modwatch: allow:2: expected") as caught:
        audit.parse_policy(f"ok\n{line}\n", "allow")
    assert caught.value.status == ExitStatus.USAGE


def test_taint_letters() -> None:
    assert audit.taint_letters(0) == []
    assert audit.taint_letters(1 | 1 << 12 | 1 << 13) == ["P", "O", "E"]
    assert audit.taint_letters(1 << 25) == ["bit25"]


# -- the state file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "corrupt"),
        ("[1, 2]", "corrupt (not a modwatch audit state)"),
        ('{"v": 1}', "corrupt (no modules)"),
        ('{"v": 2, "modules": {}}', "written by a newer modwatch (version 2"),
        (b"\xff\xfe", "unreadable"),
    ],
)
def test_a_bad_state_file_is_a_clear_error_and_left_untouched(
    tree: Tree, tmp_path: Path, content: str | bytes, why: str
) -> None:
    state = tmp_path / "state" / "audit.json"
    state.parent.mkdir()
    if isinstance(content, bytes):
        state.write_bytes(content)
    else:
        state.write_text(content)
    before = state.read_bytes()
    with pytest.raises(ModwatchError) as caught:
        run(tree, tmp_path)
    assert caught.value.status == ExitStatus.STATE_ERROR
    assert why in caught.value.message and "left as it is" in caught.value.message
    assert state.read_bytes() == before


def test_an_unreadable_state_file(tree: Tree, tmp_path: Path) -> None:
    # A directory where the file should be: unreadable whoever runs the test, root too.
    state = tmp_path / "state" / "audit.json"
    state.mkdir(parents=True)
    with pytest.raises(ModwatchError, match="unreadable \\(Is a directory\\)") as caught:
        run(tree, tmp_path)
    assert caught.value.status == ExitStatus.STATE_ERROR
    assert state.is_dir()


def test_no_temporary_file_is_left_and_the_state_is_whole(tree: Tree, tmp_path: Path) -> None:
    run(tree, tmp_path)
    run(tree, tmp_path)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "audit.json",
        "audit.json.lock",
    ]


def test_a_second_run_waits_for_the_lock_then_gives_up(tree: Tree, tmp_path: Path) -> None:
    state = str(tmp_path / "state" / "audit.json")
    with audit.state_lock(state):
        started = time.monotonic()
        with pytest.raises(ModwatchError) as caught, audit.state_lock(state, wait=0.3):
            pass
        assert time.monotonic() - started >= 0.3
    assert caught.value.status == ExitStatus.STATE_LOCKED
    assert "another audit holds" in caught.value.message


def test_a_second_run_gets_the_lock_once_the_first_ends(tree: Tree, tmp_path: Path) -> None:
    state = str(tmp_path / "state" / "audit.json")
    held = threading.Event()

    def first() -> None:
        with audit.state_lock(state):
            held.set()
            time.sleep(0.3)

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with audit.state_lock(state, wait=5):
        pass
    thread.join()


def test_syslog_gets_one_line_per_finding(tmp_path: Path) -> None:
    import socket

    address = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        findings = [{"kind": "module_added", "module": "mwtest", "signed": False}]
        assert audit.send_syslog(findings, address) is None
        message = server.recv(4096).decode()
    assert message == f"<36>modwatch[{os.getpid()}]: audit: module_added mwtest: signed=False"
    assert audit.send_syslog(findings, str(tmp_path / "none")).startswith(f"{tmp_path}/none: ")


# -- the command ---------------------------------------------------------------------------


@pytest.fixture
def host_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tree:
    """A fake kernel where `modwatch audit` looks by default."""
    t = Tree(tmp_path / "kernel", os.uname().release)
    t.file("kernel/lib/crc7.ko", SIGNED)
    t.load("crc7")
    monkeypatch.setattr(audit, "ROOTS", t.roots)
    return t


def test_command_text_baseline_then_findings(
    host_tree: Tree,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = str(tmp_path / "s.json")
    status, out, err = run_main(monkeypatch, capsys, "audit", "--state", state, "--format", "text")
    assert (status, err) == (0, "")
    assert out == (
        "modwatch audit: 0 findings; 1 modules (0 unsigned, 0 out of tree); kernel taint: none\n"
        f"  baseline recorded in {state}: the next run compares with it\n"
    )
    host_tree.file("extra/mwtest.ko", UNSIGNED)
    host_tree.load("mwtest", taints="OE", srcversion="BBBB")
    status, out, err = run_main(monkeypatch, capsys, "audit", "--state", state)
    assert (status, err) == (1, "")
    document = json.loads(out)
    assert [f["kind"] for f in document["findings"]] == ["unsigned_module", "module_added"]
    assert document["state"]["baseline"] is False and "records" not in document
    status, out, err = run_main(monkeypatch, capsys, "audit", "--state", state, "--quiet")
    assert (status, out, err) == (1, "", "")  # still an unsigned module among signed ones
    host_tree.unload("mwtest")
    assert run_main(monkeypatch, capsys, "audit", "--state", state, "-q")[0] == 1  # removed
    assert run_main(monkeypatch, capsys, "audit", "--state", state, "-q") == (0, "", "")


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        ("{", ExitStatus.STATE_ERROR, "corrupt"),
        ('{"v": 9, "modules": {}}', ExitStatus.STATE_ERROR, "newer modwatch"),
    ],
)
def test_command_state_errors(
    host_tree: Tree,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: str,
    status: int,
    message: str,
) -> None:
    state = tmp_path / "s.json"
    state.write_text(content)
    got, out, err = run_main(monkeypatch, capsys, "audit", "--state", str(state))
    assert (got, out) == (status, "")
    assert message in err and err.count("\n") == 1
    assert state.read_text() == content


def test_command_bad_allow_file(
    host_tree: Tree,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    allow = tmp_path / "allow"
    allow.write_text("crc7 md5:00\n")
    state = tmp_path / "s.json"
    got, out, err = run_main(
        monkeypatch, capsys, "audit", "--state", str(state), "--allow", str(allow)
    )
    assert (got, out) == (2, "")
    assert err.startswith(f"modwatch: {allow}:1: expected")
    assert not state.exists()
    got, out, err = run_main(
        monkeypatch, capsys, "audit", "--state", str(state), "--allow", str(tmp_path / "none")
    )
    assert got == 2 and "cannot read --allow" in err


def test_a_temporary_file_a_killed_run_left_is_removed_by_the_next(
    tree: Tree, tmp_path: Path
) -> None:
    run(tree, tmp_path)
    left = tmp_path / "state" / ".audit-killed.tmp"
    left.write_text("{half")
    before = (tmp_path / "state" / "audit.json").read_text()
    assert json.loads(before)["v"] == 1
    assert run(tree, tmp_path)["findings"] == []
    assert not left.exists()


def test_module_files_of_the_modules_asked_for(tmp_path: Path) -> None:
    roots = audit.Roots(proc=str(tmp_path), sys=str(tmp_path), modules=str(tmp_path))
    (tmp_path / "6.12").mkdir()
    (tmp_path / "6.12" / "modules.dep").write_text(
        "kernel/fs/fat/vfat.ko.xz: kernel/fs/fat/fat.ko.xz\n"
        "kernel/fs/fat/fat.ko.xz:\n"
        "kernel/sound/pci/hda/snd-hda-intel.ko.zst: kernel/fs/fat/fat.ko.xz\n"
        "kernel/lib/crc7.ko:\n"
        "updates/fat.ko:\n"
        "top.ko: kernel/lib/crc7.ko\n"
    )
    base = str(tmp_path / "6.12")
    asked = ["fat", "snd_hda_intel", "gone", "vfat", "top"]
    assert audit.module_files(roots, "6.12", asked) == {
        "fat": f"{base}/kernel/fs/fat/fat.ko.xz",  # the first line that names it
        "vfat": f"{base}/kernel/fs/fat/vfat.ko.xz",
        "snd_hda_intel": f"{base}/kernel/sound/pci/hda/snd-hda-intel.ko.zst",
        "top": f"{base}/top.ko",  # right in the directory
    }
    assert audit.module_files(roots, "6.12", ["vfat"]) == {
        "vfat": f"{base}/kernel/fs/fat/vfat.ko.xz"
    }
    assert audit.module_files(roots, "6.12", []) == {}
