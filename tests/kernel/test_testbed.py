"""The test bed itself: the right kernel, tracefs with kprobe events, loadable test modules."""

import errno
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

FinitModule = Callable[[Path, str], int]
LoadedModules = Callable[[], set[str]]


def test_runs_the_expected_kernel() -> None:
    release = os.uname().release
    assert release == os.environ["MODWATCH_TEST_KERNEL"]
    assert release.startswith(os.environ["MODWATCH_TEST_SERIES"] + ".")


def test_tracefs_has_kprobe_events(tracefs: Path) -> None:
    assert os.path.ismount(tracefs)
    assert (tracefs / "kprobe_events").exists()


def test_insmod_with_a_string_parameter_then_rmmod(
    mwtest_ko: Path, loaded_modules: LoadedModules
) -> None:
    # The quotes are part of the argument: the kernel's parse_args keeps "hello world" whole.
    subprocess.run(["insmod", str(mwtest_ko), 'note="hello world"'], check=True)
    assert "mwtest" in loaded_modules()
    assert Path("/sys/module/mwtest/parameters/note").read_text() == "hello world\n"
    subprocess.run(["rmmod", "mwtest"], check=True)
    assert "mwtest" not in loaded_modules()


def test_failing_init_returns_its_errno(
    mwtest_ko: Path, finit_module: FinitModule, loaded_modules: LoadedModules
) -> None:
    assert finit_module(mwtest_ko, "fail=22") == errno.EINVAL
    assert "mwtest" not in loaded_modules()


def test_two_distinct_modules_load_at_once(
    mwtest_ko: Path, mwtest_b_ko: Path, finit_module: FinitModule, loaded_modules: LoadedModules
) -> None:
    assert finit_module(mwtest_ko, "") == 0
    assert finit_module(mwtest_b_ko, "") == 0
    assert {"mwtest", "mwtest_b"} <= loaded_modules()


def test_delay_ms_slows_init(mwtest_b_ko: Path, finit_module: FinitModule) -> None:
    started = time.monotonic()
    assert finit_module(mwtest_b_ko, "delay_ms=300") == 0
    assert time.monotonic() - started >= 0.3


def test_a_duplicate_load_fails_with_eexist(mwtest_ko: Path, finit_module: FinitModule) -> None:
    assert finit_module(mwtest_ko, "") == 0
    assert finit_module(mwtest_ko, "") == errno.EEXIST
