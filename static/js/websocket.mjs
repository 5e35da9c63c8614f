// ES module entry: loads the classic client once and re-exports it.
import "./websocket.js";

export const FlowSocket = globalThis.FlowSocket;
export const createSocket = globalThis.createSocket;
export default { FlowSocket, createSocket };
