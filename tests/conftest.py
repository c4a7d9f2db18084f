"""Kernel tests (marker `kernel`) run only inside a guest kernel booted by scripts/testbed.py.

The host kernel has no kprobe events and no module support, and the tests need root: the
test bed boots each guest kernel, sets MODWATCH_IN_GUEST=1 there and runs `pytest -m kernel`.
Anywhere else they are skipped. Mark a kernel test module with `pytestmark = pytest.mark.kernel`.
"""

import os

import pytest

IN_GUEST = os.environ.get("MODWATCH_IN_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        # Raising the kernel's lockdown cannot be undone before the next boot.
        items.sort(key=lambda item: "lockdown" in item.keywords)
        return
    skip = pytest.mark.skip(reason="needs the guest kernel: run make test-kernel")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-cycles",
        type=int,
        default=100,
        help="load/unload cycles of the kernel soak test (the full soak: 10000, "
        "make test-kernel SOAK=10000)",
    )
