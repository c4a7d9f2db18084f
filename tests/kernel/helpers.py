"""Helpers of the kernel tests.

A new interpreter costs seconds to tens of seconds in an emulated guest: modwatch's CLI
runs in a fork of pytest (which has modwatch imported already), and the loads a test
makes are a shell script of mwload calls.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modwatch import cli
from modwatch.tracefile import CALLER


class Child:
    """modwatch's CLI in a forked child, with its stderr on a pipe."""

    def __init__(self, *args: str, stdout: int | None = None, setup: Any = None) -> None:
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            status = 99
            try:
                os.close(read_end)
                os.dup2(write_end, 2)
                os.dup2(stdout if stdout is not None else os.open(os.devnull, os.O_WRONLY), 1)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if setup is not None:
                    setup()
                sys.argv = ["modwatch", *args]
                cli.main()
                status = 0
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                # os._exit skips the interpreter's own flushing.
                with contextlib.suppress(OSError):
                    sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        os.close(write_end)
        self.stderr = os.fdopen(read_end, "r")
        self.status: int | None = None
        CHILDREN.append(self)

    def readline(self) -> str:
        return self.stderr.readline()

    def instance(self) -> str:
        """Read the banner; the session's instance (and probe group) it names."""
        return self.readline().split("tracefs instance ", 1)[1].split(";", 1)[0]

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"modwatch (pid {self.pid}) did not exit in {timeout} s")
            else:
                time.sleep(0.1)
        return self.status

    def rest_of_stderr(self) -> str:
        return self.stderr.read()


CHILDREN: list[Child] = []


def script(tmp: Path, *commands: list[str]) -> list[str]:
    """A command that runs `commands` one after another (a shell script in `tmp`)."""
    path = tmp / "scenario.sh"
    path.write_text("\n".join(shlex.join(c) for c in commands) + "\n")
    return ["sh", str(path)]


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


HOLD = Path("/sys/module/mwtest/parameters/hold_ms")
HOLD_MS = 120_000  # a bound on a held init, should nothing let it go
MARKER = "mwmarker"  # the module a marker call names: never loaded


def held() -> bool:
    """mwtest's init is running and waiting (loaded with hold_ms)."""
    try:
        return int(HOLD.read_text()) > 0
    except (OSError, ValueError):
        return False


def release() -> None:
    HOLD.write_text("0")


def callers_seen(trace: Path) -> list[dict[str, Any]]:
    """The caller lines of a saved trace: what /proc gave at each syscall entry, in order."""
    text = trace.read_text(encoding="utf-8", errors="surrogateescape")
    return [
        json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith(CALLER)
    ]


def stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the task name (which may hold spaces and parentheses):
    the state first (`T` when stopped), utime and stime at 11 and 12."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def stopped_loader(mwload: str) -> int | None:
    """The pid of an mwload that stopped itself (its `stop` operation), if one has."""
    for entry in Path("/proc").iterdir():
        try:
            if stat_fields(entry.name)[0] == "T" and os.readlink(entry / "exe") == mwload:
                return int(entry.name)
        except (OSError, ValueError):
            continue
    return None


class Releaser(threading.Thread):
    """Lets `loads` waiting loaders go on, one after another, once the capture saving its
    trace to `trace` has handled everything each did so far. A loader waits in mwtest's
    init (loaded with hold_ms), or, with `stopped`, stopped after its call (mwload's
    `stop`). While it waits, a marker call (delete_module of MARKER, which fails) is
    made, and the loader goes on when the marker's entry is in the saved trace (events
    are handled in order). However slow the guest, the capture has seen the loader's
    call while the loader was still there.

    The markers are records too: `markers` holds their pids."""

    def __init__(self, trace: Path, mwload: str, loads: int, stopped: bool = False) -> None:
        super().__init__(daemon=True)
        self.trace, self.mwload, self.loads, self.stopped = trace, mwload, loads, stopped
        self.markers: list[int] = []
        self.error: BaseException | None = None
        self.start()

    def waiting(self) -> Callable[[], None] | None:
        """What lets the waiting loader go on, once one waits."""
        if not self.stopped:
            return release if held() else None
        pid = stopped_loader(self.mwload)
        return None if pid is None else functools.partial(os.kill, pid, signal.SIGCONT)

    def run(self) -> None:
        try:
            for _ in range(self.loads):
                deadline = time.monotonic() + 120
                while (go := self.waiting()) is None:
                    assert time.monotonic() < deadline, "not within 120 s: a loader waiting"
                    time.sleep(0.2)
                marker = subprocess.Popen(
                    [self.mwload, "delete", MARKER],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                marker.wait(timeout=60)
                self.markers.append(marker.pid)
                wait_until(
                    lambda pid=marker.pid: any(c["tid"] == pid for c in callers_seen(self.trace)),
                    120,
                    f"the marker call (pid {marker.pid}) in {self.trace}",
                )
                go()
        except BaseException as err:  # reported by done()
            self.error = err

    def done(self) -> list[int]:
        """Wait for the releases; the markers' pids."""
        self.join(timeout=300)
        assert not self.is_alive(), "the releaser did not finish"
        if self.error is not None:
            raise self.error
        return self.markers
