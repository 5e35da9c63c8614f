"""The live demos of app/ (issue 13) over HTTP: the counter, the shared TSV documents and
their subscription tokens with Flask's test client (pushes and publishes captured), the
counter's store from several processes, and the command-line producer and consumers
against a real stack."""

from __future__ import annotations

import json
import multiprocessing
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app import create_app
from app.auth import safe_next
from app.store import Store
from app.tsv import MAX_BYTES, MAX_CELL_CHARS, MAX_COLUMNS, TsvError, display_filename, parse_tsv
from flowcore.channels import SubscribeRefused, verify_subscription
from flowcore.settings import load_settings
from flowcore.tokens import TokenVerifier
from support import ROOT, wait_until

SESSION_KEY = "a session key for the demo tests, not the app's"
META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')
DOC_URL = re.compile(r"^/docs/([A-Za-z0-9_-]{22})$")
TSV = b"name\tcity\tscore\n" + b"".join(f"person {i}\tcity {i}\t{i}\n".encode() for i in range(1, 46))
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
JSON = {"Accept": "application/json"}


class Captured:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.lock = threading.Lock()

    def __call__(self, *args: object) -> None:
        with self.lock:
            self.calls.append(args)


@pytest.fixture
def settings(tmp_path):
    return load_settings({"FLOW_SECRET": "s" * 64, "FLOW_ENV_FILE": str(tmp_path / "none")})


@pytest.fixture
def captured():
    return {"push": Captured(), "push_all": Captured(), "publish": Captured()}


@pytest.fixture
def app(settings, captured, tmp_path):
    return create_app({"FLOW_SETTINGS": settings, "PUSH": captured["push"], "PUSH_ALL": captured["push_all"],
                       "PUBLISH": captured["publish"], "TASK_DELAY": 0, "TESTING": True,
                       "STATE_DB": str(tmp_path / "state.sqlite3"), "SECRET_KEY": SESSION_KEY,
                       "DOC_PAGE_ROWS": 20})


def csrf_token(client, path: str = "/") -> str:
    match = META.search(client.get(path).get_data(as_text=True))
    assert match, f"no csrf-token meta tag on {path}"
    return match.group(1)


def logged_in(app, username: str):
    client = app.test_client()
    reply = client.post("/login", data={"csrf_token": csrf_token(client), "username": username})
    assert reply.status_code == 302
    return client


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body built in memory (the test client spools a large one to a
    temporary file it never closes)."""
    boundary = "----flow-test-boundary-7d3c1a"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    for name, (filename, content) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     "Content-Type: text/tab-separated-values\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(client, content: bytes, url: str = "/docs", name: str = "people.tsv", headers=None,
           csrf: bool = True):
    body, content_type = multipart({"csrf_token": csrf_token(client)} if csrf else {}, {"file": (name, content)})
    return client.post(url, data=body, content_type=content_type, headers=headers or HTML)


def new_document(client, content: bytes = TSV) -> str:
    reply = upload(client, content)
    assert reply.status_code == 303, reply.get_data(as_text=True)
    match = DOC_URL.match(reply.headers["Location"])
    assert match, reply.headers["Location"]
    return match.group(1)


def turn(client, doc_id: str, page: object, headers=None):
    return client.post(f"/docs/{doc_id}/page", data={"csrf_token": csrf_token(client), "page": str(page)},
                       headers=headers or JSON)


# ---- pages and their guards

def test_every_demo_is_linked_from_the_index_and_keeps_the_policy(app):
    client = logged_in(app, "alice")
    doc_id = new_document(client)
    index = client.get("/").get_data(as_text=True)
    for link in ('href="/counter"', 'href="/docs"'):
        assert link in index
    for path in ("/", "/counter", "/docs", f"/docs/{doc_id}"):
        reply = client.get(path)
        assert reply.status_code == 200, path
        assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
        assert reply.headers["Cache-Control"] == "no-store"
        page = reply.get_data(as_text=True)
        # Nothing the policy would block: every script has a src, no inline handler or style.
        assert not re.search(r"<script(?![^>]*\bsrc=)", page), path
        assert not re.search(r"\son[a-z]+=|\sstyle=", page), path
        assert 'id="link-state"' in page
    with client.get("/demo-static/status.js") as script:
        assert script.status_code == 200 and "FlowStatus" in script.get_data(as_text=True)
    # The scripts' folder is no window onto the app's source.
    for path in ("/demo-static/../__init__.py", "/demo-static/..%2f__init__.py", "/demo-static/%2e%2e/demos.py"):
        with client.get(path) as reply:
            assert reply.status_code == 404 and b"create_app" not in reply.data, path


def test_demo_pages_ask_anonymous_visitors_to_log_in_and_come_back(app):
    client = app.test_client()
    owner = logged_in(app, "owner")
    doc_id = new_document(owner)
    page = client.get(f"/docs/{doc_id}").get_data(as_text=True)
    assert 'id="username"' in page and f'name="next" value="/docs/{doc_id}"' in page
    assert "person 1" not in page  # nothing of the document before login
    reply = client.post("/login", data={"csrf_token": csrf_token(client), "username": "guest",
                                        "next": f"/docs/{doc_id}"})
    assert reply.status_code == 302 and reply.headers["Location"] == f"/docs/{doc_id}"
    assert "person 1" in client.get(f"/docs/{doc_id}").get_data(as_text=True)


@pytest.mark.parametrize("target", ["//evil.example/x", "/\\evil.example", "https://evil.example/",
                                    "javascript:alert(1)", "docs", "/docs\n/x", "", None])
def test_login_never_redirects_off_site(app, target):
    assert safe_next(target) is None
    client = app.test_client()
    reply = client.post("/login", data={"csrf_token": csrf_token(client), "username": "zed",
                                        **({} if target is None else {"next": target})})
    assert reply.status_code == 302 and reply.headers["Location"] == "/"


# ---- the counter

def test_each_counter_view_counts_and_is_pushed_to_all(app, captured):
    alice, bob = logged_in(app, "alice"), logged_in(app, "bob")
    assert 'data-counter="1"' in alice.get("/counter").get_data(as_text=True)
    assert 'data-counter="2"' in bob.get("/counter").get_data(as_text=True)
    assert alice.get("/api/counter").json == {"value": 2}  # reading does not count
    assert captured["push_all"].calls == [("COUNTER", {"value": 1}), ("COUNTER", {"value": 2})]
    # Not logged in: the login form, no view counted, no value handed out.
    anonymous = app.test_client()
    assert 'id="username"' in anonymous.get("/counter").get_data(as_text=True)
    assert anonymous.get("/api/counter").status_code == 401
    assert alice.get("/api/counter").json == {"value": 2}


def _count_views(path: str, views: int, results) -> None:
    results.put([Store(path).count_view() for _ in range(views)])


def test_the_counter_is_shared_by_processes(tmp_path):
    """gunicorn's workers are processes: each view must count once, whichever served it."""
    path = str(tmp_path / "state.sqlite3")
    Store(path)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_count_views, args=(path, 40, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    values = [value for _ in workers for value in results.get(timeout=60)]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert sorted(values) == list(range(1, 161))
    assert Store(path).counter() == 160


# ---- reading TSV

def test_a_good_tsv_file_is_read_exactly():
    table = parse_tsv("\ufeffname\tnote\r\nAnn\t<b>bold</b> & more\r\nBo\t\n\n".encode())
    assert table.header == ["name", "note"]
    assert table.rows == [["Ann", "<b>bold</b> & more"], ["Bo", ""]]
    assert parse_tsv(b"a\tb\nx\ty\xe2\x80\xa8z").rows == [["x", "y\u2028z"]]  # U+2028 is no line end
    assert display_filename("C:\\Users\\me\\data.tsv") == "data.tsv"
    assert display_filename("../../x\x00.tsv") == "x.tsv" and display_filename("") == "upload.tsv"


@pytest.mark.parametrize("content, says", [
    (b"", "the file is empty"),
    (b"\n\n  \n", "the file is empty"),
    (b"a\tb\n\x00\x01", "binary file"),
    (b"name\n\xff\xfe caf\xe9\n", "not UTF-8 text (byte 5"),
    (b"a\tb\tc\n1\t2\t3\n1\t2\n", "line 3: 2 fields, the header has 3"),
    (b"a\tb\n1\t2\n\n3\t4\n", "line 3: 1 fields, the header has 2"),
    (b"\t\t\n1\t2\t3\n", "line 1: the header names no column"),
    ("\t".join("c" * (MAX_COLUMNS + 1)).encode() + b"\n", f"at most {MAX_COLUMNS}"),
    (b"a\n" + b"x" * (MAX_CELL_CHARS + 1) + b"\n", f"line 2, column 1: longer than {MAX_CELL_CHARS}"),
    (b"a\tb\n1\tbell\x07\n", "line 2, column 2: control character U+0007"),
    (b"a\tb\n1\t2\r3\n", "control character U+000D"),
    (b"a\tb\n", "a header line but no rows"),
    (b"a\n" + b"1\n" * 5001, "more than 5000 rows"),
    (b"a\n" + b"x" * MAX_BYTES, "larger than 512 KiB"),
])
def test_a_bad_tsv_file_is_refused_with_the_reason(content, says):
    with pytest.raises(TsvError) as refused:
        parse_tsv(content)
    assert says in str(refused.value)


# ---- shared documents

def test_upload_gives_an_unguessable_url_that_pages_through_the_file(app):
    client = logged_in(app, "alice")
    ids = {new_document(client) for _ in range(3)}
    assert len(ids) == 3  # a fresh random id per upload, never a counter
    doc_id = ids.pop()
    page = client.get(f"/docs/{doc_id}").get_data(as_text=True)
    assert "people.tsv" in page and "person 20" in page and "person 21" not in page
    assert 'id="doc-pages">3<' in page and 'data-rev="1"' in page
    state = client.get(f"/docs/{doc_id}/state").json
    assert (state["page"], state["pages"], state["row_count"], state["version"]) == (1, 3, 45, 1)
    assert state["header"] == ["name", "city", "score"] and len(state["rows"]) == 20


def test_bad_uploads_are_answered_on_the_page(app):
    client = logged_in(app, "alice")
    reply = upload(client, b"a\tb\n1\n")
    assert reply.status_code == 400 and reply.mimetype == "text/html"
    page = reply.get_data(as_text=True)
    assert "not uploaded: line 2: 1 fields, the header has 2" in page and 'id="create-form"' in page
    reply = upload(client, b"\x89PNG\r\n\x1a\n\x00\x00", headers=JSON)
    assert reply.status_code == 400 and "binary file" in reply.json["error"]
    reply = client.post("/docs", data={"csrf_token": csrf_token(client)}, headers=JSON)
    assert reply.status_code == 400 and reply.json["error"] == "not uploaded: choose a TSV file to upload"
    # Too large: refused before it is read, the reason on the page, not Werkzeug's.
    reply = upload(client, b"a\n" + b"x\n" * (MAX_BYTES // 2 + 20_000))
    assert reply.status_code == 413 and "larger than 512 KiB" in reply.get_data(as_text=True)
    # Between the two limits (the body fits, the file does not).
    reply = upload(client, b"a\n" + b"x" * MAX_BYTES, headers=JSON)
    assert reply.status_code == 400 and "larger than 512 KiB" in reply.json["error"]
    # Without the CSRF token, nothing is kept.
    reply = upload(client, TSV, headers=JSON, csrf=False)
    assert reply.status_code == 400 and "CSRF" in reply.json["error"]
    assert logged_in(app, "anyone").post("/docs", headers=JSON).status_code == 400
    assert app.test_client().post("/docs", data={"csrf_token": csrf_token(app.test_client())},
                                  headers=JSON).status_code in (400, 401)


def test_the_file_is_shown_as_text_never_as_html(app):
    client = logged_in(app, "alice")
    doc_id = new_document(client, b"<i>col</i>\n<script>alert(1)</script>\n")
    page = client.get(f"/docs/{doc_id}").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "&lt;i&gt;col&lt;/i&gt;" in page


def test_page_changes_and_uploads_are_published_on_the_documents_channel(app, captured):
    alice = logged_in(app, "alice")
    doc_id = new_document(alice)
    bob = logged_in(app, "bob")
    bob.get(f"/docs/{doc_id}")  # bob has the URL
    state = turn(bob, doc_id, 2).json
    assert (state["page"], state["first_row"], state["rows"][0][0], state["rev"]) == (2, 21, "person 21", 2)
    assert alice.get(f"/docs/{doc_id}/state").json["page"] == 2  # one page for every viewer
    assert turn(alice, doc_id, 999).json["page"] == 3  # clamped to the last page
    for bad in ("x", "0", "-1", "²", "", "1" * 30):
        assert turn(alice, doc_id, bad).status_code == 400
    reply = upload(bob, b"k\tv\nnew\tfile\n", url=f"/docs/{doc_id}/upload", name="v2.tsv", headers=JSON)
    assert reply.status_code == 200, reply.get_data(as_text=True)
    assert (reply.json["version"], reply.json["page"], reply.json["rows"], reply.json["uploaded_by"]) == (
        2, 1, [["new", "file"]], "bob")
    channel = f"doc:{doc_id}"
    assert captured["publish"].calls == [
        (channel, "PAGE", {"rev": 2, "version": 1, "page": 2, "pages": 3, "filename": "people.tsv",
                           "uploaded_by": "alice"}),
        (channel, "PAGE", {"rev": 3, "version": 1, "page": 3, "pages": 3, "filename": "people.tsv",
                           "uploaded_by": "alice"}),
        (channel, "UPLOAD", {"rev": 4, "version": 2, "page": 1, "pages": 1, "filename": "v2.tsv",
                             "uploaded_by": "bob"}),
    ]
    # A form post without JavaScript turns the page too, and comes back to the document.
    reply = turn(alice, doc_id, 1, headers=HTML)
    assert reply.status_code == 303 and reply.headers["Location"] == f"/docs/{doc_id}"
    # A bad new file leaves the document as it was.
    reply = upload(bob, b"", url=f"/docs/{doc_id}/upload")
    assert reply.status_code == 400 and "not uploaded: the file is empty" in reply.get_data(as_text=True)
    assert alice.get(f"/docs/{doc_id}/state").json["version"] == 2


def test_only_users_who_opened_the_url_get_a_subscription_token(app, settings):
    alice = logged_in(app, "alice")
    doc_id = new_document(alice)
    channel = f"doc:{doc_id}"
    mallory = logged_in(app, "mallory")
    # Knowing the channel's name is not knowing the URL: nothing until mallory opens it.
    assert mallory.get(f"/socket_channel_token?channel={channel}").status_code == 403
    assert mallory.get(f"/docs/{doc_id}/state").status_code == 404
    assert turn(mallory, doc_id, 2).status_code == 404
    assert upload(mallory, TSV, url=f"/docs/{doc_id}/upload", headers=JSON).status_code == 404
    assert alice.get(f"/docs/{doc_id}/state").json["page"] == 1
    for other in ("doc:" + "A" * 22, "doc:*", "doc:" + doc_id + ":x", "counter", "", "user:alice"):
        assert alice.get("/socket_channel_token", query_string={"channel": other}).status_code == 403
    assert app.test_client().get(f"/socket_channel_token?channel={channel}").status_code == 401

    reply = alice.get(f"/socket_channel_token?channel={channel}")
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    assert reply.headers["Cache-Control"] == "no-store"
    verifier = TokenVerifier(settings)
    assert verify_subscription(verifier, reply.get_data(as_text=True), "alice", channel) > 0
    with pytest.raises(SubscribeRefused):  # for alice's sockets only
        verify_subscription(verifier, reply.get_data(as_text=True), "mallory", channel)
    as_json = alice.get(f"/socket_channel_token?channel={channel}", headers=JSON).json
    assert as_json["channel"] == channel and as_json["expires_in"] == settings.token_ttl

    assert mallory.get(f"/docs/{doc_id}").status_code == 200  # now mallory has the URL
    assert mallory.get(f"/socket_channel_token?channel={channel}").status_code == 200
    # An id that is no document: the same 404 as one never opened.
    assert alice.get("/docs/" + "B" * 22).status_code == 404
    assert alice.get("/docs/" + "B" * 22 + "/state").status_code == 404


def test_old_documents_make_room_for_new_ones(settings, tmp_path):
    app = create_app({"FLOW_SETTINGS": settings, "PUSH": Captured(), "PUSH_ALL": Captured(),
                      "PUBLISH": Captured(), "TESTING": True, "STATE_DB": str(tmp_path / "s.sqlite3"),
                      "SECRET_KEY": SESSION_KEY, "MAX_DOCUMENTS": 2})
    client = logged_in(app, "alice")
    first, second, third = (new_document(client) for _ in range(3))
    assert client.get(f"/docs/{first}").status_code == 404
    assert client.get(f"/docs/{second}").status_code == 200 and client.get(f"/docs/{third}").status_code == 200


# ---- producer and consumers from the command line (a real stack)

@pytest.mark.stack
def test_a_producer_reaches_every_consumer_in_order(shared_stack, tmp_path):
    count = 40
    env = dict(shared_stack.env)
    consumers = {
        "consumer.py": [sys.executable, "-m", "app.examples.consumer", "ann", "--count", str(count)],
        "flow listen": [sys.executable, "-m", "flowcore", "listen", "ben", "--count", str(count)],
    }
    running: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    try:
        for name, args in consumers.items():
            err = tmp_path / f"{name.replace(' ', '-')}.err"
            with open(err, "w") as stderr:
                running[name] = (subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                                  stderr=stderr, text=True), err)
        for name, (process, err) in running.items():
            wait_until(lambda: "listening as" in err.read_text() or process.poll() is not None,
                       20, 0.05, f"{name} to authenticate")
            assert process.poll() is None, err.read_text()
        producer = subprocess.run([sys.executable, "-m", "app.examples.producer", "--count", str(count),
                                   "--interval", "0"], env=env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=30)
        assert producer.returncode == 0, producer.stderr
        assert f"sent {count} messages" in producer.stderr
        for name, (process, err) in running.items():
            out, _ = process.communicate(timeout=20)
            assert process.returncode == 0, f"{name}: {err.read_text()}"
            messages = [json.loads(line) for line in out.splitlines()]
            assert [(m["id"], m["username"], m["data"]) for m in messages] == [
                ("TICK", "*", {"n": n, "of": count}) for n in range(1, count + 1)], name
            seqs = [m["seq"] for m in messages]
            assert seqs == list(range(seqs[0], seqs[0] + count)), name
    finally:
        for process, _ in running.values():
            if process.poll() is None:
                process.kill()
                process.wait(5)
