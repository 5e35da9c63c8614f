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
 *
 * Channels (PROTOCOL.md section 9): socket.subscribe(channel, options) returns a handle with
 * unsubscribe(), on(id, handler), state, position ({seq, epoch}), positions ({channel:
 * position}), presence ({count, users, version}) and error. Options: token (a string, or a
 * function(channel, handle) returning a string or a Promise of one, called again for every
 * (re)subscribe; none when the connection token's `channels` claim grants it), since
 * ({seq, epoch} the page already has), onMessage(message, handle), onresync(subscribeOk,
 * handle) (history of the channel could not be replayed: reload it), presence (bool;
 * default: true when onPresence is given), onPresence(state, handle), onSubscribed(ok,
 * handle), onError(frame, handle) (a permanent SUBSCRIBE FAILED, or UNSUBSCRIBED without
 * resubscribe; default: a console warning). Subscriptions outlive the socket: a reconnect
 * restores all of them inside its AUTH, each resumed from its position. A page that never
 * calls subscribe() sends exactly the frames it sent before channels existed.
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
  // Section 9: what a channel name may be, and the frames about a channel that carry no seq.
  var CHANNEL_NAME = /^[A-Za-z0-9_\-=@.]+(:[A-Za-z0-9_\-=@.]+)*$/;
  var CHANNEL_NAME_MAX = 255; // bytes; the pattern admits ASCII only, so characters too
  var CHANNEL_FRAMES = {
    "SUBSCRIBE OK": 1, "SUBSCRIBE FAILED": 1, "UNSUBSCRIBE OK": 1, UNSUBSCRIBED: 1,
    PRESENCE: 1, JOIN: 1, LEAVE: 1,
  };
  // How long an AUTH waits for the subscription tokens it carries: the server's auth
  // timeout (default 10 s) must not pass because one token source hangs. A late one is
  // subscribed with SUBSCRIBE after AUTH OK instead.
  var SUBSCRIPTION_TOKEN_WAIT_MS = 5000;

  function warn(text) {
    if (root.console) root.console.warn("flow: " + text);
  }

  function report(err) {
    if (root.console) root.console.error(err);
  }

  function isObject(value) {
    return value !== null && typeof value === "object";
  }

  function hasOwn(object, key) {
    return Object.prototype.hasOwnProperty.call(object, key);
  }

  /* object[key] = value, also for a key such as "__proto__" (channel and user names may be one). */
  function setOwn(object, key, value) {
    Object.defineProperty(object, key, { value: value, enumerable: true, writable: true, configurable: true });
  }

  function callSafely(fn, self, args) {
    if (typeof fn !== "function") return;
    try {
      fn.apply(self, args);
    } catch (err) {
      report(err);
    }
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
    this._handlers = Object.create(null); // message ids are the application's: any string
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
    this.maxChannels = null; // FLOW_MAX_CHANNELS, from AUTH OK's max_channels
    this._channels = Object.create(null); // channel -> its live Subscription
    this._requests = Object.create(null); // ref -> {kind, sub}: answers owed on this socket
    this._lastRef = 0;
    this._revision2 = false; // set by the first subscribe(): only then channel frames
    this._unsubscribeAfterAuth = []; // {ws, sub} unsubscribed while their AUTH was in flight
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
    this._socketGone();
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
    // Section 9's frames about a channel (SUBSCRIBE OK carries a seq too, JOIN a username).
    // Before subscribe() the server sends none, so a frame that looks like one stays the
    // page's, as before channels existed; a user's message with such an id (it has a seq
    // and no channel) stays a message.
    if (this._revision2 && hasOwn(CHANNEL_FRAMES, data.id) &&
        (typeof data.channel === "string" || typeof data.seq !== "number")) {
      this._onChannelFrame(data);
      return;
    }
    // Message ids belong to the application: one that looks like a control frame's is
    // still a pushed message (only pushed messages carry seq), never a command to us.
    if (typeof data.seq === "number") {
      // A channel's message goes to its subscription only, a user's or "*"'s never there.
      if (typeof data.channel === "string") this._acceptChannel(data);
      else this._accept(data);
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
        if (this._revision2 && this.state !== "authenticated") this._authRefused();
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
    // An AUTH that opens delivery restores every subscription (section 9, "subscribe"
    // inside AUTH): their tokens are fetched alongside the socket's own.
    var subs = this.state !== "authenticated" ? this._liveSubscriptions() : [];
    var gathering = subs.length > 0 ? this._gatherSubscriptionTokens(subs) : null;
    this._fetchToken()
      .then(function (token) {
        if (typeof token !== "string" || !token.trim()) throw new Error("token: empty");
        return token.trim();
      })
      .then(function (token) {
        if (!gathering) return [token, null];
        return gathering.then(function (entries) {
          return [token, entries];
        });
      })
      .then(function (got) {
        var token = got[0];
        if (self._tokenFor === ws) self._tokenFor = null;
        if (ws !== self._ws) return;
        var frame = { id: "AUTH", token: token };
        if (self.state !== "authenticated" && Object.keys(self.positions).length > 0) {
          frame.resume = self._resumePositions();
        }
        if (self.state !== "authenticated" && got[1]) {
          var subscribe = self._authSubscribe(got[1], ws);
          if (subscribe) frame.subscribe = subscribe;
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
    if (typeof data.max_channels === "number") this.maxChannels = data.max_channels;
    if (this._revision2) this._afterAuthOk();
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
    this._socketGone();
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

  // ---- Channels and presence (PROTOCOL.md section 9)

  /*
   * Receive a channel. Throws on a name section 9 does not allow, or on a channel this
   * socket already has a live handle for (one handle per channel: unsubscribe it first).
   */
  FlowSocket.prototype.subscribe = function (channel, options) {
    if (typeof channel !== "string" || channel.length > CHANNEL_NAME_MAX || !CHANNEL_NAME.test(channel)) {
      throw new Error("flow: not a channel name: " + JSON.stringify(channel));
    }
    if (this._channels[channel]) {
      throw new Error("flow: already subscribed to " + channel + "; unsubscribe() that handle first");
    }
    var sub = new Subscription(this, channel, options || {});
    this._channels[channel] = sub;
    this._revision2 = true;
    // Not authenticated yet: the coming AUTH carries it, or AUTH OK sends its SUBSCRIBE.
    if (this.state === "authenticated") this._subscribeNow(sub);
    return sub;
  };

  FlowSocket.prototype._liveSubscriptions = function () {
    var subs = [];
    for (var channel in this._channels) subs.push(this._channels[channel]);
    return subs;
  };

  FlowSocket.prototype._ref = function () {
    this._lastRef += 1;
    return this._lastRef;
  };

  /* The subscription's token: a string, or none (null) when the option gives none. */
  FlowSocket.prototype._subscriptionToken = function (sub) {
    var source = sub._token;
    return Promise.resolve()
      .then(function () {
        return typeof source === "function" ? source(sub.channel, sub) : source;
      })
      .then(function (token) {
        if (token === undefined || token === null) return null;
        if (typeof token !== "string" || !token.trim()) throw new Error("empty");
        return token.trim();
      });
  };

  /*
   * Tokens for the subscriptions an AUTH restores: [{sub, token}], one per sub, or a hole
   * where the token could not be had in time (that one is subscribed after AUTH OK).
   */
  FlowSocket.prototype._gatherSubscriptionTokens = function (subs) {
    var self = this;
    return new Promise(function (resolve) {
      var results = new Array(subs.length);
      var left = subs.length;
      var done = false;
      var timer = setTimeout(finish, SUBSCRIPTION_TOKEN_WAIT_MS);
      function finish() {
        if (done) return;
        done = true;
        clearTimeout(timer);
        resolve(results.slice());
      }
      subs.forEach(function (sub, i) {
        self._subscriptionToken(sub)
          .then(function (token) {
            results[i] = { sub: sub, token: token };
          }, function (err) {
            warn("subscription token for " + sub.channel + ": " + (err && err.message ? err.message : String(err)));
          })
          .then(function () {
            left -= 1;
            if (left === 0) finish();
          });
      });
    });
  };

  /* AUTH's "subscribe" map for the gathered subscriptions still live, or null for none. */
  FlowSocket.prototype._authSubscribe = function (entries, ws) {
    var map = null;
    for (var i = 0; i < entries.length; i++) {
      var entry = entries[i];
      if (!entry || this._channels[entry.sub.channel] !== entry.sub) continue;
      var sub = entry.sub;
      var item = {};
      if (sub.position) item.since = { seq: sub.position.seq, epoch: sub.position.epoch };
      if (entry.token !== null) item.token = entry.token;
      map = map || {};
      setOwn(map, sub.channel, item);
      sub._ws = ws;
      sub._awaiting = { request: null, since: item.since || null };
    }
    return map;
  };

  /* AUTH FAILED before AUTH OK: the server subscribed nothing of that AUTH's map. */
  FlowSocket.prototype._authRefused = function () {
    var ws = this._ws;
    this._unsubscribeAfterAuth = [];
    var subs = this._liveSubscriptions();
    for (var i = 0; i < subs.length; i++) {
      // The next AUTH carries them again, with fresh tokens.
      if (subs[i]._ws === ws && subs[i]._awaiting && subs[i]._awaiting.request === null) {
        subs[i]._ws = null;
        subs[i]._awaiting = null;
      }
    }
  };

  /* After an AUTH OK that (re)started delivery: subscribe what its AUTH did not carry. */
  FlowSocket.prototype._afterAuthOk = function () {
    var ws = this._ws;
    // Unsubscribes first: the server then takes a new SUBSCRIBE of the same channel after them.
    var later = this._unsubscribeAfterAuth;
    this._unsubscribeAfterAuth = [];
    for (var i = 0; i < later.length; i++) {
      if (later[i].ws === ws) this._sendUnsubscribe(later[i].sub);
    }
    var subs = this._liveSubscriptions();
    for (var j = 0; j < subs.length; j++) {
      if (subs[j]._ws !== ws) this._subscribeNow(subs[j]);
    }
  };

  /* Fetch the subscription's token and send its SUBSCRIBE on the current socket. */
  FlowSocket.prototype._subscribeNow = function (sub) {
    var self = this;
    var ws = this._ws;
    clearTimeout(sub._retryTimer);
    sub._retryTimer = null;
    sub._ws = ws;
    sub._awaiting = null;
    var generation = ++sub._generation;
    this._subscriptionToken(sub)
      .then(function (token) {
        if (sub._generation !== generation || ws !== self._ws || self.state !== "authenticated") return;
        var ref = self._ref();
        var request = { kind: "subscribe", sub: sub };
        var frame = { id: "SUBSCRIBE", channel: sub.channel };
        if (sub.position) frame.since = { seq: sub.position.seq, epoch: sub.position.epoch };
        if (token !== null) frame.token = token;
        if (sub._presenceFlag !== undefined) frame.presence = sub._presenceFlag;
        frame.ref = ref;
        self._requests[ref] = request;
        sub._awaiting = { request: request, since: frame.since || null };
        if (sub._presenceFlag) sub._awaitPresence();
        self._send(JSON.stringify(frame));
      }, function (err) {
        if (sub._generation !== generation || ws !== self._ws) return;
        warn("subscription token for " + sub.channel + ": " + (err && err.message ? err.message : String(err)));
        sub._ws = null;
        self._retrySubscribe(sub);
      })
      .catch(report);
  };

  /* Subscribe again after exponential backoff with full jitter (capped, as reconnects). */
  FlowSocket.prototype._retrySubscribe = function (sub) {
    var self = this;
    var bound = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, sub._attempt));
    sub._attempt += 1;
    clearTimeout(sub._retryTimer);
    sub._retryTimer = setTimeout(function () {
      sub._retryTimer = null;
      // Disconnected meanwhile: the next AUTH restores it.
      if (self._channels[sub.channel] === sub && self.state === "authenticated" && sub._ws !== self._ws) {
        self._subscribeNow(sub);
      }
    }, this._random() * bound);
  };

  FlowSocket.prototype._unsubscribe = function (sub) {
    if (this._channels[sub.channel] !== sub) return;
    delete this._channels[sub.channel];
    clearTimeout(sub._retryTimer);
    sub._retryTimer = null;
    sub._generation += 1; // a token fetch under way sends nothing
    var ws = this._ws;
    // The server has it, or will have it once it reads what was sent.
    var serverHasIt = ws && sub._ws === ws && (sub.state === "subscribed" || sub._awaiting);
    sub.state = "unsubscribed";
    sub._awaiting = null;
    sub._ws = null;
    if (!serverHasIt) return;
    if (this.state === "authenticated") this._sendUnsubscribe(sub);
    else this._unsubscribeAfterAuth.push({ ws: ws, sub: sub }); // carried by the AUTH in flight
  };

  FlowSocket.prototype._sendUnsubscribe = function (sub) {
    var ref = this._ref();
    this._requests[ref] = { kind: "unsubscribe", sub: sub };
    this._send(JSON.stringify({ id: "UNSUBSCRIBE", channel: sub.channel, ref: ref }));
  };

  FlowSocket.prototype._requestPresence = function (sub) {
    var ref = this._ref();
    this._requests[ref] = { kind: "presence", sub: sub };
    sub._awaitPresence();
    this._send(JSON.stringify({ id: "PRESENCE", channel: sub.channel, ref: ref }));
  };

  /* The socket closed: what was asked on it will not be answered; AUTH restores the rest. */
  FlowSocket.prototype._socketGone = function () {
    this._requests = Object.create(null);
    this._unsubscribeAfterAuth = [];
    for (var channel in this._channels) {
      var sub = this._channels[channel];
      clearTimeout(sub._retryTimer);
      sub._retryTimer = null;
      sub._generation += 1;
      sub._ws = null;
      sub._awaiting = null;
      sub.state = "subscribing";
    }
  };

  /*
   * The live subscription an answer is for, or null: an answer with a ref must match a
   * request of ours still owed (any other ref is ignored); one without answers the
   * "subscribe" map of AUTH.
   */
  FlowSocket.prototype._answered = function (data, kind) {
    var sub;
    if (data.ref !== undefined && data.ref !== null) {
      var request = this._requests[data.ref];
      if (!request || request.kind !== kind) return null;
      if (data.channel !== undefined && data.channel !== request.sub.channel) return null;
      delete this._requests[data.ref];
      sub = request.sub;
      if (this._channels[sub.channel] !== sub) return null; // given up since (unsubscribed)
      if (kind === "subscribe" && !(sub._awaiting && sub._awaiting.request === request)) return null;
      return sub;
    }
    if (typeof data.channel !== "string") return null;
    sub = this._channels[data.channel];
    if (kind === "subscribe") {
      return sub && sub._awaiting && sub._awaiting.request === null && sub._ws === this._ws ? sub : null;
    }
    return sub || null;
  };

  FlowSocket.prototype._onChannelFrame = function (data) {
    var sub;
    switch (data.id) {
      case "SUBSCRIBE OK":
        sub = this._answered(data, "subscribe");
        if (sub) this._subscribed(sub, data);
        return;
      case "SUBSCRIBE FAILED":
        sub = this._answered(data, "subscribe");
        if (sub) this._subscribeFailed(sub, data);
        return;
      case "UNSUBSCRIBE OK":
        // The handle let go when unsubscribe() was called; nothing of it is delivered since.
        if (data.ref !== undefined && data.ref !== null) {
          var request = this._requests[data.ref];
          if (request && request.kind === "unsubscribe") delete this._requests[data.ref];
        }
        return;
      case "UNSUBSCRIBED":
        sub = typeof data.channel === "string" ? this._channels[data.channel] : null;
        if (sub && sub.state === "subscribed") this._revoked(sub, data);
        return;
      case "PRESENCE":
        sub = this._answered(data, "presence");
        if (sub && sub.state === "subscribed") sub._presenceSnapshot(data);
        return;
      case "JOIN":
      case "LEAVE":
        sub = typeof data.channel === "string" ? this._channels[data.channel] : null;
        if (sub && sub.state === "subscribed") sub._presenceDiff(data);
        return;
    }
  };

  FlowSocket.prototype._subscribed = function (sub, data) {
    var since = sub._awaiting.since;
    var viaAuth = sub._awaiting.request === null;
    sub._awaiting = null;
    sub._attempt = 0;
    sub.error = null;
    sub.state = "subscribed";
    // As AUTH OK's streams (section 4): after a recovered resume the missed messages follow,
    // so keep the position asked from; otherwise numbering continues from the server's.
    if (!(data.recovered && sub.position)) {
      sub.position = typeof data.seq === "number" ? { seq: data.seq, epoch: data.epoch } : null;
    }
    if (isObject(data.presence)) {
      sub._presenceAwaiting = true; // a new subscription's snapshot is the base, whatever came before
      sub._presenceSnapshot(data.presence);
    } else if (viaAuth && sub._wantsPresence() && !sub._presenceAbsent) {
      // AUTH's subscribe map has no presence flag: ask for the snapshot now.
      this._requestPresence(sub);
    } else if (sub._presenceAwaiting) {
      // Asked for presence and got none: the channel has none (FLOW_PRESENCE_CHANNELS).
      sub._presenceAbsent = true;
      sub._presenceAwaiting = false;
      sub._presenceBuffer = [];
    }
    callSafely(sub.onsubscribed, sub, [data, sub]);
    // The page loaded the channel's state up to `since`; this start may have skipped some.
    if (!data.recovered && since) callSafely(sub.onresync, sub, [data, sub]);
  };

  FlowSocket.prototype._subscribeFailed = function (sub, data) {
    sub._awaiting = null;
    sub._ws = null;
    sub.error = data;
    if (data.temporary) {
      this._retrySubscribe(sub); // token_expired fetches a new token, unavailable waits
      return;
    }
    delete this._channels[sub.channel];
    sub._generation += 1;
    sub.state = "failed";
    this._channelError(sub, data, "cannot subscribe to " + sub.channel + ": " + data.reason);
  };

  /* UNSUBSCRIBED: the grant was revoked or the channel reset. */
  FlowSocket.prototype._revoked = function (sub, data) {
    sub._ws = null;
    sub.error = data;
    if (data.resubscribe) {
      sub.state = "subscribing";
      // Every subscriber of the channel got it at once: jitter spreads their comebacks.
      this._retrySubscribe(sub);
      return;
    }
    delete this._channels[sub.channel];
    sub._generation += 1;
    sub.state = "unsubscribed";
    this._channelError(sub, data, "unsubscribed from " + sub.channel + " by the server: " + data.reason);
  };

  FlowSocket.prototype._channelError = function (sub, data, text) {
    if (typeof sub.onerror === "function") callSafely(sub.onerror, sub, [data, sub]);
    else warn(text);
  };

  FlowSocket.prototype._acceptChannel = function (message) {
    var sub = this._channels[message.channel];
    // Before SUBSCRIBE OK, after unsubscribe(): not this page's any more.
    if (!sub || sub.state !== "subscribed") return;
    var last = sub.position;
    if (last && last.epoch === message.epoch && message.seq <= last.seq) return; // duplicate
    sub.position = { seq: message.seq, epoch: message.epoch };
    var lists = [sub._handlers[message.id], sub._handlers["*"]];
    for (var l = 0; l < lists.length; l++) {
      var list = lists[l] ? lists[l].slice() : [];
      for (var i = 0; i < list.length; i++) {
        // A handler may unsubscribe: nothing more of the channel after that.
        if (sub.state !== "subscribed") return;
        callSafely(list[i], sub, [message.data, message]);
      }
    }
    if (sub.state === "subscribed") callSafely(sub.onmessage, sub, [message, sub]);
  };

  /* A channel subscription, as subscribe() returns it. */
  function Subscription(socket, channel, options) {
    this.socket = socket;
    this.channel = channel;
    this.state = "subscribing"; // subscribing | subscribed | failed | unsubscribed
    var since = options.since;
    this.position = isObject(since) && typeof since.seq === "number" ? { seq: since.seq, epoch: since.epoch } : null;
    this.presence = null; // {count, users: {u: {connections: k}}, version} once known
    this.error = null; // the last SUBSCRIBE FAILED or UNSUBSCRIBED
    this.onmessage = options.onMessage || options.onmessage || null;
    this.onresync = options.onresync || options.onResync || null;
    this.onpresence = options.onPresence || options.onpresence || null;
    this.onsubscribed = options.onSubscribed || options.onsubscribed || null;
    this.onerror = options.onError || options.onerror || null;
    this._token = options.token;
    // SUBSCRIBE's presence flag: the page's choice, else asked for when it listens.
    this._presenceFlag = options.presence !== undefined ? !!options.presence : this.onpresence ? true : undefined;
    this._handlers = Object.create(null); // message ids are the application's: any string
    this._ws = null; // the socket its subscription is on, or being asked on
    this._awaiting = null; // {request (null: inside AUTH), since} until SUBSCRIBE OK/FAILED
    this._generation = 0; // bumped to void a token fetch under way
    this._attempt = 0;
    this._retryTimer = null;
    this._presenceAwaiting = false; // a snapshot is on its way: diffs wait for it
    this._presenceBuffer = [];
    this._presenceAbsent = false; // the channel has no presence
  }

  Object.defineProperty(Subscription.prototype, "positions", {
    get: function () {
      var positions = {};
      if (this.position) setOwn(positions, this.channel, { seq: this.position.seq, epoch: this.position.epoch });
      return positions;
    },
  });

  /* Handlers per message id of this channel; "*" receives all of them. Returns a remover. */
  Subscription.prototype.on = function (id, handler) {
    var list = this._handlers[id] || (this._handlers[id] = []);
    list.push(handler);
    return function () {
      var i = list.indexOf(handler);
      if (i >= 0) list.splice(i, 1);
    };
  };

  /* Stop: nothing of the channel reaches this handle from now on; the server is told. */
  Subscription.prototype.unsubscribe = function () {
    this.socket._unsubscribe(this);
  };

  Subscription.prototype._wantsPresence = function () {
    return !!this._presenceFlag;
  };

  Subscription.prototype._awaitPresence = function () {
    this._presenceAwaiting = true;
    this._presenceBuffer = [];
  };

  Subscription.prototype._presenceSnapshot = function (snapshot) {
    var version = typeof snapshot.version === "number" ? snapshot.version : -Infinity;
    // One nobody asked for that is older than what diffs built is stale.
    if (!this._presenceAwaiting && this.presence && version < this.presence.version) return;
    var users = {};
    if (isObject(snapshot.users)) {
      for (var name in snapshot.users) {
        if (hasOwn(snapshot.users, name)) setOwn(users, name, snapshot.users[name]);
      }
    }
    var count = typeof snapshot.count === "number" ? snapshot.count : Object.keys(users).length;
    this.presence = { count: count, users: users, version: version };
    this._presenceAbsent = false;
    var buffered = this._presenceBuffer;
    this._presenceAwaiting = false;
    this._presenceBuffer = [];
    // Diffs that raced the snapshot: those above its version happened after it.
    for (var i = 0; i < buffered.length; i++) this._applyDiff(buffered[i]);
    callSafely(this.onpresence, this, [this.presence, this]);
  };

  Subscription.prototype._presenceDiff = function (diff) {
    if (this._presenceAwaiting) {
      this._presenceBuffer.push(diff);
      return;
    }
    if (this._applyDiff(diff)) callSafely(this.onpresence, this, [this.presence, this]);
  };

  /* JOIN/LEAVE onto the state; false when it is not newer than the state (or no state yet). */
  Subscription.prototype._applyDiff = function (diff) {
    var state = this.presence;
    if (!state || typeof diff.version !== "number" || !(diff.version > state.version)) return false;
    if (typeof diff.username !== "string") return false;
    var users = {};
    for (var name in state.users) setOwn(users, name, state.users[name]);
    var listed = Object.keys(users).length;
    // Over FLOW_PRESENCE_MAX_LIST the snapshot lists nobody, or not everyone: count only.
    var complete = listed >= state.count;
    var count = state.count;
    var known = hasOwn(users, diff.username);
    if (diff.id === "JOIN" && !known) {
      count += 1;
      if (complete) setOwn(users, diff.username, { connections: 1 });
    } else if (diff.id === "LEAVE") {
      if (known) {
        delete users[diff.username];
        count -= 1;
      } else if (!complete && count > 0) {
        count -= 1;
      }
    }
    this.presence = { count: count, users: users, version: diff.version };
    return true;
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
