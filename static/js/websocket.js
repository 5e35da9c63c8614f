/*
 * Flow browser client. No dependencies.
 *
 * Classic script:   <script src="/static/js/websocket.js"></script>
 *                   createSocket("/websocket", messageHandler)   // message_flow style
 *                   new FlowSocket("/websocket", {onresync: reload})
 * ES module:        import { createSocket, FlowSocket } from "/static/js/websocket.mjs";
 *
 * It speaks the Flow wire protocol: answers AUTH REQUEST with a token fetched from
 * /socket_auth_token (a fresh one each time, so one refused token is replaced), asks to
 * resume each stream after the last seq it accepted, drops duplicates, reconnects with
 * exponential backoff and full jitter, and treats a silent connection (no frame for two
 * heartbeats) as dead.
 */
(function (root, factory) {
  var api = factory(root);
  if (typeof module === "object" && module.exports) {
    module.exports = api;
  }
  root.FlowSocket = api.FlowSocket;
  root.createSocket = api.createSocket;
})(typeof self !== "undefined" ? self : this, function (root) {
  "use strict";

  var BACKOFF_BASE_MS = 500;
  var BACKOFF_CAP_MS = 30000;
  var PROTOCOL_IDS = { "AUTH REQUEST": 1, "AUTH OK": 1, "AUTH FAILED": 1, PONG: 1, ERROR: 1 };

  function resolveUrl(url) {
    url = url || "/websocket";
    if (/^wss?:\/\//.test(url)) return url;
    var loc = root.location;
    var scheme = loc.protocol === "https:" ? "wss://" : "ws://";
    if (/^https?:\/\//.test(url)) return url.replace(/^http/, "ws");
    return scheme + loc.host + (url.charAt(0) === "/" ? url : "/" + url);
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
    this.positions = {}; // stream -> {seq, epoch} of the last message accepted
    this._handlers = {};
    this._stateHandlers = [];
    this._attempt = 0;
    this._stopped = false;
    this._ws = null;
    this._reconnectTimer = null;
    this._livenessTimer = null;
    this._keepaliveTimer = null;
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
    var self = this;
    this._setState("connecting");
    var ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = function () {
      self._setState("open");
      self._touch();
    };
    ws.onmessage = function (event) {
      self._onFrame(event.data);
    };
    ws.onclose = function (event) {
      self._onClose(ws, event.code);
    };
  };

  /* Close for good: no reconnect until connect() is called again. */
  FlowSocket.prototype.close = function () {
    this._stopped = true;
    clearTimeout(this._reconnectTimer);
    this._clearTimers();
    if (this._ws) this._ws.close(1000, "client closed");
    this._ws = null;
    this._setState("closed");
  };

  FlowSocket.prototype._setState = function (state) {
    if (this.state === state) return;
    this.state = state;
    for (var i = 0; i < this._stateHandlers.length; i++) {
      try {
        this._stateHandlers[i](state, this);
      } catch (err) {
        if (root.console) root.console.error(err);
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
    switch (data.id) {
      case "AUTH REQUEST":
        this._authenticate();
        return;
      case "AUTH OK":
        this._onAuthenticated(data);
        return;
      case "AUTH FAILED":
        // The next AUTH REQUEST fetches a new token.
        if (root.console) root.console.warn("flow: authentication failed: " + data.reason);
        return;
      case "PONG":
        return;
      case "ERROR":
        if (root.console) root.console.warn("flow: server says: " + data.reason);
        return;
    }
    this._accept(data);
  };

  FlowSocket.prototype._authenticate = function () {
    var self = this;
    var ws = this._ws;
    fetch(this.tokenUrl, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("token: HTTP " + response.status);
        return response.text();
      })
      .then(function (token) {
        if (ws !== self._ws) return;
        self._send(JSON.stringify({ id: "AUTH", token: token.trim(), resume: self.positions }));
      })
      .catch(function (err) {
        if (root.console) root.console.warn("flow: " + err.message);
        if (ws === self._ws && ws) ws.close(); // reconnect with backoff, try again
      });
  };

  FlowSocket.prototype._onAuthenticated = function (data) {
    var resumed = Object.keys(this.positions).length > 0;
    this.username = data.username;
    if (data.heartbeat) this.heartbeat = data.heartbeat;
    this._attempt = 0;
    if (!data.recovered) {
      // Nothing was replayed: numbering starts afresh, and the page reloads what it shows.
      this.positions = {};
    }
    this._setState("authenticated");
    this._touch();
    this._startKeepalive();
    if (!data.recovered && resumed && this.onresync) {
      try {
        this.onresync(data, this);
      } catch (err) {
        if (root.console) root.console.error(err);
      }
    }
  };

  FlowSocket.prototype._accept = function (message) {
    var stream = message.username;
    if (typeof message.seq === "number" && stream !== undefined) {
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
          if (root.console) root.console.error(err);
        }
      }
    }
    if (this.onmessage) this.onmessage(message);
  };

  FlowSocket.prototype._onClose = function (ws, code) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._clearTimers();
    this._setState("closed");
    if (this._stopped) return;
    // 1001: the server is draining; come back soon and resume elsewhere in the pool.
    this._scheduleReconnect(code === 1001 || code === 4008 ? 0 : undefined);
  };

  FlowSocket.prototype._scheduleReconnect = function (attemptOverride) {
    var self = this;
    var attempt = attemptOverride === undefined ? this._attempt : attemptOverride;
    this._attempt = attempt + 1;
    // Full jitter: anywhere between 0 and the exponential bound.
    var bound = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, attempt));
    var delay = Math.random() * bound;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(function () {
      self.connect();
    }, delay);
  };

  /* Any frame proves the connection alive; none for two heartbeats means it is dead. */
  FlowSocket.prototype._touch = function () {
    var self = this;
    clearTimeout(this._livenessTimer);
    this._livenessTimer = setTimeout(function () {
      if (self._ws) self._ws.close(4000, "no heartbeat");
      self._onClose(self._ws, 1006);
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
  };

  function setFlag(elementId, value) {
    var doc = root.document;
    var el = doc && doc.getElementById(elementId);
    if (!el) return;
    el.textContent = value ? "true" : "false";
    if (el.classList) el.classList.toggle("on", value);
  }

  /*
   * message_flow's entry point: messageHandler(data) gets every pushed message, and the
   * page's #connected / #authenticated elements, if present, follow the socket's state.
   */
  function createSocket(url, messageHandler, options) {
    options = options || {};
    options.onmessage = messageHandler || options.onmessage;
    var socket = new FlowSocket(url, options);
    socket.onState(function (state) {
      setFlag("connected", state === "open" || state === "authenticated");
      setFlag("authenticated", state === "authenticated");
    });
    return socket;
  }

  return { FlowSocket: FlowSocket, createSocket: createSocket };
});
