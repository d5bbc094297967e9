"""HS256 JSON Web Tokens for the simulator (RFC 7519), with the standard library only.

The simulator signs with a random key per process, so a token from an earlier simulator run is
refused like a revoked one: the client's renew-after-401 path gets exercised for real.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any

__all__ = ["TokenSigner"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Signs and checks the simulator's tokens; ``kind`` keeps the two token types apart."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)

    def __repr__(self) -> str:
        return "TokenSigner(key=***)"

    def sign(self, claims: dict[str, Any]) -> str:
        """A compact JWS of ``claims``."""
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self._key, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{_b64(mac)}"

    def verify(self, token: str, kind: str, now: float | None = None) -> tuple[dict[str, Any] | None, str]:
        """``(claims, "")`` for a valid, unexpired token of ``kind``, else ``(None, reason)``."""
        parts = token.split(".")
        if len(parts) != 3:
            return None, "malformed token"
        try:
            mac = _unb64(parts[2])
            claims = json.loads(_unb64(parts[1]))
        except (ValueError, TypeError):
            return None, "malformed token"
        good = hmac.new(self._key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(mac, good) or not isinstance(claims, dict):
            return None, "invalid signature"
        if claims.get("kind") != kind:
            return None, "wrong token type"
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or exp <= (time.time() if now is None else now):
            return None, "token expired"
        return claims, ""
