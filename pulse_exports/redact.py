"""Keep secrets out of logs, errors and the Dagster UI."""

from __future__ import annotations

import re

_CREDENTIALS_IN_URL = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s]+):[^@\s]+@", re.IGNORECASE)
_PASSWORD_SETTING = re.compile(r"(password\s*=\s*)\S+", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace passwords in URLs (``scheme://user:secret@``) and ``password=...`` settings."""
    return _PASSWORD_SETTING.sub(r"\1***", _CREDENTIALS_IN_URL.sub(r"\1:***@", text))
