"""Socket tokens (PROTOCOL.md section 2): issue for the web app, verify for the servers.

No I/O. Verification accepts only the configured algorithms, requires ``exp``, takes
the identity from ``username`` (or ``sub``), and checks ``aud``/``iss`` when set.
``exp``, ``iat`` and ``nbf`` must be JSON numbers: PyJWT alone would take ``"9999999999"``
(a string) or ``true`` for a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from .settings import ASYMMETRIC_ALGORITHMS, Settings
from .protocol import ProtocolError, check_username

if TYPE_CHECKING:
    from jwt.types import Options

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


# Seconds of clock skew tolerated between the token issuer and the servers.
LEEWAY = 5
# A NumericDate beyond this (2**53, the largest integer a browser holds exactly) is no time.
_MAX_NUMERIC_DATE = 2**53


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What a valid token says: who, until when (``exp``, seconds since the epoch), and
    all of its claims (for ``channels`` and the like)."""

    username: str
    expires_at: float
    claims: dict[str, Any]


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """The claim ``name`` as seconds since the epoch, None when absent. RFC 7519 makes it a
    JSON number: a string, a bool, null, NaN or an absurd value is refused."""
    if name not in claims:
        return None
    value = claims[name]
    if type(value) not in (int, float) or not abs(value) <= _MAX_NUMERIC_DATE:  # NaN too
        raise TokenError(INVALID, f"{name} claim must be a number of seconds since the epoch")
    return float(value)


class TokenVerifier:
    """Verifies tokens against one settings object; builds the key once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._key = _verifying_key(settings)
        self._algorithms = list(settings.jwt_algorithms)
        # The time claims are checked here (_check_times), where their types are checked
        # first; PyJWT's own checks would convert them with int() and accept strings.
        self._options: Options = {
            "require": ["exp"],
            "verify_aud": bool(settings.jwt_audience),
            "verify_exp": False,
            "verify_iat": False,
            "verify_nbf": False,
        }

    def verify(self, token: str) -> str:
        """The token's username, or TokenError with an AUTH FAILED reason."""
        return self.verify_claims(token).username

    def verify_claims(self, token: str) -> VerifiedToken:
        """The token's username, expiry and claims, or TokenError with an AUTH FAILED reason."""
        # A JWT is ASCII (base64url and dots); anything else would reach PyJWT's encode.
        if not isinstance(token, str) or token.count(".") != 2 or not token.isascii():
            raise TokenError(MALFORMED, "not a JWT (expected three dot-separated base64url parts)")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._settings.jwt_audience or None,
                issuer=self._settings.jwt_issuer or None,
                options=self._options,
            )
        except jwt.DecodeError as exc:
            # Bad base64/JSON structure is malformed; a bad signature is invalid.
            reason = INVALID if isinstance(exc, jwt.InvalidSignatureError) else MALFORMED
            raise TokenError(reason, str(exc)) from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(INVALID, str(exc)) from None
        except (ValueError, RecursionError) as exc:
            # Hostile text PyJWT might not wrap in its own errors (none known in 2.15).
            raise TokenError(MALFORMED, f"unreadable token: {type(exc).__name__}") from None
        expires_at = self._check_times(claims)
        try:
            username = check_username(claims.get("username", claims.get("sub")))
        except ProtocolError as exc:
            raise TokenError(INVALID, f"username claim: {exc}") from None
        return VerifiedToken(username, expires_at, claims)

    @staticmethod
    def _check_times(claims: dict[str, Any]) -> float:
        exp = _numeric_date(claims, "exp")
        iat = _numeric_date(claims, "iat")
        nbf = _numeric_date(claims, "nbf")
        if exp is None:  # PyJWT requires it; kept so that the type says float
            raise TokenError(INVALID, 'token is missing the "exp" claim')
        now = time.time()
        if exp <= now - LEEWAY:
            raise TokenError(EXPIRED, "token has expired")
        if nbf is not None and nbf > now + LEEWAY:
            raise TokenError(INVALID, "token is not yet valid (nbf)")
        if iat is not None and iat > now + LEEWAY:
            raise TokenError(INVALID, "token is not yet valid (iat)")
        return exp
