"""The live demos of app/ (issue 13) in a real browser (Playwright driving Debian's
chromium) against the supervised stack: the counter, the shared document and what the
pages say about their connection when servers die.

One stack serves the module; the last test kills its servers (supervisord restarts them),
so it stays last."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Iterator

import pytest

from conftest import Stack, _require_nginx, _stop_all

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
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
DOC_PATH = re.compile(r"/docs/([A-Za-z0-9_-]{22})$")


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _require_nginx()
    # A short leave delay: a closed page's viewer goes from the list within the test.
    stack = Stack(tmp_path_factory.mktemp("demo_stack"), {"FLOW_PRESENCE_LEAVE_DELAY": "1"})
    try:
        yield stack.start()
    finally:
        _stop_all([stack])


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


class Watched:
    """A user's browser context, with every policy violation and failed request it saw."""

    def __init__(self, browser, stack: Stack, username: str, allowed_failures: tuple[str, ...] = ()) -> None:
        self.context = browser.new_context()
        self.stack = stack
        self.username = username
        self.problems: list[str] = []
        self.allowed = allowed_failures

    def page(self, path: str):
        page = self.context.new_page()
        page.on("console", lambda message: self.problems.append(message.text)
                if "Content Security Policy" in message.text else None)
        page.on("response", lambda response: self.problems.append(f"{response.status} {response.url}")
                if response.status >= 400 and not any(a in response.url for a in self.allowed) else None)
        page.goto(self.stack.base_url + path)
        if page.locator("#username").count():
            page.fill("#username", self.username)
            page.click("#login button[type=submit]")
        expect(page.locator("#user")).to_have_text(self.username, timeout=WAIT_MS)
        return page

    def close(self) -> None:
        self.context.close()


def online(page, state: str = "online") -> None:
    expect(page.locator("#link-state")).to_have_attribute("data-state", state, timeout=WAIT_MS)


def tsv(path: Path, rows: int, prefix: str) -> Path:
    path.write_text("name\tcity\tscore\n" + "".join(f"{prefix} {i}\tcity {i}\t{i}\n" for i in range(1, rows + 1)))
    return path


def create_document(page, table: Path) -> re.Match[str]:
    """Upload ``table`` from the /docs page ``page`` is on; DOC_PATH's match of the new
    document's URL, where the page lands (group 0 its path, group 1 its id)."""
    page.set_input_files("#create-file", str(table))
    page.click("#create")
    page.wait_for_url(DOC_PATH, timeout=WAIT_MS)
    doc_path = DOC_PATH.search(page.url)
    assert doc_path
    return doc_path


def test_every_open_counter_page_shows_each_new_view(demo_stack, browser):
    ann, ben = Watched(browser, demo_stack, "ann"), Watched(browser, demo_stack, "ben")
    try:
        first = ann.page("/counter")
        online(first)
        start = int(first.locator("#counter-value").inner_text())
        second = ben.page("/counter")  # a view: the first page sees it
        online(second)
        expect(second.locator("#counter-value")).to_have_text(str(start + 1))
        expect(first.locator("#counter-value")).to_have_text(str(start + 1), timeout=WAIT_MS)
        for page in (first, second):
            page.evaluate("window.notReloaded = true")
        # A third view, from a page of its own: both open pages move at once.
        third = ann.page("/counter")
        expect(third.locator("#counter-value")).to_have_text(str(start + 2))
        for page in (first, second):
            expect(page.locator("#counter-value")).to_have_text(str(start + 2), timeout=WAIT_MS)
            assert page.evaluate("window.notReloaded") is True
        # The index links to it, and a view from elsewhere (a plain GET) counts as well.
        index = ann.page("/")
        index.click("#nav-counter")
        expect(index.locator("#counter-value")).to_have_text(str(start + 3), timeout=WAIT_MS)
        expect(first.locator("#counter-value")).to_have_text(str(start + 3), timeout=WAIT_MS)
        assert ann.problems == [] and ben.problems == []
    finally:
        ann.close()
        ben.close()


def test_viewers_of_a_document_share_its_page_and_its_uploads(demo_stack, browser, tmp_path):
    alice = Watched(browser, demo_stack, "alice")
    bob = Watched(browser, demo_stack, "bob")
    carol = Watched(browser, demo_stack, "carol", allowed_failures=("/socket_channel_token", "/state"))
    try:
        start = alice.page("/")
        start.click("#nav-docs")
        doc_id = create_document(start, tsv(tmp_path / "people.tsv", 45, "person")).group(1)
        mine = start
        theirs = bob.page(f"/docs/{doc_id}")  # bob was given the URL: logs in, lands there
        for page in (mine, theirs):
            expect(page.locator("#doc-live")).to_have_attribute("data-state", "subscribed", timeout=WAIT_MS)
            expect(page.locator("#doc-pages")).to_have_text("3")
            expect(page.locator("#doc-table tbody tr").first).to_contain_text("person 1")
        theirs.evaluate("window.notReloaded = true")

        mine.click("#next-page")
        for page in (mine, theirs):
            expect(page.locator("#doc-page")).to_have_text("2", timeout=WAIT_MS)
            expect(page.locator("#doc-table tbody tr").first).to_contain_text("21person 21")
        expect(theirs.locator("#prev-page")).to_be_enabled()

        mine.set_input_files("#upload-file", str(tsv(tmp_path / "v2.tsv", 30, "row")))
        mine.click("#upload")
        for page in (mine, theirs):
            expect(page.locator("#doc-filename")).to_have_text("v2.tsv", timeout=WAIT_MS)
            expect(page.locator("#doc-version")).to_have_text("2")
            expect(page.locator("#doc-page")).to_have_text("1")
            expect(page.locator("#doc-pages")).to_have_text("2")
            expect(page.locator("#doc-table tbody tr").first).to_contain_text("row 1")
        expect(theirs.locator("#doc-notice")).to_contain_text("alice uploaded a new file: v2.tsv (version 2)")

        # And back: bob turns the page, alice follows.
        theirs.fill("#goto-page", "2")
        theirs.click("#goto")
        expect(mine.locator("#doc-page")).to_have_text("2", timeout=WAIT_MS)
        expect(mine.locator("#doc-table tbody tr").last).to_contain_text("row 30")
        assert theirs.evaluate("window.notReloaded") is True

        # A bad file is refused on the page; the document stays as it was for everyone.
        (tmp_path / "bad.tsv").write_text("a\tb\n1\n")
        theirs.set_input_files("#upload-file", str(tmp_path / "bad.tsv"))
        theirs.click("#upload")
        expect(theirs.locator("#error")).to_contain_text("not uploaded: line 2: 1 fields, the header has 2",
                                                         timeout=WAIT_MS)
        (tmp_path / "big.tsv").write_bytes(b"a\n" + b"x\n" * 300_000)
        theirs.set_input_files("#upload-file", str(tmp_path / "big.tsv"))
        theirs.click("#upload")
        expect(theirs.locator("#error")).to_contain_text("larger than 512 KiB", timeout=WAIT_MS)
        expect(mine.locator("#doc-version")).to_have_text("2")
        assert alice.problems == [], alice.problems
        assert [p for p in bob.problems if not p.startswith("400 ")] == [], bob.problems

        # carol never had the URL: no subscription token, and no subscription without one.
        other = carol.page("/")
        online(other)
        status = other.evaluate("id => fetch('/socket_channel_token?channel=doc:' + id).then(r => r.status)", doc_id)
        assert status == 403
        refused = other.evaluate("""id => new Promise(resolve => {
            window.flowSocket.subscribe('doc:' + id, {onError: frame => resolve(frame)});
        })""", doc_id)
        assert refused["id"] == "SUBSCRIBE FAILED" and refused["reason"] == "forbidden", refused
        assert other.evaluate("id => fetch('/docs/' + id + '/state').then(r => r.status)", doc_id) == 404
        assert carol.problems == [], carol.problems
    finally:
        alice.close()
        bob.close()
        carol.close()


def test_a_document_shows_who_is_viewing_it(demo_stack, browser, tmp_path):
    """Presence (PROTOCOL section 9, FLOW_PRESENCE_CHANNELS=doc:* in the demo stack): every
    viewer's page lists the others, a second tab is no second viewer, and a closed page's
    viewer goes after the leave delay."""
    dana, eve = Watched(browser, demo_stack, "dana"), Watched(browser, demo_stack, "eve")
    try:
        start = dana.page("/docs")
        doc_path = create_document(start, tsv(tmp_path / "team.tsv", 5, "member")).group(0)
        expect(start.locator("#doc-viewers")).to_have_text("Viewing now: dana", timeout=WAIT_MS)
        theirs = eve.page(doc_path)
        for page in (start, theirs):
            expect(page.locator("#doc-viewers")).to_have_text("Viewing now (2): dana, eve", timeout=WAIT_MS)
        # A second tab of eve's is no second viewer (one JOIN per user, not per socket).
        second_tab = eve.page(doc_path)
        expect(second_tab.locator("#doc-viewers")).to_have_text("Viewing now (2): dana, eve", timeout=WAIT_MS)
        expect(start.locator("#doc-viewers")).to_have_attribute("data-count", "2")
        second_tab.close()
        theirs.close()
        expect(start.locator("#doc-viewers")).to_have_text("Viewing now: dana", timeout=WAIT_MS)
        assert dana.problems == [] and eve.problems == []
    finally:
        dana.close()
        eve.close()


def test_the_index_shows_who_is_online_through_the_lobby_grant(demo_stack, browser):
    """The connection token's `channels` claim grants the lobby (no subscription token), and
    its presence lists who has the index open."""
    gus, hal = Watched(browser, demo_stack, "gus"), Watched(browser, demo_stack, "hal")
    try:
        mine = gus.page("/")
        expect(mine.locator("#online-now")).to_contain_text("gus", timeout=WAIT_MS)
        theirs = hal.page("/")
        for page in (mine, theirs):
            expect(page.locator("#online-now")).to_contain_text("hal", timeout=WAIT_MS)
            expect(page.locator("#online-now")).to_contain_text("gus")
        theirs.close()
        expect(mine.locator("#online-now")).not_to_contain_text("hal", timeout=WAIT_MS)
        assert gus.problems == [] and hal.problems == []
    finally:
        gus.close()
        hal.close()


def test_pages_say_when_they_reconnect_resume_or_reload(demo_stack, browser, tmp_path):
    dora, emil = Watched(browser, demo_stack, "dora"), Watched(browser, demo_stack, "emil")
    try:
        start = dora.page("/docs")
        doc = emil.page(create_document(start, tsv(tmp_path / "t.tsv", 70, "line")).group(0))
        cards = emil.page("/")  # the card check page shows the same words
        for page in (doc, cards):
            online(page)
        expect(doc.locator("#doc-live")).to_have_attribute("data-state", "subscribed", timeout=WAIT_MS)
        doc.evaluate("window.notReloaded = true")

        # No WebSocket server for a while: the pages say so, and keep trying.
        demo_stack.ctl("stop", "websocket:*")
        for page in (doc, cards):
            online(page, "reconnecting")
        # Turned while emil is offline: the channel's history replays it on resume.
        start.click("#next-page")
        expect(start.locator("#doc-page")).to_have_text("2", timeout=WAIT_MS)
        assert doc.locator("#doc-page").inner_text() == "1"
        demo_stack.ctl("start", "websocket:*")
        for page in (doc, cards):
            online(page, "resumed")
        expect(doc.locator("#doc-page")).to_have_text("2", timeout=WAIT_MS)
        expect(doc.locator("#doc-notice")).to_be_hidden()

        # kill -9 loses the proxy's history: nothing can be replayed, the pages reload.
        os.kill(demo_stack.pids("proxy")[0], signal.SIGKILL)
        for page in (doc, cards):
            online(page, "reloaded")
        expect(doc.locator("#doc-notice")).to_contain_text("could not be replayed")
        expect(cards.locator("#resync")).to_be_visible()
        expect(doc.locator("#doc-live")).to_have_attribute("data-state", "subscribed", timeout=WAIT_MS)
        # Live again after the reload.
        start.click("#next-page")
        expect(doc.locator("#doc-page")).to_have_text("3", timeout=WAIT_MS)
        assert doc.evaluate("window.notReloaded") is True
        assert dora.problems == [] and emil.problems == [], dora.problems + emil.problems
    finally:
        dora.close()
        emil.close()
