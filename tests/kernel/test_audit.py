"""`modwatch audit` against the real kernel: baseline, a module loaded and unloaded
between runs, an allowlist, a run killed while writing its state, two runs at once.

The test module is not under /lib/modules, where the audit finds module files (through
modules.dep). A writable overlay over the kernel's module directory puts it there, as
`make modules_install` would, for the length of the test.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modwatch import audit

from .helpers import CHILDREN, Child, stat_fields, wait_until

pytestmark = pytest.mark.kernel


@pytest.fixture
def installed_module(tmp_path: Path, mwtest_ko: Path) -> Iterator[Path]:
    """mwtest.ko under /lib/modules/$(uname -r)/extra, listed in modules.dep."""
    modules = Path("/lib/modules") / os.uname().release
    real = modules.resolve()
    # The upper layer on a tmpfs: the guest's /tmp is an overlay itself, which cannot be one.
    layers = tmp_path / "layers"
    layers.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "mwlayers", str(layers)], check=True)
    upper, work = layers / "upper", layers / "work"
    upper.mkdir()
    work.mkdir()
    options = f"lowerdir={real},upperdir={upper},workdir={work}"
    try:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(real)], check=True)
    except subprocess.CalledProcessError:
        subprocess.run(["umount", str(layers)], check=True)
        raise
    try:
        (real / "extra").mkdir(exist_ok=True)
        installed = real / "extra" / "mwtest.ko"
        shutil.copyfile(mwtest_ko, installed)
        with open(real / "modules.dep", "a") as dep:
            dep.write("extra/mwtest.ko:\n")
        yield modules / "extra" / "mwtest.ko"
    finally:
        for child in CHILDREN:
            if child.status is None:
                child.kill()
                child.wait()
        CHILDREN.clear()
        subprocess.run(["umount", str(real)], check=True)
        subprocess.run(["umount", str(layers)], check=True)


def audit_run(state: Path, *args: str, setup: Any = None) -> tuple[int, dict[str, Any], str]:
    out = state.parent / "out.json"
    with open(out, "w") as stream:
        child = Child("audit", "--state", str(state), *args, stdout=stream.fileno(), setup=setup)
        status = child.wait()
    text = out.read_text()
    return status, json.loads(text) if text else {}, child.rest_of_stderr()


def kinds(document: dict[str, Any], module: str | None = None) -> list[str]:
    return [f["kind"] for f in document["findings"] if module is None or f["module"] == module]


def test_audit_between_runs(tmp_path: Path, mwload: str, installed_module: Path) -> None:
    state = tmp_path / "state" / "audit.json"
    state.parent.mkdir()
    status, first, err = audit_run(state)
    assert first["state"]["baseline"] is True, (first, err)
    # The guest's own modules (9p, overlay, virtio ...) are Debian's, signed, in place.
    assert (status, first["findings"]) == (0, []), err
    assert first["summary"]["modules"] > 0

    subprocess.run([mwload, "finit", str(installed_module), "", "sleep", "0"], check=True)
    try:
        status, second, err = audit_run(state)
        assert status == 1, err
        added = next(f for f in second["findings"] if f["kind"] == "module_added")
        assert added["module"] == "mwtest"
        assert added["sha256"] == hashlib.sha256(installed_module.read_bytes()).hexdigest()
        assert added["signed"] is False
        assert "unsigned_module" in kinds(second, "mwtest")
        assert "O" in second["kernel"]["taints"] and "E" in second["kernel"]["taints"]

        # An allowlist of what was loaded before: the Debian modules pass, mwtest not.
        allow = tmp_path / "allow"
        allow.write_text("# the guest's own\n" + "".join(f"{n}\n" for n in first_modules(first)))
        status, third, _ = audit_run(state, "--allow", str(allow), "--format", "json")
        assert status == 1
        assert [f["module"] for f in third["findings"] if f["kind"] == "not_allowed"] == ["mwtest"]
    finally:
        subprocess.run([mwload, "delete", "mwtest"], check=True)
    status, fourth, _ = audit_run(state)
    assert (status, kinds(fourth)) == (1, ["module_removed"])
    assert fourth["findings"][0]["module"] == "mwtest"
    # With a capture first: its records (none: nothing loads meanwhile) come along.
    status, fifth, err = audit_run(state, "--capture", "1")
    assert (status, fifth["findings"], fifth["records"]) == (0, [], []), err


def first_modules(document: dict[str, Any]) -> list[str]:
    """The modules a run saw, from the state it wrote."""
    state = json.loads(Path(document["state"]["path"]).read_text())
    return sorted(name for name in state["modules"] if name != "mwtest")


def stop_before_rename() -> None:
    os.environ[audit.PAUSE_BEFORE_RENAME] = "1"


def short_lock_wait() -> None:
    audit.state_lock = functools.partial(audit.state_lock, wait=1.0)  # type: ignore[assignment]


def stopped(child: Child) -> None:
    """Until the run has written its new state and stopped itself before the rename."""
    wait_until(lambda: stat_fields(child.pid)[0] == "T", 120, "the audit stopped before its rename")


def holds_open(pid: int, path: Path) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
    return False


def test_sigkill_while_writing_the_state_and_two_runs_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state" / "audit.json"
    state.parent.mkdir()
    lock = state.parent / "audit.json.lock"
    assert audit_run(state)[0] == 0
    before = state.read_bytes()

    # Killed after its new state is written, before the rename: the old state stays.
    child = Child("audit", "--state", str(state), setup=stop_before_rename)
    stopped(child)
    assert any(p.name.startswith(audit.TEMPORARY_PREFIX) for p in state.parent.iterdir())
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert state.read_bytes() == before
    status, after, err = audit_run(state)
    assert (status, after["findings"], after["state"]["baseline"]) == (0, [], False), err
    assert sorted(p.name for p in state.parent.iterdir()) == [
        "audit.json",
        "audit.json.lock",
        "out.json",
    ]

    # Two runs at once: the second waits for the first's lock, then runs on its state.
    first = Child("audit", "--state", str(state), "--quiet", setup=stop_before_rename)
    stopped(first)
    second = Child("audit", "--state", str(state), "--quiet")
    wait_until(lambda: holds_open(second.pid, lock), 120, "the second audit at the lock")
    first.send_signal(signal.SIGCONT)
    assert (first.wait(), second.wait()) == (0, 0)
    # One that waits longer than the lock allows gives up with its own status (allowed
    # 1 s here instead of audit.LOCK_WAIT: the first is stopped, no wait would do).
    first = Child("audit", "--state", str(state), "--quiet", setup=stop_before_rename)
    stopped(first)
    second = Child("audit", "--state", str(state), "--quiet", setup=short_lock_wait)
    assert second.wait() == 14
    assert "another audit holds" in (stderr := second.rest_of_stderr()), stderr
    assert "(waited 1 s)" in stderr
    first.send_signal(signal.SIGCONT)
    assert first.wait() == 0
    assert json.loads(state.read_text())["v"] == audit.STATE_VERSION
