"""Socket tokens (PROTOCOL.md section 2): issue for the web app, verify for the servers.

No I/O. Verification accepts only the configured algorithms, requires ``exp``, takes
the identity from ``username`` (or ``sub``), and checks ``aud``/``iss`` when set.
``exp``, ``iat`` and ``nbf`` must be JSON numbers: PyJWT alone would take ``"9999999999"``
(a string) or ``true`` for a time.

Keys are read with PyJWT's own algorithm objects (``prepare_key``), for every configured
algorithm: :func:`verifying_key` and :func:`signing_key` raise a one-line SettingsError
naming the variable when a key cannot do its role's job (Settings.check_verifier and
check_issuer call them at start). A verifier built on a key that cannot verify refuses
every token (``invalid``; the socket then closes 4001) and logs the cause once.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, NoReturn

import jwt

from .settings import ASYMMETRIC_ALGORITHMS, MIN_SECRET_BYTES, SYMMETRIC_ALGORITHMS, Settings, SettingsError
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


log = logging.getLogger("flow.tokens")

# What each family of algorithms needs, for the error sentences.
_KEY_KINDS = {
    "RS": "an RSA key", "PS": "an RSA key", "ES256": "an EC key on curve P-256",
    "ES384": "an EC key on curve P-384", "ES512": "an EC key on curve P-521",
    "EdDSA": "an Ed25519 or Ed448 key",
}


def _kind(algorithm: str) -> str:
    return _KEY_KINDS.get(algorithm, _KEY_KINDS.get(algorithm[:2], "a matching key"))


def _check_family(settings: Settings) -> None:
    symmetric = [a for a in settings.jwt_algorithms if a in SYMMETRIC_ALGORITHMS]
    if symmetric and len(symmetric) < len(settings.jwt_algorithms):
        raise SettingsError(
            "FLOW_JWT_ALGORITHMS: mixing HS* with public-key algorithms lets a public key "
            "be used as an HMAC secret; choose one family"
        )


def _check_secret(settings: Settings, job: str) -> bytes:
    minimum = max(MIN_SECRET_BYTES[a] for a in settings.jwt_algorithms)
    if len(settings.secret.encode()) < minimum:
        raise SettingsError(
            f"FLOW_SECRET: missing or shorter than {minimum} bytes (needed to {job} "
            f"{','.join(settings.jwt_algorithms)} tokens; run `make secret`, or set FLOW_SECRET)"
        )
    for algorithm in settings.jwt_algorithms:
        _prepare(algorithm, settings.secret, "FLOW_SECRET", job)
    return settings.secret.encode()


def _prepare(algorithm: str, key: str, variable: str, job: str) -> Any:
    """PyJWT's key object for ``algorithm`` made from ``key``, or SettingsError saying why not."""
    try:
        return jwt.get_algorithm_by_name(algorithm).prepare_key(key)
    except NotImplementedError:
        raise SettingsError(
            f"FLOW_JWT_ALGORITHMS: {algorithm} needs the 'cryptography' package (pip install cryptography)"
        ) from None
    except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
        text = str(exc)
        got = re.search(r"got: (\w+)", text)
        if got:
            why = f"it holds an {got.group(1)}, and {algorithm} needs {_kind(algorithm)}"
        elif "does not match the expected curve" in text:
            why = text.rstrip(".")
        elif "HMAC secret" in text:
            why = "it looks like a PEM key or certificate, which must not be an HMAC secret"
        else:
            why = f"it is not a readable PEM key ({algorithm} needs {_kind(algorithm)})"
        raise SettingsError(f"{variable}: cannot {job} {algorithm} tokens: {why}") from None


def verifying_key(settings: Settings) -> Any:
    """The key that verifies every configured algorithm: the HS* secret, or the public key
    (FLOW_JWT_PUBLIC_KEY, else the public half of FLOW_JWT_PRIVATE_KEY). SettingsError,
    naming the variable and the algorithm, when there is none or it cannot."""
    _check_family(settings)
    algorithms = settings.jwt_algorithms
    if algorithms[0] in SYMMETRIC_ALGORITHMS:
        return _check_secret(settings, "verify")
    if settings.jwt_public_key:
        variable, pem = "FLOW_JWT_PUBLIC_KEY", settings.jwt_public_key
    elif settings.jwt_private_key:
        variable, pem = "FLOW_JWT_PRIVATE_KEY", settings.jwt_private_key
    else:
        raise SettingsError(
            f"FLOW_JWT_PUBLIC_KEY: required to verify {','.join(algorithms)} tokens (PEM text or a file path)"
        )
    key: Any = None
    for algorithm in algorithms:
        prepared = _prepare(algorithm, pem, variable, "verify")
        if hasattr(prepared, "public_key"):  # a private key
            if variable == "FLOW_JWT_PUBLIC_KEY":
                raise SettingsError(
                    "FLOW_JWT_PUBLIC_KEY: holds a private key; give the servers only its public half"
                )
            prepared = prepared.public_key()
        key = key or prepared
    return key


def signing_key(settings: Settings) -> Any:
    """The key that signs tokens with the first configured algorithm: the HS* secret or the
    private key. SettingsError naming the variable when there is none or it cannot sign,
    or when it is not the private half of FLOW_JWT_PUBLIC_KEY."""
    _check_family(settings)
    algorithm = settings.jwt_algorithms[0]
    if algorithm in SYMMETRIC_ALGORITHMS:
        return _check_secret(settings, "sign")
    if not settings.jwt_private_key:
        held = "; FLOW_JWT_PUBLIC_KEY can verify tokens but not sign them" if settings.jwt_public_key else ""
        raise SettingsError(f"FLOW_JWT_PRIVATE_KEY: required to issue {algorithm} tokens{held}")
    key = _prepare(algorithm, settings.jwt_private_key, "FLOW_JWT_PRIVATE_KEY", "sign")
    if not hasattr(key, "public_key"):
        raise SettingsError(f"FLOW_JWT_PRIVATE_KEY: holds a public key, which cannot sign {algorithm} tokens")
    if settings.jwt_public_key:
        try:
            public = _prepare(algorithm, settings.jwt_public_key, "FLOW_JWT_PUBLIC_KEY", "verify")
        except SettingsError:
            public = None  # the verifier's problem, reported by its own check
        if public is not None and not hasattr(public, "public_key") and _spki(public) != _spki(key.public_key()):
            raise SettingsError(
                "FLOW_JWT_PRIVATE_KEY: is not the private half of FLOW_JWT_PUBLIC_KEY "
                "(the servers would refuse every token)"
            )
    return key


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


@functools.lru_cache(maxsize=8)
def _cached_signing_key(settings: Settings) -> Any:
    # Loading an RSA private key takes milliseconds: once per settings, not per token.
    return signing_key(settings)


def issue_token(settings: Settings, username: str, ttl: int | None = None,
                extra: Mapping[str, Any] | None = None) -> str:
    """A signed token for ``username``, valid ``ttl`` seconds (default FLOW_TOKEN_TTL).
    ``extra`` claims ride along; the ones Flow sets itself win over them."""
    check_username(username)
    now = int(time.time())
    claims: dict[str, Any] = {
        **(extra or {}),
        "username": username,
        "iat": now,
        "exp": now + (settings.token_ttl if ttl is None else ttl),
    }
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    try:
        key = _cached_signing_key(settings)
    except SettingsError as exc:
        # A programming or deployment error, not the caller's input: Settings.check_issuer
        # at start reports it as one line.
        raise RuntimeError(str(exc)) from None
    return jwt.encode(claims, key, algorithm=settings.jwt_algorithms[0])


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
        # A key that cannot verify is the deployment's error, not the client's: every
        # token is refused (Settings.check_verifier stops the server at start before this).
        self._key_problem: str | None = None
        self._key_logged = False
        try:
            self._key: Any = verifying_key(settings)
        except SettingsError as exc:
            self._key = None
            self._key_problem = str(exc)
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
        if self._key_problem is not None:
            self._cannot_verify(self._key_problem)
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
        except (jwt.InvalidKeyError, NotImplementedError) as exc:
            # The key, not the token: PyJWT raises these outside InvalidTokenError.
            self._cannot_verify(f"the configured key cannot verify this token's algorithm: {exc}")
        except (ValueError, RecursionError) as exc:
            # Hostile text PyJWT might not wrap in its own errors (none known in 2.15).
            raise TokenError(MALFORMED, f"unreadable token: {type(exc).__name__}") from None
        expires_at = self._check_times(claims)
        try:
            username = check_username(claims.get("username", claims.get("sub")))
        except ProtocolError as exc:
            raise TokenError(INVALID, f"username claim: {exc}") from None
        return VerifiedToken(username, expires_at, claims)

    def _cannot_verify(self, problem: str) -> NoReturn:
        if not self._key_logged:
            self._key_logged = True
            log.error("cannot verify tokens, every token is refused: %s", problem)
        raise TokenError(INVALID, "the server cannot verify tokens (its key is misconfigured)")

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
