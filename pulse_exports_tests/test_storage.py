"""ExportStore behaviour of the local-folder store and the S3 store against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from pulse_exports.storage import ExportStore, LocalExportStore, MiB, S3ExportStore, preload_s3, store_from_url
from pulse_exports_tests.servers import S3Endpoint


class InjectedUploadFault(Exception):
    """Raised from a botocore event hook to break an upload mid-way."""


def s3_store_from_url(url: str, endpoint: S3Endpoint) -> ExportStore:
    return store_from_url(
        url,
        endpoint_url=endpoint.url,
        access_key_id=endpoint.access_key_id,
        secret_access_key=endpoint.secret_access_key,
        region_name=endpoint.region_name,
    )


@pytest.fixture
def s3_store(s3_endpoint: S3Endpoint, s3_storage_url: str) -> ExportStore:
    return s3_store_from_url(s3_storage_url, s3_endpoint)


@pytest.fixture
def small_part_client(s3_endpoint: S3Endpoint) -> Any:
    return s3_endpoint.client()


@pytest.fixture
def small_part_store(small_part_client: Any, s3_bucket: str) -> S3ExportStore:
    """An S3 store that switches to multipart at 5 MiB (S3's smallest part size)."""
    return S3ExportStore(
        small_part_client, s3_bucket, "exports", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ExportStore:
    if request.param == "local":
        return LocalExportStore(tmp_path / "exports")
    return request.getfixturevalue("s3_store")  # type: ignore[no-any-return]


def unfinished_uploads(client: Any, bucket: str) -> list[str]:
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return sorted(upload["Key"] for upload in uploads)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    with path.open("wb") as f:
        for _ in range(20):
            f.write(os.urandom(MiB))
    return path


def test_put_and_read_back_round_trip(store: ExportStore, tmp_path: Path) -> None:
    source = tmp_path / "part.csv"
    source.write_bytes(b"id,name\n1,a\n")
    store.put_file("tenant-a/exp-1/part-00000.csv", source, content_type="text/csv")
    store.put_bytes("tenant-a/exp-1/manifest.json", b"{}", content_type="application/json")

    assert store.get_bytes("tenant-a/exp-1/part-00000.csv") == b"id,name\n1,a\n"
    assert store.get_bytes("tenant-a/exp-1/manifest.json") == b"{}"
    assert store.exists("tenant-a/exp-1/part-00000.csv")
    assert not store.exists("tenant-a/exp-1/part-00001.csv")
    assert store.size("tenant-a/exp-1/part-00000.csv") == 12
    target = tmp_path / "downloaded.csv"
    store.download_file("tenant-a/exp-1/part-00000.csv", target)
    assert target.read_bytes() == b"id,name\n1,a\n"


def test_put_overwrites_an_existing_key(store: ExportStore) -> None:
    store.put_bytes("t/e/part", b"first")
    store.put_bytes("t/e/part", b"second")
    assert store.get_bytes("t/e/part") == b"second"
    assert store.list_keys("t/") == ["t/e/part"]


def test_missing_key_raises_file_not_found(store: ExportStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.get_bytes("t/missing")
    with pytest.raises(FileNotFoundError):
        store.size("t/missing")
    with pytest.raises(FileNotFoundError):
        store.download_file("t/missing", tmp_path / "x")


def test_list_keys_is_sorted_relative_and_uses_string_prefixes(store: ExportStore) -> None:
    for key in ["b/4", "a/2/x", "ab/3", "a/1"]:
        store.put_bytes(key, b".")
    assert store.list_keys("") == ["a/1", "a/2/x", "ab/3", "b/4"]
    assert store.list_keys("a/") == ["a/1", "a/2/x"]
    assert store.list_keys("a") == ["a/1", "a/2/x", "ab/3"]  # as on S3: a prefix, not a folder
    assert store.list_keys("a/2/x") == ["a/2/x"]
    assert store.list_keys("nothing/") == []


def test_delete_prefix_counts_deletions_and_a_second_delete_finds_nothing(store: ExportStore) -> None:
    for index in range(5):
        store.put_bytes(f"tenant-a/exp-1/part-{index:05d}.csv", b"x")
    store.put_bytes("tenant-a/exp-10/part-00000.csv", b"keep")

    assert store.delete_prefix("tenant-a/exp-1/") == 5
    assert store.delete_prefix("tenant-a/exp-1/") == 0
    assert store.delete_prefix("never-written/") == 0
    assert store.list_keys("") == ["tenant-a/exp-10/part-00000.csv"]


def test_delete_prefix_deletes_more_than_one_batch(s3_store: ExportStore) -> None:
    for index in range(1005):  # DeleteObjects takes at most 1000 keys per call
        s3_store.put_bytes(f"t/e/{index:05d}", b"")
    assert s3_store.delete_prefix("t/") == 1005
    assert s3_store.list_keys("t/") == []


def test_local_delete_prefix_removes_emptied_folders(tmp_path: Path) -> None:
    store = LocalExportStore(tmp_path / "exports")
    store.put_bytes("tenant-a/exp-1/part", b"x")
    store.put_bytes("tenant-a/exp-2/part", b"x")
    store.delete_prefix("tenant-a/exp-1/")
    assert sorted(p.name for p in (tmp_path / "exports" / "tenant-a").iterdir()) == ["exp-2"]


def test_uri_names_the_full_location_of_a_key_or_prefix(s3_store: ExportStore, s3_bucket: str, tmp_path: Path) -> None:
    assert s3_store.location == f"s3://{s3_bucket}/exports"
    assert s3_store.uri("t/e/part 1.csv") == f"s3://{s3_bucket}/exports/t/e/part 1.csv"
    assert s3_store.uri("t/e/") == f"s3://{s3_bucket}/exports/t/e/"
    local = LocalExportStore(tmp_path)
    assert local.location == tmp_path.as_uri()
    assert local.uri("t/e/part 1.csv") == (tmp_path / "t/e/part 1.csv").as_uri()
    assert local.uri("t/e/") == f"{tmp_path.as_uri()}/t/e/"


def test_large_file_goes_up_in_parts_and_reads_back_identical(
    small_part_store: S3ExportStore, big_file: Path, tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    small_part_store.put_file("t/e/big.bin", big_file)

    etag = s3_endpoint.client().head_object(Bucket=s3_bucket, Key="exports/t/e/big.bin")["ETag"]
    assert etag.strip('"').endswith("-4"), etag  # a multipart ETag: md5-of-md5s, dash, part count
    assert small_part_store.size("t/e/big.bin") == 20 * MiB
    target = tmp_path / "back.bin"
    small_part_store.download_file("t/e/big.bin", target)
    assert sha256_of(target) == sha256_of(big_file)


@pytest.fixture
def failing_part_upload(small_part_client: Any) -> Iterator[Any]:
    """Make the small-part store's client fail on the second part of every multipart upload."""
    client = small_part_client

    def fail_second_part(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 2:
            raise InjectedUploadFault("connection reset while sending part 2")

    client.meta.events.register("provide-client-params.s3.UploadPart", fail_second_part)
    yield client
    client.meta.events.unregister("provide-client-params.s3.UploadPart", fail_second_part)


def test_failed_multipart_upload_leaves_no_unfinished_upload(
    small_part_store: S3ExportStore, failing_part_upload: Any, big_file: Path, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    with pytest.raises(InjectedUploadFault):
        small_part_store.put_file("t/e/big.bin", big_file)

    assert unfinished_uploads(s3_endpoint.client(), s3_bucket) == []
    assert not small_part_store.exists("t/e/big.bin")


def test_failed_upload_is_aborted_even_when_the_transfers_own_abort_fails(
    small_part_store: S3ExportStore, failing_part_upload: Any, big_file: Path, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    abort_calls: list[str] = []

    def fail_first_abort(params: dict[str, Any], **_: Any) -> None:
        abort_calls.append(params["UploadId"])
        if len(abort_calls) == 1:
            raise InjectedUploadFault("connection reset while aborting")

    failing_part_upload.meta.events.register("provide-client-params.s3.AbortMultipartUpload", fail_first_abort)
    try:
        with pytest.raises(InjectedUploadFault, match="part 2"):
            small_part_store.put_file("t/e/big.bin", big_file)
    finally:
        failing_part_upload.meta.events.unregister("provide-client-params.s3.AbortMultipartUpload", fail_first_abort)

    assert len(abort_calls) == 2  # s3transfer's abort failed; the store's own sweep did it
    assert unfinished_uploads(s3_endpoint.client(), s3_bucket) == []


def _write_slowly(path: Path, chunks: list[bytes], part_calls: list[int]) -> list[int]:
    """Append ``chunks`` to ``path`` one by one; how many parts had gone up after each append."""
    sent = []
    with path.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            time.sleep(0.3)  # the upload thread polls every 50 ms
            sent.append(len(part_calls))
    return sent


@pytest.fixture
def part_calls(small_part_client: Any) -> Iterator[list[int]]:
    """The part numbers of the UploadPart calls the small-part store's client makes, in order."""
    calls: list[int] = []

    def count(params: dict[str, Any], **_: Any) -> None:
        calls.append(params["PartNumber"])

    small_part_client.meta.events.register("provide-client-params.s3.UploadPart", count)
    yield calls
    small_part_client.meta.events.unregister("provide-client-params.s3.UploadPart", count)


def test_begun_upload_sends_full_chunks_while_the_file_grows(
    small_part_store: S3ExportStore, part_calls: list[int], tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    path = tmp_path / "growing.csv"
    path.touch()
    upload = small_part_store.begin_upload("t/e/part-00000.csv", path, content_type="text/csv")
    chunks = [os.urandom(3 * MiB) for _ in range(5)] + [b"tail"]  # 15 MiB + 4 bytes: three 5 MiB parts, then 4 bytes
    sent_while_writing = _write_slowly(path, chunks, part_calls)
    upload.finish()

    assert sent_while_writing[-1] >= 2, sent_while_writing  # parts went up while the file was being written
    assert part_calls == [1, 2, 3, 4]
    head = s3_endpoint.client().head_object(Bucket=s3_bucket, Key="exports/t/e/part-00000.csv")
    assert head["ETag"].strip('"').endswith("-4") and head["ContentType"] == "text/csv"
    target = tmp_path / "back.csv"
    small_part_store.download_file("t/e/part-00000.csv", target)
    assert target.read_bytes() == b"".join(chunks)
    assert unfinished_uploads(s3_endpoint.client(), s3_bucket) == []


def _sent_headers(client: Any, operation: str) -> list[dict[str, str]]:
    """The HTTP headers of each ``operation`` request the client sends from now on."""
    sent: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        sent.append({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})

    client.meta.events.register(f"before-send.s3.{operation}", record)
    return sent


def test_upload_pieces_are_sent_as_bytes_and_the_object_keeps_its_content_type(
    small_part_store: S3ExportStore, small_part_client: Any, tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    sent = _sent_headers(small_part_client, "UploadPart")
    path = tmp_path / "rows.csv"
    path.write_bytes(b"id,name\r\n" + b"".join(b"%d,device-%d\r\n" % (i, i) for i in range(700_000)))
    upload = small_part_store.begin_upload("t/e/rows.csv", path, content_type="text/csv")
    upload.finish()

    assert len(sent) >= 2 and {h["content-type"] for h in sent} == {"application/octet-stream"}
    head = s3_endpoint.client().head_object(Bucket=s3_bucket, Key="exports/t/e/rows.csv")
    assert head["ContentType"] == "text/csv" and head["ContentLength"] == path.stat().st_size
    assert small_part_store.get_bytes("t/e/rows.csv") == path.read_bytes()


def test_plain_http_endpoints_rely_on_the_signed_sha256_and_https_ones_keep_crc32(
    s3_endpoint: S3Endpoint, s3_storage_url: str, big_file: Path
) -> None:
    store = s3_store_from_url(s3_storage_url, s3_endpoint)
    assert isinstance(store, S3ExportStore) and s3_endpoint.url.startswith("http://")
    pieces, puts = _sent_headers(store._client, "UploadPart"), _sent_headers(store._client, "PutObject")
    store.begin_upload("t/e/big.bin", big_file).finish()  # 20 MiB: 8 MiB pieces of a multipart upload
    store.put_bytes("t/e/small.csv", b"id\r\n1\r\n", content_type="text/csv")
    assert len(pieces) == 3 and len(puts) == 1
    sent = pieces + puts
    assert all(h["x-amz-content-sha256"] != "UNSIGNED-PAYLOAD" for h in sent)  # the body's hash is signed
    assert not [name for h in sent for name in h if name.startswith("x-amz-checksum-")]
    assert {h["content-type"] for h in pieces} == {"application/octet-stream"} and puts[0]["content-type"] == "text/csv"
    target = big_file.with_suffix(".back")
    store.download_file("t/e/big.bin", target)
    assert sha256_of(target) == sha256_of(big_file)

    secure = store_from_url(s3_storage_url, endpoint_url="https://s3.example.invalid", region_name="us-east-1")
    assert isinstance(secure, S3ExportStore)
    assert secure._client.meta.config.request_checksum_calculation == "when_supported"


def test_begun_upload_of_a_small_file_is_one_put(
    small_part_store: S3ExportStore, part_calls: list[int], tmp_path: Path
) -> None:
    path = tmp_path / "small.ndjson"
    upload = small_part_store.begin_upload("t/e/small.ndjson", path)  # not even created yet
    path.write_bytes(b'{"a": 1}\n')
    upload.finish()
    assert part_calls == []
    assert small_part_store.get_bytes("t/e/small.ndjson") == b'{"a": 1}\n'


def test_aborted_or_failed_begun_upload_leaves_no_object_and_no_unfinished_upload(
    small_part_store: S3ExportStore, failing_part_upload: Any, tmp_path: Path, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(12 * MiB))
    upload = small_part_store.begin_upload("t/e/big.bin", path)
    with pytest.raises(InjectedUploadFault, match="part 2"):  # the upload thread's error surfaces at finish
        upload.finish()
    assert unfinished_uploads(s3_endpoint.client(), s3_bucket) == []
    assert not small_part_store.exists("t/e/big.bin")

    aborted = small_part_store.begin_upload("t/e/other.bin", path)
    aborted.abort()
    assert unfinished_uploads(s3_endpoint.client(), s3_bucket) == []
    assert not small_part_store.exists("t/e/other.bin")


def test_local_begun_upload_publishes_at_finish_only(tmp_path: Path) -> None:
    store = LocalExportStore(tmp_path / "exports")
    path = tmp_path / "part.csv"
    path.write_text("a\n1\n")
    upload = store.begin_upload("t/e/part.csv", path)
    assert not store.exists("t/e/part.csv")
    upload.finish()
    assert store.get_bytes("t/e/part.csv") == b"a\n1\n"
    assert not path.exists()  # same filesystem: the part was renamed into place, not copied
    path.write_text("b\n2\n")
    store.begin_upload("t/e/never.csv", path).abort()
    assert not store.exists("t/e/never.csv") and path.exists()


def test_abort_multipart_uploads_aborts_only_uploads_under_the_prefix(
    s3_store: ExportStore, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    client = s3_endpoint.client()
    started = client.create_multipart_upload(Bucket=s3_bucket, Key="exports/t/exp-1/part-00000.csv")
    client.upload_part(
        Bucket=s3_bucket, Key="exports/t/exp-1/part-00000.csv", UploadId=started["UploadId"], PartNumber=1, Body=b"x"
    )
    client.create_multipart_upload(Bucket=s3_bucket, Key="exports/t/exp-2/part-00000.csv")

    assert s3_store.abort_multipart_uploads("t/exp-1/") == 1
    assert s3_store.abort_multipart_uploads("t/exp-1/") == 0
    assert unfinished_uploads(client, s3_bucket) == ["exports/t/exp-2/part-00000.csv"]


def test_local_store_has_no_multipart_uploads_to_abort(tmp_path: Path) -> None:
    assert LocalExportStore(tmp_path).abort_multipart_uploads("t/") == 0


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\\b", "a//b", "a/", "", ".", "a/./b"])
def test_local_store_rejects_keys_that_could_leave_its_root(tmp_path: Path, key: str) -> None:
    store = LocalExportStore(tmp_path / "root")
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    assert not (tmp_path / "x").exists()


def test_local_store_creates_nothing_until_the_first_write(tmp_path: Path) -> None:
    store = LocalExportStore(tmp_path / "exports")
    assert store.list_keys("") == []
    assert not (tmp_path / "exports").exists()


def test_local_published_files_follow_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    store = LocalExportStore(tmp_path / "exports")
    store.put_bytes("t/e/part", b"x")
    assert (tmp_path / "exports/t/e/part").stat().st_mode & 0o777 == 0o666 & ~umask


def test_local_failed_write_leaves_neither_the_key_nor_a_temp_file(tmp_path: Path) -> None:
    store = LocalExportStore(tmp_path / "exports")
    store.put_bytes("t/e/part", b"old")
    with pytest.raises(FileNotFoundError):
        store.put_file("t/e/part", tmp_path / "no-such-file")
    assert store.get_bytes("t/e/part") == b"old"
    assert [p.name for p in (tmp_path / "exports" / "t" / "e").iterdir()] == ["part"]


def test_presigned_url_downloads_without_credentials(s3_store: ExportStore) -> None:
    assert isinstance(s3_store, S3ExportStore)
    s3_store.put_bytes("t/e/part-00000.csv", b"id\n1\n", content_type="text/csv")
    url = s3_store.presigned_url("t/e/part-00000.csv", expires_in=300)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"id\n1\n"
        assert response.headers["Content-Type"] == "text/csv"


def test_s3_endpoint_and_credentials_fall_back_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, s3_endpoint: S3Endpoint, s3_storage_url: str
) -> None:
    monkeypatch.setenv("PULSE_S3_ENDPOINT_URL", s3_endpoint.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the PULSE_ variable wins
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_endpoint.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_endpoint.secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_endpoint.region_name)
    store = store_from_url(s3_storage_url)
    store.put_bytes("t/e/part", b"via env")
    assert store.get_bytes("t/e/part") == b"via env"


def test_stores_in_one_process_share_botocore_models_but_keep_their_own_credentials(
    s3_endpoint: S3Endpoint, s3_storage_url: str
) -> None:
    preload_s3()  # what WarmRunLauncher's zygote runs: parsed models, no connection
    good = s3_store_from_url(s3_storage_url, s3_endpoint)
    wrong = store_from_url(
        s3_storage_url,
        endpoint_url=s3_endpoint.url,
        access_key_id=s3_endpoint.access_key_id,
        secret_access_key="not-the-secret",
        region_name=s3_endpoint.region_name,
    )
    good.put_bytes("t/e/shared", b"ok")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        wrong.get_bytes("t/e/shared")
    assert good.get_bytes("t/e/shared") == b"ok"  # the refused store changed nothing for the other


def test_store_repr_shows_the_location_but_never_the_secret(s3_endpoint: S3Endpoint, s3_storage_url: str) -> None:
    store = store_from_url(
        s3_storage_url, endpoint_url=s3_endpoint.url, access_key_id="AKIDPULSE", secret_access_key="s3cr3t-value"
    )
    assert s3_storage_url in repr(store)
    assert "s3cr3t-value" not in repr(store) and "s3cr3t-value" not in str(store)
    assert s3_endpoint.secret_access_key not in repr(s3_endpoint)


def test_store_from_url_opens_file_urls_and_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_file_url = store_from_url((tmp_path / "a b").as_uri())
    assert isinstance(from_file_url, LocalExportStore) and from_file_url.root == tmp_path / "a b"
    assert store_from_url(str(tmp_path)).location == tmp_path.as_uri()
    monkeypatch.chdir(tmp_path)
    relative = store_from_url("exports")
    assert isinstance(relative, LocalExportStore) and relative.root == tmp_path / "exports"


@pytest.mark.parametrize(
    ("url", "named"),
    [("ftp://host/exports", "'ftp'"), ("gs://bucket/exports", "'gs'"), ("file://otherhost/exports", "file:///")],
)
def test_unsupported_storage_urls_are_rejected_naming_the_problem(url: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        store_from_url(url)
