/* The echo and card page: demo.js made the socket (window.flowSocket); show its state. */
(function () {
  "use strict";
  if (window.flowSocket && window.FlowStatus) window.FlowStatus.watch(window.flowSocket);
})();
