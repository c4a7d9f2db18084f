#!/usr/bin/env python3
"""modwatch's benchmark: readers of the same probe set side by side, in one run.

    scripts/bench.py [--kernel 6.12] [--calls N] [--json FILE]
        on the host: builds the storm generator, measures --replay throughput here, then
        boots the guest kernel (scripts/testbed.py) for the rest; prints one table
    scripts/bench.py guest [--calls N]
        in the guest, as root: the kernel measurements, as one JSON document on stdout

In the guest, for each rate of failing finit_module calls (storm.c) and each reader
of the same probe set in an instance with the same buffer size: `modwatch capture` to a
file, `cat trace_pipe` to a file (the text interface's own limit), and `cat | awk`
splitting the fields (how shell ftrace tools read it). For each: events written by the
kernel and consumed by the reader (the instance's own counters), lost (overrun and
dropped), what modwatch reported lost, CPU seconds and peak RSS of the reader. In the
full-speed run, a real load of the test module between the two halves of the flood: was
its record there, with all its fields? And the same with a stopped reader whose small
buffer the floods overrun. The exit status is 1 if loss accounting was not exact or a
flood hid a real load. Also: `modwatch capture` start to armed against
`python3 -c pass`; time from a load's syscall return to its record on stdout at a low
rate (median, p99); CPU of an idle capture.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent
PYTHON = CHECKOUT / ".venv" / "bin" / "python"
BUILD = CHECKOUT / ".cache" / "bench"
STORM = BUILD / "storm"
TRACEFS = Path("/sys/kernel/tracing")
RATES = (2000, 20000, 0)  # calls per second; 0: as fast as the generator goes
READERS = ("modwatch", "cat", "awk")
# Splits every line into its fields and key=value pairs, and writes a line per event.
AWK = (
    'awk \'{ n = 0; for (i = 1; i <= NF; i++) if (index($i, "=")) '
    '{ split($i, kv, "="); n++ } print $1, n }\''
)


def build_storm() -> None:
    BUILD.mkdir(parents=True, exist_ok=True)
    source = CHECKOUT / "scripts" / "bench" / "storm.c"
    if not STORM.exists() or STORM.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(STORM), str(source)], check=True)


# -- in the guest ------------------------------------------------------------------------


def instance_counters(instance: str) -> dict[str, int]:
    """The ring buffer counters of a session's instances (its main one and its rare
    one), summed over CPUs."""
    totals = {"read events": 0, "entries": 0, "overrun": 0, "dropped events": 0}
    instances = TRACEFS / "instances"
    for stats in [
        *(instances / instance / "per_cpu").glob("cpu*/stats"),
        *(instances / f"{instance}_rare" / "per_cpu").glob("cpu*/stats"),
    ]:
        for line in stats.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in totals:
                totals[key] += int(value.split()[0])
    return totals


def process_usage(pids: list[int]) -> tuple[float, int]:
    """CPU seconds and the largest peak RSS (KiB) of some processes, still running."""
    cpu, peak = 0.0, 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        status = Path(f"/proc/{pid}/status").read_text()
        if "VmHWM:" in status:  # a zombie has none
            peak = max(peak, int(status.split("VmHWM:", 1)[1].split()[0]))
    return cpu, peak


def wait_quiet(path: Path, seconds: float = 2.0, limit: float = 180.0) -> None:
    """Until the reader's output stops growing."""
    deadline = time.monotonic() + limit
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
        time.sleep(0.2)


def wait_records(path: Path, count: int, quiet: float = 30.0, limit: float = 900.0) -> None:
    """Until `path` holds `count` lines, or stops growing for `quiet` seconds. Reads only
    what is new each time: the reader being measured shares the CPU."""
    deadline = time.monotonic() + limit
    lines, since = 0, time.monotonic()
    with open(path, "rb") as f:
        while time.monotonic() < deadline and lines < count:
            data = f.read()
            if data:
                lines += data.count(b"\n")
                since = time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.5)


def start_modwatch(out: Path, *options: str) -> tuple[subprocess.Popen[bytes], str, float]:
    """A capture in a new interpreter; its instance, and seconds from start to armed."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(PYTHON), "-m", "modwatch", "capture", "-o", str(out), *options],
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    banner = proc.stderr.readline().decode()
    armed = time.monotonic() - started
    return proc, banner.split("tracefs instance ", 1)[1].split(";", 1)[0], armed


def storm_run(calls: int, rate: int, pin: list[str] | None = None) -> dict[str, Any]:
    command = [*(pin or []), str(STORM), str(calls), str(rate)]
    storm = subprocess.run(command, capture_output=True, text=True)
    return dict(json.loads(storm.stdout))


def run_reader(reader: str, rate: int, calls: int, work: Path) -> dict[str, Any]:
    from modwatch.capture import Capture, Options

    out = work / f"{reader}-{rate}.out"
    result: dict[str, Any] = {"reader": reader, "rate": rate or "full"}
    with contextlib.ExitStack() as undo:
        if reader == "modwatch":
            proc, instance, result["armed_s"] = start_modwatch(out)
            pids = [proc.pid]
        else:
            # The same probe set, armed by modwatch's own setup, read by another reader.
            cap = Capture(Options())
            cap._arm(undo)
            # Only one reader may hold trace_pipe: hand the main instance's over (the fd
            # stays valid for the capture's own close at teardown). The rare instance,
            # with the real load's kernel-side events, is left unread.
            os.dup2(os.open(os.devnull, os.O_RDONLY), cap._fds[0])
            assert cap.instance is not None
            instance = cap.instance
            pipe = TRACEFS / "instances" / instance / "trace_pipe"
            shell = f"cat {pipe} > {out}" if reader == "cat" else f"cat {pipe} | {AWK} > {out}"
            proc = subprocess.Popen(["sh", "-c", shell], start_new_session=True)
            time.sleep(1)
            pids = [
                int(p)
                for p in subprocess.run(
                    ["pgrep", "-s", str(proc.pid)], capture_output=True, text=True
                ).stdout.split()
            ]
        if rate == 0:
            # A real load and unload in the middle of the flood's events.
            first = storm_run(calls // 2, rate)
            subprocess.run(REAL_LOAD, stderr=subprocess.DEVNULL, check=False)
            second = storm_run(calls - calls // 2, rate)
            result["storm"] = {k: round(first[k] + second[k], 3) for k in ("calls", "seconds")}
        else:
            result["storm"] = storm_run(calls, rate)
        if reader == "modwatch":
            # A record per call (and the real load's two): wait for them all, or for the
            # output to stand still long enough that nothing more is coming.
            expected = result["storm"]["calls"] + (2 if rate == 0 else 0)
            wait_records(out, expected)
        else:
            wait_quiet(out)
        counters = instance_counters(instance)
        result["cpu_s"], result["peak_rss_kib"] = process_usage(pids)
        if reader == "modwatch":
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
            records = [json.loads(line) for line in out.read_text().splitlines()]
            result["modwatch_lost"] = sum(r["count"] or 0 for r in records if r["type"] == "lost")
            result["records"] = sum(r["type"] == "load" for r in records)
            if rate == 0:
                result["real_load"] = real_load_seen(records)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    lost = counters["overrun"] + counters["dropped events"]
    result["written"] = counters["read events"] + counters["entries"] + lost
    result["consumed"] = counters["read events"]
    result["lost"] = lost
    return result


OVERRUN_BUFFER_KB = 64


def overrun(calls: int, work: Path) -> dict[str, Any]:
    """A real load and unload between two full-speed floods, while `modwatch capture`
    with a small main buffer is stopped: the floods overrun that buffer and take the
    load's syscall events with them. Is the load still reported whole, and every lost
    event counted?"""
    out = work / "overrun.out"
    proc, instance, _ = start_modwatch(out, "--buffer-kb", str(OVERRUN_BUFFER_KB))
    os.kill(proc.pid, signal.SIGSTOP)
    # All on one CPU: the second flood overwrites that CPU's buffer, the load's syscall
    # events with it (the worst case, every time).
    pin = ["taskset", "-c", "0"]
    try:
        storm_run(calls // 2, 0, pin)
        subprocess.run([*pin, *REAL_LOAD], stderr=subprocess.DEVNULL, check=False)
        storm_run(calls - calls // 2, 0, pin)
        counters = instance_counters(instance)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # A load whose entry was lost comes out once its thread is seen out of the call
    # twice, seconds apart: wait for the output to stand still that long.
    wait_quiet(out, seconds=15)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {
        "buffer_kb": OVERRUN_BUFFER_KB,
        "calls": calls,
        "lost": counters["overrun"] + counters["dropped events"],
        "modwatch_lost": sum(r["count"] or 0 for r in records if r["type"] == "lost"),
        "real_load": real_load_seen(records),
        "entry_lost": any(
            r.get("module") == "mwtest" and r.get("incomplete") == "entry_missed" for r in records
        ),
    }


def failures(result: dict[str, Any]) -> list[str]:
    """What fails the benchmark: loss accounting that is not exact, a real load that a
    flood hid (missing, or missing fields)."""
    runs = [r for r in result["runs"] if r["reader"] == "modwatch"] + [result["overrun"]]
    found = []
    for r in runs:
        where = f"{r.get('rate', 'overrun')}"
        if r["modwatch_lost"] != r["lost"]:
            found.append(
                f"{where}: modwatch reported {r['modwatch_lost']} lost, kernel {r['lost']}"
            )
        if "real_load" in r and r["real_load"] != "complete":
            found.append(f"{where}: the real load in the flood was {r['real_load']}")
    return found


def progress(text: str) -> None:
    """A line on stderr (the test bed keeps it in the run's results as it is written)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


MODULE_DIR = Path(os.environ.get("MODWATCH_TEST_MODULE_DIR", "/run/modwatch-testbed/modules"))
MWLOAD = str(MODULE_DIR / "mwload")
REAL_LOAD = [MWLOAD, "finit", str(MODULE_DIR / "mwtest.ko"), "note=real", "delete", "mwtest"]
# A load record's fields that a load in a flood must still have.
LOAD_FIELDS = ("pid", "comm", "module", "params", "path", "ret", "init_ret", "taints", "sha256")


def real_load_seen(records: list[dict[str, Any]]) -> str:
    """How the real load made in a flood was reported: "complete", "partial (missing:
    ...)", or "missing"."""
    loads = [r for r in records if r["type"] == "load" and r.get("module") == "mwtest"]
    unloads = [r for r in records if r["type"] == "unload" and r.get("module") == "mwtest"]
    if not loads:
        return "missing"
    missing = [key for key in LOAD_FIELDS if loads[0].get(key) is None]
    if loads[0].get("params") != "note=real":
        missing.append("params")
    if not unloads:
        missing.append("its unload")
    return "complete" if not missing else f"partial (missing: {', '.join(missing)})"


def latency(loads: int = 20, pause: float = 0.5) -> dict[str, Any]:
    """Seconds from a load's (and unload's) syscall return, as mwload stamps it, to its
    record read from `modwatch capture`'s stdout, at a low rate."""
    proc = subprocess.Popen(
        [str(PYTHON), "-m", "modwatch", "capture", "--format", "jsonl"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stderr.readline()  # the banner: armed
    seen: dict[tuple[int, str], int] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            at = time.monotonic_ns()
            record = json.loads(line)
            if record["type"] in ("load", "unload"):
                # By tid, always the kernel's (pid is null for a caller gone before
                # /proc was read and before the kernel noted its tgid); mwload has one
                # thread, so its tid is its pid.
                seen[(record["tid"], record["type"])] = at

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    returned: dict[tuple[int, str], int] = {}
    for _ in range(loads):
        run = subprocess.run(REAL_LOAD, capture_output=True, text=True, check=True)
        for line in run.stderr.splitlines():
            call = json.loads(line)
            returned[(call["pid"], "load" if call["op"] == "finit" else "unload")] = call["mono_ns"]
        time.sleep(pause)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    delays = sorted((seen[key] - at) / 1e9 for key, at in returned.items() if key in seen)
    if not delays:
        return {"samples": 0, "expected": len(returned)}
    return {
        "samples": len(delays),
        "expected": len(returned),
        "median_s": round(statistics.median(delays), 4),
        "p99_s": round(delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))], 4),
    }


def guest(calls: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="modwatch-bench-"))
    runs = []
    for rate in RATES:
        for reader in READERS:
            started = time.monotonic()
            runs.append(run_reader(reader, rate, calls, work))
            runs[-1]["seconds"] = round(time.monotonic() - started, 1)
            progress(f"{reader} at {rate or 'full'}/s: {runs[-1]}")
    result_overrun = overrun(calls, work)
    progress(f"overrun: {result_overrun}")
    bare = []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run(["python3", "-c", "pass"], check=True)
        bare.append(time.monotonic() - started)
    result_latency = latency()
    progress(f"latency: {result_latency}")
    # An idle capture for 30 s: its CPU time.
    proc, _, armed = start_modwatch(work / "idle.out")
    before, _ = process_usage([proc.pid])
    time.sleep(30)
    after, idle_rss = process_usage([proc.pid])
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    return {
        "kernel": os.uname().release,
        "calls": calls,
        "runs": runs,
        "overrun": result_overrun,
        "python_c_pass_s": statistics.median(bare),
        "armed_s": [r["armed_s"] for r in runs if "armed_s" in r] + [armed],
        "idle_cpu_s_30s": round(after - before, 3),
        "idle_peak_rss_kib": idle_rss,
        "latency": result_latency,
    }


# -- on the host ---------------------------------------------------------------------------


def replay_throughput(copies: int = 2000) -> dict[str, Any]:
    """--replay of a large trace (the unit tests' fixture, repeated) against a loop that
    only splits its lines."""
    sys.path.insert(0, str(CHECKOUT))
    from modwatch.capture import Capture, Options

    fixture = (CHECKOUT / "tests" / "unit" / "fixtures" / "load-unload-6.1.trace").read_text()
    header = "".join(line for line in fixture.splitlines(keepends=True) if line.startswith("# "))
    body = "".join(line for line in fixture.splitlines(keepends=True) if not line.startswith("#"))
    with tempfile.NamedTemporaryFile("w", suffix=".trace", delete=False) as f:
        f.write(header + body * copies)
        path = f.name
    try:
        lines = (body * copies).count("\n")
        started = time.process_time()
        for line in Path(path).read_text().splitlines():
            line.split()
        split_s = time.process_time() - started
        started = time.process_time()
        records = sum(1 for _ in Capture(Options()).replay(path))
        replay_s = time.process_time() - started
    finally:
        os.unlink(path)
    return {
        "lines": lines,
        "records": records,
        "split_lines_per_s": round(lines / split_s),
        "replay_lines_per_s": round(lines / replay_s),
        "ratio": round(split_s / replay_s, 3),
    }


def table(host: dict[str, Any], guest_result: dict[str, Any]) -> str:
    rows = [
        f"kernel {guest_result['kernel']}, {guest_result['calls']} failing finit_module "
        "calls per run (3 events each)",
        f"{'rate/s':>7} {'reader':<9} {'written':>8} {'consumed':>8} {'lost':>7} "
        f"{'vs cat':>6} {'mw lost':>7} {'cpu s':>6} {'peak RSS':>9}",
    ]
    by = {(r["rate"], r["reader"]): r for r in guest_result["runs"]}
    for rate in RATES:
        key = rate or "full"
        cat = by[(key, "cat")]["consumed"] or 1
        for reader in READERS:
            r = by[(key, reader)]
            mw_lost = r.get("modwatch_lost", "")
            rows.append(
                f"{key!s:>7} {reader:<9} {r['written']:>8} {r['consumed']:>8} {r['lost']:>7} "
                f"{r['consumed'] / cat:>6.2f} {mw_lost!s:>7} {r['cpu_s']:>6.2f} "
                f"{r['peak_rss_kib'] / 1024:>7.1f}MB"
            )
    real = next(
        r for r in guest_result["runs"] if r["reader"] == "modwatch" and r["rate"] == "full"
    )
    rows.append(f"a real load in the full-speed flood: {real.get('real_load')}")
    over = guest_result["overrun"]
    rows.append(
        f"a real load in floods overrunning a stopped reader's {over['buffer_kb']} KiB buffer "
        f"(its syscall events {'lost' if over.get('entry_lost') else 'kept'}): "
        f"{over['real_load']}; lost {over['lost']}, modwatch reported {over['modwatch_lost']}"
    )
    lat = guest_result["latency"]
    if lat["samples"]:
        rows.append(
            f"syscall return to record, {lat['samples']} of {lat['expected']} at 2/s: "
            f"median {lat['median_s'] * 1000:.0f} ms, p99 {lat['p99_s'] * 1000:.0f} ms"
        )
    else:
        rows.append(f"syscall return to record: none of {lat['expected']} records seen")
    armed = statistics.median(guest_result["armed_s"])
    bare = guest_result["python_c_pass_s"]
    rows += [
        f"start to armed: {armed:.1f} s median, python3 -c pass {bare:.1f} s: {armed / bare:.1f}x",
        f"idle capture: {guest_result['idle_cpu_s_30s']:.2f} CPU s in 30 s, "
        f"peak RSS {guest_result['idle_peak_rss_kib'] / 1024:.1f} MB",
        f"host --replay: {host['replay_lines_per_s']} lines/s, splitting only "
        f"{host['split_lines_per_s']} lines/s: {host['ratio']:.2f}x",
    ]
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["guest"], help="(run inside the guest)")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--kernel", default="6.12", choices=["6.1", "6.12"])
    parser.add_argument("--json", type=Path, default=BUILD / "bench.json")
    args = parser.parse_args(argv)
    if args.mode == "guest":
        sys.path.insert(0, str(CHECKOUT))
        print(json.dumps(guest(args.calls)))
        return 0
    build_storm()
    host = replay_throughput()
    run = subprocess.run(
        [
            str(PYTHON),
            str(CHECKOUT / "scripts" / "testbed.py"),
            "exec",
            "--kernel",
            args.kernel,
            "--",
            str(PYTHON),
            str(CHECKOUT / "scripts" / "bench.py"),
            "guest",
            "--calls",
            str(args.calls),
        ],
        capture_output=True,
        text=True,
        # The guest's part takes 20 minutes or more under emulation: more than the test
        # bed's default bound on a guest.
        env={"MODWATCH_TESTBED_TIMEOUT": "3600", **os.environ},
    )
    documents = [line for line in run.stdout.splitlines() if line.startswith('{"kernel"')]
    if run.returncode != 0 or not documents:
        sys.stderr.write(run.stdout + run.stderr)
        return 1
    result = {"host": host, "guest": json.loads(documents[-1])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(table(host, result["guest"]))
    print(f"(JSON: {args.json})")
    found = failures(result["guest"])
    for failure in found:
        print(f"bench: FAILED: {failure}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
