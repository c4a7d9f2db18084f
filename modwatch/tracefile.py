"""Saved traces: the raw trace_pipe text of a session with a header naming the probe
definitions it came from, and the /proc facts read while the session ran.

    # modwatch trace v1
    # clock-offset-us: 1764355124000000
    # probe: p:modwatch_123_ab12/mwab12_finit_module __x64_sys_finit_module fd=...
    # tracepoint: module/module_load
    # print-fmt: module/module_load "%s %s", __get_str(name), __print_flags(...)
    <trace_pipe text of the main instance, as read>
    #mw-rare-modwatch_123_ab12 "<trace_pipe text of the rare instance, one read>"
    #mw-caller-modwatch_123_ab12 {"tid": 812, "ts_us": 2439966, "pid": 812, ...}
    #mw-file-modwatch_123_ab12 {"tid": 812, "ts_us": 2439966, "sha256": "9f86...", ...}

`#mw-caller-GROUP` lines follow the text that holds the event they describe; a
`#mw-file-GROUP` line (the module file's facts) comes once they were read. The rare
instance's text (see probes.RARE_KINDS) is kept apart, as JSON strings, and merged
with the main text by timestamp when the trace is read back. The
group's random part keeps a caller from forging one through its task name, which
the trace text holds raw; the JSON is ASCII, with raw bytes of a path kept as
surrogate escapes (backslash-udcXX), so that it reads back as it was.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from concurrent.futures import Future
from typing import IO

from modwatch.correlate import NO_CALLER, Caller, FileRequest
from modwatch.errors import ExitStatus, ModwatchError
from modwatch.modfile import FileFacts, done
from modwatch.parser import body_pattern
from modwatch.probes import ProbeSet, ProbeSpec, Tracepoint

MAGIC = "# modwatch trace v1"
CALLER = "#mw-caller-"
FILE = "#mw-file-"
RARE = "#mw-rare-"


def caller_marker(group: str) -> str:
    return f"{CALLER}{group} "


def file_marker(group: str) -> str:
    return f"{FILE}{group} "


def rare_marker(group: str) -> str:
    return f"{RARE}{group} "


class TraceWriter:
    def __init__(self, stream: IO[str], probe_set: ProbeSet, clock_offset_us: int) -> None:
        self.stream = stream
        self.marker = caller_marker(probe_set.group)
        self.file_marker = file_marker(probe_set.group)
        self.rare_marker = rare_marker(probe_set.group)
        lines = [MAGIC, f"# group: {probe_set.group}", f"# clock-offset-us: {clock_offset_us}"]
        lines += [f"# probe: {p.definition()}" for p in probe_set.probes]
        lines += [f"# tracepoint: {t.system}/{t.event}" for t in probe_set.tracepoints]
        lines += [
            f"# print-fmt: {t.system}/{t.event} {t.print_fmt}"
            for t in probe_set.tracepoints
            if t.print_fmt is not None
        ]
        stream.write("\n".join(lines) + "\n")

    def text(self, data: str, rare: bool = False) -> None:
        """Text as read from the main instance's trace_pipe, or from the rare instance's
        (one line a read, so that a replay reads it as it was read)."""
        self.stream.write(self.rare_marker + json.dumps(data) + "\n" if rare else data)

    def caller(self, tid: int, ts_us: int, facts: Caller) -> None:
        # Facts that are None are left out: the reader fills them in as None.
        known = {k: v for k, v in facts._asdict().items() if v is not None}
        entry = {"tid": tid, "ts_us": ts_us, **known}
        self.stream.write(self.marker + json.dumps(entry) + "\n")

    def module_file(self, tid: int, ts_us: int, facts: FileFacts) -> None:
        entry = {"tid": tid, "ts_us": ts_us, **facts._asdict()}
        self.stream.write(self.file_marker + json.dumps(entry) + "\n")

    def flush(self) -> None:
        self.stream.flush()


class SavedTrace:
    """A saved trace read back: its probe set, clock offset, callers and text."""

    def __init__(self, path: str) -> None:
        self.path = path
        probes: list[ProbeSpec] = []
        tracepoints: list[Tracepoint] = []
        print_fmts: dict[str, str] = {}
        self.clock_offset_us = 0
        self.callers: dict[tuple[int, int], Caller] = {}
        self.files: dict[tuple[int, int], FileFacts] = {}
        self.rare_chunks: list[str] = []  # the rare instance's text, read by read
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                if f.readline().rstrip("\n") != MAGIC:
                    raise ModwatchError(
                        f"modwatch: {path} is not a modwatch trace (no '{MAGIC}' line): "
                        "record one with --save-trace",
                        ExitStatus.BAD_TRACE_FILE,
                    )
                header = True
                marker = files = rare = None
                group = ""
                for line in f:
                    header = header and line.startswith("# ")
                    if not header:
                        if marker is None or files is None or rare is None:
                            group = group or (probes[0].group if probes else "")
                            marker, files = caller_marker(group), file_marker(group)
                            rare = rare_marker(group)
                        if line.startswith(marker):
                            entry = json.loads(line[len(marker) :])
                            facts = {k: v for k, v in entry.items() if k in Caller._fields}
                            self.callers[(entry["tid"], entry["ts_us"])] = NO_CALLER._replace(
                                **facts
                            )
                        elif line.startswith(files):
                            entry = json.loads(line[len(files) :])
                            known = {k: v for k, v in entry.items() if k in FileFacts._fields}
                            self.files[(entry["tid"], entry["ts_us"])] = FileFacts(**known)
                        elif line.startswith(rare):
                            text = json.loads(line[len(rare) :])
                            if not isinstance(text, str):
                                raise ValueError(f"not a string of trace text: {line!r}")
                            self.rare_chunks.append(text)
                    elif line.startswith("# probe: "):
                        spec = ProbeSpec.parse(line[len("# probe: ") :].rstrip("\n"))
                        body_pattern(spec)  # its text can be parsed, or ValueError
                        probes.append(spec)
                    elif line.startswith("# tracepoint: "):
                        system, _, event = line[len("# tracepoint: ") :].strip().partition("/")
                        tracepoints.append(Tracepoint(system, event))
                    elif line.startswith("# print-fmt: "):
                        name, _, fmt = line[len("# print-fmt: ") :].rstrip("\n").partition(" ")
                        print_fmts[name] = fmt
                    elif line.startswith("# group: "):
                        group = line[len("# group: ") :].strip()
                    elif line.startswith("# clock-offset-us: "):
                        self.clock_offset_us = int(line.split(":", 1)[1])
        except OSError as err:
            raise ModwatchError(
                f"modwatch: cannot read {path}: {err.strerror}", ExitStatus.BAD_TRACE_FILE
            ) from err
        except (ValueError, KeyError, TypeError) as err:
            raise ModwatchError(
                f"modwatch: {path} is a damaged modwatch trace: {err}", ExitStatus.BAD_TRACE_FILE
            ) from err
        group = group or (probes[0].group if probes else "")
        self.marker = caller_marker(group)
        self.file_marker = file_marker(group)
        self.rare_marker = rare_marker(group)
        tracepoints = [
            dataclasses.replace(t, print_fmt=print_fmts.get(f"{t.system}/{t.event}"))
            for t in tracepoints
        ]
        self.probe_set = ProbeSet(group, tuple(probes), tuple(tracepoints), ())

    def chunks(self, size: int = 1 << 16) -> Iterator[str]:
        """The main instance's trace text, without the header and the marked lines."""
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            in_header = True
            batch: list[str] = []
            for line in f:
                if in_header and line.startswith("# "):
                    continue
                in_header = False
                if line.startswith((self.marker, self.file_marker, self.rare_marker)):
                    continue
                batch.append(line)
                if len(batch) >= size // 64:
                    yield "".join(batch)
                    batch = []
            if batch:
                yield "".join(batch)

    def caller(self, tid: int, ts_us: int, fd: int | None) -> Caller:
        return self.callers.get((tid, ts_us), Caller(None, None, None))

    def module_file(self, request: FileRequest) -> Future[FileFacts] | None:
        facts = self.files.get((request.tid, request.ts_us))
        return None if facts is None else done(facts)
