// Load client for bench/run.py: many WebSocket connections in one Node process.
//
// stdin, first line: {"url": ..., "tokens": [...], "channels": [...]?, "concurrency": 200,
// "timeout": 60}
// It opens one socket per token, answers AUTH REQUEST with the raw token, and prints
// {"event": "ready", "authed": n, "failed": n, "subscribed": n, "seconds": s} once every
// socket is authenticated or has failed (or the timeout passed). With "channels" (one
// channel name per token, PROTOCOL.md section 9) a socket answers with
// {"id": "AUTH", "token": t, "subscribe": {channel: {}}} instead, and counts as done once
// its SUBSCRIBE OK (or SUBSCRIBE FAILED) arrived. Then, one command a line:
//   {"cmd": "report", "run": R, "latencies": bool, "ids": bool}  -> {"event": "report", ...}
//   {"cmd": "forget", "run": R}                     -> drops R's figures, collects garbage
//                                                      (when run with --expose-gc), {"event": "forgot"}
//   {"cmd": "close"}                                -> closes everything, {"event": "closed"}, exit
// Pushed messages carry data = {"r": run, "i": index, "t": push time (s since epoch)};
// per run it counts them, their distinct indexes per socket, and push-to-receive latency.
// A channel message must be of the socket's channel (else "foreign") and carry the next
// seq after the last one on that socket, starting from SUBSCRIBE OK's (else "gaps").
// bench/client.py speaks the same protocol in Python.
"use strict";

const { performance } = require("perf_hooks");
const readline = require("readline");
const WebSocket = require("ws");

const nowMs = () => performance.timeOrigin + performance.now();
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const runs = new Map();
function runState(r) {
  let s = runs.get(r);
  if (!s) {
    s = { received: 0, dups: 0, gaps: 0, foreign: 0, first: 0, last: 0, lat: [], at: [], ids: [], seen: new Map() };
    runs.set(r, s);
  }
  return s;
}

let config = null;
const sockets = [];
let authed = 0, failed = 0, subscribed = 0, lostAfterReady = 0, readySent = false, started = 0;
const closeCodes = {};

function maybeReady(force) {
  if (readySent) return;
  if (force || authed + failed === config.tokens.length) {
    readySent = true;
    out({ event: "ready", authed, failed, subscribed, seconds: (nowMs() - started) / 1000 });
  }
}

function openOne(token, channel, done) {
  const ws = new WebSocket(config.url, { perMessageDeflate: false });
  const index = sockets.length;
  let state = "connecting";
  let finished = false;
  let seq = -1; // the last seq of `channel` this socket got (SUBSCRIBE OK's to begin with)
  const finish = () => { if (!finished) { finished = true; done(); } };
  const fail = () => { state = "failed"; failed++; finish(); maybeReady(false); ws.terminate(); };
  ws.on("message", (raw) => {
    const text = raw.toString();
    if (text === "<3") return;
    const msg = JSON.parse(text);
    if (state !== "authed") {
      if (msg.id === "AUTH REQUEST") {
        ws.send(channel ? JSON.stringify({ id: "AUTH", token, subscribe: { [channel]: {} } }) : token);
        return;
      }
      if (msg.id === "AUTH OK" && !channel) { state = "authed"; authed++; finish(); maybeReady(false); return; }
      if (msg.id === "AUTH OK") return; // ready (and counted) at SUBSCRIBE OK
      if (msg.id === "SUBSCRIBE OK" && msg.channel === channel) {
        seq = msg.seq; state = "authed"; authed++; subscribed++; finish(); maybeReady(false); return;
      }
      if (msg.id === "SUBSCRIBE FAILED") { fail(); return; }
      if (msg.id === "AUTH FAILED") { fail(); return; }
    }
    const d = msg.data;
    if (!d || d.r === undefined) return;
    const t = nowMs();
    const s = runState(d.r);
    if (msg.channel !== undefined) {
      if (msg.channel !== channel) { s.foreign++; return; }
      if (msg.seq !== seq + 1) s.gaps++;
      if (msg.seq > seq) seq = msg.seq;
    }
    let ids = s.seen.get(index); // the indexes this socket got in this run
    if (!ids) { ids = new Set(); s.seen.set(index, ids); }
    if (ids.has(d.i)) { s.dups++; return; }
    ids.add(d.i);
    s.received++;
    if (!s.first) s.first = t;
    s.last = t;
    s.lat.push(t - d.t * 1000);
    s.at.push(t);
    s.ids.push(d.i);
  });
  ws.on("error", () => {});
  ws.on("close", (code) => {
    closeCodes[code] = (closeCodes[code] || 0) + 1;
    if (state === "authed") lostAfterReady++;
    else if (state === "connecting") { failed++; state = "failed"; finish(); maybeReady(false); }
  });
  sockets.push(ws);
}

function start() {
  started = nowMs();
  let next = 0, inFlight = 0;
  const pump = () => {
    while (inFlight < config.concurrency && next < config.tokens.length) {
      inFlight++;
      const k = next++;
      openOne(config.tokens[k], config.channels ? config.channels[k] : null, () => { inFlight--; pump(); });
    }
  };
  pump();
  setTimeout(() => maybeReady(true), config.timeout * 1000).unref();
}

function report(cmd) {
  const s = runState(cmd.run);
  const reply = {
    event: "report", run: cmd.run, received: s.received, dups: s.dups, gaps: s.gaps, foreign: s.foreign,
    first: s.first / 1000, last: s.last / 1000, authed, failed, closed: lostAfterReady, codes: closeCodes,
  };
  if (cmd.latencies) {
    reply.lat = s.lat.map((x) => Math.round(x * 1000) / 1000);
    reply.at = s.at.map((x) => Math.round(x * 1000) / 1000); // arrival (epoch ms), in lat's order
  }
  if (cmd.ids) reply.ids = s.ids;
  out(reply);
}

// Between rounds: the next one should not pay for this one's garbage.
function forget(cmd) {
  runs.delete(cmd.run);
  if (global.gc) global.gc();
  out({ event: "forgot", run: cmd.run });
}

function closeAll() {
  let open = sockets.filter((ws) => ws.readyState !== WebSocket.CLOSED);
  if (!open.length) { out({ event: "closed" }); process.exit(0); }
  let left = open.length;
  const bye = () => { out({ event: "closed" }); process.exit(0); };
  for (const ws of open) {
    ws.once("close", () => { if (--left === 0) bye(); });
    ws.close(1000);
  }
  setTimeout(() => { for (const ws of open) ws.terminate(); bye(); }, 5000).unref();
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on("line", (line) => {
  if (!line.trim()) return;
  const msg = JSON.parse(line);
  if (!config) { config = msg; start(); return; }
  if (msg.cmd === "report") report(msg);
  else if (msg.cmd === "forget") forget(msg);
  else if (msg.cmd === "close") closeAll();
});
rl.on("close", () => process.exit(0)); // the bench went away: never linger
