/* The demo page: the socket, the two forms, and what arrives. */
(function () {
  "use strict";
  var list = document.getElementById("messages");

  function show(text) {
    var item = document.createElement("li");
    item.textContent = text;
    list.insertBefore(item, list.firstChild);
  }

  function post(url, form) {
    return fetch(url, { method: "POST", body: new URLSearchParams(new FormData(form)),
                        credentials: "same-origin" })
      .then(function (response) { return response.json(); });
  }

  // Reload what the page shows from the app's own API (the socket could not replay).
  function reloadState() {
    document.getElementById("resync").hidden = false;
    fetch("/api/state", { credentials: "same-origin" })
      .then(function (response) { return response.json(); })
      .then(function (state) {
        list.textContent = "";
        state.recent.forEach(function (item) { show(item.id + ": " + JSON.stringify(item.data)); });
      });
  }

  var socket = createSocket("/websocket", function (message) {
    show(message.id + ": " + JSON.stringify(message.data));
  }, { onresync: reloadState });
  window.flowSocket = socket;

  socket.on("CARD PROGRESS", function (data) {
    document.getElementById("card-progress").value = data.percent;
  });
  socket.on("CARD RESULT", function (data) {
    document.getElementById("card-progress").value = 100;
    document.getElementById("card-result").textContent =
      data.card + ": " + (data.valid ? "valid" : "not valid") + " (" + data.brand + ")";
  });

  document.getElementById("send-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var form = event.target;
    post("/send", form).then(function () { form.reset(); });
  });
  document.getElementById("card-form").addEventListener("submit", function (event) {
    event.preventDefault();
    document.getElementById("card-progress").value = 0;
    document.getElementById("card-result").textContent = "checking…";
    post("/cards/check", event.target);
  });
})();
