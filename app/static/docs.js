/* The upload form of /docs: checked here first, then sent; the new document's URL opened. */
(function () {
  "use strict";
  var form = document.getElementById("create-form");
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var file = FlowPage.checkedFile(form, document.getElementById("create-file"));
    if (!file) return;
    FlowPage.postJson(form.action, new FormData(form)).then(function (body) {
      window.location.assign(body.url);
    }, function (error) {
      FlowPage.showError(error.message.indexOf("not uploaded") >= 0 ? error.message
                         : "not uploaded: " + error.message);
    });
  });
})();
