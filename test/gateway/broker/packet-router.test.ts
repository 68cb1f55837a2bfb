import { generate, type Packet } from 'mqtt-packet';
import { Duplex } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { limitPacketSize, routedConnection, Routed } from '../../../src/gateway/broker/packet-limit.js';

/** A fake socket: `feed` is what the device sends; `written` what the gateway wrote back. */
function fakeSocket() {
  const written: Buffer[] = [];
  const inner = new Duplex({
    read() {},
    write(chunk: Buffer, _enc, cb) {
      written.push(chunk);
      cb();
    },
  });
  return { inner, written, feed: (b: Buffer) => inner.push(b) };
}

/** A reproducible stream of mixed packets: QoS 0/1 PUBLISHes of many sizes, PINGREQs, SUBSCRIBEs. */
function packets(seed: number, n: number): Buffer[] {
  let s = seed;
  const rand = (k: number) => {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    return s % k;
  };
  const out: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const kind = rand(6);
    let p: Packet;
    if (kind === 0) p = { cmd: 'pingreq' };
    else if (kind === 1)
      p = { cmd: 'subscribe', messageId: i + 1, subscriptions: [{ topic: `t/${i}`, qos: 1 }] };
    else
      p = {
        cmd: 'publish',
        topic: i % 2 === 0 ? `take/${i}` : `aedes/${i}`,
        payload: Buffer.alloc(rand(3) === 0 ? 200 + rand(20000) : rand(100), i & 0xff),
        qos: (kind % 2) as 0 | 1,
        messageId: kind % 2 === 1 ? i + 1 : undefined,
        retain: false,
        dup: false,
      } as Packet;
    out.push(generate(p));
  }
  return out;
}

/** Runs `all` through the router cut into chunks; returns what was taken and what aedes read. */
async function run(all: Buffer[], cutSeed: number, stallAt = -1) {
  const { inner, feed } = fakeSocket();
  const outer = limitPacketSize(inner, { maxPacketSize: 1 << 20, onReject: () => {} });
  const conn = routedConnection(outer)!;
  const taken: Buffer[] = [];
  let seen = 0;
  let stalledOnce = false;
  conn.setRouter({
    route(data, start, end) {
      const bytes = Buffer.from(data.subarray(start, end));
      if (seen++ === stallAt && !stalledOnce) {
        stalledOnce = true;
        seen--;
        setTimeout(() => conn.resume(), 5);
        return Routed.Stall;
      }
      const topicLength = bytes.readUInt16BE(headerLength(bytes));
      const topic = bytes.toString('utf8', headerLength(bytes) + 2, headerLength(bytes) + 2 + topicLength);
      if (topic.startsWith('take/')) {
        taken.push(bytes);
        return Routed.Taken;
      }
      return Routed.Pass;
    },
  });
  const read: Buffer[] = [];
  outer.on('data', (b: Buffer) => read.push(b));
  const stream = Buffer.concat(all);
  let s = cutSeed;
  for (let pos = 0; pos < stream.length;) {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    const size = 1 + (s % (s % 3 === 0 ? 7 : 3000));
    feed(stream.subarray(pos, pos + size));
    pos += size;
    await new Promise((r) => setImmediate(r));
  }
  await new Promise((r) => setTimeout(r, 20));
  return { taken, read: Buffer.concat(read) };
}

function headerLength(packet: Buffer): number {
  let i = 1;
  while ((packet[i]! & 0x80) !== 0) i++;
  return i + 1;
}

describe('packet router (limitPacketSize with a router)', () => {
  it('offers every whole PUBLISH, however the bytes are cut, and aedes reads exactly the rest in order', async () => {
    const all = packets(7, 300);
    const isTaken = (p: Buffer) =>
      p[0]! >> 4 === 3 && p.toString('utf8', headerLength(p) + 2, headerLength(p) + 7) === 'take/';
    const expectedTaken = all.filter(isTaken);
    const expectedRead = Buffer.concat(all.filter((p) => !isTaken(p)));
    expect(expectedTaken.length).toBeGreaterThan(50);
    for (const cutSeed of [1, 2, 3, 4, 5, 6]) {
      const { taken, read } = await run(all, cutSeed);
      expect(taken).toEqual(expectedTaken);
      expect(read.equals(expectedRead)).toBe(true);
    }
  });

  it('holds a stalled packet and everything after it until resume(), then routes them in order', async () => {
    const all = packets(11, 120);
    const isTaken = (p: Buffer) =>
      p[0]! >> 4 === 3 && p.toString('utf8', headerLength(p) + 2, headerLength(p) + 7) === 'take/';
    for (const stallAt of [0, 5, 40]) {
      const { taken, read } = await run(all, 9 + stallAt, stallAt);
      expect(taken).toEqual(all.filter(isTaken));
      expect(read.equals(Buffer.concat(all.filter((p) => !isTaken(p))))).toBe(true);
    }
  });
});
