#!/usr/bin/env python3
"""Real-kernel test bed: run modwatch's kernel tests inside Debian's 6.1 and 6.12 kernels.

The host kernel has neither kprobe events nor module support, so each guest kernel is booted
under QEMU (TCG) with virtme-ng, which shares the host's root file system read-only: the guest
runs the host's Python and this checkout's venv, as root.

    scripts/testbed.py prepare [--kernels 6.1,6.12]  packages, kernels and test modules only
    scripts/testbed.py run [--kernels 6.1,6.12] [PYTEST_ARGS...]
    scripts/testbed.py exec --kernel 6.1 -- COMMAND...

`run` runs `pytest -m kernel` in each kernel; without PYTEST_ARGS it also boots the newest
kernel with lockdown=confidentiality and runs `pytest -m lockdown` there.

Environment: KERNELS (default kernel series, comma-separated), MODWATCH_TESTBED_CACHE (cache
directory, default <checkout>/.cache/testbed), MODWATCH_TESTBED_TIMEOUT (seconds before a guest
is killed and counted as failed, default 1200).
"""

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CHECKOUT = Path(__file__).resolve().parent.parent
VENV_BIN = CHECKOUT / ".venv" / "bin"
MODULE_SOURCES = CHECKOUT / "tests" / "module"
MODULES = ("mwtest", "mwtest_b", "mwtest_name_of_the_longest_length_a_module_may_have_55b")
# User-space helpers of the kernel tests, compiled on the host: gcc under TCG takes minutes.
HELPER_SOURCES = CHECKOUT / "tests" / "kernel"
# Flags beyond -O2 -Wall: mwload32 is a 32-bit caller, built without a C library.
HELPER_FLAGS = {
    "mwload32": [
        *("-m32", "-nostdlib", "-static", "-ffreestanding"),
        *("-fno-pie", "-no-pie", "-fno-stack-protector"),
    ],
}

# Kernel series -> Debian meta package that depends on the current kernel of that series.
META_PACKAGES = {"6.1": "linux-image-amd64", "6.12": "linux-image-6.12-amd64"}
# A full run boots the newest kernel once more with this on its command line.
LOCKDOWN_BOOT = "lockdown=confidentiality"
# The test guests have one CPU each, as many guests run at once as the host has CPUs
# (guest_slot): with two, each guest's CPUs waited on each other (IPIs, RCU, code
# patching) while the host ran the other guest, and its kernel tests took a third
# longer (those of a full run: 4m40s, 3m39s with one CPU each). `exec` (the bench, the demo)
# keeps two, so that per-CPU buffers and a CPU that a flood does not take are real.
TEST_CPUS = 1
EXEC_CPUS = 2
# pytest's own plugins that the kernel tests do without (their fixtures, options, doctests).
UNUSED_PYTEST_PLUGINS = (
    *("doctest", "pastebin", "legacypath", "setuponly", "setupplan", "stepwise"),
    *("debugging", "unittest", "subtests", "recwarn"),
)
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod", "cpio", "make", "gcc")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

# Mount points that exist only in the guest. /run is an empty tmpfs there, so these never
# shadow a host path, wherever the checkout and the cache live.
GUEST_MODULES = "/run/modwatch-testbed/modules"
GUEST_RESULTS = "/run/modwatch-testbed/results"

# vng pastes --rodir/--rwdir paths unquoted into a shell command line, and virtme-run accepts
# only these characters in them.
SAFE_PATH = re.compile(r"[A-Za-z0-9_+/.-]+")


class TestbedError(Exception):
    """A failure the user can act on; printed as one line, without a traceback."""


def log(message: str) -> None:
    print(f"testbed: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("MODWATCH_TESTBED_CACHE") or CHECKOUT / ".cache" / "testbed")


def guest_timeout() -> float:
    value = os.environ.get("MODWATCH_TESTBED_TIMEOUT", "1200")
    try:
        return float(value)
    except ValueError:
        raise TestbedError(f"MODWATCH_TESTBED_TIMEOUT={value!r} is not a number") from None


def output(cmd: Sequence[str]) -> str:
    """Stdout of a command that may fail (apt-cache and dpkg-query exit non-zero for unknown
    packages, and still print what they know)."""
    return subprocess.run(cmd, capture_output=True, text=True, env=APT_ENV, check=False).stdout


def apt_show(packages: Iterable[str]) -> dict[str, dict[str, str]]:
    """Package -> fields of its candidate version, per the apt lists; unknown ones left out."""
    # One apt-cache call for all: here each call takes 1-2 s of CPU time (no pkgcache.bin).
    text = output(["apt-cache", "show", "--no-all-versions", *packages])
    shown: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if "Package" in fields:
            shown[fields["Package"]] = fields
    return shown


def depends(fields: dict[str, str]) -> list[str]:
    """Names in a Depends field, every alternative included."""
    return [
        alternative.split()[0]
        for dependency in fields.get("Depends", "").split(",")
        for alternative in dependency.split("|")
        if alternative.strip()
    ]


def installed(package: str) -> bool:
    return output(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package]).startswith("ii")


class Apt:
    """apt-get, with `apt-get update` run at most once per invocation."""

    def __init__(self) -> None:
        self.updated = False

    def update(self) -> bool:
        """Run `apt-get update` unless done already; True if it ran now."""
        if self.updated:
            return False
        self.updated = True
        log("apt-get update")
        done = subprocess.run(["apt-get", "update", "-q"], env=APT_ENV, check=False)
        if done.returncode != 0:
            log(f"apt-get update failed (exit {done.returncode}); going on with the old lists")
        return True

    def install_missing(self, packages: Iterable[str]) -> None:
        missing = [name for name in dict.fromkeys(packages) if not installed(name)]
        if not missing:
            return
        self.update()
        log(f"installing {' '.join(missing)}")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=APT_ENV, check=True)

    def download(self, packages: Sequence[str], into: Path) -> list[Path]:
        """Download .debs into an empty directory and return their paths."""
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        log(f"downloading {' '.join(packages)}")
        # As root, apt drops to the _apt user to download, who cannot write to the cache.
        subprocess.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages],
            cwd=into,
            env=APT_ENV,
            check=True,
        )
        return sorted(into.glob("*.deb"))


@dataclass(frozen=True)
class Kernel:
    series: str
    package: str  # versioned image package, e.g. linux-image-6.1.0-56-amd64
    version: str  # its Debian version

    @property
    def release(self) -> str:
        """The kernel's `uname -r`."""
        return self.package.removeprefix("linux-image-")

    @property
    def headers(self) -> str:
        return f"linux-headers-{self.release}"

    @property
    def root(self) -> Path:
        """Image and headers packages unpacked: boot/, lib/modules/RELEASE, usr/src/."""
        return cache_dir() / "kernels" / f"{self.package}_{self.version}"

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def build_dir(self) -> Path:
        """The headers' kbuild tree, for `make -C`."""
        return self.root / "usr" / "src" / self.headers

    @property
    def toolchain_list(self) -> Path:
        """Host packages that building modules against the headers needs, one per line;
        written last, so it also marks the root as complete."""
        return self.root / "testbed-toolchain"

    @property
    def modules(self) -> Path:
        """mwtest.ko and mwtest_b.ko built for this kernel, and the tests' helpers."""
        return cache_dir() / "modules" / self.release


def resolve_meta(series_list: Sequence[str]) -> dict[str, Kernel]:
    """Series -> the kernel its meta package depends on now, per the apt lists."""
    metas = apt_show(META_PACKAGES[series] for series in series_list)
    images: dict[str, str] = {}
    for series in series_list:
        names = depends(metas.get(META_PACKAGES[series], {}))
        candidates = [name for name in names if name.startswith("linux-image-")]
        if len(candidates) == 1:
            images[series] = candidates[0]
    shown = apt_show(images.values())
    return {
        series: Kernel(series, image, shown[image]["Version"])
        for series, image in images.items()
        if image in shown
    }


def resolve(series_list: Sequence[str], apt: Apt) -> list[Kernel]:
    """Resolve each series' kernel now (meta packages move on); else fall back to the cache."""
    found = resolve_meta(series_list)
    if len(found) < len(series_list) and apt.update():
        found = resolve_meta(series_list)
    kernels = []
    for series in series_list:
        record = cache_dir() / "kernels" / f"{series}.resolved"
        kernel = found.get(series)
        if kernel is not None:
            forget_other_kernel(record, kernel)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(f"{kernel.package} {kernel.version}\n")
        elif record.exists():
            package, version = record.read_text().split()
            kernel = Kernel(series, package, version)
            log(f"apt cannot resolve {META_PACKAGES[series]}: using the cached {package} {version}")
        else:
            raise TestbedError(f"apt cannot resolve {META_PACKAGES[series]} and nothing is cached")
        kernels.append(kernel)
    return kernels


def forget_other_kernel(record: Path, kernel: Kernel) -> None:
    """When the meta package has moved on, delete the series' previous kernel from the cache."""
    if not record.exists():
        return
    package, version = record.read_text().split()
    old = Kernel(kernel.series, package, version)
    if old != kernel:
        log(f"{kernel.series}: {old.package} {old.version} is no longer current, removing it")
        shutil.rmtree(old.root, ignore_errors=True)
        if old.release != kernel.release:
            shutil.rmtree(old.modules, ignore_errors=True)


def kernel_packages(kernel: Kernel) -> tuple[list[str], list[str]]:
    """Packages to unpack in the kernel's root, and the toolchain to install on the host.

    The headers are unpacked, not installed: linux-headers-6.12.* depends on the 6.12 image,
    whose installation brings initramfs-tools and udev into the host root that every guest
    shares, and virtme-ng-init starts udev when it finds it: a coldplug that loads dozens of
    modules in the background and adds a minute or more to each boot.
    """
    unpacked = [kernel.package, kernel.headers]
    toolchain: list[str] = []
    pending = [kernel.headers]
    while pending:
        shown = apt_show(pending)
        if len(shown) < len(pending):
            raise TestbedError(f"apt does not know {', '.join(set(pending) - set(shown))}")
        pending = []
        for name in (name for fields in shown.values() for name in depends(fields)):
            if name.startswith(("linux-headers-", "linux-kbuild-")):
                if name not in unpacked:
                    unpacked.append(name)
                    pending.append(name)
            elif not name.startswith(("linux-image-", "linux-base")) and name not in toolchain:
                toolchain.append(name)
    return unpacked, toolchain


def unpack(kernel: Kernel, apt: Apt) -> None:
    """Download and unpack the kernel's image and headers, then index its modules."""
    packages, toolchain = kernel_packages(kernel)
    staging = kernel.root.with_name(kernel.root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pinned = [f"{name}={kernel.version}" if name == kernel.package else name for name in packages]
    debs = apt.download(pinned, cache_dir() / "downloads")
    for deb in debs:
        log(f"unpacking {deb.name}")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
    # The headers' Makefile includes the -common one by its installed path, /usr/src/...
    makefile = staging / kernel.build_dir.relative_to(kernel.root) / "Makefile"
    makefile.write_text(makefile.read_text().replace(" /usr/src/", f" {kernel.root}/usr/src/"))
    # virtme-ng finds DIR/lib/modules/RELEASE by itself but needs its modules.dep to build
    # the initramfs (virtio, 9p) and for modprobe in the guest.
    subprocess.run(["depmod", "-b", str(staging), kernel.release], check=True)
    (staging / kernel.toolchain_list.name).write_text("".join(f"{name}\n" for name in toolchain))
    shutil.rmtree(kernel.root, ignore_errors=True)  # incomplete: no toolchain list
    staging.rename(kernel.root)
    shutil.rmtree(debs[0].parent)


def build_modules(kernel: Kernel) -> None:
    """Build mwtest.ko, mwtest_b.ko and the helpers (tests/kernel/NAME.c -> NAME) for the
    kernel, unless built from the same sources."""
    sources = sorted(path for path in MODULE_SOURCES.iterdir() if path.is_file())
    helpers = sorted(HELPER_SOURCES.glob("*.c"))
    digest = hashlib.sha256(kernel.root.name.encode())
    for path in [*sources, *helpers]:
        digest.update(f"\0{path.relative_to(CHECKOUT)}\0".encode() + path.read_bytes())
    stamp = kernel.modules / ".sources.sha256"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    build = cache_dir() / "build" / kernel.release
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    for path in sources:
        shutil.copy2(path, build)
    log(f"building {', '.join([*MODULES, *(path.stem for path in helpers)])} for {kernel.release}")
    subprocess.run(
        [
            "make",
            "-s",
            "--no-print-directory",
            "-C",
            str(kernel.build_dir),
            f"M={build}",
            "modules",
        ],
        stdout=sys.stderr,
        check=True,
    )
    built = build / "out"
    built.mkdir()
    for name in MODULES:
        shutil.copy2(build / f"{name}.ko", built)
    for path in helpers:
        flags = HELPER_FLAGS.get(path.stem, [])
        output = str(built / path.stem)
        subprocess.run(["gcc", "-O2", "-Wall", *flags, "-o", output, str(path)], check=True)
    (built / stamp.name).write_text(digest.hexdigest())
    # Swapped in at once: a guest of another test bed command may be using the old ones.
    old = build / "old"
    if kernel.modules.exists():
        kernel.modules.rename(old)
    kernel.modules.parent.mkdir(parents=True, exist_ok=True)
    built.rename(kernel.modules)


def prepare(series_list: Sequence[str]) -> list[Kernel]:
    """Host packages, guest kernels and test modules, installed or fetched only when missing."""
    if not (VENV_BIN / "vng").exists():
        raise TestbedError(f"{VENV_BIN / 'vng'} is missing: run `make install` first")
    for path in (CHECKOUT, cache_dir(), python_prefix()):
        if not SAFE_PATH.fullmatch(str(path.resolve())):
            raise TestbedError(f"{path}: virtme-ng needs a path made of [A-Za-z0-9_+/.-] only")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / "prepare.lock").open("w") as lock:
        # Another test bed command may be preparing the same cache.
        fcntl.flock(lock, fcntl.LOCK_EX)
        apt = Apt()
        # First: unpacking runs depmod (kmod), and a fresh machine may not have it yet.
        apt.install_missing(HOST_PACKAGES)
        kernels = resolve(series_list, apt)
        try:
            for kernel in kernels:
                if not kernel.toolchain_list.exists():
                    unpack(kernel, apt)
        except subprocess.CalledProcessError:
            # Stale lists name a version the archive no longer has: refresh, resolve again.
            if not apt.update():
                raise
            kernels = resolve(series_list, apt)
            for kernel in kernels:
                if not kernel.toolchain_list.exists():
                    unpack(kernel, apt)
        toolchain = [name for k in kernels for name in k.toolchain_list.read_text().split()]
        apt.install_missing(toolchain)
        for kernel in kernels:
            build_modules(kernel)
    return kernels


@dataclass
class GuestRun:
    kernel: Kernel
    status: int | None  # exit status of the command in the guest; None if it never wrote one
    timed_out: bool
    directory: Path  # console.log (vng's output: boot log, guest console) and results/
    seconds: float

    @property
    def results(self) -> Path:
        """Host side of the guest's writable results directory."""
        return self.directory / "results"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    def read(self, name: str) -> str:
        path = self.results / name
        return path.read_text(errors="replace") if path.exists() else ""


# Set by a signal. Each guest runs in a session of its own, which the signal does not reach:
# the loop watching a guest sees this and kills it, else qemu would outlive the test bed.
STOPPING = threading.Event()


def stop(signum: int, _frame: object) -> None:
    STOPPING.set()
    log(f"stopped by {signal.Signals(signum).name}")
    sys.exit(128 + signum)


@contextlib.contextmanager
def guest_slot() -> Iterator[None]:
    """Hold one of the machine's guest slots, one per CPU, while a guest runs.

    TCG guests are CPU-bound: with more guests than cores (two test bed commands at once,
    from any checkout) all of them slow down until they time out, so the others wait.
    """
    slots = Path(tempfile.gettempdir()) / "modwatch-testbed-slots"
    slots.mkdir(exist_ok=True)
    waited = False
    while not STOPPING.is_set():
        for index in range(os.cpu_count() or 1):
            with (slots / str(index)).open("w") as slot:
                try:
                    fcntl.flock(slot, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                yield
                return
        if not waited:
            log("waiting for a guest slot: other guests use every CPU")
            waited = True
        time.sleep(1)
    raise TestbedError("stopped before the guest booted")


def copy_stream(source: IO[bytes], target: Path) -> None:
    with target.open("wb") as sink:
        shutil.copyfileobj(source, sink)


class Follower:
    """Prints the lines a guest appends to a file of its results directory, as they come."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self.offset = 0
        self.partial = b""

    def poll(self) -> None:
        try:
            with self.path.open("rb") as file:
                file.seek(self.offset)
                data = file.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self.write(line)

    def finish(self) -> None:
        self.poll()
        if self.partial:
            self.write(self.partial)
            self.partial = b""

    def write(self, line: bytes) -> None:
        # One write per line: the followers of parallel guests share stdout.
        sys.stdout.write(f"{self.prefix}{line.decode(errors='replace')}\n")
        sys.stdout.flush()


def python_prefix() -> Path:
    """The installation the venv's python comes from (pyvenv.cfg: home = PREFIX/bin)."""
    for line in (VENV_BIN.parent / "pyvenv.cfg").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            return Path(value.strip()).resolve().parent
    raise TestbedError(f"{VENV_BIN.parent}/pyvenv.cfg names no home")


def fast_mounts() -> list[tuple[str, Path]]:
    """(9p tag, path) pairs exported again to be mounted with cache=loose in the guest.

    virtme-ng mounts its 9p shares with cache=none: every open or stat is a round trip to
    the host, and every process start reads its code into fresh pages, which TCG translates
    all over again. With the page cache kept, python starts and imports 2-3 times faster.
    /usr is left alone: virtme-ng links the guest kernel's modules into its overlay there.
    """
    return [("mwtb_python", python_prefix()), ("mwtb_checkout", CHECKOUT)]


def boot(
    kernel: Kernel,
    command: str,
    timeout: float,
    stream: str | None = None,
    append: Sequence[str] = (),
    cpus: int = EXEC_CPUS,
) -> GuestRun:
    """Boot the kernel and run a shell command in the guest as root, cwd the checkout.

    A guest that dies before the command starts (no stdout file in its results) is
    booted once more. So is one whose kernel oopsed on an int3 (`Oops: int3`): under
    QEMU's multi-threaded TCG a Debian 6.12 kernel now and then runs into a breakpoint
    its own code patching (text_poke_bp) has already removed, in code modwatch does not
    probe (`__schedule` of rcu_preempt, at boot and mid-run; `ttwu_do_activate` in an
    idle CPU's interrupt, mid-run). Any other death, and
    a second one, is a failure: a crash modwatch caused would come back.
    """
    run = boot_once(kernel, command, timeout, stream, append, cpus)
    if run.status is None and not run.timed_out and not STOPPING.is_set():
        unborn = not (run.results / "stdout").exists()
        console = run.console.read_text(errors="replace") if run.console.exists() else ""
        if unborn or "Oops: int3" in console:
            why = "died before the command started" if unborn else "kernel oopsed on an int3"
            log(f"{kernel.release}: the guest {why}; booting it once more (console: {run.console})")
            run = boot_once(kernel, command, timeout, stream, append, cpus)
    return run


def boot_once(
    kernel: Kernel,
    command: str,
    timeout: float,
    stream: str | None,
    append: Sequence[str] = (),
    cpus: int = EXEC_CPUS,
) -> GuestRun:
    """One boot: see `boot`; `append` are kernel boot options, `cpus` the guest's CPUs.

    The command's stdout, stderr and exit status come back through a --rwdir: vng's own
    output is the console, where the command's output may not arrive at all. With stream
    set, the command's stdout is printed as it comes, each line prefixed with it.
    """
    (cache_dir() / "runs").mkdir(parents=True, exist_ok=True)
    # One directory per boot: several test bed commands may run at once.
    run_dir = Path(tempfile.mkdtemp(prefix=f"{kernel.series}-", dir=cache_dir() / "runs"))
    results = run_dir / "results"
    results.mkdir()
    env = {
        "MODWATCH_IN_GUEST": "1",
        "MODWATCH_TEST_KERNEL": kernel.release,
        "MODWATCH_TEST_SERIES": kernel.series,
        "MODWATCH_TEST_MODULE_DIR": GUEST_MODULES,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    mounts = "".join(
        f"mkdir -p {path} && mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,"
        f"cache=loose {tag} {path} &&\n"
        for tag, path in fast_mounts()
    )
    exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    # A file, not the --exec text: that travels base64-encoded on the kernel command line,
    # which is cut at 2048 bytes (and 6.12 panics on the overflow).
    (results / "testbed.sh").write_text(
        "# Written by scripts/testbed.py, run as root in the guest.\n"
        f"(\n{mounts}cd {CHECKOUT} &&\nexport {exports} &&\nsh -c {shlex.quote(command)}\n)"
        f" >{GUEST_RESULTS}/stdout 2>{GUEST_RESULTS}/stderr\n"
        f"echo $? >{GUEST_RESULTS}/status\nsync\n"
    )
    vng = [
        str(VENV_BIN / "vng"),
        "--run",
        str(kernel.vmlinuz),
        "--disable-kvm",  # nested KVM hangs or aborts here
        # Debian's qemu ships the C virtiofsd, which vng starts, waits 3 s for and gives up
        # on, once per shared directory, before falling back to 9p anyway.
        "--force-9p",
        "--verbose",
        "--cpus",
        str(cpus),
        "--memory",
        "1G",
        # The checkout at its own path: the venv's scripts and .pth files hold absolute
        # paths, and the guest does not see the host's /tmp or /var/tmp as they are.
        f"--rodir={CHECKOUT}={CHECKOUT}",
        f"--rodir={GUEST_MODULES}={kernel.modules}",
        f"--rwdir={GUEST_RESULTS}={results}",
        "--exec",
        f"sh {GUEST_RESULTS}/testbed.sh",
        *(f"--append={option}" for option in append),
        *(
            f"--qemu-opts=-virtfs local,path={path},mount_tag={tag},security_model=none,"
            "readonly=on,multidevs=remap"
            for tag, path in fast_mounts()
        ),
    ]
    with guest_slot():
        console = run_dir / "console.log"
        started = time.monotonic()
        # vng runs virtme-run by name. Its own session lets a hung guest be killed as a group
        # (vng, virtme-run, qemu).
        proc = subprocess.Popen(
            vng,
            cwd=CHECKOUT,
            env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        copier = threading.Thread(target=copy_stream, args=(proc.stdout, console))
        copier.start()
        follower = Follower(results / "stdout", stream) if stream is not None else None
        deadline = started + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline and not STOPPING.is_set():
                time.sleep(0.5)
                if follower is not None:
                    follower.poll()
            timed_out = proc.poll() is None and not STOPPING.is_set()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            copier.join()
            if follower is not None:
                follower.finish()
    status_text = (results / "status").read_text().strip() if (results / "status").exists() else ""
    return GuestRun(
        kernel=kernel,
        status=int(status_text) if status_text.isdigit() else None,
        timed_out=timed_out,
        directory=run_dir,
        seconds=time.monotonic() - started,
    )


def guest_failure(run: GuestRun) -> str | None:
    """Why the guest did not bring back an exit status, or None if it did."""
    if run.timed_out:
        return f"guest killed after {run.seconds:.0f} s (MODWATCH_TESTBED_TIMEOUT)"
    if run.status is None:
        return "the guest wrote no exit status (crashed or failed to boot)"
    return None


def print_console_tail(run: GuestRun, lines: int = 40) -> None:
    text = run.console.read_text(errors="replace").splitlines() if run.console.exists() else []
    log(f"last {lines} lines of the console ({run.console}):")
    for line in text[-lines:]:
        print(f"    {line}", file=sys.stderr)


@dataclass
class Outcome:
    passed: int
    failed: list[str]  # node ids of failures and errors
    skipped: int


def node_id(case: ET.Element) -> str:
    """pytest's node id from an xunit1 test case (file, classname, name)."""
    file = case.get("file", "")
    module = file.removesuffix(".py").replace("/", ".")
    classes = case.get("classname", "").removeprefix(module).strip(".")
    return "::".join(part for part in (file, *classes.split("."), case.get("name", "")) if part)


def parse_junit(path: Path) -> Outcome:
    # A test that fails and then errors in teardown has two test cases of the same name.
    states: dict[str, str] = {}
    for case in ET.parse(path).iter("testcase"):
        node = node_id(case)
        if case.find("failure") is not None or case.find("error") is not None:
            states[node] = "failed"
        elif case.find("skipped") is not None:
            states.setdefault(node, "skipped")
        else:
            states.setdefault(node, "passed")
    return Outcome(
        passed=sum(state == "passed" for state in states.values()),
        failed=[node for node, state in states.items() if state == "failed"],
        skipped=sum(state == "skipped" for state in states.values()),
    )


def compile_on_host(pytest_args: Sequence[str] | None) -> None:
    """Write the checkout's bytecode on the host, where it takes a second.

    The guest cannot (the checkout is read-only there) and would compile modwatch again in
    every Python process it starts, 40 times slower. With pytest_args, a collection also
    writes pytest's rewritten test modules. Best effort: a failure shows up in the guest.
    """
    python = [str(VENV_BIN / "python"), "-m"]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    commands = [[*python, "compileall", "-q", "modwatch"]]
    if pytest_args is not None:
        commands.append([*python, "pytest", *pytest_args, "--collect-only", "-q"])
    for command in commands:
        subprocess.run(command, cwd=CHECKOUT, env=env, capture_output=True, check=False)


def run_tests(kernels: Sequence[Kernel], pytest_args: Sequence[str]) -> int:
    timeout = guest_timeout()
    selection = [
        "-o",
        "testpaths=tests/kernel",  # unless PYTEST_ARGS name tests
        "-p",
        "no:cacheprovider",
        # Importing hypothesis costs ~12 s in the guest; @given works without the plugin.
        "-p",
        "no:hypothesispytest",
        # pytest plugins no kernel test uses: about 1 s of each guest's pytest start.
        *(arg for name in UNUSED_PYTEST_PLUGINS for arg in ("-p", f"no:{name}")),
        *pytest_args,
    ]
    compile_on_host(["-m", "kernel", *selection])

    def command(markers: str) -> str:
        pytest = [
            str(VENV_BIN / "python"),
            "-m",
            "pytest",
            "-v",  # a line per test, streamed as each test ends
            "--durations=8",  # where a kernel's time goes
            "-o",
            "junit_family=xunit1",  # xunit1 records each test's file: node ids in the summary
            f"--junitxml={GUEST_RESULTS}/junit.xml",
            "-m",
            markers,
            *selection,
        ]
        return shlex.join(pytest) + " 2>&1"

    # (label, kernel, command, boot options)
    boots: list[tuple[str, Kernel, str, tuple[str, ...]]] = [
        (k.series, k, command("kernel"), ()) for k in kernels
    ]
    if not pytest_args:
        # The newest kernel once more, locked down from its start: the `lockdown` tests
        # (the other guests raise lockdown at run time, after every other test).
        newest = kernels[-1]
        boots.append((f"{newest.series}+lockdown", newest, command("lockdown"), (LOCKDOWN_BOOT,)))
    log(
        f"booting {', '.join(f'{label} ({k.release})' for label, k, _, _ in boots)} "
        f"(timeout {timeout:.0f} s each)"
    )
    with ThreadPoolExecutor(max_workers=len(boots)) as pool:

        def start(b: tuple[str, Kernel, str, tuple[str, ...]]) -> Future[GuestRun]:
            return pool.submit(boot, b[1], b[2], timeout, f"[{b[0]}] ", b[3], TEST_CPUS)

        # Longest first: when the guests outnumber the slots, the locked-down boot (seconds
        # of tests) starts when a full run ends, so that no full run waits behind it.
        full = len(kernels)
        futures = [start(b) for b in boots[: max(full, (os.cpu_count() or 1))]]
        if len(futures) < len(boots):
            wait(futures, return_when=FIRST_COMPLETED)
            futures.extend(start(b) for b in boots[len(futures) :])
        runs = [future.result() for future in futures]
    summary: list[str] = []
    totals = Outcome(passed=0, failed=[], skipped=0)
    for (label, *_), run in zip(boots, runs, strict=True):
        name = f"{label} ({run.kernel.release})"
        # What failed before pytest started (a mount, the cd) went to stderr.
        sys.stdout.write("".join(f"[{label}] {line}\n" for line in run.read("stderr").splitlines()))
        junit = run.results / "junit.xml"
        problem = guest_failure(run)
        if problem is None and not junit.exists():
            problem = f"pytest exited {run.status} without writing junit.xml"
        if problem is not None:
            print_console_tail(run)
            summary.append(f"{name}: FAILED: {problem} (console: {run.console})")
            totals.failed.append(f"[{label}: {run.kernel.release}] {problem}")
            continue
        outcome = parse_junit(junit)
        shutil.rmtree(run.directory)
        verdict = "ok" if run.status == 0 and not outcome.failed else "FAILED"
        summary.append(
            f"{name}: {verdict}: {outcome.passed} passed, {len(outcome.failed)} failed,"
            f" {outcome.skipped} skipped in {run.seconds:.0f} s (pytest exit {run.status})"
        )
        summary.extend(
            f"    FAILED [{label}: {run.kernel.release}] {node}" for node in outcome.failed
        )
        totals.passed += outcome.passed
        totals.skipped += outcome.skipped
        totals.failed.extend(outcome.failed)
        if run.status != 0 and not outcome.failed:
            totals.failed.append(f"[{label}: {run.kernel.release}] pytest exit status {run.status}")
    print("\n===== kernel test summary =====")
    print("\n".join(summary))
    print(f"testbed: {totals.passed} passed, {len(totals.failed)} failed, {totals.skipped} skipped")
    return 1 if totals.failed else 0


def exec_command(kernel: Kernel, command: Sequence[str]) -> int:
    compile_on_host(None)
    run = boot(kernel, " ".join(command), guest_timeout())
    sys.stdout.write(run.read("stdout"))
    sys.stdout.flush()
    sys.stderr.write(run.read("stderr"))
    problem = guest_failure(run)
    if problem is not None:
        print_console_tail(run)
        log(f"{kernel.release}: {problem}")
        return 1
    shutil.rmtree(run.directory)
    log(f"{kernel.release}: exit status {run.status} ({run.seconds:.0f} s)")
    assert run.status is not None
    return run.status


def parse_series(text: str) -> list[str]:
    series = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in series if item not in META_PACKAGES]
    if unknown or not series:
        choices = ", ".join(META_PACKAGES)
        raise TestbedError(f"unknown kernel series {text!r}: choose from {choices}")
    return series


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="testbed.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="action", required=True)
    prepare_parser = commands.add_parser(
        "prepare", help="install packages, fetch kernels, build test modules", allow_abbrev=False
    )
    run = commands.add_parser(
        "run",
        help="run the kernel tests in each guest kernel",
        usage="testbed.py run [--kernels 6.1,6.12] [PYTEST_ARGS...]",
        allow_abbrev=False,
    )
    for subparser in (prepare_parser, run):
        subparser.add_argument(
            "--kernels",
            default=os.environ.get("KERNELS") or ",".join(META_PACKAGES),
            help="comma-separated kernel series (default: $KERNELS, else all)",
        )
    execute = commands.add_parser(
        "exec", help="boot one kernel and run a shell command in it as root", allow_abbrev=False
    )
    execute.add_argument("--kernel", required=True, choices=list(META_PACKAGES))
    execute.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    args, extra = parser.parse_known_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        if args.action == "run":
            pytest_args = extra[1:] if extra[:1] == ["--"] else extra
            return run_tests(prepare(parse_series(args.kernels)), pytest_args)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.action == "prepare":
            prepare(parse_series(args.kernels))
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("exec needs a command after --")
        (kernel,) = prepare([args.kernel])
        return exec_command(kernel, command)
    except TestbedError as err:
        log(f"error: {err}")
        return 2
    except subprocess.CalledProcessError as err:
        log(f"error: {shlex.join(map(str, err.cmd))} exited {err.returncode}")
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
