"""A real browser (Playwright driving Debian's chromium) against the supervised stack."""

from __future__ import annotations

import os
import signal
import ssl
from pathlib import Path

import pytest

import flow
from conftest import _stop_all
from test_nginx import TlsStack, self_signed

CHROMIUM = Path("/usr/bin/chromium")
playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="optional dependency missing: playwright (pip)"
)
if not CHROMIUM.exists():
    pytest.skip("optional dependency missing: chromium (Debian: apt-get install chromium)",
                allow_module_level=True)

pytestmark = [pytest.mark.browser, pytest.mark.stack]
expect = playwright_sync.expect
WAIT_MS = 30_000

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        # Pages fulfilled by Playwright count as public; let them reach the loopback stack.
        "--disable-features=LocalNetworkAccessChecks"]

# A page written the message_flow way: a global messageHandler switching on data.id.
MESSAGE_FLOW_PAGE = """<!doctype html>
<html><body>
<span id="connected"></span> <span id="authenticated"></span>
<ul id="got"></ul>
<script src="/static/js/websocket.js"></script>
<script>
function messageHandler(data) {
  switch (data.id) {
    case "HELLO":
      var li = document.createElement("li");
      li.textContent = data.id + " " + data.data.n;
      document.getElementById("got").appendChild(li);
      break;
    default:
      break;
  }
}
createSocket("/websocket", messageHandler);
</script>
</body></html>"""

MODULE_PAGE = """<!doctype html>
<html><body>
<p id="state">none</p><p id="got"></p>
<script src="/static/js/flow-redux.js"></script>
<script type="module">
import { FlowSocket } from "/static/js/websocket.mjs";
window.actions = [];
const socket = new FlowSocket("/websocket");
socket.onState((state) => { document.getElementById("state").textContent = state; });
socket.on("HELLO", (data) => { document.getElementById("got").textContent = "n=" + data.n; });
connectStore(socket, { dispatch: (action) => window.actions.push(action) });
</script>
</body></html>"""


@pytest.fixture
def browser():
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def log_in(page, stack, username: str) -> None:
    page.goto(stack.base_url + "/")
    page.fill("#username", username)
    page.click("button[type=submit]")
    expect(page.locator("#user")).to_have_text(username, timeout=WAIT_MS)
    expect(page.locator("#authenticated")).to_have_text("Yes", timeout=WAIT_MS)


def test_demo_logs_in_authenticates_and_gets_task_done(stack, browser, tmp_path):
    page = browser.new_page()
    log_in(page, stack, "alice")
    expect(page.locator("#connected")).to_have_text("Online")
    page.fill("#message", "hello flow")
    page.click("#send")
    expect(page.locator("#messages li").first).to_have_text('TASK DONE: "hello flow"', timeout=WAIT_MS)

    page.fill("#card", "4111 1111 1111 1111")
    page.click("#check")
    expect(page.locator("#card-result")).to_contain_text("valid (Visa)", timeout=WAIT_MS)
    shown = page.locator("#card-result").inner_text() + page.locator("#messages").inner_text()
    assert "1111" in shown and "4111111111111111" not in shown.replace(" ", "")
    page.screenshot(path=str(tmp_path / "demo.png"))


def test_message_flow_page_and_module_page(stack, browser):
    context = browser.new_context()
    page = context.new_page()
    log_in(page, stack, "bob")
    # Same origin as far as the browser knows: the pages are served for stack URLs.
    context.route(stack.base_url + "/compat", lambda route: route.fulfill(
        status=200, content_type="text/html", body=MESSAGE_FLOW_PAGE))
    context.route(stack.base_url + "/module", lambda route: route.fulfill(
        status=200, content_type="text/html", body=MODULE_PAGE))
    compat = context.new_page()
    compat.goto(stack.base_url + "/compat")
    expect(compat.locator("#authenticated")).to_have_text("Yes", timeout=WAIT_MS)
    module = context.new_page()
    module.goto(stack.base_url + "/module")
    expect(module.locator("#state")).to_have_text("authenticated", timeout=WAIT_MS)

    publisher = flow.Flow(settings=stack.settings)
    try:
        publisher.push("bob", "HELLO", {"n": 1})
        expect(compat.locator("#got li")).to_have_text(["HELLO 1"], timeout=WAIT_MS)
        expect(module.locator("#got")).to_have_text("n=1", timeout=WAIT_MS)
        actions = module.evaluate("window.actions")
        assert {"type": "HELLO", "payload": {"n": 1}} in actions
    finally:
        publisher.close()
    context.close()


def test_client_reconnects_and_resumes_after_servers_are_killed(stack, browser):
    page = browser.new_page()
    log_in(page, stack, "carol")
    publisher = flow.Flow(settings=stack.settings)
    try:
        publisher.push("carol", "BEFORE", 1)
        expect(page.locator("#messages li")).to_have_count(1, timeout=WAIT_MS)
        for pid in stack.pids("websocket"):
            os.kill(pid, signal.SIGKILL)
        # Missed while no server was up: must be replayed on resume.
        publisher.push("carol", "WHILE DOWN", 2)
        expect(page.locator("#authenticated")).to_have_text("No", timeout=WAIT_MS)
        expect(page.locator("#authenticated")).to_have_text("Yes", timeout=WAIT_MS)
        publisher.push("carol", "AFTER", 3)
        expect(page.locator("#messages li")).to_have_text(
            ["AFTER: 3", "WHILE DOWN: 2", "BEFORE: 1"], timeout=WAIT_MS)
        assert page.locator("#resync").is_hidden()
    finally:
        publisher.close()


def test_proxy_crash_makes_the_page_reload_its_state(stack, browser):
    page = browser.new_page()
    log_in(page, stack, "dave")
    page.fill("#message", "kept by the app")
    page.click("#send")
    expect(page.locator("#messages li")).to_have_count(1, timeout=WAIT_MS)
    # kill -9 loses the proxy's in-memory history (a graceful restart would keep it);
    # supervisord starts a new one, whose new epochs make the servers close with 1012.
    os.kill(stack.pids("proxy")[0], signal.SIGKILL)
    expect(page.locator("#resync")).to_be_visible(timeout=WAIT_MS)
    # Reloaded from /api/state, which the app kept.
    expect(page.locator("#messages li")).to_have_text(['TASK DONE: "kept by the app"'], timeout=WAIT_MS)


# --- the demo's guards and errors (issue 11): an observing stack shared by these tests

def test_demo_page_headers_favicon_and_status_words(shared_stack, browser):
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.on("response", lambda response: problems.append(f"{response.status} {response.url}")
            if response.status >= 400 else None)
    reply = page.goto(shared_stack.base_url + "/")
    headers = reply.headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "same-origin"
    assert page.request.get(shared_stack.base_url + "/favicon.ico").status == 200
    assert page.evaluate("fetch(document.querySelector('link[rel=icon]').href).then(r => r.status)") == 200
    page.fill("#username", "frida")
    page.click("button[type=submit]")
    # Under the page's policy the socket still connects to its own origin.
    expect(page.locator("#connected")).to_have_text("Online", timeout=WAIT_MS)
    expect(page.locator("#authenticated")).to_have_text("Yes", timeout=WAIT_MS)
    page.fill("#message", "under the policy")
    page.click("#send")
    expect(page.locator("#messages li").first).to_have_text('TASK DONE: "under the policy"', timeout=WAIT_MS)
    assert problems == []


def test_demo_shows_refusals_on_the_page(shared_stack, browser):
    page = browser.new_page()
    page.goto(shared_stack.base_url + "/")
    # A name the app refuses: the page again, with the message, not raw JSON.
    page.fill("#username", "*")
    page.click("button[type=submit]")
    expect(page.locator("#error")).to_contain_text("username:", timeout=WAIT_MS)
    expect(page.locator("#username")).to_be_visible()

    # A forged form (its CSRF token is not the session's): refused, shown, not logged in.
    page.fill("#username", "gert")
    page.evaluate("document.querySelector('#login input[name=csrf_token]').value = 'forged'")
    page.click("button[type=submit]")
    expect(page.locator("#error")).to_contain_text("CSRF check failed", timeout=WAIT_MS)
    expect(page.locator("#username")).to_be_visible()

    page.fill("#username", "gert")
    page.click("button[type=submit]")
    expect(page.locator("#authenticated")).to_have_text("Yes", timeout=WAIT_MS)
    expect(page.locator("#error")).to_be_hidden()

    # A 400 from /cards/check: said on the page, not "checking…" forever.
    page.fill("#card", "123")
    page.click("#check")
    expect(page.locator("#card-result")).to_contain_text("not checked: 400", timeout=WAIT_MS)
    expect(page.locator("#error")).to_contain_text("12 to 19 digits", timeout=WAIT_MS)

    # A 400 from /send (blank passes the form's `required`).
    page.fill("#message", "   ")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("/send failed: 400 message: missing or empty",
                                                   timeout=WAIT_MS)
    # A good send clears it.
    page.fill("#message", "fine again")
    page.click("#send")
    expect(page.locator("#messages li").first).to_have_text('TASK DONE: "fine again"', timeout=WAIT_MS)
    expect(page.locator("#error")).to_be_hidden()

    # The fetch's X-CSRFToken header is what lets it through: without it, a visible refusal.
    page.evaluate("document.querySelector('meta[name=csrf-token]').remove()")
    status = page.evaluate("""fetch('/send', {method: 'POST', body: new URLSearchParams({message: 'x'}),
                                             headers: {'Accept': 'application/json'}})
                              .then(r => r.json().then(b => [r.status, b.error]))""")
    assert status[0] == 400 and "CSRF" in status[1]


def test_the_policy_blocks_inline_script_on_the_demo_page(shared_stack, browser):
    """Escaping is one guard against a hostile name or message; the policy is the second:
    script injected into the page (an inline <script>, an on* attribute) never runs.
    (eval is not tried: code Playwright evaluates is exempt from the page's policy.)"""
    page = browser.new_page()
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.goto(shared_stack.base_url + "/")
    ran = page.evaluate("""() => new Promise(resolve => {
        window.injected = [];
        const script = document.createElement('script');
        script.textContent = "window.injected.push('inline')";
        document.body.appendChild(script);
        const img = document.createElement('img');
        img.setAttribute('onerror', "window.injected.push('onerror')");
        img.src = '/no-such-image';
        document.body.appendChild(img);
        // The image's error fires (or is refused) within a moment; then report.
        img.addEventListener('error', () => setTimeout(() => resolve(window.injected), 50));
    })""")
    assert ran == [], ran
    assert any("inline" in text for text in violations), violations


@pytest.fixture
def tls_stack(tmp_path):
    cert, key = self_signed(tmp_path)
    (tmp_path / "stack").mkdir()
    stack = TlsStack(tmp_path / "stack", {"FLOW_TLS_CERT": cert, "FLOW_TLS_KEY": key},
                     ssl.create_default_context(cafile=str(cert)))
    try:
        yield stack.start()
    finally:
        _stop_all([stack])


def test_the_demo_works_over_tls_with_a_secure_cookie(tls_stack, browser):
    """Under TLS Flask-WTF also checks the Referer of each POST and the cookie is Secure:
    a real browser still logs in, sends, and gets its push over wss."""
    context = browser.new_context(ignore_https_errors=True)  # the test's own certificate
    page = context.new_page()
    log_in(page, tls_stack, "tilde")
    [cookie] = [c for c in context.cookies() if c["name"] == "session"]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Lax", cookie
    page.fill("#message", "over tls")
    page.click("#send")
    expect(page.locator("#messages li").first).to_have_text('TASK DONE: "over tls"', timeout=WAIT_MS)
    expect(page.locator("#error")).to_be_hidden()
    context.close()
