"""Exit statuses and the one error type the CLI turns into a line on stderr."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """Every status modwatch exits with; documented in `modwatch --help` and the README."""

    OK = 0
    FAILURE = 1  # unexpected internal error (a bug): run with MODWATCH_DEBUG=1 for the traceback
    USAGE = 2  # bad command line (typer's own status for usage errors)
    NOT_ROOT = 3
    NO_TRACEFS = 4
    NO_KPROBES = 5
    LOCKDOWN = 6
    PROBE_REJECTED = 7
    OUTPUT_ERROR = 8
    TRACE_GONE = 9  # the instance, a probe or tracefs vanished under a running capture
    BAD_TRACE_FILE = 10
    DEGRADED = 11  # doctor: capture runs, with fields or callers missing
    IMPOSSIBLE = 12  # doctor: capture cannot run here
    STATE_ERROR = 13  # audit: the state file is unreadable, corrupt or newer (left untouched)
    STATE_LOCKED = 14  # audit: another audit holds the state file's lock


EXIT_STATUS_HELP = {
    ExitStatus.OK: "capture ended normally (duration, count, Ctrl-C, SIGTERM, SIGHUP, closed pipe)",
    ExitStatus.FAILURE: "internal error (set MODWATCH_DEBUG=1 for a traceback)",
    ExitStatus.USAGE: "bad command line",
    ExitStatus.NOT_ROOT: "not root",
    ExitStatus.NO_TRACEFS: "tracefs not mounted and not mountable",
    ExitStatus.NO_KPROBES: "kernel with neither kprobe events nor the module syscalls' "
    "tracepoints, or without a required symbol",
    ExitStatus.LOCKDOWN: "kernel lockdown in confidentiality mode forbids tracing",
    ExitStatus.PROBE_REJECTED: "the kernel rejected a probe definition (its error_log is quoted)",
    ExitStatus.OUTPUT_ERROR: "output file not writable, or writing to it failed",
    ExitStatus.TRACE_GONE: "modwatch's tracefs instance or probes were removed or disabled "
    "while it ran",
    ExitStatus.BAD_TRACE_FILE: "--replay file unreadable or not a modwatch trace",
    ExitStatus.DEGRADED: "doctor: capture works here, with something missing (see its warn lines)",
    ExitStatus.IMPOSSIBLE: "doctor: capture cannot run here (see its fail lines)",
    ExitStatus.STATE_ERROR: "audit: the state file is unreadable, corrupt or from a newer "
    "modwatch; it is left untouched",
    ExitStatus.STATE_LOCKED: "audit: another audit held the state file's lock for 10 s",
}


class ModwatchError(Exception):
    """An error the user can act on: one line for stderr and the status to exit with."""

    def __init__(self, message: str, status: ExitStatus) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
