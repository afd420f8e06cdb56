"""API keys of the product API: each names one tenant; only a SHA-256 hash of the secret is stored.

A secret looks like ``pex_1a2b3c4d_<43 random characters>``. Its first part (``pex_1a2b3c4d``) is
the key's public prefix, shown in listings and accepted by ``revoke``; the secret itself is shown
once, when the key is made. The random part carries 256 bits, so a fast hash is enough: there is
nothing to brute-force, and the lookup by hash is one index probe.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import sql

from pulse_exports.catalog import _TENANT_ID
from pulse_exports.db import PostgresStore, column_list
from pulse_exports.jobstore import json_ready, parse_id

SECRET_PREFIX = "pex_"


@dataclass(frozen=True)
class ApiKey:
    """One row of api_keys, without its hash."""

    id: uuid.UUID
    tenant_id: str
    name: str | None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (ids and times as strings)."""
        return json_ready(self)


def _q(text: str) -> sql.Composed:
    """A query over api_keys with ``{cols}`` standing for ApiKey's columns (never key_hash)."""
    return sql.SQL(text).format(cols=column_list(ApiKey))  # type: ignore[arg-type]


@dataclass(frozen=True)
class NewApiKey:
    """A key just made, with the secret that is never shown again."""

    key: ApiKey
    secret: str = field(repr=False)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class ApiKeyStore(PostgresStore):
    """The api_keys table, over short connections or a pool (the API)."""

    def create(self, tenant_id: str, name: str | None = None) -> NewApiKey:
        """Make a key for ``tenant_id``; the returned secret is the only copy."""
        if not _TENANT_ID.match(tenant_id):
            raise ValueError("tenant id must be 1-128 letters, digits, '.', '_' or '-'")
        with self.connect() as conn:
            for _ in range(5):  # a clash of the 32-bit public prefix is rare; draw again
                prefix = f"{SECRET_PREFIX}{secrets.token_hex(4)}"
                secret = f"{prefix}_{secrets.token_urlsafe(32)}"
                row = conn.execute(
                    _q(
                        "INSERT INTO api_keys (tenant_id, name, prefix, key_hash) VALUES (%s, %s, %s, %s)"
                        " ON CONFLICT (prefix) DO NOTHING RETURNING {cols}"
                    ),
                    (tenant_id, name, prefix, hash_secret(secret)),
                ).fetchone()
                if row:
                    return NewApiKey(ApiKey(**row), secret)
        raise RuntimeError("could not draw an unused key prefix")

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, or None (unknown, malformed or revoked)."""
        if not secret.startswith(SECRET_PREFIX) or len(secret) > 256:
            return None
        with self.connect() as conn:
            row = conn.execute(
                _q("SELECT {cols} FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL"),
                (hash_secret(secret),),
            ).fetchone()
        return ApiKey(**row) if row else None

    def revoke(self, key_id_or_prefix: str) -> ApiKey | None:
        """Revoke a key named by its id or its public prefix; None when no live key matches."""
        key_id = parse_id(key_id_or_prefix)
        with self.connect() as conn:
            row = conn.execute(
                _q(
                    "UPDATE api_keys SET revoked_at = now() WHERE (id = %s OR prefix = %s) AND revoked_at IS NULL"
                    " RETURNING {cols}"
                ),
                (key_id, key_id_or_prefix),
            ).fetchone()
        return ApiKey(**row) if row else None

    def list(self, tenant_id: str | None = None) -> list[ApiKey]:
        with self.connect() as conn:
            rows = conn.execute(
                _q(
                    "SELECT {cols} FROM api_keys"
                    " WHERE %s::text IS NULL OR tenant_id = %s ORDER BY tenant_id, created_at DESC"
                ),
                (tenant_id, tenant_id),
            ).fetchall()
        return [ApiKey(**r) for r in rows]
