"""The demo app (PROTOCOL.md sections 2 and 8) with Flask's test client; pushes captured."""

from __future__ import annotations

import logging
import re
import threading

import pytest

from app import create_app
from app.demo import brand, luhn_valid, mask
from flowcore.settings import load_settings
from flowcore.tokens import TokenVerifier
from support import wait_until


class Captured:
    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, object]] = []
        self.lock = threading.Lock()

    def __call__(self, username: str, message_id: str, data: object) -> None:
        with self.lock:
            self.pushes.append((username, message_id, data))


@pytest.fixture
def settings(tmp_path):
    return load_settings({"FLOW_SECRET": "k" * 64, "FLOW_ENV_FILE": str(tmp_path / "none")})


@pytest.fixture
def pushes():
    return Captured()


@pytest.fixture
def disconnected():
    return []


@pytest.fixture
def client(settings, pushes, disconnected, tmp_path):
    app = create_app({"FLOW_SETTINGS": settings, "PUSH": pushes, "TASK_DELAY": 0, "TESTING": True,
                      "DISCONNECT": disconnected.append,
                      "STATE_DB": str(tmp_path / "state.sqlite3"), "SECRET_KEY": SESSION_KEY})
    return app.test_client()


SESSION_KEY = "a test session key that is not a constant of the app"
META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def csrf_token(client) -> str:
    """The token the page hands out, as a browser would read it (meta tag and forms)."""
    page = client.get("/").get_data(as_text=True)
    match = META.search(page)
    assert match, "no csrf-token meta tag on the page"
    assert f'name="csrf_token" value="{match.group(1)}"' in page
    return match.group(1)


def post(client, url, data=None, **kwargs):
    """A POST as the demo's page makes it: with the page's CSRF token in the form."""
    return client.post(url, data={"csrf_token": csrf_token(client), **(data or {})}, **kwargs)


def login(client, username="alice"):
    reply = post(client, "/login", {"username": username})
    assert reply.status_code == 302
    return reply


def test_index_shows_login_then_status_elements(client):
    assert b'name="username"' in client.get("/").data
    login(client)
    page = client.get("/").data
    for element in (b'id="connected"', b'id="authenticated"', b'id="messages"', b"alice"):
        assert element in page


def test_token_requires_a_session(client, disconnected):
    reply = client.get("/socket_auth_token")
    assert reply.status_code == 401
    login(client)
    assert post(client, "/logout").status_code == 302
    assert client.get("/socket_auth_token").status_code == 401
    # The logged-out user's open tabs are cut at once (flow.disconnect: 4004 everywhere).
    assert disconnected == ["alice"]
    assert post(client, "/logout").status_code == 302  # logged out already: nobody to cut
    assert disconnected == ["alice"]


def test_token_plain_text_is_message_flow_compatible(client, settings):
    login(client, "zoë")
    reply = client.get("/socket_auth_token")
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    assert reply.headers["Cache-Control"] == "no-store"
    assert TokenVerifier(settings).verify(reply.get_data(as_text=True)) == "zoë"


def test_token_json_form(client, settings):
    login(client)
    reply = client.get("/socket_auth_token", headers={"Accept": "application/json"})
    assert reply.status_code == 200 and reply.is_json
    assert reply.json["expires_in"] == settings.token_ttl
    assert TokenVerifier(settings).verify(reply.json["token"]) == "alice"


@pytest.mark.parametrize("username", ["", "   ", "*", "x" * 300])
def test_bad_login_is_400(client, username, caplog):
    reply = post(client, "/login", {"username": username}, headers={"Accept": "application/json"})
    assert reply.status_code == 400 and "username" in reply.json["error"]
    assert client.get("/socket_auth_token").status_code == 401
    warnings = [r for r in caplog.records if r.name == "flow.app"]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING" and not warnings[0].exc_info


def test_send_answers_at_once_then_pushes_task_done(client, pushes):
    login(client)
    reply = post(client, "/send", {"message": "hello"})
    assert reply.json == {"status": "OK", "data": "hello"}
    wait_until(lambda: pushes.pushes, 5, message="the push")
    assert pushes.pushes == [("alice", "TASK DONE", "hello")]


@pytest.mark.parametrize("form, status", [({}, 400), ({"message": "  "}, 400), ({"message": "x" * 1001}, 400)])
def test_send_bad_input(client, pushes, form, status):
    login(client)
    assert post(client, "/send", form).status_code == status
    assert pushes.pushes == []


def test_send_needs_login(client):
    assert post(client, "/send", {"message": "hi"}).status_code == 401


def test_card_check_masks_and_pushes_progress_then_result(client, pushes):
    login(client)
    reply = post(client, "/cards/check", {"number": "4111 1111 1111 1111"})
    assert reply.json["data"]["card"].endswith("1111")
    assert "4111" not in reply.get_data(as_text=True)
    wait_until(lambda: len(pushes.pushes) == 4, 5, message="four pushes")
    ids = [message_id for _, message_id, _ in pushes.pushes]
    assert ids == ["CARD PROGRESS"] * 3 + ["CARD RESULT"]
    assert [data["percent"] for _, _, data in pushes.pushes[:3]] == [25, 50, 75]
    result = pushes.pushes[-1][2]
    assert result["valid"] is True and result["brand"] == "Visa"
    assert all("4111111111111111" not in str(data) for _, _, data in pushes.pushes)
    state = client.get("/api/state").json
    assert state["username"] == "alice" and state["recent"][-1]["id"] == "CARD RESULT"


@pytest.mark.parametrize("number", ["", "abc", "123", "1" * 20, "4111-1111-1111-1111"])
def test_card_check_bad_input(client, pushes, number):
    login(client)
    assert post(client, "/cards/check", {"number": number}).status_code == 400
    assert pushes.pushes == []


def test_card_helpers():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert luhn_valid("5555555555554444") and brand("5555555555554444") == "Mastercard"
    assert brand("378282246310005") == "American Express"
    assert mask("4111111111111111") == "•" * 12 + "1111"


def test_state_needs_login(client):
    assert client.get("/api/state").status_code == 401


def test_state_is_shared_by_every_app_process(settings, pushes, tmp_path):
    """gunicorn runs several workers: what one told a user, another can report."""
    config = {"FLOW_SETTINGS": settings, "PUSH": pushes, "TASK_DELAY": 0, "TESTING": True,
              "STATE_DB": str(tmp_path / "state.sqlite3"), "SECRET_KEY": SESSION_KEY}
    first, second = create_app(config).test_client(), create_app(config).test_client()
    login(first, "erin")
    login(second, "erin")
    post(first, "/send", {"message": "from worker one"})
    wait_until(lambda: pushes.pushes, 5, message="the push")
    assert second.get("/api/state").json["recent"] == [{"id": "TASK DONE", "data": "from worker one"}]


# --- CSRF, security headers, errors on the page, favicon (issue 11)

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def app_warnings(caplog):
    return [r for r in caplog.records if r.name == "flow.app" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("url, form", [
    ("/login", {"username": "mallory"}),
    ("/logout", {}),
    ("/send", {"message": "forged"}),
    ("/cards/check", {"number": "4111111111111111"}),
])
@pytest.mark.parametrize("token", [None, "wrong", "header-of-another-session"])
def test_a_post_without_the_right_csrf_token_is_refused(client, settings, pushes, tmp_path, caplog,
                                                          url, form, token):
    login(client)
    headers = {"Accept": "application/json"}
    data = dict(form)
    if token == "header-of-another-session":
        other = create_app({"FLOW_SETTINGS": settings, "PUSH": pushes, "TESTING": True,
                            "STATE_DB": str(tmp_path / "other.sqlite3"), "SECRET_KEY": SESSION_KEY})
        headers["X-CSRFToken"] = csrf_token(other.test_client())  # valid, but not this session's
    elif token is not None:
        data["csrf_token"] = token
    caplog.clear()
    with caplog.at_level(logging.INFO):
        reply = client.post(url, data=data, headers=headers)
    assert reply.status_code == 400 and reply.is_json
    assert "CSRF" in reply.json["error"] and "Reload the page" in reply.json["error"]
    [warning] = app_warnings(caplog)
    assert warning.levelname == "WARNING" and not warning.exc_info and url in warning.getMessage()
    assert [r for r in caplog.records if "CSRF" in r.getMessage()] == [warning]
    # Nothing was done: still alice, nothing pushed.
    assert client.get("/api/state").json["username"] == "alice"
    assert pushes.pushes == []


def test_csrf_token_in_the_header_is_accepted(client, pushes):
    """What demo.js does: the page's meta tag token as X-CSRFToken on a fetch."""
    login(client)
    reply = client.post("/send", data={"message": "by fetch"},
                        headers={"X-CSRFToken": csrf_token(client), "Accept": "application/json"})
    assert reply.status_code == 200 and reply.json == {"status": "OK", "data": "by fetch"}
    wait_until(lambda: pushes.pushes, 5, message="the push")


def test_a_forged_form_post_shows_the_error_on_the_page(client):
    login(client)
    reply = client.post("/logout", data={"csrf_token": "forged"}, headers={"Accept": BROWSER_ACCEPT})
    assert reply.status_code == 400 and reply.mimetype == "text/html"
    page = reply.get_data(as_text=True)
    assert 'id="error"' in page and "CSRF check failed" in page and 'id="connected"' in page
    assert client.get("/socket_auth_token").status_code == 200  # not logged out


def test_a_bad_login_name_shows_the_page_with_the_message(client, caplog):
    reply = post(client, "/login", {"username": "*"}, headers={"Accept": BROWSER_ACCEPT})
    assert reply.status_code == 400 and reply.mimetype == "text/html"
    page = reply.get_data(as_text=True)
    assert re.search(r'<p id="error"[^>]*role="alert">username: [^<]+</p>', page), page
    assert 'name="username"' in page and "{" not in page.split('id="error"', 1)[1].split("</p>")[0]
    assert len(app_warnings(caplog)) == 1


def test_login_page_errors_are_escaped(client):
    reply = post(client, "/login", {"username": "<script>" + "x" * 300}, headers={"Accept": BROWSER_ACCEPT})
    assert reply.status_code == 400 and b"<script>x" not in reply.data


@pytest.mark.parametrize("path", ["/", "/socket_auth_token", "/static/js/demo.js", "/favicon.ico",
                                  "/nowhere"])
def test_security_headers_on_every_response(client, path):
    login(client)
    with client.get(path, headers={"Host": "demo.example:8080"}) as reply:  # closes static files
        pass
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["X-Frame-Options"] == "DENY"
    assert reply.headers["Referrer-Policy"] == "same-origin"
    policy = {part.split()[0]: part.split()[1:] for part in reply.headers["Content-Security-Policy"].split("; ")}
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["default-src"] == ["'self'"] and policy["script-src"] == ["'self'"]
    # The page's socket goes to its own origin, ws: or wss: (behind TLS).
    assert policy["connect-src"] == ["'self'", "ws://demo.example:8080", "wss://demo.example:8080"]


def test_a_strange_host_header_adds_nothing_to_the_policy(client):
    reply = client.get("/", headers={"Host": "evil; script-src *"})
    policy = reply.headers["Content-Security-Policy"]
    assert "connect-src 'self'" in policy and "script-src *" not in policy


def test_security_headers_on_refusals_too(client):
    reply = client.post("/send", data={"message": "x"})
    assert reply.status_code == 400
    assert "frame-ancestors 'none'" in reply.headers["Content-Security-Policy"]
    assert reply.headers["X-Frame-Options"] == "DENY"


def test_favicon(client):
    with client.get("/favicon.ico") as reply:
        assert reply.status_code == 200 and reply.mimetype == "image/svg+xml"
        assert reply.data.startswith(b"<svg")
    with client.get("/static/favicon.svg") as reply:
        assert reply.status_code == 200
    assert b'rel="icon"' in client.get("/").data


# --- adversarial review (adv_c): cookie flags, caching, card digits, HTTP errors ------------------


def session_cookie(reply) -> str:
    [cookie] = [c for c in reply.headers.getlist("Set-Cookie") if c.startswith("session=")]
    return cookie


def test_the_session_cookie_is_secure_over_https_and_still_sent_over_http(client):
    """Behind TLS a cookie without Secure would also go out over a plain http request
    (any http:// link to the host), where anyone on the network copies it."""
    https = {"base_url": "https://demo.example", "headers": {"Referer": "https://demo.example/"}}
    page = client.get("/", base_url=https["base_url"])
    cookie = session_cookie(page)
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "secure" in flags and "httponly" in flags and "samesite=lax" in flags, cookie
    token = META.search(page.get_data(as_text=True)).group(1)
    reply = client.post("/login", data={"csrf_token": token, "username": "alice"}, **https)
    assert reply.status_code == 302
    assert "secure" in [p.strip().lower() for p in session_cookie(reply).split(";")]
    # Plain http (make's default) keeps a cookie the browser sends back over http.
    plain = client.application.test_client().get("/")
    assert "secure" not in [p.strip().lower() for p in session_cookie(plain).split(";")]


@pytest.mark.parametrize("path", ["/", "/api/state", "/nowhere"])
def test_pages_that_read_the_session_are_never_cached(client, path):
    """The page holds the session's CSRF token and user name: a shared cache (or the back
    button after logout) must not hand it to the next person."""
    login(client)
    reply = client.get(path)
    assert reply.headers.get("Cache-Control") == "no-store", (path, reply.headers)


def test_static_files_stay_cacheable(client):
    with client.get("/favicon.ico") as reply:
        assert "no-store" not in reply.headers.get("Cache-Control", "")


@pytest.mark.parametrize("number", ["²" * 16, "٤١١١١١١١١١١١١١١١", "４１１１１１１１１１１１１１１１"])
def test_a_card_number_of_non_ascii_digits_is_400(client, pushes, caplog, number):
    """str.isdigit() took these: "²" then failed in the background task with a traceback
    after a 200, the others were checked as if they were 0-9."""
    login(client)
    with caplog.at_level(logging.INFO):
        reply = post(client, "/cards/check", {"number": number}, headers={"Accept": "application/json"})
    assert reply.status_code == 400 and "number" in reply.json["error"]
    [warning] = app_warnings(caplog)
    assert not warning.exc_info
    assert pushes.pushes == []


def test_a_wrong_method_is_a_json_refusal_logged_once(client, caplog):
    """A fetch with the wrong method or path gets {"error": ...} like any refusal, which
    demo.js shows on the page, not Werkzeug's HTML page; 405 keeps its Allow header."""
    login(client)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        reply = client.get("/send", headers={"Accept": "application/json"})
    assert reply.status_code == 405 and reply.is_json and "Method Not Allowed" in reply.json["error"]
    assert "POST" in reply.headers["Allow"]
    [warning] = app_warnings(caplog)
    assert warning.levelname == "WARNING" and not warning.exc_info and "405" in warning.getMessage()


def test_an_unknown_page_shows_the_error_on_the_page(client):
    reply = client.get("/no/such/page", headers={"Accept": BROWSER_ACCEPT})
    assert reply.status_code == 404 and reply.mimetype == "text/html"
    assert re.search(r'<p id="error"[^>]*role="alert">Not Found: [^<]+</p>', reply.get_data(as_text=True))


def test_login_never_redirects_off_site(client):
    for query in ("?next=https://evil.example/", "?next=//evil.example/", "?url=/%2f%2fevil.example"):
        reply = client.post("/login" + query, data={"csrf_token": csrf_token(client), "username": "alice"})
        assert reply.status_code == 302 and reply.headers["Location"] == "/", reply.headers


def test_the_socket_token_is_not_readable_cross_origin(client):
    """No CORS header, on the GET or its preflight: another origin's fetch with credentials
    gets an opaque error, never the token (and SameSite=Lax keeps the cookie off it anyway)."""
    login(client)
    origin = {"Origin": "https://evil.example"}
    for reply in (client.get("/socket_auth_token", headers=origin),
                  client.options("/socket_auth_token",
                                 headers={**origin, "Access-Control-Request-Method": "GET"})):
        assert not [h for h in reply.headers.keys() if h.lower().startswith("access-control-")]
    assert client.get("/socket_auth_token", headers=origin).headers["Cache-Control"] == "no-store"


def test_background_tasks_are_bounded_and_a_full_app_says_busy(settings, tmp_path, caplog):
    """One client posting in a loop started a thread per request, without limit; now a
    process runs MAX_TASKS at once and refuses the next with 503, logged once."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def held_push(username, message_id, data):
        started.release()
        release.wait(10)

    app = create_app({"FLOW_SETTINGS": settings, "PUSH": held_push, "TASK_DELAY": 0, "TESTING": True,
                      "STATE_DB": str(tmp_path / "state.sqlite3"), "SECRET_KEY": SESSION_KEY,
                      "MAX_TASKS": 2})
    client = app.test_client()
    login(client)
    json_accept = {"Accept": "application/json"}
    try:
        for n in range(2):
            assert post(client, "/send", {"message": f"m{n}"}, headers=json_accept).status_code == 200
        for _ in range(2):
            assert started.acquire(timeout=5), "a task did not start"
        caplog.clear()
        reply = post(client, "/cards/check", {"number": "4111111111111111"}, headers=json_accept)
        assert reply.status_code == 503 and "busy" in reply.json["error"]
        assert reply.headers["Retry-After"] == "1"
        [warning] = app_warnings(caplog)
        assert not warning.exc_info
    finally:
        release.set()
    # The slots come back when the tasks end.
    wait_until(lambda: post(client, "/send", {"message": "again"}, headers=json_accept).status_code == 200,
               5, 0.02, "a free task slot")
