// The JavaScript Redis event target against ours: `node redis_peer.mjs <port>`.
// Exits 0 once the exchange is done (its last publish answered by Redis).

import { createRedisEventTarget, exchange, fail, RespClient } from './adapters.mjs';

const port = Number(process.argv[2]);
const timer = setTimeout(() => fail('the exchange did not finish within 20 s'), 20_000);
const connect = () => RespClient.connect(port).catch((error) => fail(`redis ${port}: ${error.message}`));
const publishClient = await connect();
const subscribeClient = await connect();
const target = createRedisEventTarget({ publishClient, subscribeClient });
await exchange(target, async () => {
  // Answers come in order: once PING is answered, so is the reply's PUBLISH.
  await publishClient.command('PING');
  publishClient.close();
  subscribeClient.close();
  clearTimeout(timer);
});
