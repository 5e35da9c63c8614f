// What a page sees: createSocket's status elements, heartbeats, URLs, the module and Redux
// entry points.
"use strict";

const { test } = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const { pathToFileURL } = require("node:url");
const h = require("./helpers.js");

/* The two status elements of a message_flow page, enough of the DOM for createSocket. */
function fakeDocument() {
  const element = () => {
    const classes = new Set();
    return {
      textContent: "",
      classList: {
        toggle: (name, on) => (on ? classes.add(name) : classes.delete(name)),
        contains: (name) => classes.has(name),
      },
    };
  };
  const elements = { connected: element(), authenticated: element() };
  return { getElementById: (id) => elements[id] || null, elements };
}

function flags(doc) {
  const { connected, authenticated } = doc.elements;
  return [connected.textContent, connected.classList.contains("on"),
    authenticated.textContent, authenticated.classList.contains("on")];
}

test("createSocket: messageHandler gets pushed messages; #connected and #authenticated follow", async (t) => {
  const doc = fakeDocument();
  globalThis.document = doc;
  t.after(() => { delete globalThis.document; });
  h.mockTimers(t);
  const WebSocket = h.fakeWebSocketClass();
  const got = [];
  const socket = h.client.createSocket(h.URL, (data) => got.push(data), {
    WebSocket, getToken: () => Promise.resolve("t"), random: () => 0,
  });
  assert.deepEqual(flags(doc), ["Offline", false, "No", false]);
  const ws = WebSocket.last();
  ws.open();
  assert.deepEqual(flags(doc), ["Online", true, "No", false]);
  ws.deliver({ id: "AUTH REQUEST" });
  await h.flush();
  ws.deliver(h.authOk());
  assert.deepEqual(flags(doc), ["Online", true, "Yes", true]);
  ws.deliver(h.pushed("HELLO", 5));
  assert.deepEqual(got.map((m) => [m.id, m.data]), [["HELLO", { n: 5 }]]);
  ws.serverClose(1006);
  assert.deepEqual(flags(doc), ["Offline", false, "No", false]);
  socket.close();
});

test("keep-alive <3 every heartbeat; a silent connection is closed and replaced", async (t) => {
  const { socket, WebSocket, timers } = h.makeSocket(t, { random: () => 0 });
  const ws = await h.authenticate(WebSocket, h.authOk({ heartbeat: 10 }));
  assert.equal(socket.heartbeat, 10);
  timers.tick(10000);
  timers.tick(10000);
  assert.deepEqual(ws.sent.filter((f) => f === "<3"), ["<3", "<3"]);
  // Frames keep it alive; 2 * 10 + 5 s of silence kills it.
  ws.deliver("<3");
  timers.tick(24999);
  assert.equal(ws.closedBy, null);
  timers.tick(1);
  assert.deepEqual(ws.closedBy, { code: 4000, reason: "no heartbeat" });
  assert.equal(socket.state, "connecting");
  assert.equal(WebSocket.instances.length, 2);
  socket.close();
});

test("relative URLs follow the page's location; absolute ones are kept", (t) => {
  const WebSocket = h.fakeWebSocketClass();
  const make = (url) => new h.client.FlowSocket(url, { WebSocket, autoConnect: false }).url;
  assert.equal(make("wss://a.example/ws"), "wss://a.example/ws");
  assert.equal(make("https://a.example/ws"), "wss://a.example/ws");
  assert.equal(make("http://a.example:5000/ws"), "ws://a.example:5000/ws");
  assert.throws(() => make("/websocket"), /relative URL/);
  globalThis.location = { protocol: "https:", host: "app.example:8443" };
  t.after(() => { delete globalThis.location; });
  assert.equal(make("/websocket"), "wss://app.example:8443/websocket");
  assert.equal(make(), "wss://app.example:8443/websocket");
  globalThis.location = { protocol: "http:", host: "127.0.0.1:5000" };
  assert.equal(make("websocket"), "ws://127.0.0.1:5000/websocket");
});

test("without a WebSocket implementation the constructor says so", () => {
  assert.equal(typeof globalThis.WebSocket, "undefined");
  assert.throws(() => new h.client.FlowSocket(h.URL, { autoConnect: false }), /pass options\.WebSocket/);
});

test("the classic script sets globals and the ES module re-exports them", async () => {
  assert.equal(globalThis.FlowSocket, h.client.FlowSocket);
  assert.equal(globalThis.createSocket, h.client.createSocket);
  const file = path.join(__dirname, "..", "..", "static", "js", "websocket.mjs");
  const mod = await import(pathToFileURL(file).href);
  assert.equal(typeof mod.FlowSocket, "function");
  assert.equal(typeof mod.createSocket, "function");
  assert.equal(mod.default.FlowSocket, mod.FlowSocket);
  assert.equal(mod.FlowSocket.name, "FlowSocket");
});

test("connectStore dispatches pushed messages; on() handlers unsubscribe", async (t) => {
  const { connectStore } = require("../../static/js/flow-redux.js");
  const { socket, WebSocket } = h.makeSocket(t);
  const ws = await h.authenticate(WebSocket);
  const actions = [];
  const disconnect = connectStore(socket, { dispatch: (action) => actions.push(action) });
  const seen = [];
  const off = socket.on("HELLO", (data) => seen.push(data.n));
  ws.deliver(h.pushed("HELLO", 5));
  disconnect();
  off();
  ws.deliver(h.pushed("HELLO", 6));
  assert.deepEqual(actions, [{ type: "HELLO", payload: { n: 5 } }]);
  assert.deepEqual(seen, [5]);
  socket.close();
});

test("a handler that throws does not stop the others or the socket", async (t) => {
  const errors = [];
  t.mock.method(console, "error", (err) => errors.push(err));
  const { socket, WebSocket } = h.makeSocket(t, { onmessage: () => { throw new Error("page bug 2"); } });
  const ws = await h.authenticate(WebSocket);
  const seen = [];
  socket.on("HELLO", () => { throw new Error("page bug 1"); });
  socket.on("*", (data) => seen.push(data.n));
  ws.deliver(h.pushed("HELLO", 5));
  ws.deliver(h.pushed("HELLO", 6));
  assert.deepEqual(seen, [5, 6]);
  assert.deepEqual(errors.map((e) => e.message), ["page bug 1", "page bug 2", "page bug 1", "page bug 2"]);
  assert.equal(socket.state, "authenticated");
  socket.close();
});
