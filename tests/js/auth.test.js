// Authentication, stream positions, resume and resync (PROTOCOL.md sections 3 and 4).
"use strict";

const { test } = require("node:test");
const assert = require("node:assert/strict");
const h = require("./helpers.js");

function blink(t, WebSocket, code = 1006) {
  const timers = t.mock.timers;
  WebSocket.last().serverClose(code);
  timers.tick(60000); // past any reconnect delay
  return WebSocket.last();
}

test("the first AUTH sends the token, seeds every stream's position and never resyncs", async (t) => {
  const resyncs = [];
  const { socket, WebSocket, getToken } = h.makeSocket(t, { onresync: (data) => resyncs.push(data) });
  const ws = await h.authenticate(WebSocket);
  assert.equal(getToken.calls, 1);
  assert.deepEqual(ws.authFrames(), [{ id: "AUTH", token: "token-1" }]);
  assert.equal(socket.state, "authenticated");
  assert.equal(socket.username, "alice");
  assert.deepEqual(socket.positions, h.STREAMS);
  assert.deepEqual(resyncs, []);
  socket.close();
});

test("a tab that drops before any message resumes both streams from AUTH OK's positions", async (t) => {
  const { socket, WebSocket } = h.makeSocket(t);
  await h.authenticate(WebSocket);
  const second = blink(t, WebSocket);
  assert.notEqual(second, WebSocket.instances[0]);
  second.open();
  second.deliver({ id: "AUTH REQUEST" });
  await h.flush();
  assert.deepEqual(second.authFrames(), [{ id: "AUTH", token: "token-2", resume: h.STREAMS }]);
  socket.close();
});

test("an unrecovered AUTH OK after the first one calls onresync and restarts positions", async (t) => {
  const resyncs = [];
  const { socket, WebSocket } = h.makeSocket(t, { onresync: (data, s) => resyncs.push([data, s]) });
  await h.authenticate(WebSocket);
  const second = blink(t, WebSocket);
  const fresh = { alice: { seq: 0, epoch: "e7" }, "*": { seq: 0, epoch: "e7" } };
  await h.authenticate(WebSocket, h.authOk({ recovered: false, streams: fresh, epoch: "e7" }));
  assert.equal(second.authFrames().length, 1);
  assert.equal(resyncs.length, 1);
  assert.equal(resyncs[0][0].recovered, false);
  assert.equal(resyncs[0][1], socket);
  assert.deepEqual(socket.positions, fresh);
  // The new numbering: seq 1 of the new epoch is new, not an old duplicate.
  const got = [];
  socket.on("HELLO", (data) => got.push(data.n));
  second.deliver(h.pushed("HELLO", 1, { epoch: "e7" }));
  assert.deepEqual(got, [1]);
  assert.deepEqual(socket.positions.alice, { seq: 1, epoch: "e7" });
  socket.close();
});

test("a recovered resume keeps its positions, so the owed history is not taken for duplicates", async (t) => {
  const resyncs = [];
  const { socket, WebSocket } = h.makeSocket(t, { onresync: (data) => resyncs.push(data) });
  const first = await h.authenticate(WebSocket);
  first.deliver(h.pushed("HELLO", 5));
  const second = blink(t, WebSocket);
  // AUTH OK names the position after the history it is about to send (seq 7).
  await h.authenticate(WebSocket, h.authOk({
    recovered: true, missed: 2, streams: { alice: { seq: 7, epoch: "e1" }, "*": { seq: 9, epoch: "e2" } },
  }));
  assert.deepEqual(second.authFrames()[0].resume, { alice: { seq: 5, epoch: "e1" }, "*": { seq: 9, epoch: "e2" } });
  const got = [];
  socket.on("*", (data) => got.push(data.n));
  second.deliver(h.pushed("HELLO", 6));
  second.deliver(h.pushed("HELLO", 7));
  second.deliver(h.pushed("HELLO", 7)); // a duplicate
  assert.deepEqual(got, [6, 7]);
  assert.deepEqual(resyncs, []);
  socket.close();
});

test("a refreshed AUTH OK keeps positions, state and username and never resyncs", async (t) => {
  const resyncs = [];
  const states = [];
  const { socket, WebSocket } = h.makeSocket(t, {
    onresync: (data) => resyncs.push(data), onstate: (state) => states.push(state),
  });
  const ws = await h.authenticate(WebSocket);
  ws.deliver(h.pushed("HELLO", 5));
  ws.deliver(h.authOk({ refreshed: true, recovered: false, streams: undefined, expires_in: 900 }));
  assert.deepEqual(socket.positions, { alice: { seq: 5, epoch: "e1" }, "*": { seq: 9, epoch: "e2" } });
  assert.deepEqual(resyncs, []);
  assert.deepEqual(states, ["closed", "connecting", "open", "authenticated"]);
  assert.equal(socket.expiresIn, 900);
  socket.close();
});

test("an AUTH OK without streams (an older server) starts from no position", async (t) => {
  const { socket, WebSocket } = h.makeSocket(t);
  await h.authenticate(WebSocket, h.authOk({ streams: undefined }));
  assert.deepEqual(socket.positions, {});
  const second = blink(t, WebSocket);
  second.open();
  second.deliver({ id: "AUTH REQUEST" });
  await h.flush();
  assert.deepEqual(second.authFrames(), [{ id: "AUTH", token: "token-2" }]);
  socket.close();
});

test("duplicates are dropped per stream and epoch; a new epoch starts afresh", async (t) => {
  const { socket, WebSocket } = h.makeSocket(t);
  const ws = await h.authenticate(WebSocket);
  const got = [];
  const all = [];
  socket.on("HELLO", (data, message) => got.push(message.username + ":" + message.seq));
  socket.on("*", (data, message) => all.push(message.id));
  ws.deliver(h.pushed("HELLO", 4)); // AUTH OK said alice is at 4: already seen
  ws.deliver(h.pushed("HELLO", 5));
  ws.deliver(h.pushed("HELLO", 3));
  ws.deliver(h.pushed("HELLO", 9, { username: "*", epoch: "e2" })); // "*" is at 9
  ws.deliver(h.pushed("HELLO", 10, { username: "*", epoch: "e2" }));
  ws.deliver(h.pushed("HELLO", 1, { epoch: "e9" })); // alice renumbered
  assert.deepEqual(got, ["alice:5", "*:10", "alice:1"]);
  assert.deepEqual(all, ["HELLO", "HELLO", "HELLO"]);
  assert.deepEqual(socket.positions, { alice: { seq: 1, epoch: "e9" }, "*": { seq: 10, epoch: "e2" } });
  socket.close();
});

test("pushed messages with control ids are the page's messages, not commands", async (t) => {
  const messages = [];
  const { socket, WebSocket, getToken } = h.makeSocket(t, { onmessage: (m) => messages.push(m.id) });
  const ws = await h.authenticate(WebSocket);
  const handled = [];
  for (const id of ["AUTH REQUEST", "AUTH OK", "AUTH FAILED", "PONG", "ERROR"]) {
    socket.on(id, (data) => handled.push(id + " " + data.n));
  }
  const warnings = [];
  const warn = console.warn;
  console.warn = (text) => warnings.push(text);
  try {
    ws.deliver(h.pushed("AUTH REQUEST", 5));
    ws.deliver(h.pushed("AUTH OK", 6, { username: "alice", recovered: false }));
    ws.deliver(h.pushed("AUTH FAILED", 7));
    ws.deliver(h.pushed("PONG", 8));
    ws.deliver(h.pushed("ERROR", 10, { username: "*", epoch: "e2" }));
    await h.flush();
  } finally {
    console.warn = warn;
  }
  assert.equal(getToken.calls, 1, "a pushed AUTH REQUEST fetched a token");
  assert.equal(ws.authFrames().length, 1);
  assert.deepEqual(socket.positions, { alice: { seq: 8, epoch: "e1" }, "*": { seq: 10, epoch: "e2" } });
  assert.equal(socket.state, "authenticated");
  assert.deepEqual(handled, ["AUTH REQUEST 5", "AUTH OK 6", "AUTH FAILED 7", "PONG 8", "ERROR 10"]);
  assert.deepEqual(messages, ["AUTH REQUEST", "AUTH OK", "AUTH FAILED", "PONG", "ERROR"]);
  assert.deepEqual(warnings, []);
  socket.close();
});

test("frames without seq and an unknown id still reach the page (message_flow); junk is ignored", async (t) => {
  const messages = [];
  const { socket, WebSocket } = h.makeSocket(t, { onmessage: (m) => messages.push(m) });
  const ws = await h.authenticate(WebSocket);
  ws.deliver({ id: "LEGACY", data: 1 });
  ws.deliver("not json");
  ws.deliver("null");
  ws.deliver("42");
  ws.deliver({ id: "PONG" });
  assert.deepEqual(messages, [{ id: "LEGACY", data: 1 }]);
  socket.close();
});
