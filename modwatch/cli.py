"""The command line: parses options, runs the core, writes records and messages.

This is the only module that knows about the terminal.
"""

import enum
import os
import sys
from pathlib import Path
from typing import IO, Annotated

import orjson
import typer

from modwatch import __version__, capture
from modwatch.correlate import Record
from modwatch.errors import EXIT_STATUS_HELP, ExitStatus, ModwatchError
from modwatch.output import (
    COLUMNS,
    DEFAULT_COLUMNS,
    JsonlWriter,
    TableWriter,
    Writer,
    dumps,
    printable,
)
from modwatch.probes import ProbeSpec, new_group, rare_instance

# The state file `modwatch audit` compares with, unless --state says.
AUDIT_STATE = "/var/lib/modwatch/audit.json"
_STATUS_TABLE = "\n\n".join(f"{int(s)}: {text}" for s, text in EXIT_STATUS_HELP.items())

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Watch kernel module loads and unloads through kprobe events in tracefs, "
    "without eBPF.\n\nExit status:\n\n" + _STATUS_TABLE,
)


class Format(enum.StrEnum):
    jsonl = "jsonl"
    table = "table"


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _table_columns(columns: str | None, print_uid: bool) -> tuple[str, ...]:
    """The table's columns: --columns as given, else the default ones, with UID after
    PID for -U."""
    if columns is None:
        chosen = list(DEFAULT_COLUMNS)
        if print_uid:
            chosen.insert(chosen.index("pid") + 1, "uid")
        return tuple(chosen)
    chosen = [c.strip() for c in columns.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in COLUMNS]
    if unknown or not chosen:
        raise ModwatchError(
            f"modwatch: unknown column {', '.join(unknown) or '(none given)'}: "
            f"choose from {', '.join(COLUMNS)}",
            ExitStatus.USAGE,
        )
    if print_uid and "uid" not in chosen:
        chosen.insert(chosen.index("pid") + 1 if "pid" in chosen else 0, "uid")
    return tuple(chosen)


def _open_output(
    path: Path | None, fmt: Format | None, columns: tuple[str, ...] = DEFAULT_COLUMNS
) -> tuple[Writer, IO[bytes] | None]:
    try:
        stream = open(path, "wb") if path is not None else None  # noqa: SIM115
    except OSError as err:
        raise ModwatchError(
            f"modwatch: cannot write {path}: {err.strerror}: choose another --output",
            ExitStatus.OUTPUT_ERROR,
        ) from err
    if fmt is None:
        fmt = Format.table if stream is None and sys.stdout.isatty() else Format.jsonl
    if fmt is Format.table:
        text = open(stream.fileno(), "w", closefd=False) if stream else sys.stdout  # noqa: SIM115
        return TableWriter(text, columns=columns), stream
    return JsonlWriter(stream if stream else sys.stdout.buffer), stream


@app.command("capture", context_settings={"allow_interspersed_args": False})
def capture_command(
    command: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="-- COMMAND",
            help="Arm the probes, run COMMAND, stop when it exits (after reading what it "
            "caused), and exit with its status.",
            show_default=False,
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option("-d", "--duration", min=0, help="Stop after SECONDS.", metavar="SECONDS"),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option("-n", "--count", min=1, help="Stop after N load/unload records."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Write records to FILE instead of stdout."),
    ] = None,
    fmt: Annotated[
        Format | None,
        typer.Option(
            "--format",
            help="jsonl (one JSON object per line) or table; default: table on a terminal, "
            "jsonl otherwise.",
            show_default=False,
        ),
    ] = None,
    print_uid: Annotated[
        bool, typer.Option("-U", "--print-uid", help="Table: a UID column after PID.")
    ] = False,
    columns: Annotated[
        str | None,
        typer.Option(
            "--columns",
            help="Table: the columns, comma-separated, from: " + ", ".join(COLUMNS) + ". "
            "PATH comes last. JSON Lines always has every field.",
            metavar="LIST",
        ),
    ] = None,
    pid: Annotated[
        int | None, typer.Option("-p", "--pid", help="Only operations of this process or thread.")
    ] = None,
    failed: Annotated[bool, typer.Option("-x", "--failed", help="Only failed operations.")] = False,
    raw: Annotated[
        bool,
        typer.Option("--raw", help="One record per kernel event (see `modwatch events`)."),
    ] = False,
    no_kprobes: Annotated[
        bool,
        typer.Option(
            "--no-kprobes",
            help="Capture from tracepoints only, as on a kernel without kprobe events "
            "(what --dry-run shows as missing: params, init_ret, paths and uids from /proc).",
        ),
    ] = False,
    hashing: Annotated[
        bool,
        typer.Option(
            "--hash/--no-hash",
            help="Read each loaded module file (sha256, size, signature, compression, "
            "vermagic, srcversion), off the reading path, waiting at most 2 s per record. "
            "--no-hash skips the read, for a slow disk.",
        ),
    ] = True,
    buffer_kb: Annotated[
        int | None,
        typer.Option(
            "--buffer-kb",
            min=1,
            metavar="KIB",
            help="The ring buffer of modwatch's main instance, per CPU. Default: "
            f"{capture.BUFFER_BUDGET_KB} KiB in all, shared out over the CPUs (or the "
            "kernel's default per CPU, if larger). A burst of calls larger than the "
            "buffer loses events, each counted and reported; the rare events past the "
            "permission check have an instance of their own, of the kernel's default size.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the probe definitions and exit; touch nothing."),
    ] = False,
    save_trace: Annotated[
        Path | None,
        typer.Option(
            "--save-trace", help="Also keep the raw trace_pipe text, for --replay.", metavar="FILE"
        ),
    ] = None,
    replay: Annotated[
        Path | None,
        typer.Option(
            "--replay",
            help="Read a --save-trace FILE instead of the kernel (no root needed).",
            metavar="FILE",
        ),
    ] = None,
) -> None:
    """Capture module loads and unloads: one record per operation, with its outcome.

    Records are emitted when the syscall returns. Runs until Ctrl-C, SIGTERM or SIGHUP,
    --duration, --count, or the end of COMMAND; every probe and the tracefs instances
    modwatch made are removed on the way out. Events past the permission check go to an
    instance of their own, which a flood of failing calls by any user cannot overrun.
    """
    if dry_run:
        probe_set, unchecked = capture.plan_offline(new_group(os.getpid()), not no_kprobes)
        group, rare = probe_set.group, rare_instance(probe_set.group)
        print(f"# probe group: {group}; instances: {group}, and {rare} for the rare events")
        if unchecked:
            print(f"# not checked against the running kernel: {unchecked}")
        for choice in probe_set.choices:
            print(f"# {choice}")
        for spec in probe_set.probes:
            print(spec.definition())
        for spec in probe_set.probes:
            if spec.filter is not None:
                print(f"# filter {spec.event}: {spec.filter}")
        for instance, specs in zip((group, rare), probe_set.split(), strict=True):
            events = [
                f"{group}:{e.event}" if isinstance(e, ProbeSpec) else f"{e.system}:{e.event}"
                for e in specs
            ]
            print(f"# enable in {instance}: {' '.join(events) or '(none)'}")
        return

    if save_trace is not None and replay is not None:
        raise ModwatchError(
            "modwatch: --save-trace and --replay cannot be used together: a replay reads a "
            "saved trace, it does not make one",
            ExitStatus.USAGE,
        )
    trace_file = None
    if save_trace is not None:
        try:
            trace_file = open(save_trace, "w", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        except OSError as err:
            raise ModwatchError(
                f"modwatch: cannot write {save_trace}: {err.strerror}", ExitStatus.OUTPUT_ERROR
            ) from err
    writer, stream = _open_output(output, fmt, _table_columns(columns, print_uid))
    options = capture.Options(
        duration=duration,
        count=count,
        pid=pid,
        failed_only=failed,
        raw=raw,
        save_trace=trace_file,
        command=command or None,
        no_kprobes=no_kprobes,
        hashing=hashing,
        buffer_kb=buffer_kb,
    )
    cap = capture.Capture(options)
    cap.on_armed = _banner
    records = cap.replay(str(replay)) if replay is not None else cap.run()
    try:
        for record in records:
            if record["type"] == "lost":
                lost = "an unknown number of" if record["count"] is None else record["count"]
                _err(
                    f"modwatch: warning: lost {lost} events on CPU {record['cpu']} "
                    "(the kernel's buffer overran)"
                )
            writer.write(record)
    except BrokenPipeError:
        records.close()  # tears down before we go
        # Nothing more can reach stdout; keep the interpreter from failing on its flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as err:
        records.close()
        raise ModwatchError(
            f"modwatch: writing records failed ({err.strerror}); probes and instance removed",
            ExitStatus.OUTPUT_ERROR,
        ) from err
    finally:
        records.close()
        if trace_file is not None:
            trace_file.close()
        if stream is not None:
            stream.close()
        _summary(cap)
    if cap.stats.command_status is not None:
        status = cap.stats.command_status
        raise typer.Exit(status if status >= 0 else 128 - status)


def _banner(cap: capture.Capture) -> None:
    _err(
        f"modwatch: tracing finit_module, init_module and delete_module in tracefs instance "
        f"{cap.instance}; "
        + ("stops when COMMAND exits" if cap.options.command else "Ctrl-C to stop")
    )
    if cap.leftovers:
        _err(f"modwatch: removed leftovers of dead sessions: {', '.join(cap.leftovers)}")


def _summary(cap: capture.Capture) -> None:
    stats = cap.stats
    if stats.unparsed:
        samples = "; ".join(repr(s) for s in stats.unparsed_samples)
        _err(f"modwatch: {stats.unparsed} lines of trace text could not be parsed: {samples}")
    if stats.lost:
        size = (
            "" if stats.buffer_kb is None else f"; {stats.buffer_kb} KiB per CPU, see --buffer-kb"
        )
        _err(f"modwatch: {stats.lost} events lost in all (kernel buffer overruns{size})")
    if stats.buffer_problem:
        _err(f"modwatch: warning: kernel's default ring buffer kept: {stats.buffer_problem}")
    if stats.missed:
        each = ", ".join(f"{event} {count}" for event, count in stats.missed.items())
        _err(
            f"modwatch: the kernel missed {sum(stats.missed.values())} probe hits "
            f"(kprobe_profile: {each}); a call whose return was missed has "
            '"incomplete": "return_missed"'
        )
    if stats.unmatched:
        _err(f"modwatch: {stats.unmatched} kernel events belonged to no module call (ignored)")
    for problem in stats.teardown_errors:
        _err(f"modwatch: warning: teardown step failed: {problem}")


@app.command("events")
def events_command() -> None:
    """List the raw kernel events, their arguments, types and tags.

    Tags: K read from kernel memory; U from user space or chosen by the caller;
    TOCTOU may change between check and use; OPT may be absent.
    """
    from modwatch import events  # each subcommand loads what only it needs

    for event in events.CATALOGUE:
        print(f"{event.name}  ({event.probe})")
        print(f"    {event.meaning}")
        for arg in event.args:
            tags = ",".join(arg.tags)
            print(f"    {arg.name:<14} {arg.type:<24} {tags:<9} {arg.meaning}")
        print()


class AuditFormat(enum.StrEnum):
    json = "json"
    text = "text"


@app.command("audit")
def audit_command(
    state: Annotated[
        Path,
        typer.Option("--state", help="The state file the next run compares with.", metavar="FILE"),
    ] = Path(AUDIT_STATE),
    allow: Annotated[
        Path | None,
        typer.Option(
            "--allow",
            help="An allowlist: a module name glob per line, optionally followed by "
            "sha256:HEX to pin the file's hash; # starts a comment.",
            metavar="FILE",
        ),
    ] = None,
    capture_seconds: Annotated[
        float | None,
        typer.Option(
            "--capture",
            min=0,
            help="First capture module operations for SECONDS and include the records.",
            metavar="SECONDS",
        ),
    ] = None,
    fmt: Annotated[
        AuditFormat, typer.Option("--format", help="One JSON document, or a short summary.")
    ] = AuditFormat.json,
    to_syslog: Annotated[
        bool, typer.Option("--syslog", help="Also send one line per finding to syslog (/dev/log).")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="Print nothing: the exit status tells.")
    ] = False,
    hashing: Annotated[
        bool, typer.Option("--hash/--no-hash", help="Read each module file (sha256, signature).")
    ] = True,
) -> None:
    """Audit the loaded modules: what changed since the last run, even while nothing
    was watching.

    Snapshots /proc/modules, /sys/module and each module's file on disk (from
    modules.dep: sha256, signature, srcversion against the loaded one). Findings:
    hidden_module (in /sys/module or /proc/kallsyms, not in /proc/modules),
    file_missing, file_differs, unsigned_module (while others are signed); against the
    previous state: module_added, module_removed, module_reloaded, module_taint_changed,
    kernel_taint_changed, boot_changed; against --allow: not_allowed, hash_not_allowed.
    The first run records a baseline. The state is written whole (temporary file,
    fsync, rename) under a lock.

    Exit status: 0 no findings; 1 findings; 2 bad command line or --allow file;
    8 state file not writable; 13 state file unreadable, corrupt or newer (left
    untouched); 14 another audit held the lock for 10 s.
    """
    from modwatch import audit

    records: list[Record] = []
    if capture_seconds is not None:
        cap = capture.Capture(capture.Options(duration=capture_seconds, hashing=hashing))
        records = list(cap.run())
    options = audit.AuditOptions(
        state=str(state), allow=None if allow is None else str(allow), hashing=hashing
    )
    document = audit.run(options)
    if capture_seconds is not None:
        document["records"] = records
    findings = document["findings"]
    if to_syslog:
        problem = audit.send_syslog(findings)
        if problem is not None:
            _err(f"modwatch: warning: findings not sent to syslog: {problem}")
    if not quiet and fmt is AuditFormat.json:
        sys.stdout.buffer.write(dumps(document))
    elif not quiet:
        summary, kernel = document["summary"], document["kernel"]
        taints = " ".join(kernel["taints"]) or "none"
        print(
            f"modwatch audit: {len(findings)} findings; {summary['modules']} modules "
            f"({summary['unsigned']} unsigned, {summary['out_of_tree']} out of tree); "
            f"kernel taint: {taints}"
        )
        if document["state"]["baseline"]:
            print(f"  baseline recorded in {state}: the next run compares with it")
        for finding in findings:
            print("  " + printable(audit.finding_text(finding)))
    sys.stdout.flush()
    raise typer.Exit(1 if findings else 0)


@app.command("doctor")
def doctor_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document instead of lines of text.")
    ] = False,
) -> None:
    """Check whether capture can run here, and where each record field will come from.

    One line per check (privileges, tracefs, kprobe events, lockdown, BTF, tracefs
    features, each probed symbol), then the fields and a verdict. Writes nothing to
    tracefs (mounts it where capture would, if it is not mounted).

    Exit status: 0 capture fully works; 11 it works, degraded (warn lines);
    12 it cannot run (fail lines).
    """
    from modwatch import doctor

    report = doctor.examine()
    status = {
        doctor.WORKS: ExitStatus.OK,
        doctor.DEGRADED: ExitStatus.DEGRADED,
        doctor.IMPOSSIBLE: ExitStatus.IMPOSSIBLE,
    }[report.verdict]
    if as_json:
        document = {
            "v": 1,
            "verdict": report.verdict,
            "checks": [
                {"check": c.name, "status": c.status, "detail": c.detail} for c in report.checks
            ],
            "fields": report.fields,
        }
        sys.stdout.buffer.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        for check in report.checks:
            print(f"{check.status:<5} {check.name}: {printable(check.detail)}")
        for name, source in report.fields.items():
            print(f"field {name}: {source}")
        print(f"verdict: {report.verdict}")
    sys.stdout.flush()
    raise typer.Exit(int(status))


@app.command("version")
def version_command() -> None:
    """Print modwatch's version."""
    print(__version__)


def main() -> None:
    try:
        app()
    except ModwatchError as err:
        if os.environ.get("MODWATCH_DEBUG"):
            raise
        _err(err.message)
        sys.exit(err.status)
