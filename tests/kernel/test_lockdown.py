"""Kernel lockdown in confidentiality mode: capture refuses with its own status and says why.

Lockdown can be raised at run time and never lowered until the next boot; once raised, no
other test can use tracefs or load the (unsigned) test module. The `lockdown` marker makes
conftest run these tests after every other one in the guest.
"""

from pathlib import Path

import pytest

from modwatch.errors import ExitStatus

from .helpers import Child

pytestmark = [pytest.mark.kernel, pytest.mark.lockdown]

LOCKDOWN = Path("/sys/kernel/security/lockdown")


@pytest.fixture(scope="module")
def confidentiality(tracefs: Path) -> Path:
    """Raise the running kernel's lockdown to confidentiality; returns tracefs."""
    if not LOCKDOWN.exists():
        pytest.skip(f"this kernel has no lockdown LSM ({LOCKDOWN} is missing)")
    LOCKDOWN.write_text("confidentiality")
    assert "[confidentiality]" in LOCKDOWN.read_text()
    return tracefs


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
