"""Adversarial tests of presence, the HTTP publish API, receipts and flow.aio (the review of
2026-12-03, /work/notes/attack.md). Real proxy or redis-server, real WebSocket servers,
real API process. A failing test here is a bug found by that review; a passing one guards
something the rest of the suite does not."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from pipeline import Pipeline
from support import wait_until
from test_channels_live import frames_until, nothing_more, revision2
from test_presence import _count, grant, viewer

LEAVE_DELAY = 0.5
LEASE = 1.0


def diffs(frames: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f["id"], f["username"]) for f in frames if f["id"] in ("JOIN", "LEAVE")]


@pytest.fixture
def pipe(tmp_path, engine):
    pipeline = Pipeline(tmp_path, engine=engine, FLOW_PRESENCE_CHANNELS="doc:*,room",
                        FLOW_PRESENCE_LEAVE_DELAY=str(LEAVE_DELAY), FLOW_PRESENCE_LEASE=str(LEASE))
    yield pipeline
    pipeline.stop()


# ---------------------------------------------------------------- presence under faults


def test_a_stalled_then_woken_server_gets_its_users_back(pipe):
    """SIGSTOP past the lease: its users LEAVE (lease + delay); SIGCONT: they are still
    connected there, so they JOIN again and flow.presence lists them; no ghost stays."""
    async def run() -> None:
        observer, _ = await viewer(pipe, "olga", "doc:s", server=0)
        frozen, _ = await viewer(pipe, "carol", "doc:s", server=1)
        await frames_until(observer, lambda f: f["id"] == "JOIN" and f["username"] == "carol")
        publisher = pipe.publisher()
        pipe.servers[1].signal(signal.SIGSTOP)
        try:
            await frames_until(observer, lambda f: f["id"] == "LEAVE" and f["username"] == "carol",
                               timeout=LEASE + LEAVE_DELAY + 5)
            assert not publisher.is_online("carol")
        finally:
            pipe.servers[1].signal(signal.SIGCONT)
        await frames_until(observer, lambda f: f["id"] == "JOIN" and f["username"] == "carol", timeout=10)
        wait_until(lambda: set(publisher.presence("doc:s")["users"]) == {"olga", "carol"}, 5,
                   message="carol listed again")
        assert publisher.is_online("carol")
        # carol's own page, on the woken server, ends with the truth too.
        await frozen.send(json.dumps({"id": "PRESENCE", "channel": "doc:s", "ref": 1}))
        got = await frames_until(frozen, lambda f: f["id"] == "PRESENCE" and f.get("ref") == 1)
        assert set(got[-1]["users"]) == {"olga", "carol"}
        for ws in (observer, frozen):
            await ws.close()

    asyncio.run(run())


def test_a_drain_makes_no_leave_for_clients_that_come_back_within_the_window_it_gave(tmp_path, engine):
    """PROTOCOL 9: "a reload or a 1001 drain makes neither [JOIN nor LEAVE]". A draining
    server tells its clients to spread their reconnects over reconnect_within seconds
    (closing sockets x FLOW_WS_PROCESSES / 500, so 20 s for 5000 sockets on a pool of 2),
    but drops their presence at once: whoever obeys and comes back after
    FLOW_PRESENCE_LEAVE_DELAY (10 s) makes a LEAVE and a JOIN. Scaled down here: a pool
    announced as 500 servers makes the window 3 s for 3 sockets; the delay is 1 s."""
    pipe = Pipeline(tmp_path, engine=engine, FLOW_PRESENCE_CHANNELS="doc:*", FLOW_PRESENCE_LEAVE_DELAY="1",
                    FLOW_PRESENCE_LEASE=str(LEASE), FLOW_WS_PROCESSES="500")

    async def run() -> None:
        observer, _ = await viewer(pipe, "olga", "doc:d", server=0)
        movers = [await viewer(pipe, f"m{i}", "doc:d", server=1) for i in range(3)]
        await frames_until(observer, lambda f: f["id"] == "JOIN" and f["username"] == "m2")
        closes = [asyncio.ensure_future(mover.wait_closed()) for mover, _ in movers]
        pipe.servers[1].signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*closes), 10)
        reason = movers[0][0].close_reason or ""
        assert movers[0][0].close_code == 1001 and "reconnect_within=" in reason, reason
        window = float(reason.rsplit("reconnect_within=", 1)[1])
        assert window >= 3.0
        # The clients come back two thirds into the window they were given, as a uniform
        # spread brings a third of them back later still.
        await asyncio.sleep(window * 2 / 3)  # the client's own schedule, not synchronisation
        back = [await viewer(pipe, f"m{i}", "doc:d", server=0) for i in range(3)]
        seen = diffs(await nothing_more(observer))
        for ws in [observer, *(ws for ws, _ in back)]:
            await ws.close()
        assert seen == [], f"a drain made {seen}"

    try:
        asyncio.run(run())
    finally:
        pipe.stop()


def test_a_proxy_restart_makes_no_join_for_users_who_never_left(tmp_path):
    """PROTOCOL 9: JOIN "when a user's first connection subscribes". After a graceful
    restart of the ZeroMQ proxy (a deploy), each server reports its counts to an empty
    table again: every user present goes from 0 to 1 there, and every page is sent a JOIN
    for everyone already in its list (an app showing "carol joined" shows it for all)."""
    # A lease of 5 s renews every second: the servers' fan-out links are back before
    # their next report reaches the new proxy, so its JOINs reach the pages.
    pipe = Pipeline(tmp_path, FLOW_PRESENCE_CHANNELS="doc:*", FLOW_PRESENCE_LEAVE_DELAY=str(LEAVE_DELAY),
                    FLOW_PRESENCE_LEASE="5")

    async def run() -> None:
        observer, ok = await viewer(pipe, "olga", "doc:r", server=0)
        others = [await viewer(pipe, "carol", "doc:r", server=1), await viewer(pipe, "dave", "doc:r", server=0)]
        await frames_until(observer, lambda f: f["id"] == "JOIN" and f["username"] == "dave")
        publisher = pipe.publisher()
        pipe.restart_proxy()
        wait_until(lambda: _count(publisher, "doc:r") == 3, 15, message="presence re-reported")
        frames = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            frames += await nothing_more(observer)
            await asyncio.sleep(0.1)  # pacing the polls: each one is a PING round trip
        for ws in [observer, *(ws for ws, _ in others)]:
            await ws.close()
        assert diffs(frames) == [], f"users who never left: {frames}"

    try:
        asyncio.run(run())
    finally:
        pipe.stop()


def test_a_confirmed_push_across_a_killed_and_restarted_proxy_is_told_true(tmp_path):
    """kill -9 of the proxy, a confirmed push while it is away, a new proxy within the
    timeout: the push and the receipt request waited in the publisher's sockets, so the
    new proxy numbers it (in its new epoch) and answers; the receipt is what the engine did."""
    import threading

    import flow

    pipe = Pipeline(tmp_path, servers=1)
    try:
        publisher = pipe.publisher()
        first = publisher.push("kim", "FIRST", confirm=True)
        pipe.kill_proxy()
        outcome: dict[str, Any] = {}

        def confirm() -> None:
            try:
                outcome["receipt"] = publisher.push("kim", "ACROSS", confirm=True, timeout=3)
            except flow.Unavailable as exc:
                outcome["unavailable"] = exc

        thread = threading.Thread(target=confirm)
        thread.start()
        pipe.start_proxy()
        thread.join(10)
        after = publisher.push("kim", "AFTER", confirm=True, timeout=5)
        if "receipt" in outcome:
            receipt = outcome["receipt"]
            assert receipt["epoch"] != first["epoch"] and receipt["epoch"] == after["epoch"]
            assert after["seq"] == receipt["seq"] + 1
        else:  # told unavailable: then never numbered
            assert after["seq"] == 1, outcome
    finally:
        pipe.stop()


# ---------------------------------------------------------------- the HTTP API


def test_api_answers_503_within_its_timeout_when_many_requests_wait_on_an_engine_away(tmp_path):
    """docs/http-api.md: 503 when the engine "did not number the message within
    FLOW_API_TIMEOUT". Each publish holds one of 16 pool threads for the whole timeout, and
    the timeout starts only when a thread takes the request: with the proxy away, 48
    concurrent requests (a backend retrying after Retry-After: 1) are answered in waves,
    the last after three timeouts, and /readyz, on the same pool, waits behind them."""
    import concurrent.futures

    from test_api import Api

    api = Api(tmp_path, "zmq")
    try:
        assert api.publish(user="ann", id="UP").status == 200
        api.pipe.stop_proxy()

        def timed(index: int) -> tuple[int, float]:
            started = time.monotonic()
            answer = api.publish(user="ann", id="N", data=index)
            return answer.status, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(48) as pool:
            results = list(pool.map(timed, range(48)))
        assert {status for status, _ in results} == {503}
        slowest = max(took for _, took in results)
        # FLOW_API_TIMEOUT is 1 s; a receipt on its way may add 0.25 s.
        assert slowest < 2.0, f"the last 503 came after {slowest:.1f}s (FLOW_API_TIMEOUT=1)"
    finally:
        api.stop()


# ---------------------------------------------------------------- flow.aio


def test_aio_confirmed_pushes_to_an_engine_away_do_not_starve_the_loops_executor(tmp_path, capfd):
    """docs/asyncio.md: confirmed pushes "wait in the loop's default executor (a thread
    each while they wait), so other requests go on meanwhile". The default executor has
    min(32, cores + 4) threads (6 here): with the engine away, a dozen confirmed pushes
    hold all of them for their timeout, so (1) each one's timeout starts only when a
    thread is free, and `timeout=0.3` raises after seconds, and (2) everything else of
    the app that uses the executor (loop.getaddrinfo for every outgoing connection,
    loop.run_in_executor) waits behind them."""
    import flow
    from support import base_env, free_port

    publisher = flow.aio.Flow.from_env(base_env(tmp_path), endpoint=f"tcp://127.0.0.1:{free_port()}",
                                       control_endpoint=f"tcp://127.0.0.1:{free_port()}", linger=0.1)

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def confirmed(i: int) -> float:
            with pytest.raises(flow.Unavailable):
                await publisher.push("alice", "ID", i, confirm=True, timeout=0.3)
            return loop.time() - started

        pushes = asyncio.gather(*(confirmed(i) for i in range(24)))
        await asyncio.sleep(0.05)  # the pushes are in the executor now
        resolving = loop.time()
        await loop.getaddrinfo("127.0.0.1", 80)
        resolved = loop.time() - resolving
        slowest = max(await pushes)
        await publisher.close()
        return slowest, resolved

    slowest, resolved = asyncio.run(run())
    capfd.readouterr()
    assert resolved < 0.5, f"loop.getaddrinfo waited {resolved:.1f}s behind confirmed pushes"
    assert slowest < 1.0, f"a confirmed push with timeout=0.3 raised after {slowest:.1f}s"


# ---------------------------------------------------------------- hostile frames


HOSTILE_PRESENCE_FRAMES = [
    {"id": "SUBSCRIBE", "channel": "doc:h", "presence": "yes"},
    {"id": "SUBSCRIBE", "channel": "doc:h", "presence": 1},
    {"id": "SUBSCRIBE", "channel": "doc:h", "presence": {}},
    {"id": "SUBSCRIBE", "channel": "doc:h", "ref": "r" * 65},
    {"id": "SUBSCRIBE", "channel": "doc:h", "ref": 2**53},
    {"id": "SUBSCRIBE", "channel": "doc:h", "ref": 1.5},
    {"id": "SUBSCRIBE", "channel": "doc:h", "ref": [1]},
    {"id": "PRESENCE", "channel": ["doc:h"]},
    {"id": "PRESENCE", "channel": "doc:" + "x" * 5000},
    {"id": "PRESENCE"},
    {"id": "PRESENCE", "channel": "doc:h", "ref": {"a": 1}},
]


def test_hostile_presence_frames_are_refused_and_count_nobody(pipe):
    async def run() -> None:
        observer, _ = await viewer(pipe, "olga", "doc:h")
        for frame in HOSTILE_PRESENCE_FRAMES:
            # A socket each: refusals cost against the rate limit (ERROR_COST).
            ws, _ = await revision2(pipe.url(1), grant(pipe, "mallory"))
            await ws.send(json.dumps(frame))
            [answer] = await frames_until(ws, lambda f: f["id"] in ("ERROR", "SUBSCRIBE OK", "SUBSCRIBE FAILED",
                                                                     "PRESENCE"))
            assert answer["id"] in ("ERROR", "SUBSCRIBE FAILED"), (frame, answer)
            await ws.close()
        assert pipe.publisher().presence("doc:h")["users"] == {"olga": {"connections": 1}}
        assert diffs(await nothing_more(observer)) == []
        await observer.close()

    asyncio.run(run())


async def _every(ws: ClientConnection, kind: str, names: list[str]) -> None:
    """Read until a ``kind`` (JOIN or LEAVE) came for every one of ``names``, exactly, each
    diff's version above the one before (what a page relies on to order them)."""
    seen: set[str] = set()
    versions: list[int] = []

    def done(frame: dict[str, Any]) -> bool:
        if frame["id"] in ("JOIN", "LEAVE"):
            assert not versions or frame["version"] > versions[-1], (versions[-1], frame)
            versions.append(frame["version"])
        if frame["id"] == kind:
            seen.add(frame["username"])
        return seen >= set(names)

    await frames_until(ws, done)
    assert seen == set(names)


def test_unicode_usernames_in_presence_come_back_exactly(pipe):
    """Spaces, newlines, RTL marks, astral characters and a 256-byte name: the Redis
    engine splits its presence events on spaces, the ZeroMQ one encodes JSON."""
    names = ["zoë 🚀 two words", "line\nbreak", "\u202eevil", "\U0001f600" * 64, "a b c d"]

    async def run() -> None:
        observer, _ = await viewer(pipe, "olga", "doc:u")
        sockets = [(await viewer(pipe, name, "doc:u", server=i % 2))[0] for i, name in enumerate(names)]
        await _every(observer, "JOIN", names)
        assert set(pipe.publisher().presence("doc:u")["users"]) == {"olga", *names}
        publisher = pipe.publisher()
        assert all(publisher.is_online(name) for name in names)
        for ws in sockets:
            await ws.close()
        await _every(observer, "LEAVE", names)
        await observer.close()

    asyncio.run(run())


def test_a_proxy_away_longer_than_a_presence_request_still_refreshes_the_pages(tmp_path):
    """docs/protocol.md: after an engine restart "every subscription that listens is sent a
    fresh snapshot ... because a LEAVE that was pending may be gone". The ZeroMQ server
    notices the lost table only from a reply saying it is not known; when the proxy is
    away longer than PRESENCE_TIMEOUT (5 s), the pending report times out, the next one
    is a full report (always applied, so always "known") and no page is refreshed: fred,
    whose LEAVE was pending in the lost table, stays on erin's page for good."""
    pipe = Pipeline(tmp_path, FLOW_PRESENCE_CHANNELS="doc:*", FLOW_PRESENCE_LEAVE_DELAY="3",
                    FLOW_PRESENCE_LEASE="5")

    async def run() -> None:
        erin, ok = await viewer(pipe, "erin", "doc:g", server=0)
        try:
            fred, _ = await viewer(pipe, "fred", "doc:g", server=1)
            await frames_until(erin, lambda f: f["id"] == "JOIN" and f["username"] == "fred")
            await fred.close()  # fred's LEAVE is pending (3 s) when the proxy goes
            publisher = pipe.publisher()
            wait_until(lambda: publisher.presence("doc:g")["users"].get("fred") == {"connections": 0}, 5,
                       message="fred's LEAVE pending")
            pipe.stop_proxy()  # graceful: the numbering goes on, the presence table does not
            await asyncio.sleep(6)  # the outage itself: longer than one presence request's 5 s
            pipe.start_proxy()
            wait_until(lambda: _count(publisher, "doc:g") == 1, 15, message="presence re-reported")
            assert publisher.presence("doc:g")["users"] == {"erin": {"connections": 1}}  # the engine's truth
            # A renewal (every second) finds the new proxy: the refresh is due within that.
            try:
                frames = await frames_until(erin, lambda f: f["id"] == "LEAVE" or (
                    f["id"] == "PRESENCE" and "ref" not in f), timeout=10)
            except TimeoutError:
                pytest.fail("fred left while the proxy was away; erin's page got no LEAVE and no fresh "
                            "snapshot: fred stays on it")
            assert frames[-1]["id"] == "LEAVE" or "fred" not in frames[-1].get("users", {}), frames
        finally:
            await erin.close()

    try:
        asyncio.run(run())
    finally:
        pipe.stop()


@pytest.fixture(scope="module")
def zapi(tmp_path_factory):
    from test_api import Api

    service = Api(tmp_path_factory.mktemp("zapi"), "zmq")
    yield service
    service.stop()


def _raw_http(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        return status, data


def test_api_hostile_requests_get_4xx_in_its_shape_never_a_500(zapi):
    api = zapi
    key = api.key.encode()
    body = b'{"user": "hx", "id": "X"}'

    def head(auth: bytes, extra: bytes = b"", length: int | None = len(body)) -> bytes:
        size = b"" if length is None else b"Content-Length: %d\r\n" % length
        return (b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + auth + size + extra + b"\r\n")

    cases = [
        (head(b"Authorization: Bearer \xc3\xa9" + key + b"\r\n"), body, 401),  # UTF-8 in the header
        (head(b"Authorization: Bearer\r\n"), body, 401),
        (head(b"Authorization: \r\n"), body, 401),
        (head(b"Authorization: Bearer " + key[:-1] + b"\r\n"), body, 401),
        (head(b"Authorization: Bearer " + key + b"\r\nAuthorization: Bearer " + key + b"\r\n"), body, 401),
    ]
    for request_head, request_body, status in cases:
        got, raw = _raw_http(api.port, request_head, request_body)
        assert got == status, (request_head, raw[:300])
        assert b'"error"' in raw, raw[:300]
    # Accepted spellings of a good key.
    for auth in (b"Authorization: bearer " + key + b"\r\n", b"Authorization:   Bearer " + key + b"  \r\n"):
        got, raw = _raw_http(api.port, head(auth), body)
        assert got == 200, raw[:300]
    assert "Traceback" not in api.logs()


def test_api_batch_of_100_bad_items_publishes_nothing_and_answers_each(zapi):
    api = zapi
    user = f"bb{time.monotonic_ns()}"
    bad: list[Any] = [None, 1, "x", [], {"user": user}, {"user": user, "id": "AUTH OK"},
                      {"user": user, "id": "X", "data": "x" * 5000}, {"user": user, "id": "X", "zz": 1},
                      {"user": user, "id": "X", "idempotency_key": "k" * 257},
                      {"user": user, "id": "X", "idempotency_key": ""}]
    items = (bad * 10)[:100]
    answer = api.post("/api/batch", {"messages": items})
    assert answer.status == 200
    results = answer.body["results"]
    assert len(results) == 100 and all(set(r) == {"error"} for r in results), results[:3]
    assert api.publish(user=user, id="AFTER").body["seq"] == 1


def test_api_idempotency_keys_of_any_unicode_are_their_own(zapi):
    """256 astral characters (1 KiB), a lone surrogate (stdlib JSON takes it), and two keys
    that differ only in normalisation are three keys: each publishes once."""
    api = zapi
    user = f"ik{time.monotonic_ns()}"
    keys = ["\U0001f600" * 256, "\ud800", "e\u0301", "\u00e9"]
    for key in keys:
        raw = json.dumps({"user": user, "id": "K", "idempotency_key": key}).encode()
        first, again = (api.post("/api/publish", raw) for _ in range(2))
        assert first.status == 200 and again.body == first.body, (key, first.body, again.body)
    assert api.publish(user=user, id="AFTER").body["seq"] == len(keys) + 1


def test_subscribe_unsubscribe_churn_on_a_presence_channel_leaves_no_count(pipe):
    """Ten sockets of one user each send 18 SUBSCRIBE/UNSUBSCRIBE pairs (presence true and
    false mixed) in one write, so every race between a pair is taken, then a last
    SUBSCRIBE, then close: the user shows once while subscribed, and leaves no count, no
    ghost and no stuck LEAVE behind."""
    from test_attack import RawSocket

    async def run() -> None:
        observer, _ = await viewer(pipe, "olga", "doc:c")
        raws = []
        for i in range(10):
            raw = RawSocket(pipe.ports[i % 2])
            assert raw.recv() == {"id": "AUTH REQUEST"}
            frames: list[Any] = [{"id": "AUTH", "token": grant(pipe, "churn")}]
            for n in range(18):
                frames += [{"id": "SUBSCRIBE", "channel": "doc:c", "presence": n % 2 == 0, "ref": n},
                           {"id": "UNSUBSCRIBE", "channel": "doc:c", "ref": n}]
            frames.append({"id": "SUBSCRIBE", "channel": "doc:c", "ref": "last"})
            raw.send(*frames)
            raws.append(raw)
        for raw in raws:
            got = raw.until(lambda f: f.get("ref") == "last" and f["id"] == "SUBSCRIBE OK", timeout=15)
            assert got and got[-1].get("ref") == "last", got[-3:]
        publisher = pipe.publisher()
        wait_until(lambda: publisher.presence("doc:c")["users"].get("churn") == {"connections": 10}, 5,
                   message="ten connections of churn")
        for raw in raws:
            raw.close()
        wait_until(lambda: set(publisher.presence("doc:c")["users"]) == {"olga"}, 5, message="churn gone")
        assert not publisher.is_online("churn")
        seen = diffs(await nothing_more(observer))
        assert seen in ([], [("JOIN", "churn"), ("LEAVE", "churn")]), seen
        await observer.close()

    asyncio.run(run())


def test_a_thousand_sockets_of_one_user_make_one_join_and_one_leave(pipe):
    from test_attack import RawSocket

    async def run() -> None:
        observer, _ = await viewer(pipe, "olga", "doc:k")
        token = grant(pipe, "many")
        raws = []
        for i in range(1000):
            raw = RawSocket(pipe.ports[i % 2])
            raw.send({"id": "AUTH", "token": token}, {"id": "SUBSCRIBE", "channel": "doc:k", "presence": False})
            raws.append(raw)
        for raw in raws:
            raw.until(lambda f: f["id"] == "SUBSCRIBE OK", timeout=20)
        publisher = pipe.publisher()
        wait_until(lambda: publisher.presence("doc:k")["users"].get("many") == {"connections": 1000}, 10,
                   message="1000 connections")
        await observer.send(json.dumps({"id": "PRESENCE", "channel": "doc:k", "ref": "n"}))
        got = await frames_until(observer, lambda f: f["id"] == "PRESENCE")
        assert got[-1]["users"]["many"] == {"connections": 1000}
        for raw in raws:
            raw.close()
        got += await frames_until(observer, lambda f: f["id"] == "LEAVE", timeout=10)
        assert set(publisher.presence("doc:k")["users"]) == {"olga"}
        assert diffs(got + await nothing_more(observer)) == [("JOIN", "many"), ("LEAVE", "many")]
        await observer.close()

    asyncio.run(run())


# ---------------------------------------------------------------- receipts under faults


def test_unavailable_from_a_stalled_engine_means_not_published(tmp_path, engine):
    """docs/http-api.md: "A 503 means the message was not published ... the engine is told
    the moment after which it must not number the message". The Redis publisher checks
    that moment only before it sends the script call: a call sent to a Redis that is
    stalled (SIGSTOP here; a fork for BGSAVE, a slow script or a swapped-out Redis alike)
    runs when Redis wakes, after its caller was told flow.Unavailable. (The ZeroMQ proxy
    checks the deadline when it takes the push: it holds.)"""
    import flow

    pipe = Pipeline(tmp_path, servers=1, engine=engine)
    try:
        publisher = pipe.publisher()
        first = publisher.push("rita", "FIRST", confirm=True)
        assert pipe.proxy is not None
        pipe.proxy.signal(signal.SIGSTOP)
        try:
            with pytest.raises(flow.Unavailable):
                publisher.push("rita", "TOLD UNAVAILABLE", confirm=True, timeout=0.3)
        finally:
            pipe.proxy.signal(signal.SIGCONT)
        after = publisher.push("rita", "AFTER", confirm=True, timeout=10)
        assert after["epoch"] == first["epoch"]
        assert after["seq"] == first["seq"] + 1, "the message its caller was told was not published was published"
    finally:
        pipe.stop()


def test_a_flood_of_presence_queries_does_not_hold_up_other_users_subscriptions(tmp_path):
    """One account, 400 sockets, each spending its burst on 8 PRESENCE queries (the rate
    limit is per socket, not per user). Every query and every presence SUBSCRIBE of the
    server is one round trip to the engine, one at a time behind one lock (the ZeroMQ
    engine's _report_lock, the Redis one's _PresenceReporter._lock): another user's
    SUBSCRIBE waits behind all 3200 (about 0.7 s here, 4500 a second); a sustained flood
    of 1200 such sockets outruns the engine and the wait grows without bound.

    What the fix guarantees is checked, not a time (a loaded test machine moves times):
    queries of one channel share the engine's answer while it is on its way, so the
    engine is asked at most once per socket's burst, not once per query."""
    from test_attack import RawSocket

    pipe = Pipeline(tmp_path, servers=1, FLOW_PRESENCE_CHANNELS="doc:*")
    raws: list[Any] = []
    try:
        token = pipe.token("mallory", extra={"channels": ["doc:*"]})
        for _ in range(400):
            raw = RawSocket(pipe.ports[0])
            raw.send({"id": "AUTH", "token": token}, {"id": "SUBSCRIBE", "channel": "doc:f", "presence": False})
            raws.append(raw)
        for raw in raws:
            raw.until(lambda f: f["id"] == "SUBSCRIBE OK", timeout=30)
        asked_before = pipe.stats(0)["presence_asks"]
        for raw in raws:
            raw.send(*[{"id": "PRESENCE", "channel": "doc:f", "ref": k} for k in range(8)])
        legit = RawSocket(pipe.ports[0])
        legit.send({"id": "AUTH", "token": grant(pipe, "ann")}, {"id": "SUBSCRIBE", "channel": "doc:g"})
        got = legit.until(lambda f: f["id"] in ("SUBSCRIBE OK", "SUBSCRIBE FAILED"), timeout=60)
        raws.append(legit)
        assert got[-1]["id"] == "SUBSCRIBE OK", got
        for raw in raws[:-1]:  # every query answered, with a snapshot
            refs = [f.get("ref") for f in raw.until(lambda f: f.get("ref") == 7, timeout=60)
                    if f["id"] == "PRESENCE"]
            assert refs == list(range(8)), refs
        asked = pipe.stats(0)["presence_asks"] - asked_before
        assert 1 <= asked <= len(raws) - 1, f"{asked} engine round trips for {8 * (len(raws) - 1)} queries"
    finally:
        for raw in raws:
            raw.close()
        pipe.stop()
