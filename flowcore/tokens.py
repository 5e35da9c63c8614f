"""Socket tokens (PROTOCOL.md section 2): issue for the web app, verify for the servers.

No I/O. Verification accepts only the configured algorithms, requires ``exp``, takes
the identity from ``username`` (or ``sub``), and checks ``aud``/``iss`` when set.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from .settings import ASYMMETRIC_ALGORITHMS, Settings
from .protocol import ProtocolError, check_username

EXPIRED = "expired"
INVALID = "invalid"
MALFORMED = "malformed"


class TokenError(Exception):
    """A token was refused; ``reason`` is one of the AUTH FAILED reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _signing_key(settings: Settings) -> str:
    if settings.jwt_algorithms[0] in ASYMMETRIC_ALGORITHMS:
        if not settings.jwt_private_key:
            raise RuntimeError("FLOW_JWT_PRIVATE_KEY is needed to issue tokens with " + settings.jwt_algorithms[0])
        return settings.jwt_private_key
    return settings.secret


def _verifying_key(settings: Settings) -> Any:
    if settings.jwt_algorithms[0] in ASYMMETRIC_ALGORITHMS:
        if settings.jwt_public_key:
            return settings.jwt_public_key
        # Only a private key configured: derive its public half.
        from cryptography.hazmat.primitives import serialization

        private = serialization.load_pem_private_key(settings.jwt_private_key.encode(), None)
        return private.public_key()
    return settings.secret


def issue_token(settings: Settings, username: str, ttl: int | None = None) -> str:
    """A signed token for ``username``, valid ``ttl`` seconds (default FLOW_TOKEN_TTL)."""
    check_username(username)
    now = int(time.time())
    claims: dict[str, Any] = {
        "username": username,
        "iat": now,
        "exp": now + (settings.token_ttl if ttl is None else ttl),
    }
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, _signing_key(settings), algorithm=settings.jwt_algorithms[0])


class TokenVerifier:
    """Verifies tokens against one settings object; builds the key once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._key = _verifying_key(settings)
        self._algorithms = list(settings.jwt_algorithms)
        self._options = {"require": ["exp"], "verify_aud": bool(settings.jwt_audience)}

    def verify(self, token: str) -> str:
        """The token's username, or TokenError with an AUTH FAILED reason."""
        if not isinstance(token, str) or token.count(".") != 2:
            raise TokenError(MALFORMED, "not a JWT (expected three dot-separated parts)")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._settings.jwt_audience or None,
                issuer=self._settings.jwt_issuer or None,
                options=self._options,
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError(EXPIRED, "token has expired") from None
        except jwt.DecodeError as exc:
            # Bad base64/JSON structure is malformed; a bad signature is invalid.
            reason = INVALID if isinstance(exc, jwt.InvalidSignatureError) else MALFORMED
            raise TokenError(reason, str(exc)) from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(INVALID, str(exc)) from None
        username = claims.get("username", claims.get("sub"))
        try:
            check_username(username)
        except ProtocolError as exc:
            raise TokenError(INVALID, f"username claim: {exc}") from None
        return username
