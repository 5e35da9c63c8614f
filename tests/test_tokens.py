"""Unit tests for flowcore.tokens (PROTOCOL.md section 2): no I/O."""

from __future__ import annotations

import base64
import dataclasses
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from flowcore.settings import Settings
from flowcore.tokens import EXPIRED, INVALID, MALFORMED, TokenError, TokenVerifier, VerifiedToken, issue_token

# 64 bytes: long enough for HS512 too (RFC 7518 section 3.2; PyJWT warns below it).
SECRET = "s3cret-" + "x" * 57
OTHER_SECRET = "other-" + "y" * 58


def hs(**overrides) -> Settings:
    return dataclasses.replace(Settings(secret=SECRET), **overrides)


def sign(claims: dict, key=SECRET, algorithm: str = "HS256", headers: dict | None = None) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def future(seconds: int = 600) -> int:
    return int(time.time()) + seconds


def b64url(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def refused(verifier: TokenVerifier, token) -> TokenError:
    with pytest.raises(TokenError) as info:
        verifier.verify(token)
    assert info.value.reason in (EXPIRED, INVALID, MALFORMED)
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value


# ---------------------------------------------------------------- HS256 basics


def test_issue_verify_round_trip():
    settings = hs()
    token = issue_token(settings, "alice")
    assert token.count(".") == 2
    assert TokenVerifier(settings).verify(token) == "alice"


def test_extra_claims_ride_along_and_never_replace_flows_own():
    settings = hs()
    token = issue_token(settings, "alice", 60, {"role": "editor", "username": "mallory", "exp": 1})
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["role"] == "editor"
    assert claims["username"] == "alice" and claims["exp"] > time.time()
    assert TokenVerifier(settings).verify(token) == "alice"


def test_round_trip_with_a_32_byte_secret():
    settings = Settings(secret="k" * 32)
    assert TokenVerifier(settings).verify(issue_token(settings, "alice")) == "alice"


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_round_trip_other_hmac_algorithms(alg):
    settings = hs(jwt_algorithms=(alg,))
    token = issue_token(settings, "alice")
    assert jwt.get_unverified_header(token)["alg"] == alg
    assert TokenVerifier(settings).verify(token) == "alice"


def test_issued_claims():
    settings = hs(token_ttl=120)
    before = int(time.time())
    token = issue_token(settings, "zoë")
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert header["alg"] == "HS256"
    assert claims["username"] == "zoë"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == 120
    assert "aud" not in claims and "iss" not in claims
    assert TokenVerifier(settings).verify(token) == "zoë"


def test_issue_explicit_ttl():
    token = issue_token(hs(), "alice", ttl=5)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 5


@pytest.mark.parametrize("username", ["", "*", "a\0b", 5, None])
def test_issue_refuses_bad_usernames(username):
    with pytest.raises(ValueError):
        issue_token(hs(), username)


def test_sub_accepted_when_username_absent():
    token = sign({"sub": "bob", "exp": future()})
    assert TokenVerifier(hs()).verify(token) == "bob"


def test_username_wins_over_sub():
    token = sign({"username": "alice", "sub": "bob", "exp": future()})
    assert TokenVerifier(hs()).verify(token) == "alice"


def test_missing_exp_is_invalid():
    token = sign({"username": "alice"})
    assert refused(TokenVerifier(hs()), token).reason == INVALID


def test_expired():
    token = sign({"username": "alice", "exp": int(time.time()) - 60})
    assert refused(TokenVerifier(hs()), token).reason == EXPIRED


def test_issued_with_negative_ttl_is_expired():
    token = issue_token(hs(), "alice", ttl=-60)
    assert refused(TokenVerifier(hs()), token).reason == EXPIRED


def test_small_clock_skew_tolerated():
    token = sign({"username": "alice", "exp": int(time.time()) - 1})
    assert TokenVerifier(hs()).verify(token) == "alice"


def test_no_identity_is_invalid():
    token = sign({"exp": future()})
    assert refused(TokenVerifier(hs()), token).reason == INVALID


@pytest.mark.parametrize("username", [5, True, ["alice"], {"n": "alice"}, "", "*", "a\0b", "x" * 300])
def test_bad_username_claim_is_invalid(username):
    token = sign({"username": username, "exp": future()})
    err = refused(TokenVerifier(hs()), token)
    assert err.reason == INVALID


def test_null_username_does_not_fall_back_to_sub():
    token = sign({"username": None, "sub": "bob", "exp": future()})
    assert refused(TokenVerifier(hs()), token).reason == INVALID


@pytest.mark.parametrize("sub", ["", "*"])
def test_bad_sub_is_invalid(sub):
    token = sign({"sub": sub, "exp": future()})
    assert refused(TokenVerifier(hs()), token).reason == INVALID


# ---------------------------------------------------------------- algorithm attacks


def test_alg_none_refused():
    header = b64url({"alg": "none", "typ": "JWT"})
    payload = b64url({"username": "alice", "exp": future()})
    token = f"{header}.{payload}."
    assert refused(TokenVerifier(hs()), token).reason == INVALID


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_with_a_signature_refused(alg):
    header = b64url({"alg": alg, "typ": "JWT"})
    payload = b64url({"username": "alice", "exp": future()})
    token = f"{header}.{payload}.{b64url(b'whatever')}"
    refused(TokenVerifier(hs()), token)


def test_hs512_refused_when_only_hs256_configured():
    token = sign({"username": "alice", "exp": future()}, algorithm="HS512")
    assert refused(TokenVerifier(hs()), token).reason == INVALID
    # ...and accepted once it is configured.
    assert TokenVerifier(hs(jwt_algorithms=("HS256", "HS512"))).verify(token) == "alice"


def test_header_cannot_pick_an_unconfigured_algorithm():
    token = sign({"username": "alice", "exp": future()}, algorithm="HS384")
    assert refused(TokenVerifier(hs(jwt_algorithms=("HS512",))), token).reason == INVALID


def test_wrong_secret_is_invalid():
    token = sign({"username": "alice", "exp": future()}, key=OTHER_SECRET)
    assert refused(TokenVerifier(hs()), token).reason == INVALID


def test_tampered_payload_is_invalid():
    token = issue_token(hs(), "alice")
    header, _, signature = token.split(".")
    forged = f"{header}.{b64url({'username': 'mallory', 'exp': future()})}.{signature}"
    assert refused(TokenVerifier(hs()), forged).reason == INVALID


@pytest.mark.parametrize(
    "token", ["abc", "a.b.c", "", "x.y", "a.b.c.d", "...", "a..c", "eyJ.eyJ.", " ", "<3", "{}"]
)
def test_garbage_is_malformed(token):
    assert refused(TokenVerifier(hs()), token).reason == MALFORMED


@pytest.mark.parametrize("token", [None, 5, b"a.b.c"])
def test_non_string_is_malformed(token):
    assert refused(TokenVerifier(hs()), token).reason == MALFORMED


def test_signed_payload_not_json_is_malformed():
    token = jwt.api_jws.encode(b"not json", SECRET, algorithm="HS256")
    assert refused(TokenVerifier(hs()), token).reason == MALFORMED


def test_signed_payload_not_an_object_is_malformed():
    token = jwt.api_jws.encode(b'["alice"]', SECRET, algorithm="HS256")
    assert refused(TokenVerifier(hs()), token).reason == MALFORMED


def test_bad_signature_with_unreadable_payload_is_refused():
    header = b64url({"alg": "HS256", "typ": "JWT"})
    token = f"{header}.{b64url(b'not json')}.{b64url(b'sig')}"
    assert refused(TokenVerifier(hs()), token).reason in (INVALID, MALFORMED)


# ---------------------------------------------------------------- aud / iss


def test_aud_and_iss_issued_and_accepted():
    settings = hs(jwt_audience="flow-ws", jwt_issuer="flow-app")
    token = issue_token(settings, "alice")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="flow-ws")
    assert claims["aud"] == "flow-ws"
    assert claims["iss"] == "flow-app"
    assert TokenVerifier(settings).verify(token) == "alice"


def test_aud_enforced():
    verifier = TokenVerifier(hs(jwt_audience="flow-ws"))
    assert verifier.verify(sign({"username": "a", "exp": future(), "aud": "flow-ws"})) == "a"
    assert verifier.verify(sign({"username": "a", "exp": future(), "aud": ["x", "flow-ws"]})) == "a"
    assert refused(verifier, sign({"username": "a", "exp": future(), "aud": "other"})).reason == INVALID
    assert refused(verifier, sign({"username": "a", "exp": future()})).reason == INVALID


def test_iss_enforced():
    verifier = TokenVerifier(hs(jwt_issuer="flow-app"))
    assert verifier.verify(sign({"username": "a", "exp": future(), "iss": "flow-app"})) == "a"
    assert refused(verifier, sign({"username": "a", "exp": future(), "iss": "evil"})).reason == INVALID
    assert refused(verifier, sign({"username": "a", "exp": future()})).reason == INVALID


def test_aud_and_iss_both_required_when_both_configured():
    verifier = TokenVerifier(hs(jwt_audience="ws", jwt_issuer="app"))
    assert verifier.verify(sign({"username": "a", "exp": future(), "aud": "ws", "iss": "app"})) == "a"
    refused(verifier, sign({"username": "a", "exp": future(), "aud": "ws"}))
    refused(verifier, sign({"username": "a", "exp": future(), "iss": "app"}))


def test_token_from_another_audience_issuer_refused():
    token = issue_token(hs(jwt_audience="other", jwt_issuer="app"), "alice")
    assert refused(TokenVerifier(hs(jwt_audience="ws", jwt_issuer="app")), token).reason == INVALID


# ---------------------------------------------------------------- asymmetric


def _pem_pair(private_key) -> tuple[str, str]:
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private_pem, public_pem


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[str, str]:
    return _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys() -> tuple[str, str]:
    return _pem_pair(ec.generate_private_key(ec.SECP256R1()))


@pytest.mark.parametrize("alg, keys", [("RS256", "rsa_keys"), ("ES256", "ec_keys")])
def test_asymmetric_public_key_only_verifier(alg, keys, request):
    private_pem, public_pem = request.getfixturevalue(keys)
    issuer = Settings(jwt_algorithms=(alg,), jwt_private_key=private_pem)
    verifier_settings = Settings(jwt_algorithms=(alg,), jwt_public_key=public_pem)
    assert verifier_settings.jwt_private_key == "" and verifier_settings.secret == ""

    token = issue_token(issuer, "alice")
    assert jwt.get_unverified_header(token)["alg"] == alg
    verifier = TokenVerifier(verifier_settings)
    assert verifier.verify(token) == "alice"

    # Expired and tampered tokens are still refused.
    assert refused(verifier, issue_token(issuer, "alice", ttl=-60)).reason == EXPIRED
    header, _, signature = token.split(".")
    forged = f"{header}.{b64url({'username': 'mallory', 'exp': future()})}.{signature}"
    assert refused(verifier, forged).reason == INVALID


@pytest.mark.parametrize("alg, keys", [("RS256", "rsa_keys"), ("ES256", "ec_keys")])
def test_asymmetric_private_key_only_verifier_derives_public(alg, keys, request):
    private_pem, _ = request.getfixturevalue(keys)
    settings = Settings(jwt_algorithms=(alg,), jwt_private_key=private_pem)
    assert TokenVerifier(settings).verify(issue_token(settings, "bob")) == "bob"


def test_asymmetric_other_key_refused(rsa_keys):
    other_private, _ = _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    token = issue_token(Settings(jwt_algorithms=("RS256",), jwt_private_key=other_private), "alice")
    verifier = TokenVerifier(Settings(jwt_algorithms=("RS256",), jwt_public_key=rsa_keys[1]))
    assert refused(verifier, token).reason == INVALID


def test_public_key_as_hmac_secret_refused(rsa_keys):
    """The classic algorithm-confusion attack: HS256 signed with the public key's PEM."""
    _, public_pem = rsa_keys
    verifier = TokenVerifier(Settings(jwt_algorithms=("RS256",), jwt_public_key=public_pem))
    header = b64url({"alg": "HS256", "typ": "JWT"})
    payload = b64url({"username": "mallory", "exp": future()})
    import hashlib
    import hmac

    signature = hmac.new(public_pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(signature)}"
    assert refused(verifier, token).reason == INVALID


def test_hs_token_refused_by_rs_verifier(rsa_keys):
    verifier = TokenVerifier(Settings(jwt_algorithms=("RS256",), jwt_public_key=rsa_keys[1]))
    assert refused(verifier, sign({"username": "a", "exp": future()})).reason == INVALID


def test_es256_token_refused_by_rs256_verifier(rsa_keys, ec_keys):
    token = issue_token(Settings(jwt_algorithms=("ES256",), jwt_private_key=ec_keys[0]), "alice")
    verifier = TokenVerifier(Settings(jwt_algorithms=("RS256",), jwt_public_key=rsa_keys[1]))
    assert refused(verifier, token).reason == INVALID


def test_issuing_needs_the_private_key(rsa_keys):
    with pytest.raises(RuntimeError, match="FLOW_JWT_PRIVATE_KEY"):
        issue_token(Settings(jwt_algorithms=("RS256",), jwt_public_key=rsa_keys[1]), "alice")


def test_token_error_fields():
    err = TokenError(INVALID, "bad signature")
    assert err.reason == "invalid"
    assert err.detail == "bad signature"
    assert str(err) == "invalid: bad signature"
    assert (EXPIRED, INVALID, MALFORMED) == ("expired", "invalid", "malformed")


# ---------------------------------------------------------------- time claims and verify_claims


@pytest.mark.parametrize(
    "exp",
    ["9999999999", "1", True, False, [9999999999], {"t": 1}, "x", 10**400, 2**60, -(2**60), 1e300],
    ids=repr,
)
def test_exp_must_be_a_plain_number(exp):
    # PyJWT alone takes a numeric string for exp (and True as 1).
    err = refused(TokenVerifier(hs()), sign({"username": "alice", "exp": exp}))
    assert err.reason == INVALID and "exp" in err.detail


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_exp_must_be_finite(value):
    # json.dumps would not write these; a hand-built payload can, and PyJWT's json reads them.
    payload = '{"username":"alice","exp":%s}' % value
    token = jwt.api_jws.encode(payload.encode(), SECRET, algorithm="HS256")
    assert refused(TokenVerifier(hs()), token).reason == INVALID


def test_null_exp_is_invalid():
    assert refused(TokenVerifier(hs()), sign({"username": "alice", "exp": None})).reason == INVALID


@pytest.mark.parametrize("claim", ["iat", "nbf"])
@pytest.mark.parametrize("value", ["9999999999", "1", True, False, None, [1], {"t": 1}, 10**400], ids=repr)
def test_iat_and_nbf_must_be_plain_numbers(claim, value):
    err = refused(TokenVerifier(hs()), sign({"username": "alice", "exp": future(), claim: value}))
    assert err.reason == INVALID and claim in err.detail


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_iat_and_nbf_in_the_future_are_invalid(claim):
    assert refused(TokenVerifier(hs()), sign({"username": "a", "exp": future(), claim: future(60)})).reason == INVALID
    # A few seconds of skew are tolerated; the past is fine.
    for value in (int(time.time()) + 2, int(time.time()) - 3600, time.time() - 0.5):
        assert TokenVerifier(hs()).verify(sign({"username": "a", "exp": future(), claim: value})) == "a"


def test_verify_claims():
    settings = hs(token_ttl=300)
    token = issue_token(settings, "alice")
    verified = TokenVerifier(settings).verify_claims(token)
    assert isinstance(verified, VerifiedToken)
    assert verified.username == "alice"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert verified.claims == claims
    assert verified.expires_at == claims["exp"] and type(verified.expires_at) is float
    assert 290 <= verified.expires_at - time.time() <= 300
    with pytest.raises(dataclasses.FrozenInstanceError):
        verified.username = "mallory"  # type: ignore[misc]


def test_verify_claims_keeps_fractional_exp_and_extra_claims():
    exp = time.time() + 100.75
    token = sign({"sub": "bob", "exp": exp, "channels": ["doc:42", "team:7:*"]})
    verified = TokenVerifier(hs()).verify_claims(token)
    assert verified.username == "bob"
    assert verified.expires_at == exp
    assert verified.claims["channels"] == ["doc:42", "team:7:*"]


def test_verify_claims_refuses_what_verify_refuses():
    verifier = TokenVerifier(hs())
    for token in (sign({"username": "a", "exp": int(time.time()) - 60}), sign({"username": "a"}), "abc"):
        with pytest.raises(TokenError):
            verifier.verify_claims(token)


HOSTILE_TOKENS = [
    "\ud800.a.b",  # would reach PyJWT's str.encode
    "a.\udfff.b",
    "é.b.c",
    "a.b.c\u00a0",
    "\0.\0.\0",
    f"{b64url(b'[' * 40_000 + b']' * 40_000)}.{b64url({'exp': 1})}.x",  # deep header JSON
    f"{b64url([1])}.{b64url({'exp': 1})}.x",  # header not an object
    f"{b64url({'alg': {'a': 1}})}.{b64url({'exp': 1})}.x",
    f"{b64url({'alg': ['HS256']})}.{b64url({'exp': 1})}.x",
    f"{b64url({'alg': 'HS256', 'kid': {'a': 1}})}.{b64url({'exp': 1})}.x",
    f"{b64url({'alg': 'HS256', 'crit': {'a': 1}})}.{b64url({'exp': 1})}.x",
    f"{b64url({'alg': 'HS256', 'crit': [{'a': 1}]})}.{b64url({'exp': 1})}.x",
    b64url(b"\xff\xfe") + "." + b64url({"exp": 1}) + ".x",  # header not UTF-8
    f"{b64url({'alg': 'HS256'})}.{'A' * 60_000}.x",
    "a" * 60_000 + ".b.c",
    "====.====.====",
    "a.b.c===",
]


@pytest.mark.parametrize("token", HOSTILE_TOKENS, ids=range(len(HOSTILE_TOKENS)))
def test_hostile_tokens_are_token_errors(token):
    for verifier in (TokenVerifier(hs()), TokenVerifier(hs(jwt_audience="ws", jwt_issuer="app"))):
        err = refused(verifier, token)
        assert len(str(err)) < 300
