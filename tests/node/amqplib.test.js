'use strict';
// amqplib: publish/consume/ack, confirm channels, topic routing, prefetch, errors.

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const amqp = require('amqplib');
const { broker, unique } = require('./harness');

let b;
let conn;

before(async () => {
  b = await broker();
  conn = await amqp.connect(b.url);
});

after(async () => {
  try {
    if (conn) await conn.close();
  } finally {
    if (b) b.stop();
  }
});

// Resolve once `count` messages were handed to `onMessage`; reject after a hang guard.
function collect(channel, queue, count, onMessage = () => {}) {
  return new Promise((resolve, reject) => {
    const got = [];
    const timer = setTimeout(() => reject(new Error(`only ${got.length}/${count} delivered`)), 60_000);
    channel.consume(queue, (msg) => {
      got.push(msg);
      onMessage(msg, got);
      if (got.length === count) {
        clearTimeout(timer);
        resolve(got);
      }
    }).catch(reject);
  });
}

test('publish, consume and ack', async () => {
  const ch = await conn.createChannel();
  const q = unique('node-q');
  await ch.assertQueue(q, { exclusive: true });
  for (let i = 0; i < 10; i++) ch.sendToQueue(q, Buffer.from(`m${i}`), { contentType: 'text/plain' });
  const got = await collect(ch, q, 10, (msg) => ch.ack(msg));
  assert.deepEqual(got.map((m) => m.content.toString()), [...Array(10).keys()].map((i) => `m${i}`));
  assert.ok(got.every((m) => !m.fields.redelivered && m.properties.contentType === 'text/plain'));
  const { messageCount } = await ch.checkQueue(q);
  assert.equal(messageCount, 0);
  await ch.close();
});

test('confirm channel acks every publish', async () => {
  const ch = await conn.createConfirmChannel();
  const q = unique('node-confirm');
  await ch.assertQueue(q, { exclusive: true });
  const confirms = [];
  for (let i = 0; i < 100; i++) {
    confirms.push(new Promise((resolve, reject) => {
      ch.sendToQueue(q, Buffer.from(String(i)), { persistent: true },
        (err) => (err ? reject(err) : resolve(i)));
    }));
  }
  assert.deepEqual(await Promise.all(confirms), [...Array(100).keys()]);
  await ch.waitForConfirms();
  assert.equal((await ch.checkQueue(q)).messageCount, 100);
  const first = await ch.get(q, { noAck: true });
  assert.equal(first.content.toString(), '0');
  assert.equal(first.fields.messageCount, 99);
  assert.equal(first.properties.deliveryMode, 2);
  await ch.close();
});

test('topic routing', async () => {
  const ch = await conn.createConfirmChannel();
  const x = unique('node-topic');
  await ch.assertExchange(x, 'topic', { autoDelete: true });
  const bindings = { star: ['*.error'], hash: ['app.#'], both: ['*.error', 'app.#'] };
  const queues = {};
  for (const [label, keys] of Object.entries(bindings)) {
    queues[label] = (await ch.assertQueue(unique(label), { exclusive: true })).queue;
    for (const key of keys) await ch.bindQueue(queues[label], x, key);
  }
  const keys = ['app.error', 'db.error', 'app.web.info', 'app', 'db.warn', 'x.y.error'];
  for (const key of keys) ch.publish(x, key, Buffer.from(key));
  await ch.waitForConfirms();
  const drain = async (q) => {
    const out = [];
    for (;;) {
      const msg = await ch.get(q, { noAck: true });
      if (msg === false) return out;
      out.push(msg.content.toString());
    }
  };
  assert.deepEqual(await drain(queues.star), ['app.error', 'db.error']);
  assert.deepEqual(await drain(queues.hash), ['app.error', 'app.web.info', 'app']);
  assert.deepEqual(await drain(queues.both), ['app.error', 'db.error', 'app.web.info', 'app']);
  await ch.close();
});

test('prefetch limits unacked deliveries', async () => {
  const pub = await conn.createConfirmChannel();
  const q = unique('node-prefetch');
  await pub.assertQueue(q, { exclusive: true });
  for (let i = 0; i < 6; i++) pub.sendToQueue(q, Buffer.from(String(i)));
  await pub.waitForConfirms();

  const ch = await conn.createChannel();
  await ch.prefetch(2);
  const got = [];
  let notify = null;
  await ch.consume(q, (msg) => {
    got.push(msg);
    if (notify) notify();
  });
  const waitFor = (n) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`only ${got.length}/${n} delivered`)), 60_000);
    const check = () => {
      if (got.length >= n) {
        clearTimeout(timer);
        notify = null;
        resolve();
      }
    };
    notify = check;
    check();
  });
  await waitFor(2);
  // Two unacked deliveries out: the other four wait in the queue.
  assert.equal((await pub.checkQueue(q)).messageCount, 4);
  assert.equal(got.length, 2);
  ch.ack(got[0]);
  await waitFor(3);
  assert.equal((await pub.checkQueue(q)).messageCount, 3);
  assert.equal(got.length, 3);
  assert.deepEqual(got.map((m) => m.content.toString()), ['0', '1', '2']);
  await ch.close();
  await pub.close();
});

test('passive check of a missing queue closes the channel with 404', async () => {
  const ch = await conn.createChannel();
  ch.on('error', () => {}); // the channel error is expected
  await assert.rejects(ch.checkQueue(unique('missing')), (err) => {
    assert.equal(err.code, 404);
    assert.match(err.message, /NOT_FOUND/);
    return true;
  });
  // The connection survives a channel error.
  const other = await conn.createChannel();
  await other.assertQueue(unique('after-404'), { exclusive: true });
  await other.close();
});

test('wrong credentials are refused', async () => {
  const url = b.url.replace('guest:guest@', 'guest:wrong@');
  await assert.rejects(amqp.connect(url), /ACCESS.REFUSED|403/);
});
