/* The demo page: the socket, the two forms, and what arrives. */
(function () {
  "use strict";
  var list = document.getElementById("messages");

  function show(text) {
    var item = document.createElement("li");
    item.textContent = text;
    list.insertBefore(item, list.firstChild);
  }

  // The page's #error line and the app's JSON requests: pages.js, which base.html loads first.
  var page = window.FlowPage;

  function failed(what) {
    return function (error) {
      page.showError(what + " failed: " + error.message);
      throw error;
    };
  }

  function post(url, form) {
    return page.postJson(url, new URLSearchParams(new FormData(form)))
      .then(function (body) { page.clearError(); return body; }, failed(url));
  }

  // Reload what the page shows from the app's own API (the socket could not replay).
  function reloadState() {
    document.getElementById("resync").hidden = false;
    page.getJson("/api/state")
      .then(function (state) {
        list.textContent = "";
        state.recent.forEach(function (item) { show(item.id + ": " + JSON.stringify(item.data)); });
      }, failed("reloading the page's state"))
      .catch(function () { /* shown on the page */ });
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
    post("/send", form).then(function () { form.reset(); }, function () { /* shown */ });
  });
  document.getElementById("card-form").addEventListener("submit", function (event) {
    event.preventDefault();
    document.getElementById("card-progress").value = 0;
    var result = document.getElementById("card-result");
    result.textContent = "checking…";
    post("/cards/check", event.target).catch(function (error) {
      result.textContent = "not checked: " + error.message;
    });
  });
})();
