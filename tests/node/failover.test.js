'use strict';
// amqplib failover: an application given every compute node's URL loses the node it is
// connected to (SIGKILL), reconnects through the next URL, and finds the durable queue, its
// binding and every confirmed message; the deliveries it had not acked come back redelivered.
// amqplib connects to one URL, so going through the list is the application's part.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const amqp = require('amqplib');
const { WarrenDev, unique } = require('./harness');

const MESSAGES = 20;
const HELD = 5;
// Hang guard for the failover (the queue's takeover included), not a timing assertion.
const FAILOVER_DEADLINE_MS = 45_000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function connectAny(urls, deadline) {
  for (;;) {
    for (const url of urls) {
      try {
        const conn = await amqp.connect(url, { timeout: 5000 });
        conn.on('error', () => {}); // a lost node surfaces as 'close'
        return { conn, url };
      } catch {
        // next address
      }
    }
    if (Date.now() > deadline) throw new Error('no compute node accepted a connection');
    await sleep(200);
  }
}

// Run op on a fresh confirm channel until it succeeds: while the queue moves to a new owner
// an operation may fail with a channel error (404 "down or inaccessible"); a mandatory
// publish may come back unroutable while the node's topology catches up.
async function retry(conn, deadline, what, op) {
  let last;
  while (Date.now() < deadline) {
    const ch = await conn.createConfirmChannel();
    ch.on('error', () => {});
    try {
      return await op(ch);
    } catch (e) {
      last = e;
      await ch.close().catch(() => {});
      await sleep(200);
    }
  }
  throw new Error(`${what}: still failing at the deadline: ${last}`);
}

test('amqplib reconnects through the next URL and finds queue, binding and unacked messages',
  { skip: process.env.WARREN_TEST_AMQP_URL ? 'needs process control of a warren dev cluster' : false },
  async () => {
    const dev = await WarrenDev.start(3, 3);
    try {
      const queue = unique('node-failover-q');
      const exchange = unique('node-failover-x');
      const key = 'rk';
      const bodies = Array.from({ length: MESSAGES }, (_, i) => `n-${i}`);

      let { conn, url } = await connectAny(dev.urls, Date.now() + 30_000);
      const firstNode = `compute-${dev.urls.indexOf(url)}`;
      const ch = await conn.createConfirmChannel();
      ch.on('error', () => {});
      await ch.assertExchange(exchange, 'direct', { durable: true });
      await ch.assertQueue(queue, { durable: true });
      await ch.bindQueue(queue, exchange, key);
      let returned = 0;
      ch.on('return', () => { returned += 1; });
      for (const body of bodies) {
        ch.publish(exchange, key, Buffer.from(body), { persistent: true, mandatory: true });
      }
      await ch.waitForConfirms();
      assert.equal(returned, 0, 'unroutable before the failover');

      // Take HELD deliveries and ack none of them.
      await ch.prefetch(HELD);
      const held = [];
      await ch.consume(queue, (msg) => { if (msg) held.push(msg); }, { noAck: false });
      const heldBy = Date.now() + 30_000;
      while (held.length < HELD) {
        assert.ok(Date.now() < heldBy, `only ${held.length} deliveries arrived`);
        await sleep(20);
      }
      assert.deepEqual(held.map((m) => m.content.toString()), bodies.slice(0, HELD));
      assert.ok(held.every((m) => !m.fields.redelivered));

      const closed = new Promise((resolve) => conn.once('close', resolve));
      await dev.kill(firstNode);
      await closed;

      const deadline = Date.now() + FAILOVER_DEADLINE_MS;
      ({ conn, url } = await connectAny(dev.urls, deadline));
      try {
        assert.notEqual(`compute-${dev.urls.indexOf(url)}`, firstNode);

        // The queue is there, and its binding routes a new confirmed message into it.
        await retry(conn, deadline, 'passive declare', (c) => c.checkQueue(queue));
        await retry(conn, deadline, 'publish through the binding', async (c) => {
          let ret = false;
          c.on('return', () => { ret = true; });
          c.publish(exchange, key, Buffer.from('after'), { persistent: true, mandatory: true });
          await c.waitForConfirms();
          if (ret) throw new Error('unroutable');
        });

        // Every confirmed message comes back; the held ones as redelivered.
        const got = new Map();
        await retry(conn, deadline, 'drain', async (c) => {
          while (got.size < MESSAGES + 1) {
            const msg = await c.get(queue, { noAck: false });
            if (!msg) {
              if (Date.now() > deadline) {
                const missing = [...bodies, 'after'].filter((b) => !got.has(b));
                assert.fail(`missing after the failover: ${missing}`);
              }
              await sleep(100);
              continue;
            }
            const body = msg.content.toString();
            if (!got.has(body)) got.set(body, msg.fields.redelivered);
            c.ack(msg);
          }
        });
        assert.deepEqual([...got.keys()].sort(), [...bodies, 'after'].sort());
        for (const body of bodies.slice(0, HELD)) {
          assert.equal(got.get(body), true, `${body} was held unacked but not flagged redelivered`);
        }
        await retry(conn, deadline, 'clean up', async (c) => {
          await c.deleteQueue(queue);
          await c.deleteExchange(exchange);
        });
      } finally {
        await conn.close().catch(() => {});
      }
    } finally {
      dev.stop();
    }
  });
