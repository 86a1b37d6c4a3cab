// The JavaScript WebSocket event target against ours: `node websocket_peer.mjs <url>`.
// Prints which WebSocket client it used; exits 0 once the exchange is done and the socket closed.

import { createWebSocketEventTarget, exchange, fail, openWebSocket } from './adapters.mjs';

const [url] = process.argv.slice(2);
const timer = setTimeout(() => fail('the exchange did not finish within 20 s'), 20_000);
const { ws, kind } = await openWebSocket(url).catch((error) => fail(`${url}: ${error.message}`));
console.log(`websocket: ${kind}`);
let finished = false;
ws.addEventListener('error', (event) => fail(`websocket error: ${event.message ?? 'unknown'}`));
ws.addEventListener('close', () => {
  if (!finished) fail('the connection closed before the exchange finished');
  clearTimeout(timer);
});
const target = createWebSocketEventTarget(ws);
await exchange(target, () => {
  finished = true;
  // The reply goes out before the close frame.
  ws.close(1000);
});
