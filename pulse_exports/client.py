"""A small typed client of the product API, over httpx.

with PulseExportsClient("https://exports.example.com", api_key) as client:
    created = client.create("telemetry", format="parquet", filters={"time_range": "7d"})
    done = client.wait(created.export_id)
    files = client.download(done.id, Path("./export"))
"""

from __future__ import annotations

import builtins
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from pulse_exports.api.schemas import (
    DownloadManifest,
    ExportCreated,
    ExportPage,
    ExportPublic,
    ExportTypePublic,
    Health,
)

API_PREFIX = "/api/v1"
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "EXPIRED"})


class PulseExportsError(Exception):
    """The API answered with an error status; ``detail`` is its explanation (or validation errors)."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class PulseExportsClient:
    """The product API for one tenant (the one its API key belongs to)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )
        # Presigned URLs carry their own signature: they must not also get the API key.
        self._plain = httpx.Client(timeout=timeout, transport=transport, follow_redirects=True)

    @classmethod
    def from_env(cls, **kwargs: Any) -> PulseExportsClient:
        """A client for ``PULSE_API_URL`` with ``PULSE_API_KEY``."""
        url, key = os.environ.get("PULSE_API_URL"), os.environ.get("PULSE_API_KEY")
        if not url or not key:
            raise ValueError("set PULSE_API_URL and PULSE_API_KEY")
        return cls(url, key, **kwargs)

    def close(self) -> None:
        self._api.close()
        self._plain.close()

    def __enter__(self) -> PulseExportsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._api.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise PulseExportsError(response.status_code, detail)
        return response

    # -- exports ----------------------------------------------------------------------------
    def create(
        self,
        export_type: str,
        *,
        format: str = "csv",
        compression: str | None = None,
        columns: builtins.list[str] | None = None,
        filters: dict[str, Any] | None = None,
        row_limit: int | None = None,
        options: dict[str, Any] | None = None,
        callback_url: str | None = None,
        expires_in: int | None = None,
        idempotency_key: str | None = None,
    ) -> ExportCreated:
        body = {
            "export_type": export_type,
            "format": format,
            "compression": compression,
            "columns": columns,
            "filters": filters,
            "row_limit": row_limit,
            "options": options,
            "callback_url": callback_url,
            "expires_in": expires_in,
        }
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self._request(
            "POST", "/exports", json={k: v for k, v in body.items() if v is not None}, headers=headers
        )
        return ExportCreated.model_validate(response.json())

    def get(self, export_id: uuid.UUID | str) -> ExportPublic:
        return ExportPublic.model_validate(self._request("GET", f"/exports/{export_id}").json())

    def list(
        self,
        *,
        limit: int = 50,
        cursor: str | None = None,
        status: builtins.list[str] | None = None,
        export_type: builtins.list[str] | None = None,
    ) -> ExportPage:
        params: dict[str, Any] = {"limit": limit, "status": status or [], "type": export_type or []}
        if cursor:
            params["cursor"] = cursor
        return ExportPage.model_validate(self._request("GET", "/exports", params=params).json())

    def wait(self, export_id: uuid.UUID | str, *, timeout: float = 600.0, interval: float = 1.0) -> ExportPublic:
        """Poll until the export has finished (COMPLETED, FAILED, CANCELLED or EXPIRED)."""
        deadline = time.monotonic() + timeout
        while True:
            export = self.get(export_id)
            if export.status.value in FINISHED:
                return export
            if time.monotonic() >= deadline:
                raise TimeoutError(f"export {export_id} is still {export.status.value} after {timeout}s")
            time.sleep(interval)

    def cancel(self, export_id: uuid.UUID | str) -> ExportPublic:
        return ExportPublic.model_validate(self._request("DELETE", f"/exports/{export_id}").json())

    def manifest(self, export_id: uuid.UUID | str) -> DownloadManifest:
        """The parts of a COMPLETED export, with a download URL each."""
        response = self._request("GET", f"/exports/{export_id}/download", params={"manifest": "true"})
        return DownloadManifest.model_validate(response.json())

    def download(self, export_id: uuid.UUID | str, out_dir: Path) -> builtins.list[Path]:
        """Fetch every part into ``out_dir``, checking each against the manifest's sha256."""
        manifest = self.manifest(export_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for part in manifest.parts:
            target = out_dir / Path(part.file).name
            digest = hashlib.sha256()
            http = self._api if part.url.startswith(self.base_url + "/") else self._plain
            with http.stream("GET", part.url) as response, target.open("wb") as out:
                if response.status_code >= 400:
                    raise PulseExportsError(response.status_code, f"download of {part.file} failed")
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != part.sha256:
                target.unlink()
                raise PulseExportsError(200, f"{part.file}: sha256 {digest.hexdigest()} does not match the manifest")
            files.append(target)
        return files

    # -- the rest -----------------------------------------------------------------------------
    def export_types(self) -> builtins.list[ExportTypePublic]:
        return [ExportTypePublic.model_validate(t) for t in self._request("GET", "/export-types").json()]

    def health(self) -> Health:
        """The API's health answer (also when it is 503)."""
        response = self._api.get("/health")
        return Health.model_validate(response.json())
