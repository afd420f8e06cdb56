"""Where export parts live: one small ``ExportStore`` interface with S3 and local-folder implementations.

Keys are relative, ``/``-separated paths such as ``tenant-a/job-42/part-00001.parquet``. Both
stores validate them the same way, so a key that works locally works on S3 and the reverse.
Reading a missing key raises ``FileNotFoundError`` in both.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit
from urllib.request import url2pathname

_log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB
# A part uploaded while it is written sends pieces this big (S3's smallest but the last is 5 MiB): one
# in flight per writer, and an export may have a writer per slice. 10,000 pieces allow 80 GiB parts.
TAIL_UPLOAD_CHUNKSIZE = 8 * MiB
_DELETE_BATCH = 1000  # the most keys one S3 DeleteObjects call accepts
_TEMP_PREFIX = ".pulse-tmp-"  # in-flight local writes; never a key segment, never listed


class PartUpload(Protocol):
    """The storing of one part file, begun while the file is still being written."""

    def finish(self) -> None:
        """The file is complete and closed: store the rest of it and publish the object."""

    def abort(self) -> None:
        """Give up: nothing is published and nothing unfinished is left behind."""


@runtime_checkable
class ExportStore(Protocol):
    """Object storage for export parts, addressed by keys relative to the store's root."""

    location: str

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None: ...
    def begin_upload(self, key: str, path: Path, content_type: str | None = None) -> PartUpload: ...
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def abort_multipart_uploads(self, prefix: str) -> int: ...
    def uri(self, key: str) -> str: ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``."""
    if not key:
        raise ValueError("empty storage key")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} contains a backslash or NUL")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} is absolute")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"storage key {key!r} has an empty, '.' or '..' segment")
        if segment.startswith(_TEMP_PREFIX):
            raise ValueError(f"storage key {key!r} uses the reserved prefix {_TEMP_PREFIX!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is empty or a key, optionally ending in ``/``; else raise ``ValueError``."""
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


class LocalExportStore:
    """Export parts as files under ``root``; each write lands atomically (temp file + ``os.replace``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.location = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalExportStore({self.location!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    @contextmanager
    def _atomic_target(self, key: str) -> Iterator[Path]:
        """Yield a temp path beside the key's file; it replaces the file only if the block succeeds."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not mkstemp: its 0600 mode would stick to the published file; this one follows the umask.
        temp = target.with_name(f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
        try:
            yield temp
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        with self._atomic_target(key) as temp:
            shutil.copyfile(path, temp)

    def begin_upload(self, key: str, path: Path, content_type: str | None = None) -> PartUpload:
        """Published at ``finish``, atomically: the finished file is moved into place (renamed, when the
        scratch folder is on the store's filesystem, so a part is never copied), else copied."""
        validate_key(key)
        return _CopyWhenFinished(lambda: self._move_in(key, path, content_type))

    def _move_in(self, key: str, path: Path, content_type: str | None) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self.put_file(key, path, content_type)  # another filesystem: copy beside the target, then rename

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        with self._atomic_target(key) as temp:
            temp.write_bytes(data)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def download_file(self, key: str, path: Path) -> None:
        shutil.copyfile(self._path(key), path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        # Same meaning as an S3 prefix: a plain string prefix, so walk the deepest folder it names.
        folder = self.root / prefix.rpartition("/")[0] if prefix else self.root
        if not folder.is_dir():
            return []
        keys = []
        for directory, _subdirs, files in os.walk(folder):
            for name in files:
                if name.startswith(_TEMP_PREFIX):
                    continue
                key = Path(directory, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        self._prune_empty_folders({self._path(key).parent for key in keys})
        return len(keys)

    def _prune_empty_folders(self, folders: set[Path]) -> None:
        """Remove now-empty folders up to (not including) the root, as S3 has no folders."""
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except OSError:  # not empty (or already gone): stop climbing
                    break
                folder = folder.parent

    def abort_multipart_uploads(self, prefix: str) -> int:
        validate_prefix(prefix)
        return 0

    def uri(self, key: str) -> str:
        """``file://`` URI of a key, or of a prefix (a trailing ``/`` is kept)."""
        return f"{self.root.as_uri().rstrip('/')}/{quote(validate_prefix(key))}"


class S3ExportStore:
    """Export parts as S3 objects under ``s3://bucket/prefix``; large files go up as multipart uploads.

    ``presign_client`` signs download links; it should be a SigV4, path-style client (see
    ``store_from_url``). Without one, the main client signs them.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        presign_client: Any | Callable[[], Any] | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        if not bucket:
            raise ValueError("S3 store needs a bucket name")
        self.bucket = bucket
        self.prefix = validate_prefix(prefix.strip("/")) if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client
        client.meta.events.register(
            "before-call.s3.UploadPart", _declare_part_body_as_bytes, unique_id="pulse-exports-part-body-type"
        )
        self._presign_client = presign_client or client  # a client, or a factory of one (built on first use)
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize
        )

    def __repr__(self) -> str:
        return f"S3ExportStore({self.location!r})"

    def _object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _object_prefix(self, prefix: str) -> str:
        validate_prefix(prefix)
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> None:
        object_key = self._object_key(key)
        extra_args = {"ContentType": content_type} if content_type else None
        try:
            self._client.upload_file(
                str(path), self.bucket, object_key, ExtraArgs=extra_args, Config=self._transfer_config
            )
        except BaseException:
            # s3transfer aborts a failed multipart upload itself, but it only logs (at debug) when
            # that abort fails; sweep again so no unfinished upload keeps its parts billed.
            try:
                self._abort_uploads(object_key, exact=True)
            except Exception:
                _log.warning("could not abort the unfinished upload of %s", self.uri(key), exc_info=True)
            raise

    def begin_upload(self, key: str, path: Path, content_type: str | None = None) -> PartUpload:
        """Upload ``path`` chunk by chunk while it grows, so little is left to send once it is closed."""
        return _TailUpload(
            self, key, path, content_type, min(TAIL_UPLOAD_CHUNKSIZE, self._transfer_config.multipart_chunksize)
        )

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data, **extra)

    def get_bytes(self, key: str) -> bytes:
        with self._missing_as_file_not_found(key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            return bytes(response["Body"].read())

    def download_file(self, key: str, path: Path) -> None:
        with self._missing_as_file_not_found(key):
            self._client.download_file(self.bucket, self._object_key(key), str(path), Config=self._transfer_config)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        with self._missing_as_file_not_found(key):
            head = self._client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            return int(head["ContentLength"])

    def _iter_object_keys(self, prefix: str) -> Iterator[list[str]]:
        """Yield the full object keys under ``prefix``, one list per listing page."""
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._object_prefix(prefix)):
            yield [item["Key"] for item in page.get("Contents", [])]

    def list_keys(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(key[strip:] for page in self._iter_object_keys(prefix) for key in page)

    def delete_prefix(self, prefix: str) -> int:
        deleted = 0
        for page in self._iter_object_keys(prefix):
            for start in range(0, len(page), _DELETE_BATCH):
                batch = page[start : start + _DELETE_BATCH]
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                if errors := response.get("Errors"):
                    first = errors[0]
                    raise OSError(
                        f"S3 refused to delete {len(errors)} object(s) under {self.uri(prefix)!r}, "
                        f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                    )
                deleted += len(batch)
        return deleted

    def abort_multipart_uploads(self, prefix: str) -> int:
        return self._abort_uploads(self._object_prefix(prefix), exact=False)

    def _abort_uploads(self, object_prefix: str, *, exact: bool) -> int:
        paginator = self._client.get_paginator("list_multipart_uploads")
        aborted = 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=object_prefix):
            for upload in page.get("Uploads", []):
                if exact and upload["Key"] != object_prefix:
                    continue
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    def uri(self, key: str) -> str:
        """``s3://`` URI of a key, or of a prefix (a trailing ``/`` is kept)."""
        return f"s3://{self.bucket}/{self._object_prefix(key)}"

    def presigned_url(self, key: str, expires_in: int) -> str:
        """A URL that downloads ``key`` without credentials for ``expires_in`` seconds."""
        if not hasattr(self._presign_client, "generate_presigned_url"):
            self._presign_client = self._presign_client()
        return str(
            self._presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._object_key(key)}, ExpiresIn=expires_in
            )
        )

    @contextmanager
    def _missing_as_file_not_found(self, key: str) -> Iterator[None]:
        from botocore.exceptions import ClientError

        try:
            yield
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"no object at {self.uri(key)}") from error
            raise


def _declare_part_body_as_bytes(params: dict[str, Any], **_: Any) -> None:
    """Send each multipart piece as ``application/octet-stream``; the object keeps the content type
    its CreateMultipartUpload named.

    botocore sends an UploadPart without a Content-Type, and SeaweedFS then sniffs the body: a CSV or
    NDJSON piece reads as text, which its S3 gateway gzips and its volume server unzips again to check,
    ~25% of its CPU per MiB of CSV (pprof, SeaweedFS 4.48). S3 ignores the header on a part."""
    params["headers"]["Content-Type"] = "application/octet-stream"


class _CopyWhenFinished:
    def __init__(self, store: Callable[[], None]) -> None:
        self._store = store

    def finish(self) -> None:
        self._store()

    def abort(self) -> None:
        pass


class _TailUpload:
    """A multipart upload of an append-only file that is still being written.

    A thread sends each full ``chunk_size`` piece as soon as the file has grown past it; ``finish``
    sends the remainder and completes the upload (a file smaller than one chunk is one plain PUT).
    Writers append only (CSV, JSON, gzip, zstd and Parquet never seek back), so the bytes below the
    file's size are final. Memory: one chunk in flight.
    """

    def __init__(
        self, store: S3ExportStore, key: str, path: Path, content_type: str | None, chunk_size: int, poll: float = 0.05
    ) -> None:
        self._store = store
        self._key = key
        self._object_key = store._object_key(key)
        self._path = path
        self._content_type = content_type
        self._chunk_size = max(chunk_size, 5 * MiB)  # S3's smallest part but the last
        self._poll = poll
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._offset = 0
        self._error: BaseException | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"upload {key}", daemon=True)
        self._thread.start()

    def _send(self, length: int) -> None:
        client = self._store._client
        if self._upload_id is None:
            extra = {"ContentType": self._content_type} if self._content_type else {}
            created = client.create_multipart_upload(Bucket=self._store.bucket, Key=self._object_key, **extra)
            self._upload_id = str(created["UploadId"])
        with self._path.open("rb") as file:
            file.seek(self._offset)
            body = file.read(length)
        number = len(self._parts) + 1
        answer = client.upload_part(
            Bucket=self._store.bucket, Key=self._object_key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        self._offset += len(body)

    def _run(self) -> None:
        try:
            while True:
                closed = self._closed.is_set()  # read before the size: once closed, the size is final
                while self._path.exists() and self._path.stat().st_size - self._offset >= self._chunk_size:
                    self._send(self._chunk_size)
                if closed:
                    return
                self._closed.wait(self._poll)
        except BaseException as exc:  # reported by finish(); this thread must not die silently
            self._error = exc

    def _stop(self) -> None:
        self._closed.set()
        self._thread.join()

    def finish(self) -> None:
        self._stop()
        try:
            if self._error is not None:
                raise self._error
            if self._upload_id is None:
                self._store.put_file(self._key, self._path, self._content_type)
                return
            remaining = self._path.stat().st_size - self._offset
            if remaining:
                self._send(remaining)
            self._store._client.complete_multipart_upload(
                Bucket=self._store.bucket,
                Key=self._object_key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._stop()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._store._client.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._object_key, UploadId=upload_id
                )
            except Exception:
                _log.warning("could not abort the unfinished upload of %s", self._store.uri(self._key), exc_info=True)


def store_from_url(
    url: str,
    *,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region_name: str | None = None,
) -> ExportStore:
    """Open the store a storage URL names: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path.

    For S3 the endpoint defaults to ``$PULSE_S3_ENDPOINT_URL``, then ``$AWS_ENDPOINT_URL``
    (AWS itself when neither is set); credentials default to boto3's usual chain.
    """
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket")
        endpoint_url = endpoint_url or os.environ.get("PULSE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        client, presign_client = _s3_clients(endpoint_url, access_key_id, secret_access_key, region_name)
        return S3ExportStore(client, parts.netloc, parts.path, presign_client=presign_client)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"storage URL {url!r} must be file:///absolute/path")
        return LocalExportStore(Path(url2pathname(parts.path)))  # url2pathname also unquotes
    if parts.scheme == "":
        return LocalExportStore(Path(url))
    raise ValueError(f"unsupported storage URL scheme {parts.scheme!r} in {url!r}: use s3://, file:// or a path")


def _s3_clients(
    endpoint_url: str | None, access_key_id: str | None, secret_access_key: str | None, region_name: str | None
) -> tuple[Any, Callable[[], Any]]:
    """The transfer client, and a factory of the SigV4 path-style client that signs download links.

    Plain boto3: building the client through dagster-aws's ``S3Resource`` imported ~0.8 s of modules
    into every run worker before its first row, and its resource-built client presigned with legacy
    SigV2 query parameters, which AWS regions opened since 2014 refuse. Run workers never presign, so
    that client is only built when a link is asked for.
    """
    import boto3
    from botocore.config import Config

    # Over plain http (a MinIO or SeaweedFS on the same network) botocore signs every body's SHA-256,
    # which the server checks; a CRC32 of the same bytes on top costs client and server CPU for nothing.
    # Over https the body is not signed, so the CRC32 stays.
    checksums = "when_required" if (endpoint_url or "").lower().startswith("http://") else "when_supported"
    session = boto3.session.Session(
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region_name,
        botocore_session=_botocore_session(),
    )
    client = session.client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(retries={"mode": "standard"}, request_checksum_calculation=checksums),
    )

    def presign_client() -> Any:
        return session.client(
            "s3", endpoint_url=endpoint_url, config=Config(signature_version="s3v4", s3={"addressing_style": "path"})
        )

    return client, presign_client


_botocore_loader: Any = None


def _botocore_session() -> Any:
    """A new botocore session whose data loader is the process's: botocore parses its S3 service
    model and endpoint rules (~0.07-0.1 s) once per process, not once per client. Sessions keep
    their own credentials and region; the loader only caches botocore's bundled JSON files."""
    import botocore.session

    global _botocore_loader
    session = botocore.session.Session()
    if _botocore_loader is None:
        _botocore_loader = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _botocore_loader)
    return session


def preload_s3() -> None:
    """Parse botocore's S3 models into the process's loader, without a connection or a thread:
    ``WarmRunLauncher``'s zygote calls it (``preload: ["pulse_exports.storage:preload_s3"]``) so
    each forked S3 run builds its client from parsed models."""
    _s3_clients("http://127.0.0.1:9", "preload", "preload", "us-east-1")
