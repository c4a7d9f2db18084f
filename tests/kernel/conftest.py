"""Fixtures for the kernel tests, which run as root in a guest booted by scripts/testbed.py.

The test bed sets MODWATCH_TEST_KERNEL (the expected `uname -r`), MODWATCH_TEST_SERIES (6.1 or
6.12) and MODWATCH_TEST_MODULE_DIR (mwtest.ko and mwtest_b.ko built for that kernel).
"""

import ctypes
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import helpers

LONG_NAME = "mwtest_name_of_the_longest_length_a_module_may_have_55b"  # 55 bytes
TEST_MODULES = ("mwtest", "mwtest_b", LONG_NAME)
TRACEFS = Path("/sys/kernel/tracing")
SYS_FINIT_MODULE = 313  # x86_64


def modules_in_proc() -> set[str]:
    with open("/proc/modules") as modules:
        return {line.split(" ", 1)[0] for line in modules}


@pytest.fixture(scope="session")
def loaded_modules() -> Callable[[], set[str]]:
    """loaded_modules(): names in /proc/modules, whatever their state (Live, Loading, ...)."""
    return modules_in_proc


@pytest.fixture(scope="session")
def module_dir() -> Path:
    value = os.environ.get("MODWATCH_TEST_MODULE_DIR")
    if not value:
        pytest.fail("MODWATCH_TEST_MODULE_DIR is not set: run the kernel tests by make test-kernel")
    return Path(value)


@pytest.fixture(scope="session")
def mwtest_ko(module_dir: Path) -> Path:
    return module_dir / "mwtest.ko"


@pytest.fixture(scope="session")
def mwtest_b_ko(module_dir: Path) -> Path:
    return module_dir / "mwtest_b.ko"


@pytest.fixture(scope="session")
def tracefs() -> Path:
    """/sys/kernel/tracing, where tracefs is mounted (mounting it if it is not)."""
    if not os.path.ismount(TRACEFS):
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    return TRACEFS


@pytest.fixture(scope="session")
def finit_module() -> Callable[[Path, str], int]:
    """finit_module(path, params): 0 when the module loaded, else the errno of the syscall.

    An exact errno that `insmod` would only describe in words.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def load(path: Path, params: str = "") -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.syscall(SYS_FINIT_MODULE, fd, params.encode(), 0) == 0:
                return 0
            return ctypes.get_errno()
        finally:
            os.close(fd)

    return load


@pytest.fixture(scope="session")
def long_name_ko(module_dir: Path) -> Path:
    """mwtest under the longest name a module may have."""
    return module_dir / f"{LONG_NAME}.ko"


@pytest.fixture(autouse=True)
def no_test_module_left() -> Iterator[None]:
    """Remove the test modules if a test left them loaded."""
    yield
    deadline = time.monotonic() + 10
    while left := modules_in_proc() & set(TEST_MODULES):
        if helpers.held():  # a test failed before letting its held init go on
            helpers.release()
        for name in left:
            subprocess.run(["rmmod", name], capture_output=True, check=False)
        if time.monotonic() > deadline:
            pytest.fail(f"cannot unload {', '.join(sorted(left))} after the test")
        # A module whose init is still running (delay_ms, hold_ms) cannot be removed yet: EBUSY.
        time.sleep(0.1)


@pytest.fixture(scope="session")
def mwload(module_dir: Path) -> str:
    """The C loader (tests/kernel/mwload.c), built on the host by the test bed."""
    return helper(module_dir, "mwload")


@pytest.fixture(scope="session")
def mwload32(module_dir: Path) -> str:
    """A 32-bit caller of the module syscalls (tests/kernel/mwload32.c)."""
    return helper(module_dir, "mwload32")


def helper(module_dir: Path, name: str) -> str:
    binary = module_dir / name
    assert binary.exists(), f"{binary} is missing: the test bed builds it with the modules"
    return str(binary)
