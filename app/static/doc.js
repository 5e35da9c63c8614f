/*
 * A shared document: this page shows what every viewer shows. Any viewer's page change or
 * upload is published on channel doc:<id>; each announcement carries the document's
 * revision, and the page then reads the state from /docs/<id>/state and shows it unless it
 * already shows a newer one (announcements from two workers may arrive in either order).
 */
(function () {
  "use strict";
  var main = document.querySelector("main[data-doc]");
  var docId = main.dataset.doc;
  var base = "/docs/" + encodeURIComponent(docId);
  var shownRev = parseInt(main.dataset.rev, 10) || 0;
  var live = document.getElementById("doc-live");
  var notice = document.getElementById("doc-notice");

  function text(id, value) {
    document.getElementById(id).textContent = String(value);
  }

  function cell(tag, value, className) {
    var element = document.createElement(tag);
    element.textContent = value; // never HTML: the file is anyone's
    if (className) element.className = className;
    return element;
  }

  function render(state) {
    text("doc-filename", state.filename);
    text("doc-version", state.version);
    text("doc-uploader", state.uploaded_by);
    text("doc-rows", state.row_count);
    text("doc-page", state.page);
    text("doc-pages", state.pages);
    document.getElementById("prev-page-number").value = state.page - 1;
    document.getElementById("next-page-number").value = state.page + 1;
    document.getElementById("prev-page").disabled = state.page <= 1;
    document.getElementById("next-page").disabled = state.page >= state.pages;
    document.getElementById("goto-page").max = state.pages;
    var table = document.getElementById("doc-table");
    var head = document.createElement("tr");
    head.appendChild(cell("th", "#"));
    state.header.forEach(function (name) { head.appendChild(cell("th", name)); });
    var body = document.createElement("tbody");
    state.rows.forEach(function (row, i) {
      var tr = document.createElement("tr");
      tr.appendChild(cell("td", String(state.first_row + i), "rownum"));
      row.forEach(function (value) { tr.appendChild(cell("td", value)); });
      body.appendChild(tr);
    });
    table.tHead.replaceChildren(head);
    table.replaceChild(body, table.tBodies[0]);
    main.dataset.rev = String(state.rev);
  }

  function apply(state) {
    if (!state || typeof state.rev !== "number" || state.rev <= shownRev) return;
    shownRev = state.rev;
    render(state);
  }

  // One read at a time; announcements that arrive meanwhile make one more read after it.
  var loading = null;
  var again = false;
  function load() {
    if (loading) {
      again = true;
      return loading;
    }
    loading = FlowPage.getJson(base + "/state").then(apply, function (error) {
      FlowPage.showError("reading the document failed: " + error.message);
    }).then(function () {
      loading = null;
      if (again) {
        again = false;
        load();
      }
    });
    return loading;
  }

  function say(words) {
    notice.textContent = words;
    notice.hidden = false;
  }

  function setLive(state, words) {
    live.dataset.state = state;
    live.textContent = "Live updates: " + words;
  }

  // Who else has this document open (presence, PROTOCOL section 9): the names, or only
  // how many when the list is too long to send (FLOW_PRESENCE_MAX_LIST).
  var viewers = document.getElementById("doc-viewers");
  function showViewers(state) {
    var names = Object.keys(state.users).sort();
    var listed = names.length >= state.count;
    // Names only: JOIN/LEAVE are per user, so other pages' tab counts are not kept up to date.
    var words = listed ? names.join(", ") : state.count + " people";
    viewers.textContent = (state.count === 1 ? "Viewing now: " : "Viewing now (" + state.count + "): ") + words;
    viewers.dataset.count = String(state.count);
    viewers.hidden = false;
  }

  var socket = createSocket("/websocket", null, { onresync: load });
  window.flowSocket = socket;
  var status = FlowStatus.watch(socket);
  var firstSubscribe = true;
  var doc = socket.subscribe("doc:" + docId, {
    // Asked again for every (re)subscribe: the app checks this user may see the document.
    token: function (channel) {
      return fetch("/socket_channel_token?channel=" + encodeURIComponent(channel),
                   { credentials: "same-origin", cache: "no-store" })
        .then(function (response) {
          if (!response.ok) {
            setLive("refused", "refused (" + response.status + "), retrying");
            throw new Error("subscription token: HTTP " + response.status);
          }
          return response.text();
        });
    },
    onSubscribed: function () {
      setLive("subscribed", "on");
      status.update();
      // Changes made between this page's render and now were announced before we listened.
      if (firstSubscribe) {
        firstSubscribe = false;
        load();
      }
    },
    onresync: function () {
      say("Some changes could not be replayed after the reconnect; the page reloaded the document.");
      load().then(status.lost);
    },
    onError: function (frame) {
      setLive("failed", "stopped (" + frame.reason + ")");
      FlowPage.showError("live updates stopped: " + frame.reason + ". Reload the page to try again.");
    },
    onPresence: showViewers,
    onMessage: function (message) {
      var data = message.data || {};
      if (message.id === "UPLOAD") {
        say(data.uploaded_by + " uploaded a new file: " + data.filename + " (version " + data.version + ").");
      }
      if (typeof data.rev === "number" && data.rev > shownRev) load();
    },
  });
  status.track(doc);
  window.flowDocument = doc;

  function turnTo(page) {
    var body = new URLSearchParams({ page: String(page) });
    return FlowPage.postJson(base + "/page", body).then(function (state) {
      FlowPage.clearError();
      apply(state);
    }, function (error) {
      FlowPage.showError("turning the page failed: " + error.message);
    });
  }

  document.querySelectorAll("form.page-step").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      turnTo(form.elements.page.value);
    });
  });
  document.getElementById("goto-form").addEventListener("submit", function (event) {
    event.preventDefault();
    turnTo(document.getElementById("goto-page").value);
  });

  var uploadForm = document.getElementById("upload-form");
  uploadForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var file = FlowPage.checkedFile(uploadForm, document.getElementById("upload-file"));
    if (!file) return;
    FlowPage.postJson(uploadForm.action, new FormData(uploadForm)).then(function (state) {
      FlowPage.clearError();
      uploadForm.reset();
      apply(state);
    }, function (error) {
      FlowPage.showError(error.message.indexOf("not uploaded") >= 0 ? error.message
                         : "not uploaded: " + error.message);
    });
  });
})();
