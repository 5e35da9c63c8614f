/* The echo and card page: demo.js made the socket (window.flowSocket); show its state. */
(function () {
  "use strict";
  var socket = window.flowSocket;
  if (socket && window.FlowStatus) window.FlowStatus.watch(socket);
  // Who else is online: the lobby channel, which every connection token grants (its
  // `channels` claim), with presence (FLOW_PRESENCE_CHANNELS includes it in the demo).
  var online = document.getElementById("online-now");
  if (!socket || !online || typeof socket.subscribe !== "function") return;
  socket.subscribe("lobby", {
    onPresence: function (state) {
      var names = Object.keys(state.users).sort();
      online.textContent = names.length >= state.count ? names.join(", ") : state.count + " people";
      online.dataset.count = String(state.count);
    },
  });
})();
