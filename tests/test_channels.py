"""Unit tests for flowcore.channels (PROTOCOL.md section 9: names, grants, subscription
tokens, the SUBSCRIBE decision, presence patterns). No I/O: plain values, and real PyJWT
tokens signed with a test deployment's own secret."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from flowcore import protocol
from flowcore.channels import (
    CHANNEL_RE,
    MAX_GRANTS,
    REASONS,
    Grants,
    SubscribeRefused,
    authorize,
    check_channel,
    connection_grants,
    issue_subscription_token,
    parse_presence_channels,
    presence_enabled,
    verify_subscription,
)
from flowcore.protocol import ProtocolError
from flowcore.settings import Settings, load_settings
from flowcore.tokens import LEEWAY, TokenError, TokenVerifier, issue_token
from support import base_env

OTHER_SECRET = "another-deployment-" + "z" * 45


@pytest.fixture
def settings(tmp_path) -> Settings:
    return load_settings(base_env(tmp_path))


@pytest.fixture
def verifier(settings) -> TokenVerifier:
    return TokenVerifier(settings)


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def b64url(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def refused(call, *args) -> SubscribeRefused:
    with pytest.raises(SubscribeRefused) as info:
        call(*args)
    assert info.value.reason in REASONS
    assert str(info.value) == f"{info.value.reason}: {info.value.detail}"
    return info.value


# ---------------------------------------------------------------- channel names

VALID_NAMES = [
    "doc:42", "a", "A-Z_a-z_0-9", "x=y@z.w", "team:7:x:y", "-", ".", "...:@@@:===",
    "x" * 255, "a:" + "b" * 253, ":".join("a" * 128),
]

INVALID_NAMES = [
    "", ":", "doc:", ":doc", "doc::42", "doc:42:", "doc 42", "doc/42", "doc#1", "doc?x",
    "x" * 256, "a:" + "b" * 254, "doc:42\n", "doc:42\r\n", "\ndoc", "doc\0", "doc\0:42", "\0",
    "d\u043ec",      # Cyrillic o
    "doc:\uff14\uff12",  # fullwidth digits
    "\u212a",        # Kelvin sign, which re.IGNORECASE would take for K
    "\u017f",        # long s
    "doc:\u00e9", "doc\u200b", "doc\ud800", "*", "team:*", "team:7:*", "*:x", "team*", "doc:42 ",
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names_pass_unchanged(name):
    assert check_channel(name) == name
    assert CHANNEL_RE.fullmatch(name)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused(name):
    with pytest.raises(ProtocolError):
        check_channel(name)
    # The pattern is section 9's syntax; the 255-byte bound is check_channel's.
    assert len(name) > 255 or not CHANNEL_RE.fullmatch(name)


def test_channel_re_match_does_not_take_a_trailing_newline():
    # "$" would match before the newline; the exported pattern must not.
    assert CHANNEL_RE.match("doc:42\n") is None
    assert CHANNEL_RE.match("doc:42") is not None


@pytest.mark.parametrize("value", [None, 42, 4.2, True, b"doc:42", ["doc:42"], {"doc": 42}])
def test_non_strings_are_refused_by_type(value):
    with pytest.raises(ProtocolError, match=f"must be a string, not {type(value).__name__}"):
        check_channel(value)


def test_a_str_subclass_comes_back_as_a_plain_str():
    class Sly(str):
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            return True

    out = check_channel(Sly("doc:42"))
    assert type(out) is str and out == "doc:42"


@pytest.mark.parametrize("name,words", [
    ("", "must not be empty"),
    ("doc::42", "empty part"),
    ("doc:", "empty part"),
    ("x" * 300, "longer than 255 bytes"),
    ("d\u043ec", "'\\u043e' at position 1"),
    ("doc\0", "'\\x00' at position 3"),
    ("team:*:x", "'*'"),
])
def test_refusals_say_why(name, words):
    with pytest.raises(ProtocolError) as info:
        check_channel(name)
    assert words in str(info.value)


@pytest.mark.parametrize("name", ["a" * 10_000 + "!", "!" + "a" * 10_000, "\0" * 5000, "\u043e" * 300])
def test_refusals_echo_at_most_40_characters_escaped(name):
    with pytest.raises(ProtocolError) as info:
        check_channel(name)
    message = str(info.value)
    assert len(message) < 400
    assert "a" * 41 not in message
    assert message.isascii() and "\0" not in message


def test_protocol_check_channel_agrees_when_present():
    # The lead's protocol module may hold its own check; the two must never disagree.
    other = getattr(protocol, "check_channel", None)
    if other is None:
        pytest.skip("flowcore.protocol has no check_channel")
    for name in VALID_NAMES:
        assert other(name) == name
    for name in INVALID_NAMES:
        with pytest.raises(ProtocolError):
            other(name)


# ---------------------------------------------------------------- grants


def test_exact_names_and_patterns():
    grants = Grants.parse(["doc:42", "team:7:*"])
    assert grants.allows("doc:42")
    assert grants.allows("team:7:x") and grants.allows("team:7:x:y") and grants.allows("team:7:x:y:z")
    for name in ["team:7", "team:70:x", "team:7x:y", "team", "team:8:x", "doc:4", "doc:420", "doc:42:x", "doc"]:
        assert not grants.allows(name), name


def test_a_single_part_pattern():
    grants = Grants.parse(["team:*"])
    assert grants.allows("team:7") and grants.allows("team:7:x")
    assert not grants.allows("team") and not grants.allows("teams:7") and not grants.allows("tea:m")


@pytest.mark.parametrize("channel", [None, 42, b"team:7:x", "team:7:", "team:7::x", "team:7:x\n", "team:7:*",
                                     "team:7:x\0", "doc:42\n", "team:7:" + "x" * 300])
def test_allows_never_grants_what_is_not_a_channel(channel):
    grants = Grants.parse(["doc:42", "team:7:*"])
    assert grants.allows(channel) is False


def test_allows_takes_a_str_subclass_by_its_text():
    class Sly(str):
        def __hash__(self) -> int:
            return hash("doc:42")

        def __eq__(self, other: object) -> bool:
            return True

    grants = Grants.parse(["doc:42"])
    assert not grants.allows(Sly("doc:43"))
    assert grants.allows(Sly("doc:42"))


def test_allows_looks_up_ancestors_never_scans_patterns():
    class Counting(frozenset):
        lookups = 0

        def __contains__(self, item: object) -> bool:
            Counting.lookups += 1
            return super().__contains__(item)

    many = Grants.parse([f"team:{i}:*" for i in range(MAX_GRANTS)])
    counted = Grants(many.exact, Counting(many.prefixes))
    name = "a:b:c:d:e"
    assert not counted.allows(name)
    assert Counting.lookups == name.count(":")  # one per ancestor, not one per pattern
    Counting.lookups = 0
    assert counted.allows("team:1023:x:y")
    assert Counting.lookups == 2  # "team:" then "team:1023:"


@pytest.mark.parametrize("claim,words", [
    ("doc:42", "not a string"),
    ({"doc:42": True}, "not dict"),
    (None, "not NoneType"),
    (42, "not int"),
    ({"doc:42"}, "not set"),
    (b"doc:42", "not bytes"),
])
def test_a_claim_that_is_not_a_list_is_refused(claim, words):
    with pytest.raises(ValueError) as info:
        Grants.parse(claim)
    assert "must be a list" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("entry", [1, None, True, 4.2, ["doc:42"], {"channel": "doc:42"}, b"doc:42"])
def test_an_entry_that_is_not_a_string_is_refused(entry):
    with pytest.raises(ValueError, match=f"entry 1 is not a string but {type(entry).__name__}"):
        Grants.parse(["doc:1", entry])


@pytest.mark.parametrize("entry", [
    "*", "team:*:x", "*:x", "team*", "team:7*", "team:7:**", "team:7:*:*", "team:7:*:", ":*", "::*",
    "team::*", "team:7:", "", ":", "doc::42", "d\u043ec:*", "doc\0", "doc:42\n", "x" * 256,
    "x" * 254 + ":*", "\u212a:*",
])
def test_bad_names_and_patterns_are_refused(entry):
    with pytest.raises(ValueError, match="^entry 0: "):
        Grants.parse([entry])


def test_a_bare_star_is_refused_in_words():
    with pytest.raises(ValueError, match="every channel"):
        Grants.parse(["doc:1", "*"])


def test_the_longest_pattern_matches_the_longest_names():
    base = "x" * 253
    grants = Grants.parse([base + ":*"])  # 255 bytes
    assert grants.allows(base + ":y")  # 255 bytes


def test_entry_cap():
    assert len(Grants.parse([f"doc:{i}" for i in range(MAX_GRANTS)]).exact) == MAX_GRANTS
    with pytest.raises(ValueError, match=f"{MAX_GRANTS + 1} entries, more than the {MAX_GRANTS} allowed"):
        Grants.parse([f"doc:{i}" for i in range(MAX_GRANTS + 1)])


def test_a_huge_claim_is_refused_before_it_is_read():
    class Poisoned(list):
        def __iter__(self):
            raise AssertionError("the entries were read")

    with pytest.raises(ValueError, match="more than the 1024 allowed"):
        Grants.parse(Poisoned([0] * 1_000_000))


def test_a_huge_entry_is_refused_with_a_short_message():
    with pytest.raises(ValueError) as info:
        Grants.parse(["doc:" + "9" * 5_000_000])
    assert len(str(info.value)) < 200


def test_empty_grants_are_none_and_grant_nothing():
    assert Grants.parse([]) is Grants.NONE
    assert Grants.parse(()) is Grants.NONE
    assert not Grants.NONE and Grants.parse(["doc:1"])
    assert not Grants.NONE.allows("doc:42") and Grants.NONE.entries == ()


def test_grants_are_values():
    a = Grants.parse(["team:7:*", "doc:42", "doc:42"])
    b = Grants.parse(("doc:42", "team:7:*"))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.entries == ("doc:42", "team:7:*")
    assert Grants.parse(list(a.entries)) == a
    with pytest.raises(AttributeError):
        a.exact = frozenset()  # type: ignore[misc]


# ---------------------------------------------------------------- connection tokens


def test_connection_grants_from_a_real_token(settings, verifier):
    token = issue_token(settings, "alice", extra={"channels": ["doc:42", "team:7:*"]})
    grants = connection_grants(verifier.verify_claims(token))
    assert grants.allows("doc:42") and grants.allows("team:7:x") and not grants.allows("team:70:x")


def test_no_channels_claim_means_no_grants(settings, verifier):
    assert connection_grants(verifier.verify_claims(issue_token(settings, "alice"))) is Grants.NONE


@pytest.mark.parametrize("claim", [
    "doc:42", None, {"doc:42": True}, 42, ["doc:42", 7], ["*"], ["team:*:x"], ["doc:"], ["d\u043ec"],
    [f"doc:{i}" for i in range(MAX_GRANTS + 1)], ["x" * 100_000],
])
def test_a_malformed_channels_claim_fails_the_whole_auth(settings, verifier, claim):
    verified = verifier.verify_claims(issue_token(settings, "alice", extra={"channels": claim}))
    with pytest.raises(TokenError) as info:
        connection_grants(verified)
    assert info.value.reason == "malformed"
    assert info.value.detail.startswith("channels claim ")
    assert len(info.value.detail) < 300


@pytest.mark.parametrize("extra", [{"channel": "doc:42"}, {"channel": "doc:42", "channels": ["doc:42"]},
                                   {"channel": None}])
def test_a_subscription_token_is_not_a_connection_token(settings, verifier, extra):
    verified = verifier.verify_claims(issue_token(settings, "alice", extra=extra))
    with pytest.raises(TokenError) as info:
        connection_grants(verified)
    assert info.value.reason == "invalid"
    assert "not a connection token" in info.value.detail


# ---------------------------------------------------------------- subscription tokens


def test_a_subscription_token_round_trip(settings, verifier):
    token = issue_subscription_token(settings, "alice", "doc:42", ttl=120)
    claims = claims_of(token)
    assert claims["channel"] == "doc:42" and claims["username"] == "alice" and "channels" not in claims
    expires_at = verify_subscription(verifier, token, "alice", "doc:42")
    assert expires_at == claims["exp"] and abs(expires_at - (time.time() + 120)) < 5


def test_the_default_ttl_is_the_token_ttl(settings):
    claims = claims_of(issue_subscription_token(settings, "alice", "doc:42"))
    assert claims["exp"] - claims["iat"] == settings.token_ttl


@pytest.mark.parametrize("channel", ["team:7:*", "*", "doc:", "", "d\u043ec", None, 42])
def test_issue_refuses_a_bad_channel(settings, channel):
    with pytest.raises(ProtocolError):
        issue_subscription_token(settings, "alice", channel)


@pytest.mark.parametrize("username", ["", "*", "a\0b", 42])
def test_issue_refuses_a_bad_username(settings, username):
    with pytest.raises(ProtocolError):
        issue_subscription_token(settings, username, "doc:42")


def test_a_token_for_another_user(settings, verifier):
    token = issue_subscription_token(settings, "mallory", "doc:42")
    error = refused(verify_subscription, verifier, token, "alice", "doc:42")
    assert error.reason == "token_invalid" and not error.temporary and "another user" in error.detail


@pytest.mark.parametrize("granted,asked", [
    ("doc:42", "doc:43"), ("doc:42", "doc:420"), ("doc:4", "doc:42"), ("team:7:x", "team:7:y"),
    ("team:7", "team:7:x"), ("team:7:x", "team:7"),
])
def test_a_token_for_another_channel(settings, verifier, granted, asked):
    token = issue_subscription_token(settings, "alice", granted)
    error = refused(verify_subscription, verifier, token, "alice", asked)
    assert error.reason == "token_invalid" and "another channel" in error.detail


def test_a_token_with_a_pattern_for_its_channel(settings, verifier):
    token = issue_token(settings, "alice", extra={"channel": "team:7:*"})
    error = refused(verify_subscription, verifier, token, "alice", "team:7:x")
    assert error.reason == "token_invalid" and "not a pattern" in error.detail


@pytest.mark.parametrize("value", [42, None, ["doc:42"], {"name": "doc:42"}, True])
def test_a_channel_claim_that_is_not_a_string(settings, verifier, value):
    token = issue_token(settings, "alice", extra={"channel": value})
    error = refused(verify_subscription, verifier, token, "alice", "doc:42")
    assert error.reason == "token_invalid" and "not a string" in error.detail


def test_a_connection_token_is_not_a_subscription_token(settings, verifier):
    error = refused(verify_subscription, verifier, issue_token(settings, "alice"), "alice", "doc:42")
    assert error.reason == "token_invalid" and "no channel claim" in error.detail
    token = issue_token(settings, "alice", extra={"channels": ["doc:42"]})
    error = refused(verify_subscription, verifier, token, "alice", "doc:42")
    assert error.reason == "token_invalid" and "not a subscription token" in error.detail
    # Both claims: still a connection token's shape, refused.
    token = issue_token(settings, "alice", extra={"channels": ["doc:42"], "channel": "doc:42"})
    assert refused(verify_subscription, verifier, token, "alice", "doc:42").reason == "token_invalid"


def test_an_expired_token_is_temporary(settings, verifier):
    token = issue_subscription_token(settings, "alice", "doc:42", ttl=-(LEEWAY + 30))
    error = refused(verify_subscription, verifier, token, "alice", "doc:42")
    assert error.reason == "token_expired" and error.temporary is True


def test_a_token_just_expired_passes_within_the_leeway(settings, verifier):
    token = issue_subscription_token(settings, "alice", "doc:42", ttl=-2)
    expires_at = verify_subscription(verifier, token, "alice", "doc:42")
    assert expires_at < time.time()


def test_a_token_signed_with_another_key(settings, verifier):
    claims = claims_of(issue_subscription_token(settings, "alice", "doc:42"))
    forged = jwt.encode(claims, OTHER_SECRET, algorithm="HS256")
    error = refused(verify_subscription, verifier, forged, "alice", "doc:42")
    assert error.reason == "token_invalid" and not error.temporary


def test_a_token_from_another_deployment(tmp_path, verifier):
    other = load_settings(base_env(tmp_path / "other"))
    token = issue_subscription_token(other, "alice", "doc:42")
    assert refused(verify_subscription, verifier, token, "alice", "doc:42").reason == "token_invalid"


def test_alg_none_is_refused(settings, verifier):
    claims = claims_of(issue_subscription_token(settings, "alice", "doc:42"))
    unsigned = b64url({"alg": "none", "typ": "JWT"}) + "." + b64url(claims) + "."
    assert refused(verify_subscription, verifier, unsigned, "alice", "doc:42").reason == "token_invalid"
    none_by_pyjwt = jwt.encode(claims, None, algorithm="none")
    assert refused(verify_subscription, verifier, none_by_pyjwt, "alice", "doc:42").reason == "token_invalid"


def test_an_algorithm_not_configured_is_refused(settings, verifier):
    claims = claims_of(issue_subscription_token(settings, "alice", "doc:42"))
    other_alg = jwt.encode(claims, settings.secret, algorithm="HS512")
    assert refused(verify_subscription, verifier, other_alg, "alice", "doc:42").reason == "token_invalid"


@pytest.mark.parametrize("exp", [None, "9999999999", True])
def test_exp_is_required_and_a_number(settings, verifier, exp):
    claims = {"username": "alice", "channel": "doc:42"}
    if exp is not None:
        claims["exp"] = exp
    token = jwt.encode(claims, settings.secret, algorithm="HS256")
    assert refused(verify_subscription, verifier, token, "alice", "doc:42").reason == "token_invalid"


def test_sub_stands_for_username_as_in_section_2(settings, verifier):
    token = jwt.encode({"sub": "alice", "channel": "doc:42", "exp": int(time.time()) + 60},
                       settings.secret, algorithm="HS256")
    assert verify_subscription(verifier, token, "alice", "doc:42") > time.time()


def test_audience_is_checked_when_configured(tmp_path):
    strict = load_settings(base_env(tmp_path, FLOW_JWT_AUDIENCE="flow-docs"))
    verifier = TokenVerifier(strict)
    assert verify_subscription(verifier, issue_subscription_token(strict, "alice", "doc:42"), "alice", "doc:42")
    no_aud = jwt.encode({"username": "alice", "channel": "doc:42", "exp": int(time.time()) + 60},
                        strict.secret, algorithm="HS256")
    assert refused(verify_subscription, verifier, no_aud, "alice", "doc:42").reason == "token_invalid"


@pytest.mark.parametrize("token", [None, 42, b"a.b.c", ["a.b.c"], "", "not a jwt", "a.b.c", "\u00e9.b.c",
                                   "x" * 100_000])
def test_hostile_tokens_are_invalid(verifier, token):
    error = refused(verify_subscription, verifier, token, "alice", "doc:42")
    assert error.reason == "token_invalid" and len(error.detail) < 300


# ---------------------------------------------------------------- the SUBSCRIBE decision


def test_grants_alone_allow_with_no_expiry(verifier):
    grants = Grants.parse(["doc:42", "team:7:*"])
    assert authorize(grants, verifier, "alice", "doc:42", None) is None
    assert authorize(grants, verifier, "alice", "team:7:x:y", None) is None


@pytest.mark.parametrize("channel", ["doc:43", "team:7", "team:70:x", "other"])
def test_no_grant_no_token_is_forbidden(verifier, channel):
    grants = Grants.parse(["doc:42", "team:7:*"])
    error = refused(authorize, grants, verifier, "alice", channel, None)
    assert error.reason == "forbidden" and error.temporary is False
    assert refused(authorize, Grants.NONE, verifier, "alice", channel, None).reason == "forbidden"


@pytest.mark.parametrize("channel", ["", "doc:", "team:7:*", "*", "d\u043ec", "x" * 256, None, 42, ["doc:42"]])
def test_a_bad_name_is_invalid_channel_before_anything_else(settings, verifier, channel):
    token = issue_subscription_token(settings, "alice", "doc:42")
    for grants, tok in [(Grants.NONE, None), (Grants.parse(["team:7:*"]), None), (Grants.NONE, token)]:
        error = refused(authorize, grants, verifier, "alice", channel, tok)
        assert error.reason == "invalid_channel" and not error.temporary


def test_a_token_decides_when_given(settings, verifier):
    token = issue_subscription_token(settings, "alice", "doc:42", ttl=90)
    assert authorize(Grants.NONE, verifier, "alice", "doc:42", token) == claims_of(token)["exp"]
    # Granted by the connection too, but a bad token is still answered as one.
    granted = Grants.parse(["doc:*"])
    assert refused(authorize, granted, verifier, "alice", "doc:43", token).reason == "token_invalid"
    expired = issue_subscription_token(settings, "alice", "doc:42", ttl=-60)
    error = refused(authorize, granted, verifier, "alice", "doc:42", expired)
    assert error.reason == "token_expired" and error.temporary
    assert refused(authorize, granted, verifier, "alice", "doc:42", "").reason == "token_invalid"


def test_a_token_for_another_user_does_not_subscribe(settings, verifier):
    token = issue_subscription_token(settings, "bob", "doc:42")
    assert refused(authorize, Grants.NONE, verifier, "alice", "doc:42", token).reason == "token_invalid"


# ---------------------------------------------------------------- SubscribeRefused


def test_subscribe_refused_reasons_and_temporary():
    assert SubscribeRefused("token_expired", "x").temporary is True
    assert SubscribeRefused("unavailable", "x").temporary is True
    for reason in ["forbidden", "token_invalid", "invalid_channel", "limit", "already_subscribed"]:
        assert SubscribeRefused(reason, "x").temporary is False
    assert SubscribeRefused("limit", "x", temporary=True).temporary is True
    with pytest.raises(ValueError):
        SubscribeRefused("nope", "x")


# ---------------------------------------------------------------- presence


def test_presence_channels_setting():
    patterns = parse_presence_channels(" doc:42 , team:* ,, ")
    assert patterns.entries == ("doc:42", "team:*")
    assert presence_enabled(patterns, "doc:42") and presence_enabled(patterns, "team:7:x")
    assert not presence_enabled(patterns, "doc:43") and not presence_enabled(patterns, "team")


@pytest.mark.parametrize("raw", ["", "  ", ",", " , ,"])
def test_presence_blank_means_none(raw):
    patterns = parse_presence_channels(raw)
    assert patterns is Grants.NONE and not presence_enabled(patterns, "doc:42")


@pytest.mark.parametrize("raw,words", [
    ("*", "every channel"), ("doc:42,team:*:x", "entry 1"), ("doc 42", "entry 0"), ("doc:", "empty part"),
    (",".join(f"d:{i}" for i in range(MAX_GRANTS + 1)), "more than the 1024"), ("d\u043ec", "\\u043e"),
])
def test_presence_setting_errors_say_why(raw, words):
    with pytest.raises(ValueError) as info:
        parse_presence_channels(raw)
    assert words in str(info.value) and "comma-separated" in str(info.value)
