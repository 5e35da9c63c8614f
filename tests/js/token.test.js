// Where tokens come from, and their renewal on an open socket (PROTOCOL.md sections 2 and 3).
"use strict";

const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./helpers.js");

test("AUTH REQUEST reason expired on an authenticated socket: a fresh token, no resume", async (t) => {
  const resyncs = [];
  const { socket, WebSocket, getToken } = h.makeSocket(t, { onresync: (d) => resyncs.push(d) });
  const ws = await h.authenticate(WebSocket);
  ws.deliver(h.pushed("HELLO", 5));
  ws.deliver({ id: "AUTH REQUEST", reason: "expired" });
  await h.flush();
  assert.equal(getToken.calls, 2);
  assert.deepEqual(ws.authFrames(), [{ id: "AUTH", token: "token-1" }, { id: "AUTH", token: "token-2" }]);
  ws.deliver(h.authOk({ refreshed: true, streams: undefined }));
  assert.equal(socket.state, "authenticated");
  assert.deepEqual(socket.positions.alice, { seq: 5, epoch: "e1" });
  assert.deepEqual(resyncs, []);
  socket.close();
});

test("the token is refreshed before it expires, from expires_in", async (t) => {
  const { socket, WebSocket, getToken, timers } = h.makeSocket(t);
  const ws = await h.authenticate(WebSocket, h.authOk({ expires_in: 100 }));
  // max(100 - 30, 100 * 0.8) = 80 s
  timers.tick(79999);
  await h.flush();
  assert.equal(getToken.calls, 1);
  timers.tick(1);
  await h.flush();
  assert.equal(getToken.calls, 2);
  assert.deepEqual(ws.authFrames()[1], { id: "AUTH", token: "token-2" });
  // A short-lived token: max(20 - 30, 20 * 0.8) = 16 s after the refreshed AUTH OK.
  ws.deliver(h.authOk({ refreshed: true, expires_in: 20 }));
  timers.tick(15999);
  await h.flush();
  assert.equal(getToken.calls, 2);
  timers.tick(1);
  await h.flush();
  assert.deepEqual(ws.authFrames().map((f) => f.token), ["token-1", "token-2", "token-3"]);
  // A long-lived one: 3600 - 30.
  ws.deliver(h.authOk({ refreshed: true, expires_in: 3600 }));
  h.tickAlive(timers, ws, 3569999);
  await h.flush();
  assert.equal(getToken.calls, 3);
  timers.tick(1);
  await h.flush();
  assert.equal(getToken.calls, 4);
  socket.close();
});

test("no refresh is scheduled without expires_in, or when it is already spent", async (t) => {
  const { socket, WebSocket, getToken, timers } = h.makeSocket(t);
  const ws = await h.authenticate(WebSocket, h.authOk({ expires_in: undefined }));
  h.tickAlive(timers, ws, 24 * 3600 * 1000);
  await h.flush();
  ws.deliver(h.authOk({ refreshed: true, expires_in: 0 }));
  h.tickAlive(timers, ws, 3600 * 1000);
  await h.flush();
  assert.equal(getToken.calls, 1);
  assert.equal(WebSocket.instances.length, 1);
  assert.equal(socket.state, "authenticated");
  socket.close();
});

test("the refresh timer dies with its socket: on a server close and on close()", async (t) => {
  const { socket, WebSocket, getToken, timers } = h.makeSocket(t, { random: () => 0 });
  const first = await h.authenticate(WebSocket, h.authOk({ expires_in: 100 }));
  first.serverClose(1006);
  timers.tick(0);
  const second = WebSocket.last();
  assert.notEqual(second, first);
  second.open(); // the server has not asked for a token yet
  timers.tick(80000);
  await h.flush();
  assert.equal(getToken.calls, 1);
  assert.deepEqual(second.authFrames(), []);

  second.deliver({ id: "AUTH REQUEST" });
  await h.flush();
  second.deliver(h.authOk({ recovered: true, expires_in: 100 }));
  socket.close();
  timers.tick(80000);
  await h.flush();
  assert.equal(getToken.calls, 2);
  assert.equal(WebSocket.instances.length, 2);
});

test("AUTH FAILED during a refresh: the next AUTH REQUEST fetches again", async (t) => {
  const warnings = h.captureWarnings(t);
  const { socket, WebSocket, getToken, timers } = h.makeSocket(t);
  const ws = await h.authenticate(WebSocket, h.authOk({ expires_in: 100 }));
  timers.tick(80000);
  await h.flush();
  ws.deliver({ id: "AUTH FAILED", reason: "expired" });
  ws.deliver({ id: "AUTH REQUEST", reason: "expired" });
  await h.flush();
  assert.equal(getToken.calls, 3);
  assert.deepEqual(ws.authFrames().map((f) => f.token), ["token-1", "token-2", "token-3"]);
  assert.equal(socket.state, "authenticated");
  assert.match(warnings.join("\n"), /authentication failed: expired/);
  socket.close();
});

test("a scheduled refresh and the server's expiry request share one token fetch", async (t) => {
  let release;
  let calls = 0;
  const getToken = () => {
    calls += 1;
    return calls === 1 ? Promise.resolve("token-1") : new Promise((resolve) => { release = resolve; });
  };
  const { socket, WebSocket, timers } = h.makeSocket(t, { getToken });
  const ws = await h.authenticate(WebSocket, h.authOk({ expires_in: 100 }));
  timers.tick(80000);
  await h.flush();
  ws.deliver({ id: "AUTH REQUEST", reason: "expired" });
  await h.flush();
  assert.equal(calls, 2);
  release("token-2");
  await h.flush();
  assert.deepEqual(ws.authFrames().map((f) => f.token), ["token-1", "token-2"]);
  socket.close();
});

test("a refresh whose fetch fails leaves the socket open; before AUTH OK it reconnects", async (t) => {
  const warnings = h.captureWarnings(t);
  let fail = false;
  const getToken = () => (fail ? Promise.reject(new Error("token: HTTP 503")) : Promise.resolve("tok"));
  const { socket, WebSocket, timers } = h.makeSocket(t, { getToken, random: () => 0 });
  const ws = await h.authenticate(WebSocket, h.authOk({ expires_in: 100 }));
  fail = true;
  timers.tick(80000);
  await h.flush();
  assert.equal(ws.closedBy, null);
  assert.equal(socket.state, "authenticated");

  ws.serverClose(4003, "token expired");
  timers.tick(0);
  const next = WebSocket.last();
  next.open();
  next.deliver({ id: "AUTH REQUEST" });
  await h.flush();
  assert.deepEqual(next.closedBy, { code: undefined, reason: undefined });
  assert.equal(socket.state, "closed");
  assert.match(warnings.join("\n"), /token: HTTP 503/);
  socket.close();
});

test("without getToken the token is a same-origin GET of tokenUrl, body trimmed", async (t) => {
  const requests = [];
  t.mock.method(globalThis, "fetch", (url, init) => {
    requests.push([url, init]);
    return Promise.resolve({ ok: true, status: 200, text: () => Promise.resolve("  jwt-body\n") });
  });
  const WebSocket = h.fakeWebSocketClass();
  h.mockTimers(t);
  const socket = new h.client.FlowSocket(h.URL, { WebSocket, tokenUrl: "/auth/token" });
  const ws = WebSocket.last();
  ws.open();
  ws.deliver({ id: "AUTH REQUEST" });
  await h.flush();
  assert.deepEqual(requests, [["/auth/token", { credentials: "same-origin", cache: "no-store" }]]);
  assert.deepEqual(ws.authFrames(), [{ id: "AUTH", token: "jwt-body" }]);
  socket.close();

  requests.length = 0;
  const other = new h.client.FlowSocket(h.URL, { WebSocket });
  WebSocket.last().open();
  WebSocket.last().deliver({ id: "AUTH REQUEST" });
  await h.flush();
  assert.equal(requests[0][0], "/socket_auth_token");
  other.close();
});

test("a refused token GET (logged out) closes the socket to retry with backoff", async (t) => {
  const warnings = h.captureWarnings(t);
  t.mock.method(globalThis, "fetch", () =>
    Promise.resolve({ ok: false, status: 401, text: () => Promise.resolve("") }));
  const WebSocket = h.fakeWebSocketClass();
  const timers = h.mockTimers(t);
  const socket = new h.client.FlowSocket(h.URL, { WebSocket, random: () => 0.5 });
  const ws = WebSocket.last();
  ws.open();
  ws.deliver({ id: "AUTH REQUEST" });
  await h.flush();
  assert.ok(ws.closedBy);
  assert.deepEqual(ws.authFrames(), []);
  assert.match(warnings.join("\n"), /HTTP 401/);
  timers.tick(249);
  assert.equal(WebSocket.instances.length, 1);
  timers.tick(1);
  assert.equal(WebSocket.instances.length, 2);
  socket.close();
});

test("an empty token is refused in the client", async (t) => {
  const warnings = h.captureWarnings(t);
  const { socket, WebSocket } = h.makeSocket(t, { getToken: () => Promise.resolve("  ") });
  const ws = WebSocket.last();
  ws.open();
  ws.deliver({ id: "AUTH REQUEST" });
  await h.flush();
  assert.deepEqual(ws.authFrames(), []);
  assert.match(warnings.join("\n"), /token: empty/);
  socket.close();
});
