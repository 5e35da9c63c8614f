/*
 * The connection's state as the page can honestly tell it (#link-state):
 *   connecting    before the first AUTH OK
 *   online        authenticated
 *   reconnecting  the socket dropped after it was online; the client is coming back
 *   restoring     back online, channel subscriptions not all answered yet
 *   resumed       back online and every stream resumed: nothing was missed
 *   reloaded      the server could not replay what was missed (recovered: false, after
 *                 a reconnect or a channel's reset), so the page reloaded its state
 *   closed        the page closed the socket
 * FlowStatus.watch(socket) starts it and returns {track(subscription), update(), lost()}:
 * a page tracks its channel subscriptions, calls update() from their onSubscribed and
 * lost() from their onresync, after it reloaded what the channel shows.
 */
(function (root) {
  "use strict";
  var WORDS = {
    connecting: "Connecting…",
    online: "Online",
    reconnecting: "Reconnecting…",
    restoring: "Online again, restoring subscriptions…",
    resumed: "Online again: resumed, nothing was missed",
    reloaded: "Online: some messages could not be replayed, so the page reloaded its state",
    closed: "Closed",
  };

  function watch(socket, element) {
    element = element || root.document.getElementById("link-state");
    var everOnline = false;
    var reconnected = false; // online again after an outage
    var lostSince = false; // a stream not recovered since the last reconnect
    var tracked = [];

    function show(state) {
      if (!element) return;
      element.dataset.state = state;
      element.textContent = WORDS[state];
    }

    function update() {
      var state = socket.state;
      if (state === "authenticated") {
        if (lostSince) return show("reloaded");
        if (!reconnected) return show("online");
        for (var i = 0; i < tracked.length; i++) {
          var sub = tracked[i];
          if (sub.state === "subscribing") return show("restoring");
        }
        return show("resumed");
      }
      if (state === "closed" && socket._stopped) return show("closed");
      show(everOnline ? "reconnecting" : "connecting");
    }

    var api = {
      track: function (sub) {
        tracked.push(sub);
        update();
        return sub;
      },
      update: update,
      lost: function () {
        lostSince = true; // until the next outage: what the page shows was reloaded
        update();
      },
    };

    // The client calls onresync right after the state turns "authenticated", in the same
    // AUTH OK: the word shown is corrected before the browser paints.
    var pageResync = socket.onresync;
    socket.onresync = function () {
      api.lost();
      if (pageResync) return pageResync.apply(this, arguments);
    };
    socket.onState(function (state) {
      if (state === "authenticated") {
        if (everOnline) {
          reconnected = true;
          lostSince = false;
        }
        everOnline = true;
      }
      update();
    });
    return api;
  }

  root.FlowStatus = { watch: watch, words: WORDS };
})(window);
