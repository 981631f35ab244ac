"""Seconds since this process started: start-up is measured from the process's birth (imports
included), the figure users wait for, not from the engine's constructor."""

from __future__ import annotations

import os


def seconds_since_process_start() -> float | None:
    """From /proc (Linux); None where there is none."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return None
    start_ticks = int(fields[19])  # field 22 of proc(5): start time after boot, clock ticks
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
