// The JavaScript design's event targets, as `@alkdev/pubsub` describes them (restated in the
// project's reference, js-event-target-adapters.md), for tests/javascript.rs: the Rust side
// must interoperate with these on the wire. Node.js only, no package: Redis is spoken with a
// small RESP client over `net`, and the WebSocket is Node's own (`WebSocket`, Node 22, or 20.10
// and later with `--experimental-websocket`) or, with `MINI_WEBSOCKET=1` or on an older Node,
// the small client below.

import net from 'node:net';
import crypto from 'node:crypto';

export function fail(message) {
  console.error(`js peer: ${message}`);
  process.exit(1);
}

// `new CustomEvent(type, { detail })`, which Node 18 has only behind a flag.
function customEvent(type, detail) {
  return typeof CustomEvent === 'function'
    ? new CustomEvent(type, { detail })
    : Object.assign(new Event(type), { detail });
}

// ------------------------------------------------------------------ the event targets

// WebSocket: `dispatchEvent` sends the envelope as JSON; a message is parsed, and dispatched to
// the listeners of `type:id`.
export function createWebSocketEventTarget(ws) {
  const target = new EventTarget();
  ws.addEventListener('message', (message) => {
    const envelope = JSON.parse(message.data);
    const topic = envelope.type + ':' + envelope.id;
    target.dispatchEvent(customEvent(topic, envelope));
  });
  return {
    addEventListener: (topic, callback) => target.addEventListener(topic, callback),
    removeEventListener: (topic, callback) => target.removeEventListener(topic, callback),
    dispatchEvent(event) {
      ws.send(JSON.stringify(event.detail));
      return true;
    },
  };
}

// Redis: the topic is the channel; the first listener of a topic subscribes, the last one to
// leave unsubscribes; a message is parsed and dispatched to the channel's listeners.
export function createRedisEventTarget({ publishClient, subscribeClient }) {
  const target = new EventTarget();
  const callbacks = new Map();
  subscribeClient.onMessage = (channel, message) => {
    target.dispatchEvent(customEvent(channel, JSON.parse(message)));
  };
  return {
    async addEventListener(topic, callback) {
      if (!callbacks.has(topic)) {
        callbacks.set(topic, new Set());
        await subscribeClient.command('SUBSCRIBE', topic);
      }
      callbacks.get(topic).add(callback);
      target.addEventListener(topic, callback);
    },
    async removeEventListener(topic, callback) {
      target.removeEventListener(topic, callback);
      const set = callbacks.get(topic);
      if (set && set.delete(callback) && set.size === 0) {
        callbacks.delete(topic);
        await subscribeClient.command('UNSUBSCRIBE', topic);
      }
    },
    dispatchEvent(event) {
      publishClient.command('PUBLISH', event.type, JSON.stringify(event.detail));
      return true;
    },
  };
}

// ------------------------------------------------------------------ RESP (Redis)

// A RESP2 client: commands are answered in order; in subscribe mode, `message` pushes go to
// `onMessage(channel, payload)`, and (un)subscribe confirmations answer their command.
export class RespClient {
  static connect(port) {
    return new Promise((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1', () => resolve(new RespClient(socket)));
      socket.once('error', reject);
    });
  }

  constructor(socket) {
    this.socket = socket;
    this.buffer = Buffer.alloc(0);
    this.pending = [];
    this.onMessage = () => {};
    socket.on('data', (data) => {
      this.buffer = Buffer.concat([this.buffer, data]);
      for (;;) {
        const parsed = parse(this.buffer, 0);
        if (parsed === null) break;
        this.buffer = this.buffer.subarray(parsed.end);
        this.dispatch(parsed.value);
      }
    });
    socket.on('error', (error) => fail(`redis connection: ${error.message}`));
  }

  dispatch(value) {
    if (Array.isArray(value) && value[0] === 'message') {
      this.onMessage(value[1], value[2]);
      return;
    }
    const next = this.pending.shift();
    if (!next) fail(`unexpected reply ${JSON.stringify(value)}`);
    if (value instanceof Error) next.reject(value);
    else next.resolve(value);
  }

  command(...args) {
    const parts = [`*${args.length}\r\n`];
    for (const arg of args) parts.push(`$${Buffer.byteLength(arg)}\r\n${arg}\r\n`);
    this.socket.write(parts.join(''));
    return new Promise((resolve, reject) => this.pending.push({ resolve, reject }));
  }

  close() {
    this.socket.end();
  }
}

// One RESP2 value from `buffer` at `at`: `{ value, end }`, or null if it is not all there.
// Bulk strings are read as UTF-8 (what JSON and channel names are).
function parse(buffer, at) {
  const line = buffer.indexOf('\r\n', at);
  if (line < 0) return null;
  const kind = String.fromCharCode(buffer[at]);
  const head = buffer.toString('utf8', at + 1, line);
  const next = line + 2;
  switch (kind) {
    case '+':
      return { value: head, end: next };
    case '-':
      return { value: new Error(head), end: next };
    case ':':
      return { value: Number(head), end: next };
    case '$': {
      const length = Number(head);
      if (length < 0) return { value: null, end: next };
      if (buffer.length < next + length + 2) return null;
      return { value: buffer.toString('utf8', next, next + length), end: next + length + 2 };
    }
    case '*': {
      const count = Number(head);
      const values = [];
      let end = next;
      for (let i = 0; i < count; i++) {
        const element = parse(buffer, end);
        if (element === null) return null;
        values.push(element.value);
        end = element.end;
      }
      return { value: values, end };
    }
    default:
      fail(`unexpected RESP type ${JSON.stringify(kind)}`);
  }
}

// ------------------------------------------------------------------ WebSocket

export function openWebSocket(url) {
  const mini = process.env.MINI_WEBSOCKET === '1' || typeof WebSocket === 'undefined';
  const ws = mini ? new MiniWebSocket(url) : new WebSocket(url);
  return new Promise((resolve, reject) => {
    ws.addEventListener('open', () => resolve({ ws, kind: mini ? 'mini' : 'node' }));
    ws.addEventListener('error', (event) => reject(new Error(event.message ?? 'error')));
  });
}

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

// A WebSocket client (RFC 6455) with the part of the browser API the adapter uses: `send`
// (a text frame), `close`, and the `open`, `message`, `close` and `error` events.
class MiniWebSocket extends EventTarget {
  constructor(address) {
    super();
    const url = new URL(address);
    const key = crypto.randomBytes(16).toString('base64');
    this.expected = crypto.createHash('sha1').update(key + GUID).digest('base64');
    this.buffer = Buffer.alloc(0);
    this.open = false;
    this.fragments = [];
    this.socket = net.connect(Number(url.port), url.hostname, () => {
      this.socket.write(
        `GET ${url.pathname} HTTP/1.1\r\nHost: ${url.host}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
    this.socket.on('data', (data) => this.receive(data));
    this.socket.on('error', (error) => this.emit('error', { message: error.message }));
    this.socket.on('close', () => this.emit('close', {}));
  }

  emit(type, fields) {
    this.dispatchEvent(Object.assign(new Event(type), fields));
  }

  receive(data) {
    this.buffer = Buffer.concat([this.buffer, data]);
    if (!this.open) {
      const end = this.buffer.indexOf('\r\n\r\n');
      if (end < 0) return;
      const head = this.buffer.toString('latin1', 0, end);
      this.buffer = this.buffer.subarray(end + 4);
      const accept = /sec-websocket-accept: *(\S+)/i.exec(head);
      if (!head.startsWith('HTTP/1.1 101') || !accept || accept[1] !== this.expected) {
        this.emit('error', { message: `handshake refused: ${head.split('\r\n')[0]}` });
        this.socket.destroy();
        return;
      }
      this.open = true;
      this.emit('open', {});
      // Frames that came with the handshake are dispatched in a later task, as a browser's
      // are, once the code awaiting `open` has run.
      setImmediate(() => this.receive(Buffer.alloc(0)));
      return;
    }
    for (;;) {
      if (this.buffer.length < 2) return;
      const [b0, b1] = this.buffer;
      if (b1 & 0x80) return this.emit('error', { message: 'a masked frame from the server' });
      let length = b1 & 0x7f;
      let at = 2;
      if (length === 126) {
        if (this.buffer.length < 4) return;
        length = this.buffer.readUInt16BE(2);
        at = 4;
      } else if (length === 127) {
        if (this.buffer.length < 10) return;
        length = Number(this.buffer.readBigUInt64BE(2));
        at = 10;
      }
      if (this.buffer.length < at + length) return;
      const payload = this.buffer.subarray(at, at + length);
      this.buffer = this.buffer.subarray(at + length);
      this.frame(b0 & 0x80, b0 & 0x0f, payload);
    }
  }

  frame(fin, opcode, payload) {
    if (opcode === 0x1 || opcode === 0x0) {
      this.fragments.push(payload);
      if (fin) {
        const data = new TextDecoder('utf-8', { fatal: true }).decode(Buffer.concat(this.fragments));
        this.fragments = [];
        this.emit('message', { data });
      }
    } else if (opcode === 0x8) {
      if (!this.closing) this.write(0x8, payload.subarray(0, 2));
      this.socket.end();
    } else if (opcode === 0x9) {
      this.write(0xa, payload);
    }
  }

  write(opcode, payload) {
    const mask = crypto.randomBytes(4);
    const length = payload.length;
    const head =
      length < 126
        ? Buffer.from([0x80 | opcode, 0x80 | length])
        : length < 65536
          ? Buffer.from([0x80 | opcode, 0x80 | 126, length >> 8, length & 0xff])
          : Buffer.concat([Buffer.from([0x80 | opcode, 0x80 | 127]), bigEndian64(length)]);
    const masked = Buffer.from(payload);
    for (let i = 0; i < masked.length; i++) masked[i] ^= mask[i % 4];
    this.socket.write(Buffer.concat([head, mask, masked]));
  }

  send(text) {
    this.write(0x1, Buffer.from(text, 'utf8'));
  }

  close(code = 1000) {
    this.closing = true;
    const payload = Buffer.alloc(2);
    payload.writeUInt16BE(code);
    this.write(0x8, payload);
  }
}

function bigEndian64(n) {
  const buffer = Buffer.alloc(8);
  buffer.writeBigUInt64BE(BigInt(n));
  return buffer;
}

// ------------------------------------------------------------------ the exchange

// What the JavaScript peer says hello with: values whose JSON only a JavaScript engine writes
// this way (`-0` as `0`, `1e21` as `1e+21`, a string cut inside an emoji as a lone surrogate
// escape). tests/javascript.rs holds what the Rust side must read from it.
export const FROM_JAVASCRIPT = {
  text: 'héllo wörld — ✓ 😀',
  cut: '😀'.slice(0, 1),
  big: 1e21,
  tiny: 5e-324,
  negativeZero: -0,
  sum: 0.1 + 0.2,
  safe: Number.MAX_SAFE_INTEGER,
  nested: { list: [1, 'two', null, true, { k: [] }] },
  escapes: 'quote" back\\ nl\n tab\t ctl\u0001 ls\u2028 ps\u2029',
  empty: '',
};

// The exchange, the same over both transports: the peer listens to `rust.event:1`, then says
// it is ready on `js.ready:1` every 50 ms until the first `rust.event:1` comes (the Rust side
// may not listen yet when it first says so); on that event, it answers on `js.reply:1` with
// what it read (and the topic it read it on), says hello on `js.hello:1`, and calls `done`.
export async function exchange(target, done) {
  const send = (type, payload) =>
    target.dispatchEvent(customEvent(`${type}:1`, { type, id: '1', payload }));
  let answered = false;
  let ready;
  const answer = (event) => {
    if (answered) return;
    answered = true;
    clearInterval(ready);
    const envelope = event.detail;
    send('js.reply', { topic: event.type, type: envelope.type, id: envelope.id, got: envelope.payload });
    send('js.hello', FROM_JAVASCRIPT);
    done();
  };
  await target.addEventListener('rust.event:1', answer);
  send('js.ready', null);
  ready = setInterval(() => send('js.ready', null), 50);
}
