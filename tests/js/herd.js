// Many real browser clients (static/js/websocket.js) in one Node process, on the `ws`
// package, for tests/test_reconnect_spread.py.
//
//   node tests/js/herd.js config.json      config: {"urls": [...], "tokens": [...]}
//
// Instance i connects to urls[i % urls.length] with tokens[i]. One JSON line on stdout per
// event, t in ms since the script started:
//   {"event": "auth", "i": i, "n": k, "t": ms}     instance i authenticated for the k-th time
//   {"event": "resync", "i": i, "t": ms}           its onresync was called
//   {"event": "close", "i": i, "code": c, "reason": r, "t": ms}   a socket of it closed
//   {"event": "started", "count": n, "t": ms}      every instance is created
// When stdin ends it closes every instance and exits.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { performance } = require("node:perf_hooks");

const ROOT = path.join(__dirname, "..", "..");
const WebSocket = require(require.resolve("ws", { paths: [path.join(ROOT, "bench")] }));
const { FlowSocket } = require(path.join(ROOT, "static", "js", "websocket.js"));

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const out = (event) => process.stdout.write(JSON.stringify({ ...event, t: Math.round(performance.now()) }) + "\n");
const RAMP_BATCH = 200; // instances created per ramp step, so the first handshakes do not
const RAMP_STEP_MS = 50; // all hit the servers' listen backlog in the same instant

// The client's console warnings (a refused token, a reconnect) are not events here.
console.warn = () => {};

function socketClassFor(i) {
  // Compression off, as bench/client.js: it only costs CPU here.
  return class HerdWebSocket extends WebSocket {
    constructor(url) {
      super(url, { perMessageDeflate: false });
      this.addEventListener("open", () => out({ event: "open", i }));
      this.addEventListener("close", (event) => out({ event: "close", i, code: event.code, reason: event.reason }));
      this.addEventListener("error", () => {}); // the close event follows
    }
  };
}

const sockets = [];
function start(i) {
  let authentications = 0;
  const socket = new FlowSocket(config.urls[i % config.urls.length], {
    WebSocket: socketClassFor(i),
    getToken: () => Promise.resolve(config.tokens[i]),
    onresync: () => out({ event: "resync", i }),
  });
  socket.onState((state) => {
    if (state === "authenticated") out({ event: "auth", i, n: ++authentications });
  });
  sockets.push(socket);
}

let next = 0;
function ramp() {
  const end = Math.min(config.tokens.length, next + RAMP_BATCH);
  for (; next < end; next++) start(next);
  if (next < config.tokens.length) setTimeout(ramp, RAMP_STEP_MS);
  else out({ event: "started", count: sockets.length });
}
ramp();

function stop() {
  for (const socket of sockets) socket.close();
  setTimeout(() => process.exit(0), 200);
}
process.stdin.on("end", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
