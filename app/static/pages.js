/* What the demo pages share: JSON requests to the app (CSRF header on POSTs) and the
   page's #error line. */
(function (root) {
  "use strict";
  var errorText = document.getElementById("error");
  var meta = document.querySelector('meta[name="csrf-token"]');

  function showError(text) {
    errorText.textContent = text;
    errorText.hidden = false;
  }

  function clearError() {
    errorText.hidden = true;
    errorText.textContent = "";
  }

  // The app's JSON answer; a refusal (4xx with {"error": ...}, a proxy's 413 or 502 page)
  // or a network failure rejects with one sentence for the page.
  function answer(response) {
    var json = (response.headers.get("Content-Type") || "").indexOf("application/json") === 0;
    return (json ? response.json() : response.text()).then(function (body) {
      if (response.ok && json) return body;
      var detail = json && body && body.error ? body.error : response.statusText;
      throw new Error(response.status + " " + detail);
    }, function () {
      throw new Error(response.status + " " + response.statusText);
    });
  }

  function getJson(url) {
    return fetch(url, { credentials: "same-origin", cache: "no-store",
                        headers: { "Accept": "application/json" } }).then(answer);
  }

  /* POST a FormData or URLSearchParams body; the answer's JSON. */
  function postJson(url, body) {
    return fetch(url, { method: "POST", body: body, credentials: "same-origin",
                        headers: { "Accept": "application/json", "X-CSRFToken": meta ? meta.content : "" } })
      .then(answer);
  }

  /* A file input's file if it is within the form's data-max-bytes, else an error shown. */
  function checkedFile(form, input) {
    var file = input.files && input.files[0];
    if (!file) {
      showError("not uploaded: choose a TSV file to upload");
      return null;
    }
    var limit = parseInt(form.dataset.maxBytes, 10);
    if (limit && file.size > limit) {
      showError("not uploaded: the file is larger than " + Math.floor(limit / 1024) + " KiB");
      return null;
    }
    return file;
  }

  root.FlowPage = { showError: showError, clearError: clearError, getJson: getJson,
                    postJson: postJson, checkedFile: checkedFile };
})(window);
