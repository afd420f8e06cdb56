"""Long-running child processes in their own session, stopped with everything in their process group.

Used by `pulse-exports dev` (code server, webserver, daemon), the benchmark's Dagster deployments and the test fixtures
(webserver, daemon, API, SeaweedFS).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_group(process: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM the leader's group, give it ``grace`` seconds, then SIGKILL whatever the group still holds."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    signal_group(process.pid, signal.SIGKILL)  # also anything the leader left behind
    process.wait(timeout=10)


class ServiceProcess:
    """One long-running command, its output appended to ``<workdir>/<name>.log``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None, workdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches the parent only; it stops the group
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the group (Dagster shuts its code servers down), then SIGKILL what is left."""
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, grace)
