"""What this machine's CPU can run, for tests of kernels that exist only on some CPUs."""
from __future__ import annotations

import platform


def cpu_flags() -> set[str]:
    """The x86 CPU's feature flags as Linux lists them (empty where /proc/cpuinfo has none,
    and on other architectures: an emulated aarch64 process, qemu-aarch64 on an x86 host,
    reads the host's /proc/cpuinfo)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()
