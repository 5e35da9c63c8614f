"""The HTTP publish API (PROTOCOL.md section 10), for backends not written in Python.

    POST /api/publish   {"user": u | "channel": c | "broadcast": true, "id": i, "data": d,
                         "idempotency_key": k?}            -> {"stream", "seq", "epoch", "online"}
    POST /api/batch     {"messages": [...]} (at most 100)   -> {"results": [receipt | {"error"}]}
    GET  /healthz, /readyz (503 while the engine does not answer), /metrics

A small Tornado process (``python -m flowcore api``, which supervisord starts only when
FLOW_API_KEY is set), listening on FLOW_API_BIND:FLOW_API_PORT (loopback by default) and
never routed by the public nginx. Every message goes through ``flow.Flow`` with
``confirm=True``: the answer is the receipt of a message the engine numbered and stored,
or an error, never a guess. docs/http-api.md is the user's page.

- Authorization: ``Bearer <FLOW_API_KEY>``, compared in constant time; a key in the query
  string is refused (and the query never logged), as any query string is.
- Errors: ``{"error": {"code", "message"}}`` with 400 ``invalid``, 401 ``unauthorized``
  (``WWW-Authenticate: Bearer``), 404 ``not_found``, 405 ``method_not_allowed``, 413
  ``too_large``, 415 ``unsupported_media_type``, 503 ``unavailable`` (``Retry-After``).
- ``idempotency_key``: the first request with a key publishes; a retry with that key
  within 5 minutes gets the first result and publishes nothing; a duplicate arriving while
  the first is still being published waits for its result. A failed first attempt (503)
  keeps nothing: the retry publishes. With the ZeroMQ engine (one host) the keys live in
  this process; with Redis, in Redis (SET NX with an expiry), so that every API process of
  every host shares them.
- Publishing runs in a thread pool (``flow.Flow`` waits on the engine); the loop only
  parses, checks and answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import logging
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web

from . import protocol
from .health import EngineProbe
from .proxy import WarningLimiter
from .settings import Settings

if TYPE_CHECKING:
    import flow

log = logging.getLogger("flow.api")

# Messages one batch may hold (PROTOCOL section 10).
MAX_BATCH = 100
# What a request body may hold besides the message itself: the target, id, key, JSON syntax.
ENVELOPE = 64 * 1024
# A batch body may be this many times the message limit (FLOW_MAX_MESSAGE), plus the envelope.
BATCH_FACTOR = 10
# A body over its limit by at most this much is read and dropped, so that the client reads
# the 413 (a connection closed while it still sends may lose the answer); past it the
# connection is closed right after the answer.
DISCARD_LIMIT = 4 * 1024 * 1024
# How long a retry with the same idempotency key gets the first result.
IDEMPOTENCY_TTL = 300.0
MAX_KEY_CHARS = 256
# Keys the in-process store holds at most (ZeroMQ engine); the oldest go first past it.
MEMORY_KEYS = 200_000
# Seconds a client is told to wait (Retry-After) when the engine is away.
RETRY_AFTER = 1
# Threads that wait on the engine (each confirmed publish holds one until its receipt).
PUBLISH_THREADS = 64
# A duplicate of a request still being published polls its result this often (Redis).
DUPLICATE_POLL = 0.02
# At SIGTERM, how long requests already taken may take to finish.
DRAIN_TIMEOUT = 10.0
# Tornado's own body limit is this far past ours, so that we answer 413 before it cuts
# the connection (it delivers a body in pieces of at most 64 KiB).
TORNADO_SLACK = 1024 * 1024

TARGETS = ("user", "channel", "broadcast")
MESSAGE_FIELDS = frozenset({*TARGETS, "id", "data", "idempotency_key"})


class ApiError(Exception):
    """An answer other than 200: its status, code and message (safe to show the client)."""

    def __init__(self, status: int, code: str, message: str, engine: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.engine = engine  # the engine is unavailable (not this one request)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def http_reason(status: int) -> str:
    return tornado.httputil.responses.get(status, "error")


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid", message)


def unavailable(message: str, engine: bool = False) -> ApiError:
    return ApiError(503, "unavailable", message, engine)


@dataclass(frozen=True, slots=True)
class Message:
    """One checked message of a request: where it goes and what it says."""

    kind: str  # "user" | "channel" | "broadcast"
    target: str  # the username, the channel's name, or "*"
    message_id: str
    data: Any
    idempotency_key: str | None


def parse_message(obj: object, max_message: int) -> Message:
    """A message object of a request, checked as ``flow.push`` would (and more: exactly
    one target, no unknown field). Raises ApiError (400 invalid, 413 too_large)."""
    if not isinstance(obj, dict):
        raise invalid("a message is a JSON object")
    unknown = sorted(set(obj) - MESSAGE_FIELDS)
    if unknown:
        raise invalid(f"unknown field {protocol.shown_name(str(unknown[0]))} (a message has user, channel or "
                      "broadcast, id, data and idempotency_key)")
    targets = [name for name in TARGETS if name in obj]
    if len(targets) != 1:
        raise invalid("a message has exactly one target: \"user\", \"channel\" or \"broadcast\": true"
                      + (f" (this one has {', '.join(targets)})" if targets else ""))
    kind = targets[0]
    try:
        if kind == "user":
            target = protocol.check_username(obj["user"])
            if target == protocol.BROADCAST:
                raise protocol.ProtocolError('username "*" is reserved: send "broadcast": true')
        elif kind == "channel":
            target = protocol.check_channel(obj["channel"])
        else:
            if obj["broadcast"] is not True:
                raise protocol.ProtocolError('"broadcast" is true or absent')
            target = protocol.BROADCAST
        if "id" not in obj:
            raise protocol.ProtocolError('a message needs an "id"')
        message_id = protocol.check_message_id(obj["id"])
        data = obj.get("data")
        id_part = protocol.dumps(message_id) + b"\n"
        data_json = protocol.encode_data(data, protocol.fast_dumps)
    except protocol.ProtocolError as exc:
        raise invalid(str(exc)) from None
    size = len(id_part) + len(data_json)
    if size > max_message:
        raise ApiError(413, "too_large", f"the message is {size} bytes, over the {max_message}-byte limit "
                       "(FLOW_MAX_MESSAGE)")
    key = obj.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
        raise invalid(f"idempotency_key is a string of 1 to {MAX_KEY_CHARS} characters")
    return Message(kind, target, message_id, data, key)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """A request body as JSON: strict (no NaN or Infinity), integers kept exact (a backend's
    64-bit id must not come back as a float). Raises ApiError 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("the body is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise invalid("the body nests too deep") from None
    except ValueError as exc:
        raise invalid(f"the body is not JSON: {exc}") from None


# ---------------------------------------------------------------- idempotency


@dataclass(slots=True)
class Claim:
    """The outcome of claiming an idempotency key: ``result`` is the first request's answer
    (publish nothing), else this request owns the key (``token``) and publishes."""

    key: str
    token: str
    result: dict[str, Any] | None = None


class IdempotencyStore(Protocol):
    async def claim(self, key: str, wait: float) -> Claim:
        """Own ``key``, or get the first request's result (waiting up to ``wait`` seconds
        for one still being published). Raises ApiError 503."""

    async def complete(self, claim: Claim, result: dict[str, Any]) -> None:
        """Keep ``result`` for retries with the key (IDEMPOTENCY_TTL)."""

    async def release(self, claim: Claim) -> None:
        """The publish failed: forget the key, so that a retry publishes."""

    async def close(self) -> None:
        ...


@dataclass(slots=True)
class _Entry:
    expires: float
    token: str
    result: dict[str, Any] | None
    done: asyncio.Future[dict[str, Any] | None]


class MemoryIdempotency:
    """Keys in this process (the ZeroMQ engine runs on one host, with one API process).
    Used on the event loop only: no lock."""

    def __init__(self, ttl: float = IDEMPOTENCY_TTL, limit: int = MEMORY_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.limit = limit
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    def _forget_old(self, now: float) -> None:
        # Entries are in claim order, and every one lives about ttl from its claim.
        entries = self._entries
        while entries:
            key = next(iter(entries))
            entry = entries[key]
            if entry.expires > now and len(entries) <= self.limit:
                break
            del entries[key]
            if not entry.done.done():
                entry.done.set_result(None)

    async def claim(self, key: str, wait: float) -> Claim:
        now = self.clock()
        self._forget_old(now)
        entry = self._entries.get(key)
        if entry is None:
            token = secrets.token_hex(8)
            future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
            # A pending key lives as long as its publish may take; a result, ttl from then.
            self._entries[key] = _Entry(now + self.ttl, token, None, future)
            return Claim(key, token)
        if entry.result is not None:
            return Claim(key, "", entry.result)
        try:
            result = await asyncio.wait_for(asyncio.shield(entry.done), wait)
        except asyncio.TimeoutError:
            result = None
        if result is None:
            raise unavailable("a request with this idempotency_key did not complete; retry")
        return Claim(key, "", result)

    async def complete(self, claim: Claim, result: dict[str, Any]) -> None:
        entry = self._entries.get(claim.key)
        if entry is None or entry.token != claim.token:
            return  # forgotten meanwhile (the limit): nothing to keep it in
        entry.result = result
        entry.expires = self.clock() + self.ttl
        if not entry.done.done():
            entry.done.set_result(result)

    async def release(self, claim: Claim) -> None:
        entry = self._entries.get(claim.key)
        if entry is not None and entry.token == claim.token:
            del self._entries[claim.key]
            if not entry.done.done():
                entry.done.set_result(None)

    async def close(self) -> None:
        for entry in self._entries.values():
            if not entry.done.done():
                entry.done.set_result(None)
        self._entries.clear()


# KEYS[1]: the key; ARGV: the owner's pending value, then the result (or "" to forget).
_FINISH_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


class RedisIdempotency:
    """Keys in Redis, shared by every API process of every host: ``P:idem:<sha256 of the
    key>`` is ``p <token>`` while its owner publishes (SET NX, expiring after the longest a
    publish may take, so a crashed owner frees it), then the result's JSON for
    IDEMPOTENCY_TTL. Of two requests with one key, exactly one SET NX succeeds."""

    def __init__(self, settings: Settings, pending_ttl: float, ttl: float = IDEMPOTENCY_TTL) -> None:
        from .engines.redis import async_client

        self.prefix = settings.redis_prefix
        self.ttl = ttl
        self.pending_ttl = pending_ttl
        self._client = async_client(settings.redis_address())
        self._finish = self._client.register_script(_FINISH_SCRIPT)

    def _redis_key(self, key: str) -> str:
        return f"{self.prefix}:idem:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"

    async def claim(self, key: str, wait: float) -> Claim:
        import redis

        name = self._redis_key(key)
        deadline = time.monotonic() + wait
        token = secrets.token_hex(8)
        try:
            while True:
                if await self._client.set(name, f"p {token}", nx=True, px=int(self.pending_ttl * 1000)):
                    return Claim(key, token)
                value: Any = await self._client.get(name)
                if value is not None and not value.startswith(b"p "):
                    try:
                        result = json.loads(value)
                    except ValueError:
                        result = None
                    if isinstance(result, dict):
                        return Claim(key, "", result)
                    log.warning("the idempotency key %s holds no result: published again", name)
                    await self._client.delete(name)
                    continue
                if value is None:
                    continue  # released or expired just now: claim it
                if time.monotonic() >= deadline:
                    raise unavailable("a request with this idempotency_key is still being published; retry")
                await asyncio.sleep(DUPLICATE_POLL)
        except (redis.RedisError, OSError) as exc:
            raise unavailable(f"the idempotency store (Redis) does not answer: {type(exc).__name__}") from None

    async def _end(self, claim: Claim, result: bytes) -> None:
        import redis

        try:
            await self._finish(keys=[self._redis_key(claim.key)],
                               args=[f"p {claim.token}", result, int(self.ttl * 1000)])
        except (redis.RedisError, OSError) as exc:
            # The pending value expires by itself; until then retries are told to retry.
            log.warning("could not record an idempotency result in Redis: %s: %s", type(exc).__name__, exc)

    async def complete(self, claim: Claim, result: dict[str, Any]) -> None:
        await self._end(claim, protocol.dumps(result))

    async def release(self, claim: Claim) -> None:
        await self._end(claim, b"")

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception:
            pass  # closing a link that is gone


# ---------------------------------------------------------------- the service


class Service:
    """What the handlers share: settings, the publisher, the idempotency store, counters."""

    def __init__(self, settings: Settings, publisher: "flow.Flow", store: IdempotencyStore,
                 probe: Callable[[], str | None], publish_timeout: float) -> None:
        self.settings = settings
        self.key = settings.api_key.encode("ascii")
        self.publisher = publisher
        self.store = store
        self.probe = probe
        self.publish_timeout = publish_timeout
        self.publish_limit = settings.max_message + ENVELOPE
        self.batch_limit = BATCH_FACTOR * settings.max_message + ENVELOPE
        self.pool = concurrent.futures.ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="flow-api")
        # /readyz and /metrics ask the engine too, but never queue behind publishes that
        # wait on an engine that is away.
        self.admin_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="flow-api-admin")
        self.refusals = WarningLimiter(log)
        self.in_flight = 0
        self.counts: dict[str, int] = {}

    def count(self, name: str, by: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + by

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Latin-1 is how Tornado decoded the header: the bytes the client sent.
        return hmac.compare_digest(token.strip().encode("latin-1", "replace"), self.key)

    def _publish_sync(self, message: Message, deadline: float) -> dict[str, Any]:
        """In a pool thread: publish with confirm=True, the receipt or an ApiError. The
        request's time counts from its arrival (``deadline``), not from when a thread took it."""
        import flow

        publisher, timeout = self.publisher, deadline - time.monotonic()
        if timeout <= 0:
            raise unavailable("the engine did not confirm the message in time (FLOW_API_TIMEOUT)", engine=True)
        try:
            if message.kind == "user":
                return publisher.push(message.target, message.message_id, message.data, confirm=True,
                                      timeout=timeout)
            if message.kind == "channel":
                return publisher.publish(message.target, message.message_id, message.data, confirm=True,
                                         timeout=timeout)
            return publisher.push_all(message.message_id, message.data, confirm=True, timeout=timeout)
        except flow.QueueFull as exc:
            raise unavailable(f"the engine is not taking messages: {exc}", engine=True) from None
        except flow.Unavailable as exc:
            raise unavailable(f"the engine did not confirm the message: {exc}", engine=True) from None
        except flow.InvalidMessage as exc:  # checked before, but flow.Flow has the last word
            raise invalid(str(exc)) from None

    async def publish(self, message: Message) -> dict[str, Any]:
        """Publish one checked message, once per idempotency key. Raises ApiError."""
        claim = None
        if message.idempotency_key is not None:
            # A duplicate waits as long as the first may take.
            claim = await self.store.claim(message.idempotency_key, self.publish_timeout + 1.0)
            if claim.result is not None:
                self.count("replayed")
                return claim.result
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.publish_timeout
        try:
            receipt = await loop.run_in_executor(self.pool, self._publish_sync, message, deadline)
        except BaseException:
            if claim is not None:
                await self.store.release(claim)
            raise
        if claim is not None:
            await self.store.complete(claim, receipt)
        self.count(f"published_{message.kind}")
        return receipt

    async def batch(self, items: list[Any]) -> list[dict[str, Any]]:
        """Each item's receipt or error, in order. Items are published one after another
        (their order is kept); once the engine is unavailable the rest are not tried."""
        results: list[dict[str, Any]] = []
        away: ApiError | None = None
        for item in items:
            try:
                message = parse_message(item, self.settings.max_message)
                if away is not None:
                    raise away
                results.append(await self.publish(message))
            except ApiError as exc:
                if exc.engine and away is None:
                    away = unavailable(f"not tried: an earlier message of the batch found the engine "
                                       f"unavailable ({exc.message})", engine=True)
                self.count(f"item_error_{exc.code}")
                results.append(exc.body())
        return results

    async def ready(self) -> str | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.admin_pool, self.probe)

    def metrics(self) -> bytes:
        from . import metrics

        # With the publisher's own counts and engine check (which may wait on the engine
        # for a moment: the handler calls this in the pool).
        return metrics.render(metrics.registry("api", self.settings.engine, _ApiCollector(self),
                                               metrics.publisher_collector(self.probe)))


class _ApiCollector:
    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counts = dict(self.service.counts)
        published = CounterMetricFamily("flow_api_published", "Messages the HTTP API published (confirmed), "
                                        "by target", labels=["kind"])
        for kind in TARGETS:
            published.add_metric([kind], counts.get(f"published_{kind}", 0))
        yield published
        responses = CounterMetricFamily("flow_api_responses", "HTTP API responses by status", labels=["status"])
        for name, value in sorted(counts.items()):
            if name.startswith("status_"):
                responses.add_metric([name[len("status_"):]], value)
        yield responses
        yield CounterMetricFamily("flow_api_replayed", "Requests answered from an idempotency key's first "
                                  "result (nothing published)", value=counts.get("replayed", 0))
        yield GaugeMetricFamily("flow_api_in_flight", "Requests being handled", value=self.service.in_flight)


# ---------------------------------------------------------------- handlers


class _Base(tornado.web.RequestHandler):
    """JSON answers, errors in the API's shape, and no Tornado HTML page ever."""

    service: Service

    def initialize(self, service: Service) -> None:
        self.service = service

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    answered = False
    refusal = ""

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self.answered = True
        self.set_status(status)
        self.finish(protocol.dumps(body))

    def fail(self, error: ApiError) -> None:
        if error.status == 503:
            self.set_header("Retry-After", str(RETRY_AFTER))
        elif error.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="flow"')
        self.refusal = error.message  # for the access log's line
        self.answer(error.status, error.body())

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's own errors (405, a bug's 500) in the API's shape, never its HTML page.
        codes = {404: "not_found", 405: "method_not_allowed"}
        if status_code == 405:
            self.set_header("Allow", "POST" if isinstance(self, _Publishing) else "GET")
        message = http_reason(status_code) if status_code < 500 else "internal error; see the API's log"
        self.finish(protocol.dumps({"error": {"code": codes.get(status_code, "error"), "message": message}}))


class NotFound(_Base):
    def prepare(self) -> None:
        self.answer(404, {"error": {"code": "not_found", "message":
                                    f"no such path {protocol.shown_name(self.request.path)} "
                                    "(POST /api/publish, POST /api/batch, GET /healthz, /readyz)"}})


@tornado.web.stream_request_body
class _Publishing(_Base):
    """POST with a JSON body, read as it streams, within a limit; checks in the order that
    tells an unauthorized client nothing: query string, key, content type, size, JSON.

    A refusal waits until the body is read (it is dropped as it comes), so that the client,
    still sending, reads the answer: a server that closes on unread data resets the
    connection, and the answer may be lost with it. Only a body far over the limit
    (DISCARD_LIMIT) is answered at once, and its connection closed."""

    SUPPORTED_METHODS = ("POST",)

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._refused: ApiError | None = None
        self.limit = self.body_limit()
        request = self.request
        if request.query:
            # A key put in the URL is in every log it passes: never accepted, never logged here.
            self._refused = invalid("the API takes no query string: send the key in the Authorization header "
                                    "and the message in the JSON body")
        elif not self.service.authorized(request.headers.get("Authorization")):
            self._refused = ApiError(401, "unauthorized", "send Authorization: Bearer <FLOW_API_KEY>")
        else:
            content_type = request.headers.get("Content-Type", "")
            media, _, params = content_type.partition(";")
            charset = params.strip().lower().replace(" ", "").replace('"', "")
            if media.strip().lower() != "application/json" or charset not in ("", "charset=utf-8"):
                self._refused = ApiError(415, "unsupported_media_type", "send Content-Type: application/json "
                                         f"(not {protocol.shown_name(content_type) if content_type else 'none'})")
        length = request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.limit:
            self._refused = self._refused or self._too_large(int(length))
            if int(length) > self.limit + DISCARD_LIMIT:
                self.fail(self._refused)
                return
        # Past this Tornado stops reading (a chunked body that never ends), after we answered.
        connection: Any = request.connection
        connection.set_max_body_size(self.limit + DISCARD_LIMIT + TORNADO_SLACK)

    def on_finish(self) -> None:
        self.service.count(f"status_{self.get_status()}")

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, "too_large", f"the body is {size} bytes or more, over the {self.limit}-byte limit "
                        f"of {self.request.path} (FLOW_MAX_MESSAGE plus {ENVELOPE // 1024} KiB"
                        + (f", times {BATCH_FACTOR})" if self.limit > self.service.publish_limit else ")"))

    def body_limit(self) -> int:
        raise NotImplementedError

    def data_received(self, chunk: bytes) -> None:
        if self.answered:
            return
        self._size += len(chunk)
        if self._size > self.limit and self._refused is None:
            self._refused = self._too_large(self._size)
        if self._refused is None:
            self._chunks.append(chunk)
            return
        self._chunks = []
        if self._size > self.limit + DISCARD_LIMIT:
            self.fail(self._refused)

    async def post(self) -> None:
        if self.answered:
            return
        if self._refused is not None:
            self.fail(self._refused)
            return
        service = self.service
        service.in_flight += 1
        try:
            body = parse_json(b"".join(self._chunks))
            self._chunks = []
            answer = await self.handle(body)
        except ApiError as error:
            self.fail(error)
            return
        finally:
            service.in_flight -= 1
        self.answer(200, answer)

    async def handle(self, body: Any) -> dict[str, Any]:
        raise NotImplementedError


class PublishHandler(_Publishing):
    def body_limit(self) -> int:
        return self.service.publish_limit

    async def handle(self, body: Any) -> dict[str, Any]:
        message = parse_message(body, self.service.settings.max_message)
        return await self.service.publish(message)


class BatchHandler(_Publishing):
    def body_limit(self) -> int:
        return self.service.batch_limit

    async def handle(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"messages"} or not isinstance(body["messages"], list):
            raise invalid('a batch is {"messages": [message, ...]}')
        items = body["messages"]
        if not items or len(items) > MAX_BATCH:
            raise invalid(f"a batch holds 1 to {MAX_BATCH} messages, not {len(items)}")
        return {"results": await self.service.batch(items)}


class HealthHandler(_Base):
    def initialize(self, service: Service, ready: bool = False) -> None:
        self.service = service
        self.ready = ready

    async def get(self) -> None:
        if not self.ready:
            self.answer(200, {"alive": True})
            return
        problem = await self.service.ready()
        if problem:
            self.set_header("Retry-After", str(RETRY_AFTER))
            self.answer(503, {"ready": False, "reason": problem})
        else:
            self.answer(200, {"ready": True})


class MetricsHandler(_Base):
    async def get(self) -> None:
        from .health import METRICS_CONTENT_TYPE

        body = await asyncio.get_running_loop().run_in_executor(self.service.admin_pool, self.service.metrics)
        self.set_header("Content-Type", METRICS_CONTENT_TYPE)
        self.finish(body)


def _log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log: the path only (never a query string, where a careless client may
    put the key), health checks at debug level, refusals with their reason and rate-limited
    (a client retrying a bad request in a loop is one line a second, with the count)."""
    status = handler.get_status()
    request = handler.request
    took = 1000.0 * request.request_time()
    if isinstance(handler, (HealthHandler, MetricsHandler)):
        log.debug("%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip, took)
    elif status < 400:
        log.info("%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip, took)
    elif isinstance(handler, _Base):
        handler.service.refusals.warn(str(status), "%d %s %s (%s) %.2fms: %s", status, request.method,
                                      request.path, request.remote_ip, took, handler.refusal or http_reason(status))
    else:
        log.warning("%d %s %s (%s) %.2fms", status, request.method, request.path, request.remote_ip, took)


def make_app(service: Service) -> tornado.web.Application:
    routes: list[Any] = [
        (r"/api/publish", PublishHandler, {"service": service}),
        (r"/api/batch", BatchHandler, {"service": service}),
        (r"/healthz", HealthHandler, {"service": service}),
        (r"/readyz", HealthHandler, {"service": service, "ready": True}),
    ]
    if service.settings.metrics:
        routes.append((r"/metrics", MetricsHandler, {"service": service}))
    return tornado.web.Application(routes, default_handler_class=NotFound,
                                   default_handler_args={"service": service}, log_function=_log_request)


def idempotency_store(settings: Settings, publish_timeout: float) -> IdempotencyStore:
    if settings.engine == "redis":
        # Pending long enough for any publish to end: a crashed owner frees it after that.
        return RedisIdempotency(settings, pending_ttl=publish_timeout + 10.0)
    return MemoryIdempotency()


async def serve(settings: Settings, port: int | None = None, ready: Callable[[int], Awaitable[None]] | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Run the API until ``stop`` is set (default: SIGTERM or SIGINT), then finish the
    requests already taken (within DRAIN_TIMEOUT), flush and close the publisher."""
    import flow

    publish_timeout = settings.api_timeout
    publisher = flow.Flow(settings=settings)
    probe = EngineProbe(settings)
    store = idempotency_store(settings, publish_timeout)
    service = Service(settings, publisher, store, probe.problem, publish_timeout)
    http = tornado.httpserver.HTTPServer(
        make_app(service), max_body_size=service.batch_limit + DISCARD_LIMIT + 1, idle_connection_timeout=60,
        body_timeout=30)
    try:
        sockets = tornado.netutil.bind_sockets(settings.api_port if port is None else port,
                                               address=settings.api_bind)
    except OSError as exc:
        await store.close()
        publisher.close()
        probe.close()
        service.pool.shutdown(wait=False)
        service.admin_pool.shutdown(wait=False)
        raise SystemExit(f"api: cannot listen on {settings.api_bind}:{port or settings.api_port} "
                         f"(FLOW_API_BIND, FLOW_API_PORT): {exc.strerror or exc}") from None
    http.add_sockets(sockets)
    bound = int(sockets[0].getsockname()[1])  # the port, when 0 was asked
    log.info("HTTP publish API up on %s:%d (engine %s)", settings.api_bind, bound, settings.engine)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        await ready(bound)
    await stop.wait()
    http.stop()  # no new connections; requests already taken go on
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while service.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # a drain's pace, bounded by DRAIN_TIMEOUT
    if service.in_flight:
        log.warning("%d requests still in progress after %gs: cut", service.in_flight, DRAIN_TIMEOUT)
    try:
        await asyncio.wait_for(http.close_all_connections(), 2)
    except asyncio.TimeoutError:
        pass
    await store.close()
    service.pool.shutdown(wait=False, cancel_futures=True)
    service.admin_pool.shutdown(wait=False, cancel_futures=True)
    await asyncio.get_running_loop().run_in_executor(None, publisher.close)
    probe.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    """``flow api`` / ``python -m flowcore api``: the HTTP publish API, when FLOW_API_KEY is set."""
    import argparse

    parser = argparse.ArgumentParser(prog="flow api", description="Flow HTTP publish API (PROTOCOL.md section 10)")
    parser.add_argument("--port", type=int, help="listen port (default FLOW_API_PORT)")
    args = parser.parse_args(argv)

    from .runtime import start_process

    settings = start_process("api", "publisher")
    if not settings.api_key:
        print("api: FLOW_API_KEY is not set: the HTTP publish API is off (set a key of 32 characters or more)",
              file=sys.stderr, flush=True)
        raise SystemExit(2)
    asyncio.run(serve(settings, args.port))
