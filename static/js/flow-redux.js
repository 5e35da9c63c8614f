/*
 * Dispatch pushed messages into a Redux (or any store with dispatch) as
 * {type: id, payload: data}. No Redux dependency. Returns a function that disconnects.
 *
 *   connectStore(createSocket("/websocket"), store);
 */
(function (root, factory) {
  var api = factory();
  if (typeof module === "object" && module.exports) module.exports = api;
  root.connectStore = api.connectStore;
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";
  function connectStore(socket, store) {
    return socket.on("*", function (data, message) {
      store.dispatch({ type: message.id, payload: data });
    });
  }
  return { connectStore: connectStore };
});
