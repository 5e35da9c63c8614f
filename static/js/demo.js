/* The demo page: the socket, the two forms, and what arrives. */
(function () {
  "use strict";
  var list = document.getElementById("messages");

  function show(text) {
    var item = document.createElement("li");
    item.textContent = text;
    list.insertBefore(item, list.firstChild);
  }

  var errorText = document.getElementById("error");
  var csrfToken = document.querySelector('meta[name="csrf-token"]').content;

  function showError(text) {
    errorText.textContent = text;
    errorText.hidden = false;
  }

  function clearError() {
    errorText.hidden = true;
    errorText.textContent = "";
  }

  // The app's answer as JSON; a refusal (400, 401, a proxy's 502) or a network failure
  // rejects with a sentence for the page, the app's own {"error": ...} when it sent one.
  function answer(response) {
    var json = (response.headers.get("Content-Type") || "").indexOf("application/json") === 0;
    return (json ? response.json() : response.text()).then(function (body) {
      if (response.ok && json) { return body; }
      var detail = json && body && body.error ? body.error : response.statusText;
      throw new Error(response.status + " " + detail);
    }, function () {
      throw new Error(response.status + " " + response.statusText);
    });
  }

  function failed(what) {
    return function (error) {
      showError(what + " failed: " + error.message);
      throw error;
    };
  }

  function post(url, form) {
    return fetch(url, { method: "POST", body: new URLSearchParams(new FormData(form)),
                        credentials: "same-origin",
                        headers: { "Accept": "application/json", "X-CSRFToken": csrfToken } })
      .then(answer)
      .then(function (body) { clearError(); return body; }, failed(url));
  }

  // Reload what the page shows from the app's own API (the socket could not replay).
  function reloadState() {
    document.getElementById("resync").hidden = false;
    fetch("/api/state", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(answer)
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
