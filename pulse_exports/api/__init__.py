"""The product API: tenants create, follow, download and cancel exports over HTTP.

``create_app`` is the factory (``uvicorn --factory pulse_exports.api:create_app``); importing this
package is light, so the typed client can share the response models in ``api.schemas``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pulse_exports.api.settings import ApiSettings


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app, configured from ``settings`` or else from the PULSE_* environment."""
    from pulse_exports.api.app import build_app

    return build_app(settings)
