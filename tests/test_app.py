"""The demo app (PROTOCOL.md sections 2 and 8) with Flask's test client; pushes captured."""

from __future__ import annotations

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
def client(settings, pushes, tmp_path):
    app = create_app({"FLOW_SETTINGS": settings, "PUSH": pushes, "TASK_DELAY": 0, "TESTING": True,
                      "STATE_DB": str(tmp_path / "state.sqlite3")})
    return app.test_client()


def login(client, username="alice"):
    reply = client.post("/login", data={"username": username})
    assert reply.status_code == 302
    return reply


def test_index_shows_login_then_status_elements(client):
    assert b'name="username"' in client.get("/").data
    login(client)
    page = client.get("/").data
    for element in (b'id="connected"', b'id="authenticated"', b'id="messages"', b"alice"):
        assert element in page


def test_token_requires_a_session(client):
    reply = client.get("/socket_auth_token")
    assert reply.status_code == 401
    login(client)
    client.post("/logout")
    assert client.get("/socket_auth_token").status_code == 401


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
    reply = client.post("/login", data={"username": username})
    assert reply.status_code == 400 and "username" in reply.json["error"]
    assert client.get("/socket_auth_token").status_code == 401
    warnings = [r for r in caplog.records if r.name == "flow.app"]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING" and not warnings[0].exc_info


def test_send_answers_at_once_then_pushes_task_done(client, pushes):
    login(client)
    reply = client.post("/send", data={"message": "hello"})
    assert reply.json == {"status": "OK", "data": "hello"}
    wait_until(lambda: pushes.pushes, 5, message="the push")
    assert pushes.pushes == [("alice", "TASK DONE", "hello")]


@pytest.mark.parametrize("form, status", [({}, 400), ({"message": "  "}, 400), ({"message": "x" * 1001}, 400)])
def test_send_bad_input(client, pushes, form, status):
    login(client)
    assert client.post("/send", data=form).status_code == status
    assert pushes.pushes == []


def test_send_needs_login(client):
    assert client.post("/send", data={"message": "hi"}).status_code == 401


def test_card_check_masks_and_pushes_progress_then_result(client, pushes):
    login(client)
    reply = client.post("/cards/check", data={"number": "4111 1111 1111 1111"})
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
    assert client.post("/cards/check", data={"number": number}).status_code == 400
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
              "STATE_DB": str(tmp_path / "state.sqlite3")}
    first, second = create_app(config).test_client(), create_app(config).test_client()
    login(first, "erin")
    login(second, "erin")
    first.post("/send", data={"message": "from worker one"})
    wait_until(lambda: pushes.pushes, 5, message="the push")
    assert second.get("/api/state").json["recent"] == [{"id": "TASK DONE", "data": "from worker one"}]
