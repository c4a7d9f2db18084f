"""modwatch: watch kernel module loads and unloads through kprobe events, without eBPF."""

__version__ = "0.1.0"
