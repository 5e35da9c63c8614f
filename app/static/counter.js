/* The live counter: the value this view made, then every later one, pushed to all. */
(function () {
  "use strict";
  var main = document.querySelector("main[data-counter]");
  var output = document.getElementById("counter-value");
  var shown = parseInt(main.dataset.counter, 10) || 0;

  // Views served by different workers may be pushed in either order: keep the highest.
  function show(value) {
    if (typeof value !== "number" || value <= shown) return;
    shown = value;
    output.textContent = String(value);
    output.classList.remove("bumped");
    void output.offsetWidth; // restart the animation
    output.classList.add("bumped");
  }

  function catchUp() {
    return FlowPage.getJson("/api/counter").then(function (body) {
      show(body.value);
    }, function (error) {
      FlowPage.showError("reading the counter failed: " + error.message);
    });
  }

  var socket = createSocket("/websocket", null, { onresync: catchUp });
  window.flowSocket = socket;
  FlowStatus.watch(socket);
  socket.on("COUNTER", function (data) {
    show(data && data.value);
  });
  // Views between this page's render and its socket's first AUTH OK were pushed to
  // sockets that existed then: read the value once, when this one is up.
  var caughtUp = false;
  socket.onState(function (state) {
    if (state === "authenticated" && !caughtUp) {
      caughtUp = true;
      catchUp();
    }
  });
})();
