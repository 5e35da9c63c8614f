"""Channel grants (PROTOCOL.md section 9), with no I/O.

Who may receive a channel is decided by the application, never assumed. It says so in
one of two ways:

- the connection token's ``channels`` claim, a list of exact names (``"doc:42"``) and
  trailing patterns (``"team:7:*"``: every channel below ``team:7``, never ``team:7``
  itself nor ``team:70:x``), parsed into :class:`Grants` by :func:`connection_grants`;
- a subscription token, a JWT for one user and one exact ``channel``, checked by
  :func:`verify_subscription`.

:func:`authorize` makes the whole SUBSCRIBE decision from both and answers every refusal
with a :class:`SubscribeRefused` carrying its SUBSCRIBE FAILED reason. The same pattern
syntax selects the presence-enabled channels (``FLOW_PRESENCE_CHANNELS``,
:func:`parse_presence_channels`).

Every message of a ProtocolError, ValueError or SubscribeRefused raised here is safe to
show a client: it quotes at most 40 characters of the input, escaped.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import ClassVar

from .protocol import CHANNEL_RE, MAX_CHANNEL_BYTES, ProtocolError, check_channel
from .protocol import shown_name as _shown
from .settings import Settings
from .tokens import EXPIRED, INVALID, MALFORMED, TokenError, TokenVerifier, VerifiedToken, issue_token

__all__ = [
    "ALREADY_SUBSCRIBED", "CHANNEL_RE", "FORBIDDEN", "Grants", "INVALID_CHANNEL", "LIMIT",
    "MAX_CHANNEL_BYTES", "MAX_GRANTS", "REASONS", "SubscribeRefused", "TEMPORARY_REASONS",
    "TOKEN_EXPIRED", "TOKEN_INVALID", "UNAVAILABLE", "authorize", "check_channel",
    "connection_grants", "issue_subscription_token", "parse_presence_channels",
    "presence_enabled", "presence_grants", "verify_subscription",
]

# Entries of one `channels` claim (or of FLOW_PRESENCE_CHANNELS). A token is sent on every
# connect; a claim this long is a bug in the app, and a bigger one only costs the server.
MAX_GRANTS = 1024

# SUBSCRIBE FAILED reasons (section 9).
FORBIDDEN = "forbidden"
TOKEN_EXPIRED = "token_expired"
TOKEN_INVALID = "token_invalid"
INVALID_CHANNEL = "invalid_channel"
LIMIT = "limit"
ALREADY_SUBSCRIBED = "already_subscribed"
UNAVAILABLE = "unavailable"
REASONS: frozenset[str] = frozenset(
    {FORBIDDEN, TOKEN_EXPIRED, TOKEN_INVALID, INVALID_CHANNEL, LIMIT, ALREADY_SUBSCRIBED, UNAVAILABLE}
)
# A client may try these again (with a new token, or later); the others are final.
TEMPORARY_REASONS: frozenset[str] = frozenset({TOKEN_EXPIRED, UNAVAILABLE})

# ---------------------------------------------------------------- grants


@dataclass(frozen=True, slots=True)
class Grants:
    """The channels a socket may subscribe to without a subscription token.

    ``exact`` holds whole names; ``prefixes`` holds each pattern's base with its colon
    (``"team:7:*"`` is kept as ``"team:7:"``). Build it with :meth:`parse`; the empty
    value is :attr:`Grants.NONE`. Immutable and hashable, so a Settings field may hold it.
    """

    exact: frozenset[str]
    prefixes: frozenset[str]

    NONE: ClassVar[Grants]

    @classmethod
    def parse(cls, claim: object) -> Grants:
        """Grants from a ``channels`` claim: a list (or tuple) of at most 1024 names and
        ``name:*`` patterns. ValueError with a short reason, safe to show, for anything else:
        not a list, an entry not a string, a bad name or pattern, a bare ``*``, too many."""
        if isinstance(claim, str):
            raise ValueError("must be a list of channel names and patterns, not a string")
        if not isinstance(claim, (list, tuple)):
            raise ValueError(f"must be a list of channel names and patterns, not {type(claim).__name__}")
        # Counted before anything is read: a huge claim is refused in constant time.
        if len(claim) > MAX_GRANTS:
            raise ValueError(f"has {len(claim)} entries, more than the {MAX_GRANTS} allowed")
        exact: set[str] = set()
        prefixes: set[str] = set()
        for index, entry in enumerate(claim):
            if not isinstance(entry, str):
                raise ValueError(f"entry {index} is not a string but {type(entry).__name__}")
            entry = str.__str__(entry)
            try:
                if entry == "*":
                    raise ProtocolError(
                        "'*' alone would grant every channel; name channels, or a prefix as in 'team:7:*'"
                    )
                if entry.endswith(":*"):
                    if len(entry) > MAX_CHANNEL_BYTES:
                        raise ProtocolError(f"pattern {_shown(entry)} is longer than {MAX_CHANNEL_BYTES} bytes")
                    prefixes.add(check_channel(entry[:-2]) + ":")
                else:
                    exact.add(check_channel(entry))
            except ProtocolError as exc:
                raise ValueError(f"entry {index}: {exc}") from None
        if not exact and not prefixes:
            return cls.NONE
        return cls(frozenset(exact), frozenset(prefixes))

    @property
    def entries(self) -> tuple[str, ...]:
        """The names and patterns granted, sorted (what :meth:`parse` would take back)."""
        return tuple(sorted(self.exact | {prefix + "*" for prefix in self.prefixes}))

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)

    def allows(self, channel: object) -> bool:
        """Whether ``channel`` is granted: an exact name, or below a pattern's base.

        One set lookup for the name and one per ancestor (``a:b:c`` asks ``a:`` and
        ``a:b:``), never a scan of the patterns: linear in the name's length, whatever the
        number of grants. Anything that is not a channel name is never granted."""
        if not isinstance(channel, str):
            return False
        if type(channel) is not str:
            channel = str.__str__(channel)
        if len(channel) > MAX_CHANNEL_BYTES or not CHANNEL_RE.fullmatch(channel):
            return False
        if channel in self.exact:
            return True
        if not self.prefixes:
            return False
        # The last part is never empty in a checked name, so every ancestor found here is
        # a strict prefix: "team:7:" never grants "team:7".
        at = channel.find(":")
        while at >= 0:
            if channel[: at + 1] in self.prefixes:
                return True
            at = channel.find(":", at + 1)
        return False


Grants.NONE = Grants(frozenset(), frozenset())


def connection_grants(verified: VerifiedToken) -> Grants:
    """The grants of a connection token (its ``channels`` claim; absent: none).

    TokenError (an AUTH FAILED reason, section 9: the whole AUTH fails) when the claim is
    malformed (``malformed``), or when the token carries ``channel``, which makes it a
    subscription token (``invalid``)."""
    claims = verified.claims
    if "channel" in claims:
        raise TokenError(INVALID, "a subscription token (with a channel claim) is not a connection token")
    if "channels" not in claims:
        return Grants.NONE
    try:
        return Grants.parse(claims["channels"])
    except ValueError as exc:
        raise TokenError(MALFORMED, f"channels claim {exc}") from None


# ---------------------------------------------------------------- subscription tokens


class SubscribeRefused(Exception):
    """A SUBSCRIBE refused: ``reason`` is a SUBSCRIBE FAILED reason (section 9), ``detail``
    says why in words safe to show and log, ``temporary`` whether trying again may help
    (by default: true for ``token_expired`` and ``unavailable``)."""

    def __init__(self, reason: str, detail: str, temporary: bool | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"not a SUBSCRIBE FAILED reason: {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.temporary = reason in TEMPORARY_REASONS if temporary is None else temporary


def verify_subscription(verifier: TokenVerifier, token: object, username: str, channel: str) -> float:
    """The expiry (``exp``, seconds since the epoch) of a valid subscription token for
    ``username`` (the socket's user) and ``channel`` (a checked name), else
    SubscribeRefused: ``token_expired`` (temporary: fetch a new one) or ``token_invalid``.

    The token follows section 2 (signature, algorithms, ``exp`` required, ``aud``/``iss``)
    and carries ``channel``, exactly the subscribed name; a token with a ``channels``
    claim is a connection token and is refused. Like every token, one that expired less
    than tokens.LEEWAY seconds ago still passes, so the expiry returned may be just past."""
    if not isinstance(token, str):
        raise SubscribeRefused(TOKEN_INVALID, f"the subscription token must be a string, not {type(token).__name__}")
    try:
        verified = verifier.verify_claims(token)
    except TokenError as exc:
        if exc.reason == EXPIRED:
            raise SubscribeRefused(TOKEN_EXPIRED, "the subscription token has expired") from None
        raise SubscribeRefused(TOKEN_INVALID, f"subscription token refused: {exc.detail}") from None
    claims = verified.claims
    if "channels" in claims:
        raise SubscribeRefused(TOKEN_INVALID, "a connection token (with a channels claim) is not a subscription token")
    if "channel" not in claims:
        raise SubscribeRefused(TOKEN_INVALID, "the token has no channel claim")
    if verified.username != username:
        raise SubscribeRefused(TOKEN_INVALID, "the subscription token is for another user")
    granted = claims["channel"]
    if type(granted) is not str:
        raise SubscribeRefused(TOKEN_INVALID, "the token's channel claim is not a string")
    if granted != channel:
        if granted.endswith("*"):
            raise SubscribeRefused(TOKEN_INVALID, "a subscription token names one exact channel, not a pattern")
        raise SubscribeRefused(TOKEN_INVALID, "the subscription token is for another channel")
    return verified.expires_at


def authorize(grants: Grants, verifier: TokenVerifier, username: str, channel: object,
              token: object | None) -> float | None:
    """The whole SUBSCRIBE decision for a socket of ``username`` holding ``grants``.

    The channel name first (``invalid_channel``). Then, when the client sent a token, that
    token alone decides (its ``exp`` is returned: the subscription ends with it), even if
    the grants would allow the channel: a client that sends a token is told what is wrong
    with it. Without one, the grants: None means no expiry beyond the connection's own.
    Else ``forbidden``. Every refusal is a SubscribeRefused."""
    try:
        name = check_channel(channel)
    except ProtocolError as exc:
        raise SubscribeRefused(INVALID_CHANNEL, str(exc)) from None
    if token is not None:
        return verify_subscription(verifier, token, username, name)
    if grants.allows(name):
        return None
    raise SubscribeRefused(FORBIDDEN, "no grant for this channel: the application must grant it "
                                      "(the channels claim, or a subscription token)")


def issue_subscription_token(settings: Settings, username: str, channel: str, ttl: int | None = None) -> str:
    """A subscription token for ``username`` and exactly ``channel``, valid ``ttl`` seconds
    (default FLOW_TOKEN_TTL). ProtocolError for a bad channel name or username."""
    return issue_token(settings, username, ttl, extra={"channel": check_channel(channel)})


# ---------------------------------------------------------------- presence


def parse_presence_channels(raw: str) -> Grants:
    """FLOW_PRESENCE_CHANNELS: comma-separated names and ``name:*`` patterns (the syntax of
    the ``channels`` claim; blank: none). ValueError with a reason for a bad value, for the
    settings loader to report with the variable's name."""
    entries = [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return Grants.parse(entries)
    except ValueError as exc:
        raise ValueError(f"a comma-separated list of channel names and patterns ('doc:42,team:*'): {exc}") from None


def presence_enabled(patterns: Grants, channel: str) -> bool:
    """Whether ``channel`` keeps presence (it matches FLOW_PRESENCE_CHANNELS)."""
    return patterns.allows(channel)


@functools.lru_cache(maxsize=8)
def presence_grants(entries: tuple[str, ...]) -> Grants:
    """Settings.presence_channels (checked when the settings were loaded), parsed once."""
    return Grants.parse(list(entries))
