"""Run one contender in a child process and measure it: wall time and that process's peak RSS."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss: int  # bytes: the child's VmHWM, the high-water mark of its own address space
    peak_anon: int  # bytes: the most RssAnon seen (sampled): its own heap, without the libraries' mapped pages
    returncode: int
    stdout: str
    stderr: str


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set of a process's current program, in bytes (0 once it is gone).

    Not ``ru_maxrss``: Linux carries that over ``exec`` from the forked parent, so every child
    of a large benchmark process would report at least the parent's size.
    """
    return memory_status(pid)[0]


def memory_status(pid: int | str = "self") -> tuple[int, int]:
    """(VmHWM, RssAnon) of a process in bytes, (0, 0) once it is gone.

    RssAnon is what the process allocated itself. VmHWM also counts the pages of its libraries that are
    mapped in (RssFile): how many depends on the page cache, not on the process. A library written by a
    fresh ``pip install`` sits in the cache in large folios, each mapped whole on a fault; read back from
    disk it is mapped in smaller pieces (here the same imports took 179 MiB and 140 MiB).
    """
    fields = {"VmHWM:": 0, "RssAnon:": 0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                parts = line.split()
                if parts and parts[0] in fields:
                    fields[parts[0]] = int(parts[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields["VmHWM:"], fields["RssAnon:"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process (all its threads) has used so far, in seconds (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_measured(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None, started: float | None = None
) -> Measured:
    """Start ``argv``, wait for it and return its wall time, peak RSS and peak anonymous RSS.

    The peak is VmHWM read every 20 ms while the child runs (more often in its first 100 ms); Python
    workers also print their own final VmHWM (``"vm_hwm"`` in their JSON line), which the caller prefers. ``started`` (a
    ``time.monotonic()`` value) starts the clock before work this process did for the contender.
    """
    t0 = time.monotonic() if started is None else started
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, env=dict(env) if env is not None else None, cwd=cwd, stdout=out, stderr=err)
        peak = peak_anon = 0
        done = threading.Event()

        def poll() -> None:
            nonlocal peak, peak_anon
            interval = 0.001  # from 1 ms up to POLL_SECONDS: a child done in 20 ms is still read near its end
            while not done.is_set():
                hwm, anon = memory_status(process.pid)
                peak, peak_anon = max(peak, hwm), max(peak_anon, anon)
                done.wait(interval)
                interval = min(POLL_SECONDS, interval * 1.5)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        process.wait()
        seconds = time.monotonic() - t0
        done.set()
        poller.join()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return Measured(seconds, peak, peak_anon, process.returncode, stdout, stderr)
