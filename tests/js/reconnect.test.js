// When the client reconnects: spread over the server's window after closes the server makes
// because of its own state, exponential backoff with full jitter otherwise.
"use strict";

const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./helpers.js");

const HERD_CODES = [1001, 1012, 1013, 4008];

/* Close the current socket with code/reason; the delay (ms) before the next one opens. */
function delayAfterClose(timers, WebSocket, code, reason, limitMs = 120000) {
  const before = WebSocket.instances.length;
  WebSocket.last().serverClose(code, reason);
  let waited = 0;
  while (WebSocket.instances.length === before) {
    if (waited >= limitMs) throw new Error("no reconnect within " + limitMs + " ms");
    timers.tick(1);
    waited += 1;
  }
  return waited;
}

test("server-state closes wait random * window, the window from reconnect_within, clamped", async (t) => {
  // random() = 0.5: the delay is half the window.
  const { socket, WebSocket, timers } = h.makeSocket(t, { random: () => 0.5 });
  const cases = [
    ["", 2500], // default window 5 s
    ["engine lost messages; reconnect_within=6", 3000],
    ["reconnect_within=2.5 (draining)", 1250],
    ["reconnect_within=0.1", 250], // at least 0.5 s
    ["reconnect_within=600", 30000], // at most 60 s
    ["reconnect_within=soon", 2500],
  ];
  for (const code of HERD_CODES) {
    for (const [reason, expected] of cases) {
      await h.authenticate(WebSocket);
      assert.equal(delayAfterClose(timers, WebSocket, code, reason), expected, code + " " + reason);
    }
  }
  socket.close();
});

test("3,000 clients closed with 1012 reconnect_within=6 spread over the whole window", async (t) => {
  const random = h.seededRandom(20261201);
  const WebSocket = h.fakeWebSocketClass();
  const timers = h.mockTimers(t);
  const count = 3000;
  const sockets = [];
  for (let i = 0; i < count; i++) {
    sockets.push(new h.client.FlowSocket(h.URL, { WebSocket, getToken: () => Promise.resolve("t"), random }));
  }
  const first = WebSocket.instances.slice();
  for (const ws of first) {
    ws.open();
    ws.deliver({ id: "AUTH REQUEST" });
  }
  await h.flush();
  for (const ws of first) ws.deliver(h.authOk());
  assert.ok(sockets.every((s) => s.state === "authenticated"));

  for (const ws of first) ws.serverClose(1012, "engine lost messages; reconnect_within=6");
  const step = 10;
  const times = [];
  for (let now = step; now <= 6000 + step && times.length < count; now += step) {
    const before = WebSocket.instances.length;
    timers.tick(step);
    for (let i = before; i < WebSocket.instances.length; i++) times.push(now);
  }
  assert.equal(times.length, count, "every client reconnected within the window");
  const buckets = new Array(12).fill(0);
  for (const ms of times) buckets[Math.min(11, Math.floor((ms - 1) / 500))] += 1;
  const busiest = Math.max(...buckets);
  assert.ok(busiest <= count * 0.15, "a 0.5 s bucket holds " + busiest + ": " + buckets);
  assert.ok(Math.min(...buckets) >= count * 0.04, "a 0.5 s bucket is nearly empty: " + buckets);
  assert.ok(Math.max(...times) - Math.min(...times) >= 5500, "spread " + Math.min(...times) + ".." + Math.max(...times));
  for (const s of sockets) s.close();
});

test("after a server-state close, failed attempts back off exponentially again", async (t) => {
  const { socket, WebSocket, timers } = h.makeSocket(t, { random: () => 0.5 });
  await h.authenticate(WebSocket);
  assert.equal(delayAfterClose(timers, WebSocket, 1012, "reconnect_within=6"), 3000);
  // The server is not back: each attempt fails before it opens.
  const delays = [];
  for (let i = 0; i < 8; i++) delays.push(delayAfterClose(timers, WebSocket, 1006, ""));
  assert.deepEqual(delays, [250, 500, 1000, 2000, 4000, 8000, 15000, 15000]);
  // An AUTH OK starts the backoff over.
  await h.authenticate(WebSocket);
  assert.equal(delayAfterClose(timers, WebSocket, 1006, ""), 250);
  socket.close();
});

test("other closes, 4001/4003/4004 included, keep exponential backoff with full jitter", async (t) => {
  for (const code of [1000, 1006, 1009, 4001, 4002, 4003, 4004, 4029]) {
    const { socket, WebSocket, timers } = h.makeSocket(t, { random: () => 0.5 });
    await h.authenticate(WebSocket);
    const delays = [delayAfterClose(timers, WebSocket, code, "reconnect_within=20")];
    delays.push(delayAfterClose(timers, WebSocket, code, ""));
    delays.push(delayAfterClose(timers, WebSocket, code, ""));
    assert.deepEqual(delays, [250, 500, 1000], "close " + code);
    socket.close();
    t.mock.timers.reset();
  }
});

test("the backoff is full jitter: anywhere from 0 to the bound", async (t) => {
  const { socket, WebSocket, timers } = h.makeSocket(t, { random: () => 0 });
  await h.authenticate(WebSocket);
  WebSocket.last().serverClose(1006);
  timers.tick(0);
  assert.equal(WebSocket.instances.length, 2);
  socket.close();
});

test("close() stops reconnecting and closes the socket with 1000", async (t) => {
  const { socket, WebSocket, timers } = h.makeSocket(t, { random: () => 0.5 });
  const ws = await h.authenticate(WebSocket);
  socket.close();
  assert.deepEqual(ws.closedBy, { code: 1000, reason: "client closed" });
  await h.flush();
  assert.equal(socket.state, "closed");
  timers.tick(120000);
  assert.equal(WebSocket.instances.length, 1);

  // And a close while a reconnect is pending cancels it; connect() starts again.
  socket.connect();
  await h.authenticate(WebSocket);
  WebSocket.last().serverClose(1012);
  socket.close();
  timers.tick(120000);
  assert.equal(WebSocket.instances.length, 2);
  socket.connect();
  assert.equal(WebSocket.instances.length, 3);
  assert.equal(socket.state, "connecting");
  socket.close();
});

test("a WebSocket constructor that throws is retried with backoff", async (t) => {
  const warnings = h.captureWarnings(t);
  let fail = true;
  const Fake = h.fakeWebSocketClass();
  class Flaky extends Fake {
    constructor(url) {
      if (fail) throw new SyntaxError("bad url");
      super(url);
    }
  }
  Flaky.instances = Fake.instances;
  const timers = h.mockTimers(t);
  const socket = new h.client.FlowSocket(h.URL, { WebSocket: Flaky, getToken: () => Promise.resolve("t"), random: () => 0.5 });
  assert.equal(socket.state, "closed");
  assert.match(warnings.join("\n"), /bad url/);
  fail = false;
  timers.tick(249);
  assert.equal(Fake.instances.length, 0);
  timers.tick(1);
  assert.equal(Fake.instances.length, 1);
  socket.close();
});
