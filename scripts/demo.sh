#!/usr/bin/env bash
# Shows modwatch capturing real module loads and unloads: on this machine when its
# kernel can (root, kprobe events, module support, headers to build the test module),
# otherwise inside Debian's 6.12 kernel booted by the test bed.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
python=$top/.venv/bin/python

scenario() {
    local dir=$1
    cd "$top"
    echo "\$ modwatch capture --format table -- sh -c '<loads and unloads of the test module>'"
    # insmod's own complaints would interleave with the table: the table says it all.
    "$python" -m modwatch capture --format table -- sh -c "
        insmod $dir/mwtest.ko 'note=\"hello world\"'
        insmod $dir/mwtest.ko 2>/dev/null           # already loaded: EEXIST
        insmod $dir/mwtest_b.ko fail=22 2>/dev/null # its init fails: EINVAL
        setpriv --reuid 65534 insmod $dir/mwtest.ko 2>/dev/null  # not root: EPERM
        rmmod mwtest
        true"
}

if [ "${1:-}" = "--here" ]; then
    scenario "$2"
    exit
fi

release=$(uname -r)
if [ "$(id -u)" = 0 ] && [ -e /sys/kernel/tracing/kprobe_events ] && [ -e /proc/modules ] \
    && [ -d "/lib/modules/$release/build" ]; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    cp "$top"/tests/module/* "$build"/
    make -s -C "/lib/modules/$release/build" M="$build" modules >/dev/null
    scenario "$build"
else
    echo "demo: this kernel ($release) cannot load modules or lacks kprobe events;" \
        "running the demo in Debian's 6.12 kernel under QEMU (about a minute)" >&2
    exec "$python" "$top/scripts/testbed.py" exec --kernel 6.12 -- \
        "$top/scripts/demo.sh" --here '"$MODWATCH_TEST_MODULE_DIR"'
fi
