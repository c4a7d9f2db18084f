"""Helpers of the kernel tests.

A new interpreter costs seconds to tens of seconds in an emulated guest: modwatch's CLI
runs in a fork of pytest (which has modwatch imported already), and the loads a test
makes are a shell script of mwload calls.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from modwatch import cli


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
