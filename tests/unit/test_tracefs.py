"""tracefs: finding the mount, error_log, lockdown, and Tracefs on a fake tree."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from modwatch import tracefs
from modwatch.errors import ExitStatus, ModwatchError
from modwatch.tracefs import KernelError, ProbeRejected, Tracefs

# -- find_mount -------------------------------------------------------------------------


def mounts(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "mounts"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_tracefs_at_the_default_mountpoint_is_preferred(tmp_path: Path) -> None:
    text = (
        "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
        "tracefs /mnt/other tracefs rw,relatime 0 0\n"
        "debugfs /sys/kernel/debug debugfs rw,relatime 0 0\n"
        "tracefs /sys/kernel/debug/tracing tracefs rw,relatime 0 0\n"
        "tracefs /sys/kernel/tracing tracefs rw,nosuid,nodev,noexec,relatime 0 0\n"
    )
    assert tracefs.find_mount(mounts(tmp_path, text)) == "/sys/kernel/tracing"


def test_first_tracefs_mount_elsewhere(tmp_path: Path) -> None:
    text = (
        "proc /proc proc rw 0 0\ntracefs /mnt/t1 tracefs rw 0 0\ntracefs /mnt/t2 tracefs rw 0 0\n"
    )
    assert tracefs.find_mount(mounts(tmp_path, text)) == "/mnt/t1"


def test_escaped_space_in_the_mount_point(tmp_path: Path) -> None:
    text = "tracefs /mnt/my\\040trace tracefs rw 0 0\n"
    assert tracefs.find_mount(mounts(tmp_path, text)) == "/mnt/my trace"


def test_debugfs_fallback_needs_its_tracing_directory(tmp_path: Path) -> None:
    debug = tmp_path / "debug"
    (debug / "tracing").mkdir(parents=True)
    text = (
        "proc /proc proc rw 0 0\n"
        f"debugfs {tmp_path}/nothing debugfs rw 0 0\n"
        f"debugfs {debug} debugfs rw 0 0\n"
    )
    assert tracefs.find_mount(mounts(tmp_path, text)) == str(debug / "tracing")


def test_tracefs_beats_debugfs(tmp_path: Path) -> None:
    debug = tmp_path / "debug"
    (debug / "tracing").mkdir(parents=True)
    text = f"debugfs {debug} debugfs rw 0 0\ntracefs /mnt/t tracefs rw 0 0\n"
    assert tracefs.find_mount(mounts(tmp_path, text)) == "/mnt/t"


def test_no_tracing_mount(tmp_path: Path) -> None:
    text = f"proc /proc proc rw 0 0\ndebugfs {tmp_path}/none debugfs rw 0 0\nshort line\n\n"
    assert tracefs.find_mount(mounts(tmp_path, text)) is None


def test_unreadable_mounts_file(tmp_path: Path) -> None:
    assert tracefs.find_mount(str(tmp_path / "missing")) is None


def test_non_ascii_mount_point(tmp_path: Path) -> None:
    # /proc/mounts escapes only space, tab, newline and backslash: other bytes come raw.
    text = "tracefs /mnt/tracé tracefs rw 0 0\n"
    assert tracefs.find_mount(mounts(tmp_path, text)) == "/mnt/tracé"


def test_mount_point_that_is_not_utf8_elsewhere_in_the_table(tmp_path: Path) -> None:
    # Any user can have such a mount (fusermount on a directory of their own).
    text = b"fuse /home/u/\xff fuse rw 0 0\ntracefs /sys/kernel/tracing tracefs rw 0 0\n"
    assert tracefs.find_mount(mounts(tmp_path, text)) == "/sys/kernel/tracing"


# -- error_log --------------------------------------------------------------------------

ERROR_LOG = (
    "[  10.000001] trace_kprobe: error: Probe point is not found\n"
    "  Command: p:g/old nosuch_symbol\n"
    "                   ^\n"
    "[  12.345678] trace_kprobe: error: Invalid fetch argument\n"
    "  Command: p:g/e sym a=b\n"
    "                     ^\n"
)


def test_parse_error_log_takes_the_last_entry() -> None:
    assert tracefs.parse_error_log(ERROR_LOG) == KernelError(
        "Invalid fetch argument", "p:g/e sym a=b", "a=b"
    )


def test_parse_error_log_caret_at_the_start() -> None:
    assert tracefs.parse_error_log(ERROR_LOG.split("[  12")[0]) == KernelError(
        "Probe point is not found", "p:g/old nosuch_symbol", "nosuch_symbol"
    )


def test_parse_error_log_caret_inside_a_word() -> None:
    text = (
        "[  12.345678] trace_kprobe: error: Invalid fetch argument\n"
        "  Command: p:g/e sym a=b\n"
        "                       ^\n"
    )
    assert tracefs.parse_error_log(text) == KernelError(
        "Invalid fetch argument", "p:g/e sym a=b", "b"
    )


def test_parse_error_log_without_command() -> None:
    text = "[    1.000000] trace_kprobe: error: Maxactive is not for kprobe\n"
    assert tracefs.parse_error_log(text) == KernelError("Maxactive is not for kprobe", None, None)


@pytest.mark.parametrize("text", ["", "\n", "no entries here\n"])
def test_parse_error_log_empty(text: str) -> None:
    assert tracefs.parse_error_log(text) is None


def test_kernel_error_text() -> None:
    assert str(KernelError("Invalid fetch argument", "p:g/e sym a=b", "a=b")) == (
        "Invalid fetch argument at 'a=b'"
    )
    assert str(KernelError("Bad", None, None)) == "Bad"


# -- lockdown ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("[none] integrity confidentiality\n", "none"),
        ("none [integrity] confidentiality\n", "integrity"),
        ("none integrity [confidentiality]\n", "confidentiality"),
        ("none integrity confidentiality\n", None),
    ],
)
def test_lockdown_mode(tmp_path: Path, text: str, mode: str | None) -> None:
    path = tmp_path / "lockdown"
    path.write_text(text)
    assert tracefs.lockdown_mode(str(path)) == mode


def test_lockdown_mode_without_the_lsm(tmp_path: Path) -> None:
    assert tracefs.lockdown_mode(str(tmp_path / "missing")) is None


# -- Tracefs on a fake tree -------------------------------------------------------------

KPROBE_EVENTS = (
    "p:kprobes/other_tool do_sys_open\n"
    "p:modwatch_242_d864c37967/mwd864c37967_finit_module __x64_sys_finit_module fd=+112(%di):s32\n"
    "r10:modwatch_242_d864c37967/mwd864c37967_finit_module_ret __x64_sys_finit_module "
    "ret=$retval:s64\n"
    "r10:modwatch_9_aa/mwaa_do_init_module_ret do_init_module ret=$retval:s32\n"
    "p:modwatch_9_aa/mwaa_load_module load_module\n"
)


@pytest.fixture
def fake(tmp_path: Path) -> Tracefs:
    root = tmp_path / "tracing"
    (root / "instances").mkdir(parents=True)
    (root / "events" / "module" / "module_load").mkdir(parents=True)
    (root / "kprobe_events").write_text(KPROBE_EVENTS)
    (root / "available_filter_functions").write_text(
        "load_module\n__x64_sys_finit_module\nmwtest_init [mwtest]\n"
    )
    (root / "error_log").write_text(ERROR_LOG)
    return Tracefs(str(root))


def test_groups(fake: Tracefs) -> None:
    assert fake.groups("modwatch_") == {
        "modwatch_242_d864c37967": [
            "-:modwatch_242_d864c37967/mwd864c37967_finit_module",
            "-:modwatch_242_d864c37967/mwd864c37967_finit_module_ret",
        ],
        "modwatch_9_aa": [
            "-:modwatch_9_aa/mwaa_do_init_module_ret",
            "-:modwatch_9_aa/mwaa_load_module",
        ],
    }
    assert fake.groups("nothing") == {}


def test_groups_see_return_probes_with_maxactive(fake: Tracefs) -> None:
    # kprobe_events shows return probes as `r10:GROUP/EVENT` (seen on a 2-CPU guest).
    (Path(fake.root) / "kprobe_events").write_text(
        "r10:modwatch_9_aa/mwaa_do_init_module_ret do_init_module ret=$retval:s32\n"
    )
    assert fake.groups("modwatch_9_aa") == {
        "modwatch_9_aa": ["-:modwatch_9_aa/mwaa_do_init_module_ret"]
    }


def test_available_functions(fake: Tracefs, tmp_path: Path) -> None:
    functions = fake.available_functions()
    for name in ("load_module", "__x64_sys_finit_module", "mwtest_init"):
        assert name in functions, name
    # Whole names only: not a part of one, nor the module column, nor spaces.
    for name in ("load_modul", "oad_module", "_x64_sys_finit_module", "mwtest", "[mwtest]", ""):
        assert name not in functions, name
    assert "load_module\n__x64_sys_finit_module" not in functions
    assert "load_module" not in Tracefs(str(tmp_path / "none")).available_functions()


def test_available_functions_last_line_without_newline(fake: Tracefs) -> None:
    Path(fake.path("available_filter_functions")).write_text("first\nlast")
    functions = fake.available_functions()
    assert "first" in functions and "last" in functions and "las" not in functions


def test_has_tracepoint(fake: Tracefs) -> None:
    assert fake.has_tracepoint("module", "module_load")
    assert not fake.has_tracepoint("module", "module_free")


def test_add_probe_appends_and_never_truncates(fake: Tracefs) -> None:
    fake.add_probe("p:modwatch_1_ab/mwab_load_module load_module")
    assert (
        fake.read("kprobe_events")
        == KPROBE_EVENTS + "p:modwatch_1_ab/mwab_load_module load_module\n"
    )


def test_add_probe_refused_quotes_the_kernel(fake: Tracefs) -> None:
    os.remove(fake.path("kprobe_events"))
    with pytest.raises(ProbeRejected) as err:
        fake.add_probe("p:g/e sym a=b")
    assert err.value.status == ExitStatus.PROBE_REJECTED
    assert err.value.message == (
        f"modwatch: the kernel rejected probe 'p:g/e sym a=b' in {fake.path('kprobe_events')}: "
        "Invalid fetch argument at 'a=b'"
    )
    assert err.value.symbol() is None  # the kernel has the symbol: an argument is wrong


def test_add_probe_refused_for_its_symbol(fake: Tracefs) -> None:
    os.remove(fake.path("kprobe_events"))
    Path(fake.path("error_log")).write_text(
        "[    9.032114] trace_kprobe: error: Invalid probed address or symbol\n"
        "  Command: r:g/e no_such_function ret=$retval:s64\n"
        "                 ^\n"
    )
    with pytest.raises(ProbeRejected) as err:
        fake.add_probe("r:g/e no_such_function ret=$retval:s64")
    assert err.value.symbol() == "no_such_function"


def test_add_probe_refused_without_error_log(fake: Tracefs) -> None:
    os.remove(fake.path("kprobe_events"))
    os.remove(fake.path("error_log"))
    with pytest.raises(ModwatchError) as err:
        fake.add_probe("p:g/e sym")
    assert err.value.message.endswith(": No such file or directory")


class FlakyTracefs(Tracefs):
    """A Tracefs whose kprobe_events write fails once with `errno_`."""

    def __init__(self, root: str, errno_: int) -> None:
        super().__init__(root)
        self.errno = errno_
        self.writes: list[str] = []

    def write(self, rel: str, text: str, append: bool = False) -> None:
        if rel == "kprobe_events" and self.errno:
            err, self.errno = self.errno, 0
            raise OSError(err, os.strerror(err))
        self.writes.append(text)
        super().write(rel, text, append)


def test_remove_probe_busy_disables_the_group_everywhere_then_retries(fake: Tracefs) -> None:
    group = "modwatch_9_aa"
    flaky = FlakyTracefs(fake.root, errno.EBUSY)
    top = Path(fake.root) / "events" / group
    inst = Path(fake.root) / "instances" / group / "events" / group
    for d in (top, inst):
        d.mkdir(parents=True)
        (d / "enable").write_text("1")
    flaky.remove_probe(f"-:{group}/mwaa_load_module", group)
    assert (top / "enable").read_text() == "0"
    assert (inst / "enable").read_text() == "0"
    assert flaky.writes == [f"-:{group}/mwaa_load_module\n"]


def test_remove_probe_already_gone(fake: Tracefs) -> None:
    flaky = FlakyTracefs(fake.root, errno.ENOENT)
    flaky.remove_probe("-:modwatch_5_ff/mwff_load_module", "modwatch_5_ff")
    assert flaky.writes == []


def test_remove_probe_refused_while_the_group_exists(fake: Tracefs) -> None:
    flaky = FlakyTracefs(fake.root, errno.EINVAL)
    with pytest.raises(OSError) as err:
        flaky.remove_probe("-:modwatch_9_aa/mwaa_load_module", "modwatch_9_aa")
    assert err.value.errno == errno.EINVAL


def test_instances(fake: Tracefs) -> None:
    assert fake.instance_paths() == {}
    path = fake.make_instance("modwatch_1_ab")
    assert path == fake.path("instances", "modwatch_1_ab")
    assert fake.instance_paths() == {"modwatch_1_ab": path}
    fake.remove_instance("modwatch_1_ab")
    fake.remove_instance("modwatch_1_ab")  # already gone: no error
    assert fake.instance_paths() == {}


def test_write_never_truncates(fake: Tracefs) -> None:
    # On a regular file the missing O_TRUNC shows: the old tail stays after the new text.
    Path(fake.path("trace_clock")).write_text("[local] global mono boot\n")
    fake.write("trace_clock", "mono")
    assert fake.read("trace_clock") == "monoal] global mono boot\n"


def test_lines_strip_newlines(fake: Tracefs) -> None:
    assert list(fake.lines("kprobe_events")) == KPROBE_EVENTS.splitlines()
    assert fake.probe_lines() == KPROBE_EVENTS.splitlines()


# -- kallsyms ---------------------------------------------------------------------------


def test_kallsyms_text_symbols(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81234560 t load_module\n"
        "ffffffff81234990 T __x64_sys_finit_module\n"
        "ffffffff82000000 D some_data\n"
        "ffffffff82000100 r rodata_thing\n"
        "ffffffffc0000000 t mwtest_init\t[mwtest]\n"
        "0000000000000000 T hidden_when_kptr_restrict\n"
        "garbage\n"
    )
    symbols = tracefs.kallsyms_text_symbols(str(path))
    for name in ("_stext", "load_module", "__x64_sys_finit_module", "hidden_when_kptr_restrict"):
        assert name in symbols, name
    # Data, a module's function, part of a name, garbage: not the kernel's text.
    for name in ("some_data", "rodata_thing", "mwtest_init", "load_modul", "garbage", "T"):
        assert name not in symbols, name


def test_kallsyms_missing(tmp_path: Path) -> None:
    assert "load_module" not in tracefs.kallsyms_text_symbols(str(tmp_path / "missing"))


def test_kprobe_misses(fake: Tracefs) -> None:
    # kernel/trace/trace_kprobe.c: "  %-44s %15lu %15lu\n", event name, hits, misses.
    (Path(fake.root) / "kprobe_profile").write_text(
        "  other_tool                                                 12               3\n"
        "  mwaa_finit_module                                          16               0\n"
        "  mwaa_finit_module_ret                                      10               6\n"
        "  mwaa_do_init_module_ret                                     1               0\n"
    )
    wanted = ["mwaa_finit_module", "mwaa_finit_module_ret", "mwaa_do_init_module_ret"]
    assert fake.kprobe_misses(wanted) == {"mwaa_finit_module_ret": 6}
    assert fake.kprobe_misses([]) == {}


def test_task_groups_answer_from_a_reading_made_after_the_thread_was_gone(
    tmp_path: Path,
) -> None:
    saved = tmp_path / "saved_tgids"
    saved.write_text("18 18\n166 160\nnonsense\n")
    now = [100.0]
    groups = tracefs.TaskGroups(Tracefs(str(tmp_path)), interval=0.1, clock=lambda: now[0])
    assert groups.tgid(166, gone_at=99.9) == 160
    # Found gone before that reading: it answers, unread.
    saved.write_text("166 166\n200 199\n")
    assert (groups.tgid(18, gone_at=99.0), groups.tgid(200, gone_at=99.9)) == (18, None)
    # Found gone after it, 50 ms later: the map may have noted another thread 166 since;
    # too soon to read it again, so no answer rather than an old one.
    now[0] += 0.05
    assert groups.tgid(166, gone_at=100.04) is None
    now[0] += 0.06
    assert (groups.tgid(166, gone_at=100.1), groups.tgid(200, gone_at=100.1)) == (166, 199)
    saved.unlink()
    now[0] += 1
    assert groups.tgid(200, gone_at=101.0) is None
