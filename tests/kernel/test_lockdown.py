"""Kernel lockdown in confidentiality mode: capture refuses with its own status and says why.

Lockdown can be raised at run time and never lowered until the next boot; once raised, no
other test can use tracefs or load the (unsigned) test module. The `lockdown` marker makes
conftest run these tests after every other one in the guest. A full test bed run also
boots the newest kernel with `lockdown=confidentiality` on its command line and runs only
these tests there: a kernel locked down from its start.
"""

from pathlib import Path

import pytest

from modwatch.errors import ExitStatus

from .helpers import Child

pytestmark = [pytest.mark.kernel, pytest.mark.lockdown]

LOCKDOWN = Path("/sys/kernel/security/lockdown")
BOOT_OPTION = "lockdown=confidentiality"


def booted_locked_down() -> bool:
    return BOOT_OPTION in Path("/proc/cmdline").read_text().split()


@pytest.fixture(scope="module")
def confidentiality(tracefs: Path) -> Path:
    """The running kernel's lockdown at confidentiality, raised now unless the kernel was
    booted so (it cannot be written again then); returns tracefs."""
    if not LOCKDOWN.exists():
        pytest.skip(f"this kernel has no lockdown LSM ({LOCKDOWN} is missing)")
    if not booted_locked_down():
        LOCKDOWN.write_text("confidentiality")
    assert "[confidentiality]" in LOCKDOWN.read_text()
    return tracefs


def test_the_kernel_was_locked_down_from_its_start(confidentiality: Path) -> None:
    if not booted_locked_down():
        pytest.skip(f"raised at run time here; the test bed's boot with {BOOT_OPTION} runs this")
    # Locked down before tracing was set up: the kernel did not create tracefs's event
    # files at all (raised at run time, they are there but refuse to open).
    assert "[confidentiality]" in LOCKDOWN.read_text()
    assert not (confidentiality / "available_events").exists()


def test_the_kernel_forbids_kprobe_events(confidentiality: Path) -> None:
    # What the tests below rely on: the kernel itself refuses, even to root.
    with pytest.raises(PermissionError):
        (confidentiality / "kprobe_events").open("a").close()


def test_capture_exits_with_the_lockdown_status(confidentiality: Path) -> None:
    child = Child("capture", "-d", "1")
    status, stderr = child.wait(), child.rest_of_stderr()
    assert status == ExitStatus.LOCKDOWN, stderr
    assert stderr.count("\n") == 1, stderr
    assert "lockdown" in stderr and "confidentiality" in stderr
    assert "lockdown=integrity" in stderr  # the fix


def test_dry_run_says_what_it_could_not_check(confidentiality: Path, tmp_path: Path) -> None:
    out = tmp_path / "dry-run.txt"
    with out.open("w") as stdout:
        child = Child("capture", "--dry-run", stdout=stdout.fileno())
    assert child.wait() == 0, child.rest_of_stderr()
    text = out.read_text()
    assert "# not checked against the running kernel: kernel lockdown" in text
    assert "\np:" in text  # the definitions it would write, all the same


def test_doctor_says_capture_is_impossible(confidentiality: Path, tmp_path: Path) -> None:
    out = tmp_path / "doctor.txt"
    with out.open("w") as stdout:
        child = Child("doctor", stdout=stdout.fileno())
    assert child.wait() == ExitStatus.IMPOSSIBLE, child.rest_of_stderr()
    lines = out.read_text().splitlines()
    assert any(line.startswith("fail  lockdown: confidentiality") for line in lines), lines
    assert lines[-1] == "verdict: impossible"
