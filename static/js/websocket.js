/*
 * Flow browser client. No dependencies.
 *
 * Classic script:   <script src="/static/js/websocket.js"></script>
 *                   createSocket("/websocket", messageHandler)   // message_flow style
 *                   new FlowSocket("/websocket", {onresync: reload})
 * ES module:        import { createSocket, FlowSocket } from "/static/js/websocket.mjs";
 * CommonJS / Node:  const { FlowSocket } = require("./websocket.js");
 *                   new FlowSocket("wss://host/websocket", {WebSocket: require("ws"),
 *                                                           getToken: () => fetchMyToken()})
 *
 * It speaks the Flow wire protocol (PROTOCOL.md sections 3 and 4): answers AUTH REQUEST with
 * a token fetched from /socket_auth_token (a fresh one each time, so one refused token is
 * replaced), refreshes the token before it expires, keeps a position per stream from AUTH OK
 * on and asks to resume every stream from it, drops duplicates, and treats a silent
 * connection (no frame for two heartbeats) as dead. It reconnects with exponential backoff
 * and full jitter; when the server closes because of its own state (draining, lost
 * messages, overload) it spreads the reconnects over the window the server names, so a
 * pool-wide close does not come back as one burst.
 *
 * Options: tokenUrl, getToken() -> Promise<string> (replaces the GET of tokenUrl),
 * WebSocket (constructor; default the global one), onmessage(message), onresync(authOk),
 * onstate(state), autoConnect (default true), random() -> [0, 1) (default Math.random).
 */
(function (root, factory) {
  var api = factory(root);
  if (typeof module === "object" && module.exports) {
    module.exports = api;
  }
  root.FlowSocket = api.FlowSocket;
  root.createSocket = api.createSocket;
})(typeof self !== "undefined" ? self : typeof globalThis !== "undefined" ? globalThis : this,
  function (root) {
  "use strict";

  var BACKOFF_BASE_MS = 500;
  var BACKOFF_CAP_MS = 30000;
  // Closes the server makes because of its own state, not because of this client: every
  // socket it holds gets one at the same moment, so reconnecting soon would be a herd.
  var SERVER_STATE_CLOSES = { 1001: 1, 1012: 1, 1013: 1, 4008: 1 };
  var HERD_WINDOW_DEFAULT_S = 5;
  var HERD_WINDOW_MIN_S = 0.5;
  var HERD_WINDOW_MAX_S = 60;
  var RECONNECT_WITHIN = /reconnect_within=(\d+(?:\.\d+)?)/;
  // Refresh the token this long before it expires, or at this fraction of its life if
  // that is later (short-lived tokens).
  var REFRESH_MARGIN_S = 30;
  var REFRESH_FRACTION = 0.8;
  var MAX_TIMER_MS = 2147483647; // setTimeout fires at once above this

  function warn(text) {
    if (root.console) root.console.warn("flow: " + text);
  }

  function report(err) {
    if (root.console) root.console.error(err);
  }

  function isObject(value) {
    return value !== null && typeof value === "object";
  }

  function resolveUrl(url) {
    url = url || "/websocket";
    if (/^wss?:\/\//.test(url)) return url;
    if (/^https?:\/\//.test(url)) return url.replace(/^http/, "ws");
    var loc = root.location;
    if (!loc) throw new Error("flow: a relative URL needs a page location; pass a ws:// URL");
    var scheme = loc.protocol === "https:" ? "wss://" : "ws://";
    return scheme + loc.host + (url.charAt(0) === "/" ? url : "/" + url);
  }

  /* Seconds within which the server asks this client to reconnect, from the close reason. */
  function reconnectWindow(reason) {
    var match = RECONNECT_WITHIN.exec(typeof reason === "string" ? reason : "");
    var seconds = match ? parseFloat(match[1]) : HERD_WINDOW_DEFAULT_S;
    return Math.min(HERD_WINDOW_MAX_S, Math.max(HERD_WINDOW_MIN_S, seconds));
  }

  function FlowSocket(url, options) {
    options = options || {};
    this.url = resolveUrl(url);
    this.tokenUrl = options.tokenUrl || "/socket_auth_token";
    this.onmessage = options.onmessage || null; // every pushed message
    this.onresync = options.onresync || null; // history could not be replayed
    this.state = "closed"; // connecting | open | authenticated | closed
    this.username = null;
    this.heartbeat = 45;
    this.expiresIn = null; // seconds the token had left at the last AUTH OK
    this.positions = {}; // stream -> {seq, epoch} after which delivery continues
    this._getToken = options.getToken || null;
    this._WebSocket = options.WebSocket || root.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new Error("flow: no WebSocket implementation here; pass options.WebSocket");
    }
    this._random = options.random || Math.random;
    this._handlers = {};
    this._stateHandlers = [];
    this._authCount = 0; // AUTH OKs that (re)started delivery, refreshes not counted
    this._attempt = 0;
    this._stopped = false;
    this._ws = null;
    this._tokenFor = null; // the socket a token fetch is under way for
    this._reconnectTimer = null;
    this._livenessTimer = null;
    this._keepaliveTimer = null;
    this._refreshTimer = null;
    if (options.onstate) this.onState(options.onstate);
    if (options.autoConnect !== false) this.connect();
  }

  /* Handlers per message id; "*" receives every pushed message. Returns an unsubscribe. */
  FlowSocket.prototype.on = function (id, handler) {
    var list = this._handlers[id] || (this._handlers[id] = []);
    list.push(handler);
    return function () {
      var i = list.indexOf(handler);
      if (i >= 0) list.splice(i, 1);
    };
  };

  FlowSocket.prototype.onState = function (handler) {
    this._stateHandlers.push(handler);
    handler(this.state, this);
    var handlers = this._stateHandlers;
    return function () {
      var i = handlers.indexOf(handler);
      if (i >= 0) handlers.splice(i, 1);
    };
  };

  FlowSocket.prototype.connect = function () {
    this._stopped = false;
    if (this._ws) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    var self = this;
    this._setState("connecting");
    var ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (err) {
      warn("cannot open " + this.url + ": " + err.message);
      this._setState("closed");
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = function () {
      if (ws !== self._ws) return;
      self._setState("open");
      self._touch();
    };
    ws.onmessage = function (event) {
      if (ws === self._ws) self._onFrame(event.data);
    };
    ws.onclose = function (event) {
      self._onClose(ws, event.code, event.reason);
    };
  };

  /* Close for good: no reconnect until connect() is called again. */
  FlowSocket.prototype.close = function () {
    this._stopped = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._clearTimers();
    var ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000, "client closed");
    this._setState("closed");
  };

  FlowSocket.prototype._setState = function (state) {
    if (this.state === state) return;
    this.state = state;
    for (var i = 0; i < this._stateHandlers.length; i++) {
      try {
        this._stateHandlers[i](state, this);
      } catch (err) {
        report(err);
      }
    }
  };

  FlowSocket.prototype._send = function (text) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(text);
  };

  FlowSocket.prototype._onFrame = function (raw) {
    this._touch();
    if (raw === "<3") return;
    var data;
    try {
      data = JSON.parse(raw);
    } catch (err) {
      return;
    }
    if (!isObject(data)) return;
    // Message ids belong to the application: one that looks like a control frame's is
    // still a pushed message (only pushed messages carry seq), never a command to us.
    if (typeof data.seq === "number") {
      this._accept(data);
      return;
    }
    switch (data.id) {
      case "AUTH REQUEST":
        this._authenticate();
        return;
      case "AUTH OK":
        this._onAuthenticated(data);
        return;
      case "AUTH FAILED":
        // The next AUTH REQUEST fetches a new token.
        warn("authentication failed: " + data.reason);
        return;
      case "PONG":
        return;
      case "ERROR":
        warn("server says: " + data.reason);
        return;
    }
    this._accept(data); // message_flow: anything else is the page's
  };

  FlowSocket.prototype._fetchToken = function () {
    var self = this;
    if (this._getToken) {
      return Promise.resolve().then(function () {
        return self._getToken();
      });
    }
    return root.fetch(this.tokenUrl, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("token: HTTP " + response.status);
        return response.text();
      });
  };

  /*
   * Send a token: with resume positions when it opens delivery, bare when the socket is
   * already authenticated (a refresh: the server answers AUTH OK with refreshed: true).
   */
  FlowSocket.prototype._authenticate = function () {
    var self = this;
    var ws = this._ws;
    // One fetch per socket at a time: a scheduled refresh and the server's expiry
    // AUTH REQUEST can coincide, and one token answers both.
    if (!ws || this._tokenFor === ws) return;
    this._tokenFor = ws;
    this._fetchToken()
      .then(function (token) {
        if (typeof token !== "string" || !token.trim()) throw new Error("token: empty");
        return token.trim();
      })
      .then(function (token) {
        if (self._tokenFor === ws) self._tokenFor = null;
        if (ws !== self._ws) return;
        var frame = { id: "AUTH", token: token };
        if (self.state !== "authenticated" && Object.keys(self.positions).length > 0) {
          frame.resume = self._resumePositions();
        }
        self._send(JSON.stringify(frame));
      }, function (err) {
        if (self._tokenFor === ws) self._tokenFor = null;
        warn(err && err.message ? err.message : String(err));
        // A refresh that failed leaves the socket working: the server asks again when
        // the token expires. Before AUTH OK, reconnect with backoff and try again.
        if (ws === self._ws && self.state !== "authenticated") ws.close();
      })
      .catch(report);
  };

  FlowSocket.prototype._resumePositions = function () {
    var resume = {};
    for (var name in this.positions) {
      if (Object.prototype.hasOwnProperty.call(this.positions, name)) {
        resume[name] = { seq: this.positions[name].seq, epoch: this.positions[name].epoch };
      }
    }
    return resume;
  };

  FlowSocket.prototype._onAuthenticated = function (data) {
    if (data.refreshed && this.state === "authenticated") {
      // A new token on the same socket: nothing was lost, nothing is replayed.
      this._scheduleRefresh(data.expires_in);
      return;
    }
    var first = this._authCount === 0;
    this._authCount += 1;
    this.username = data.username;
    if (data.heartbeat) this.heartbeat = data.heartbeat;
    this._attempt = 0;
    var streams = isObject(data.streams) ? data.streams : {};
    if (!data.recovered) {
      // Numbering continues from where the server says, for every stream, so a socket
      // that drops before its first message still resumes all of them.
      this.positions = {};
    }
    // After a recovered resume the owed history follows AUTH OK: keep the positions we
    // asked from, or that history would look like duplicates.
    for (var name in streams) {
      if (!Object.prototype.hasOwnProperty.call(streams, name)) continue;
      var position = streams[name];
      if (this.positions[name] || !isObject(position) || typeof position.seq !== "number") continue;
      this.positions[name] = { seq: position.seq, epoch: position.epoch };
    }
    this._setState("authenticated");
    this._touch();
    this._startKeepalive();
    this._scheduleRefresh(data.expires_in);
    // The page loaded its state with this instance; any later unrecovered start means
    // something may be missing from what it shows.
    if (!data.recovered && !first && this.onresync) {
      try {
        this.onresync(data, this);
      } catch (err) {
        report(err);
      }
    }
  };

  FlowSocket.prototype._scheduleRefresh = function (expiresIn) {
    var self = this;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof expiresIn !== "number" || !isFinite(expiresIn)) return;
    this.expiresIn = expiresIn;
    // Already expired: the server's AUTH REQUEST (reason "expired") drives the refresh.
    if (expiresIn <= 0) return;
    var seconds = Math.max(expiresIn - REFRESH_MARGIN_S, expiresIn * REFRESH_FRACTION);
    var ws = this._ws;
    this._refreshTimer = setTimeout(function () {
      self._refreshTimer = null;
      if (ws === self._ws && self.state === "authenticated") self._authenticate();
    }, Math.min(MAX_TIMER_MS, seconds * 1000));
  };

  FlowSocket.prototype._accept = function (message) {
    var stream = message.username;
    if (typeof message.seq === "number" && typeof stream === "string") {
      var last = this.positions[stream];
      if (last && last.epoch === message.epoch && message.seq <= last.seq) return; // duplicate
      this.positions[stream] = { seq: message.seq, epoch: message.epoch };
    }
    var lists = [this._handlers[message.id], this._handlers["*"]];
    for (var l = 0; l < lists.length; l++) {
      var list = lists[l];
      if (!list) continue;
      for (var i = 0; i < list.length; i++) {
        try {
          list[i](message.data, message);
        } catch (err) {
          report(err);
        }
      }
    }
    if (this.onmessage) {
      try {
        this.onmessage(message);
      } catch (err) {
        report(err);
      }
    }
  };

  FlowSocket.prototype._onClose = function (ws, code, reason) {
    if (!ws || ws !== this._ws) return;
    this._ws = null;
    this._clearTimers();
    this._setState("closed");
    if (this._stopped) return;
    if (SERVER_STATE_CLOSES[code]) {
      // Every socket of the server got this close at once: spread the comebacks over
      // the window the server asks for (it knows its load), uniformly.
      this._scheduleReconnect(this._random() * reconnectWindow(reason) * 1000);
    } else {
      this._scheduleReconnect();
    }
  };

  /* Reconnect after delayMs, or after exponential backoff with full jitter. */
  FlowSocket.prototype._scheduleReconnect = function (delayMs) {
    var self = this;
    if (delayMs === undefined) {
      var bound = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, this._attempt));
      delayMs = this._random() * bound;
      this._attempt += 1;
    }
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(function () {
      self._reconnectTimer = null;
      self.connect();
    }, delayMs);
  };

  /* Any frame proves the connection alive; none for two heartbeats means it is dead. */
  FlowSocket.prototype._touch = function () {
    var self = this;
    var ws = this._ws;
    clearTimeout(this._livenessTimer);
    this._livenessTimer = setTimeout(function () {
      if (ws !== self._ws) return;
      ws.close(4000, "no heartbeat");
      self._onClose(ws, 1006, "no heartbeat");
    }, (this.heartbeat * 2 + 5) * 1000);
  };

  FlowSocket.prototype._startKeepalive = function () {
    var self = this;
    clearInterval(this._keepaliveTimer);
    this._keepaliveTimer = setInterval(function () {
      self._send("<3");
    }, this.heartbeat * 1000);
  };

  FlowSocket.prototype._clearTimers = function () {
    clearTimeout(this._livenessTimer);
    clearInterval(this._keepaliveTimer);
    clearTimeout(this._refreshTimer);
    this._livenessTimer = this._keepaliveTimer = this._refreshTimer = null;
  };

  function setFlag(elementId, value, yes, no) {
    var doc = root.document;
    var el = doc && doc.getElementById(elementId);
    if (!el) return;
    el.textContent = value ? yes : no;
    if (el.classList) el.classList.toggle("on", value);
  }

  /*
   * message_flow's entry point: messageHandler(data) gets every pushed message, and the
   * page's #connected ("Online"/"Offline") and #authenticated ("Yes"/"No") elements, if
   * present, follow the socket's state, with the words message_flow wrote there.
   */
  function createSocket(url, messageHandler, options) {
    options = options || {};
    options.onmessage = messageHandler || options.onmessage;
    var socket = new FlowSocket(url, options);
    socket.onState(function (state) {
      setFlag("connected", state === "open" || state === "authenticated", "Online", "Offline");
      setFlag("authenticated", state === "authenticated", "Yes", "No");
    });
    return socket;
  }

  return { FlowSocket: FlowSocket, createSocket: createSocket };
});
