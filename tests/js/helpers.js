// Test doubles for the browser client: a scriptable WebSocket, a token source that counts,
// a seeded random, and a way to let promise callbacks run.
"use strict";

const client = require("../../static/js/websocket.js");

const URL = "ws://flow.test/websocket";

/* A WebSocket class whose instances record what the client sends and let a test play the
 * server: open(), deliver(frame), serverClose(code, reason). */
function fakeWebSocketClass() {
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedBy = null; // {code, reason} when the client closed it
      this.onopen = this.onmessage = this.onclose = null;
      FakeWebSocket.instances.push(this);
    }

    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(text);
    }

    close(code, reason) {
      if (this.readyState >= 2) return;
      this.closedBy = { code, reason };
      this.readyState = 2;
      // As in a browser: the close event comes later, with 1005 when no code was given.
      queueMicrotask(() => this._closed(code === undefined ? 1005 : code, reason || ""));
    }

    // -- the server's side
    open() {
      this.readyState = 1;
      this.onopen && this.onopen({});
    }

    deliver(frame) {
      const data = typeof frame === "string" ? frame : JSON.stringify(frame);
      this.onmessage && this.onmessage({ data });
    }

    serverClose(code, reason = "") {
      this._closed(code, reason);
    }

    _closed(code, reason) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.onclose && this.onclose({ code, reason, wasClean: true });
    }

    /* Sent frames, JSON ones parsed. */
    frames() {
      return this.sent.map((text) => (text === "<3" ? text : JSON.parse(text)));
    }

    authFrames() {
      return this.frames().filter((frame) => frame !== "<3" && frame.id === "AUTH");
    }
  }
  FakeWebSocket.instances = [];
  FakeWebSocket.last = () => FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  return FakeWebSocket;
}

/* getToken that hands out "token-1", "token-2", ... and counts its calls. */
function tokenSource() {
  const source = () => {
    source.calls += 1;
    return Promise.resolve("token-" + source.calls);
  };
  source.calls = 0;
  return source;
}

/* A deterministic [0, 1) generator (mulberry32). */
function seededRandom(seed) {
  let a = seed >>> 0;
  return function () {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/* Let pending promise callbacks (token fetches) run; setImmediate is never mocked here. */
function flush() {
  return new Promise((resolve) => setImmediate(resolve));
}

function mockTimers(t) {
  t.mock.timers.enable({ apis: ["setTimeout", "setInterval"] });
  return t.mock.timers;
}

/* Quiet the client's console.warn for one test; returns the warnings. */
function captureWarnings(t) {
  const warnings = [];
  t.mock.method(console, "warn", (text) => warnings.push(String(text)));
  return warnings;
}

/* A FlowSocket on a fake WebSocket with a counting token source, under mocked timers
 * (t.mock.timers; the test's `timers`), so no real timer outlives the test. */
function makeSocket(t, options = {}) {
  const timers = mockTimers(t);
  const WebSocket = options.WebSocket || fakeWebSocketClass();
  const getToken = options.getToken || tokenSource();
  const socket = new client.FlowSocket(URL, { WebSocket, getToken, ...options });
  return { socket, WebSocket, getToken, timers };
}

const STREAMS = { alice: { seq: 4, epoch: "e1" }, "*": { seq: 9, epoch: "e2" } };

function authOk(extra = {}) {
  return {
    id: "AUTH OK", username: "alice", epoch: "e1", heartbeat: 45, recovered: false,
    missed: 0, streams: STREAMS, expires_in: 3600, ...extra,
  };
}

/* Open the current socket and take it through AUTH REQUEST -> AUTH -> AUTH OK. */
async function authenticate(WebSocket, reply = authOk()) {
  const ws = WebSocket.last();
  ws.open();
  ws.deliver({ id: "AUTH REQUEST" });
  await flush();
  ws.deliver(reply);
  return ws;
}

/* Advance the clock by ms while the server sends a heartbeat every 45 s, as it does. */
function tickAlive(timers, ws, ms) {
  const beat = 45000;
  for (; ms > beat; ms -= beat) {
    timers.tick(beat);
    ws.deliver("<3");
  }
  timers.tick(ms);
}

function pushed(id, seq, extra = {}) {
  return { id, username: "alice", data: { n: seq }, seq, epoch: "e1", ...extra };
}

module.exports = {
  client, URL, fakeWebSocketClass, tokenSource, seededRandom, flush, mockTimers,
  captureWarnings, makeSocket, STREAMS, authOk, authenticate, tickAlive, pushed,
};
