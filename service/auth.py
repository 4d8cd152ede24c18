"""Optional API keys: header `X-API-Key`, compared in constant time, never logged.

With no keys configured (development) every request passes. Health, readiness and metrics stay
open so orchestrators and Prometheus need no secret.
"""
from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import Unauthorized

_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of FACESET_API_KEYS")


def key_matches(given: str, keys) -> bool:
    """Whether `given` is one of `keys` (SecretStr); every key is compared, so timing reveals nothing."""
    given_b = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given_b, key.get_secret_value().encode())
    return found


def require_api_key(request: Request, key: Annotated[str | None, Security(_header)] = None) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if key is None:
        raise Unauthorized("missing X-API-Key header")
    if not key_matches(key, keys):
        raise Unauthorized("invalid API key")


Authenticated = Depends(require_api_key)
