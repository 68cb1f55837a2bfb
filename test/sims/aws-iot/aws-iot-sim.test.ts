import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { IConnackPacket, IPubackPacket, IPublishPacket, ISubackPacket, Packet } from 'mqtt-packet';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { startAwsIotSim, type AwsIotSim } from './aws-iot-sim.js';
import { rawTlsConnect, type RawTlsMqtt } from './raw-client.js';
import { createShadowService, deltaOf, mergeState } from './shadow-service.js';

const ENDPOINT = 'a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com';

let pki: TestPki;
let server: { cert: Buffer; key: Buffer };
let client: { cert: Buffer; key: Buffer };
const open: RawTlsMqtt[] = [];
const sims: AwsIotSim[] = [];

beforeAll(() => {
  pki = createTestPki();
  server = pki.issueServer(ENDPOINT);
  client = pki.issueClient('site-gw');
});
afterAll(() => pki.cleanup());
afterEach(async () => {
  for (const c of open.splice(0)) c.close();
  for (const s of sims.splice(0)) await s.stop();
});

async function sim(options: Partial<Parameters<typeof startAwsIotSim>[0]> = {}): Promise<AwsIotSim> {
  const s = await startAwsIotSim({ endpoint: ENDPOINT, ...server, ca: pki.ca, ...options });
  sims.push(s);
  return s;
}

async function raw(
  s: AwsIotSim,
  options: {
    version?: 4 | 5;
    servername?: string;
    alpn?: string[];
    cert?: { cert: Buffer; key: Buffer };
  } = {},
): Promise<RawTlsMqtt> {
  const c = await rawTlsConnect(
    s.port,
    {
      ca: pki.ca,
      ...(options.cert ?? client),
      servername: options.servername ?? ENDPOINT,
      ...(options.alpn ? { ALPNProtocols: options.alpn } : {}),
    },
    options.version ?? 5,
  );
  open.push(c);
  return c;
}

async function connected(
  s: AwsIotSim,
  clientId: string,
  version: 4 | 5 = 5,
): Promise<{ c: RawTlsMqtt; connack: IConnackPacket }> {
  const c = await raw(s, { version });
  c.send({
    cmd: 'connect',
    protocolId: 'MQTT',
    protocolVersion: version,
    clientId,
    clean: true,
    keepalive: 60,
  });
  const connack = (await c.next('connack')) as IConnackPacket;
  return { c, connack };
}

const code = (p: Packet) => (p as IConnackPacket).reasonCode ?? (p as IConnackPacket).returnCode;

describe('AWS IoT simulator: TLS and CONNECT (§1.1, §1.2)', () => {
  it('requires a client certificate of its CA and SNI naming the endpoint; records SNI and ALPN', async () => {
    const s = await sim({ alpn443: true });
    await expect(
      rawTlsConnect(s.port, { ca: pki.ca, servername: ENDPOINT, ALPNProtocols: ['x-amzn-mqtt-ca'] }).then(
        async (c) => {
          open.push(c);
          await c.closed;
          throw new Error('closed');
        },
      ),
    ).rejects.toThrow();
    const foreign = pki.issueClient('intruder', { signedByOtherCa: true });
    const byForeign = raw(s, { cert: foreign, alpn: ['x-amzn-mqtt-ca'] }).then(async (c) => {
      await c.closed;
      throw new Error('closed');
    });
    await expect(byForeign).rejects.toThrow();
    // Without the ALPN name, port 443 is not MQTT.
    const noAlpn = await raw(s);
    noAlpn.send({
      cmd: 'connect',
      protocolId: 'MQTT',
      protocolVersion: 5,
      clientId: 'no-alpn',
      clean: true,
      keepalive: 10,
    });
    await noAlpn.closed;
    expect(noAlpn.packets).toEqual([]);
    // A wrong SNI (the certificate check is turned off to reach the server's rule).
    const wrongSni = await rawTlsConnect(s.port, {
      ...client,
      servername: 'other.example.com',
      rejectUnauthorized: false,
      ALPNProtocols: ['x-amzn-mqtt-ca'],
    });
    open.push(wrongSni);
    await wrongSni.closed;

    const ok = await raw(s, { alpn: ['x-amzn-mqtt-ca'] });
    ok.send({
      cmd: 'connect',
      protocolId: 'MQTT',
      protocolVersion: 5,
      clientId: 'site-gw',
      clean: true,
      keepalive: 10,
    });
    const connack = (await ok.next('connack')) as IConnackPacket;
    expect(connack.reasonCode).toBe(0);
    expect(connack.properties?.maximumQoS).toBe(1);
    expect(connack.properties?.serverKeepAlive).toBe(30);
    expect(s.clients()).toEqual([
      expect.objectContaining({
        clientId: 'site-gw',
        sni: ENDPOINT,
        alpn: 'x-amzn-mqtt-ca',
        protocolVersion: 5,
      }),
    ]);
    expect(s.events.filter((e) => e.type === 'tls_refused').length).toBeGreaterThanOrEqual(2);
  });

  it('refuses client ids that start with $ or exceed 128 bytes', async () => {
    const s = await sim();
    const dollar = await connected(s, '$reserved');
    expect(code(dollar.connack)).toBe(0x85);
    await dollar.c.closed;
    const long = await connected(s, 'x'.repeat(129), 4);
    expect(code(long.connack)).toBe(2);
    await long.c.closed;
  });

  it('a second connection with the same client id kicks the first; a CONNECT within 1 s of the last is refused', async () => {
    const s = await sim({ connectIntervalMs: 300 });
    const first = await connected(s, 'dup');
    const tooSoon = await connected(s, 'dup');
    expect(code(tooSoon.connack)).toBe(0x97);
    await tooSoon.c.closed;
    expect(first.c.isClosed).toBe(false);
    await new Promise((r) => setTimeout(r, 350));
    const second = await connected(s, 'dup');
    expect(code(second.connack)).toBe(0);
    const disconnect = await first.c.next('disconnect');
    expect((disconnect as { reasonCode?: number }).reasonCode).toBe(0x8e);
    await first.c.closed;
    expect(second.c.isClosed).toBe(false);
    expect(s.events.some((e) => e.type === 'kicked' && e.clientId === 'dup')).toBe(true);
  });
});

describe('AWS IoT simulator: publish rules (§1.2)', () => {
  it('a denied publish closes a 3.1.1 connection without PUBACK; MQTT 5 gets PUBACK 0x87', async () => {
    const s = await sim();
    s.deny('secret/#');
    const v4 = await connected(s, 'v4', 4);
    v4.c.send(
      {
        cmd: 'publish',
        topic: 'open/a',
        payload: Buffer.from('1'),
        qos: 1,
        messageId: 1,
        retain: false,
        dup: false,
      },
      {
        cmd: 'publish',
        topic: 'secret/a',
        payload: Buffer.from('2'),
        qos: 1,
        messageId: 2,
        retain: false,
        dup: false,
      },
    );
    await v4.c.closed;
    const acks = v4.c.packets.filter((p) => p.cmd === 'puback') as IPubackPacket[];
    expect(acks.map((a) => a.messageId)).toEqual([1]);
    expect(s.received.map((r) => r.topic)).toEqual(['open/a']);

    const v5 = await connected(s, 'v5', 5);
    v5.c.send({
      cmd: 'publish',
      topic: 'secret/b',
      payload: Buffer.from('3'),
      qos: 1,
      messageId: 7,
      retain: false,
      dup: false,
    });
    const ack = (await v5.c.next('puback')) as IPubackPacket;
    expect(ack.reasonCode).toBe(0x87);
    expect(v5.c.isClosed).toBe(false);
  });

  it('ignores QoS 2 (no PUBREC) and closes on a payload over 128 KB; 128 KB exactly is taken', async () => {
    const s = await sim();
    const { c } = await connected(s, 'sizes');
    c.send(
      {
        cmd: 'publish',
        topic: 'q/2',
        payload: Buffer.from('x'),
        qos: 2,
        messageId: 1,
        retain: false,
        dup: false,
      },
      {
        cmd: 'publish',
        topic: 'q/1',
        payload: Buffer.alloc(128 * 1024),
        qos: 1,
        messageId: 2,
        retain: false,
        dup: false,
      },
    );
    const ack = (await c.next('puback')) as IPubackPacket;
    expect(ack.messageId).toBe(2);
    expect(c.packets.some((p) => p.cmd === 'pubrec')).toBe(false);
    expect(s.received.map((r) => r.topic)).toEqual(['q/1']);
    c.send({
      cmd: 'publish',
      topic: 'q/1',
      payload: Buffer.alloc(128 * 1024 + 1),
      qos: 1,
      messageId: 3,
      retain: false,
      dup: false,
    });
    await c.closed;
    expect(c.packets.some((p) => p.cmd === 'puback' && p.messageId === 3)).toBe(false);
  });

  it('takes 100 publishes per second on a connection; the rest of a burst gets 0x97', async () => {
    const s = await sim();
    const { c } = await connected(s, 'burst');
    const burst: Packet[] = [];
    for (let i = 1; i <= 150; i++) {
      burst.push({
        cmd: 'publish',
        topic: 't',
        payload: Buffer.from(String(i)),
        qos: 1,
        messageId: i,
        retain: false,
        dup: false,
      });
    }
    c.send(...burst);
    await s.waitFor(() => c.packets.filter((p) => p.cmd === 'puback').length === 150, 20_000, '150 PUBACKs');
    const acks = c.packets.filter((p) => p.cmd === 'puback') as IPubackPacket[];
    const taken = acks.filter((a) => (a.reasonCode ?? 0) === 0).length;
    const throttled = acks.filter((a) => a.reasonCode === 0x97).length;
    expect(taken).toBeGreaterThanOrEqual(100);
    expect(throttled).toBeGreaterThan(0);
    expect(taken + throttled).toBe(150);
    expect(s.received.length).toBe(taken);
  });
});

describe('AWS IoT simulator: subscriptions (§1.2)', () => {
  it('grants 50 subscriptions, refuses the 51st, closes on 9 filters in one SUBSCRIBE', async () => {
    const s = await sim();
    const { c } = await connected(s, 'subs');
    for (let batch = 0; batch < 7; batch++) {
      const subscriptions = [];
      for (let i = 0; i < 8 && batch * 8 + i < 51; i++)
        subscriptions.push({ topic: `f/${batch * 8 + i}`, qos: 1 as const });
      c.send({ cmd: 'subscribe', messageId: batch + 1, subscriptions });
    }
    const granted: number[] = [];
    for (let batch = 0; batch < 7; batch++)
      granted.push(...((await c.next('suback')) as ISubackPacket).granted.map(Number));
    expect(granted.filter((g) => g === 1).length).toBe(50);
    expect(granted[50]).toBe(0x97);
    const many = Array.from({ length: 9 }, (_, i) => ({ topic: `g/${i}`, qos: 0 as const }));
    c.send({ cmd: 'subscribe', messageId: 99, subscriptions: many });
    await c.closed;
  });

  it('a/# does not match a; only an exact-topic subscription gets the retained message', async () => {
    const s = await sim();
    const { c } = await connected(s, 'wild');
    s.publish('a', 'parent', { retain: true });
    s.publish('a/b', 'child', { retain: true });
    c.send({
      cmd: 'subscribe',
      messageId: 1,
      subscriptions: [
        { topic: 'a/#', qos: 1 },
        { topic: 'a/b', qos: 1 },
      ],
    });
    await c.next('suback');
    const retained = (await c.next('publish')) as IPublishPacket;
    expect([retained.topic, retained.retain]).toEqual(['a/b', true]);
    s.publish('a', 'again', { qos: 1 });
    s.publish('a/c', 'sibling', { qos: 1 });
    const live = (await c.next('publish')) as IPublishPacket;
    expect(live.topic).toBe('a/c');
    expect(c.packets.some((p) => p.cmd === 'publish' && p.topic === 'a')).toBe(false);
  });
});

describe('AWS IoT simulator: shadow service (§1.3)', () => {
  async function shadowClient(s: AwsIotSim) {
    const { c } = await connected(s, `shadow-${Math.random().toString(16).slice(2, 8)}`);
    c.send({ cmd: 'subscribe', messageId: 1, subscriptions: [{ topic: '$aws/things/+/shadow/#', qos: 1 }] });
    await c.next('suback');
    let id = 10;
    const request = async (topic: string, body: unknown) => {
      c.send({
        cmd: 'publish',
        topic,
        payload: Buffer.from(typeof body === 'string' ? body : JSON.stringify(body)),
        qos: 1,
        messageId: id++,
        retain: false,
        dup: false,
      });
      await c.next('puback');
    };
    const response = async (suffix: string) => {
      const p = (await c.next('publish', 10_000, (q) =>
        (q as IPublishPacket).topic.endsWith(suffix),
      )) as IPublishPacket;
      return JSON.parse(p.payload.toString()) as Record<string, unknown>;
    };
    return { c, request, response };
  }

  it('versions, clientToken echo, deltas from a cloud-side change, and 409 on a stale version', async () => {
    const s = await sim();
    const { request, response } = await shadowClient(s);
    await request('$aws/things/pump-1/shadow/update', {
      state: { reported: { rpm: 10 } },
      clientToken: 'tok-1',
    });
    const accepted = await response('/update/accepted');
    expect(accepted).toMatchObject({ state: { reported: { rpm: 10 } }, version: 1, clientToken: 'tok-1' });
    expect(accepted.metadata).toMatchObject({ reported: { rpm: { timestamp: expect.any(Number) } } });

    s.updateShadow('pump-1', { state: { desired: { rpm: 20, mode: 'eco' } } });
    const delta = await response('/update/delta');
    expect(delta).toMatchObject({ state: { rpm: 20, mode: 'eco' }, version: 2 });

    await request('$aws/things/pump-1/shadow/update', {
      state: { reported: { rpm: 20 } },
      version: 1,
      clientToken: 'tok-2',
    });
    expect(await response('/update/rejected')).toMatchObject({
      code: 409,
      message: 'Version conflict',
      clientToken: 'tok-2',
    });

    await request('$aws/things/pump-1/shadow/get', { clientToken: 'tok-3' });
    const doc = await response('/get/accepted');
    expect(doc).toMatchObject({
      state: { desired: { rpm: 20, mode: 'eco' }, reported: { rpm: 10 }, delta: { rpm: 20, mode: 'eco' } },
      version: 2,
      clientToken: 'tok-3',
    });
    await request('$aws/things/pump-1/shadow/update', { state: { reported: { rpm: 20 } }, version: 2 });
    const delta2 = await response('/update/delta');
    expect(delta2.state).toEqual({ mode: 'eco' });
  });

  it("answers with AWS's error bodies: 404, 400 Invalid JSON, missing state, long clientToken", async () => {
    const s = await sim();
    const { request, response } = await shadowClient(s);
    await request('$aws/things/nobody/shadow/name/cfg/get', { clientToken: 'a' });
    expect(await response('/get/rejected')).toMatchObject({
      code: 404,
      message: 'No shadow exists with name: cfg',
      clientToken: 'a',
    });
    await request('$aws/things/x/shadow/update', '{not json');
    expect(await response('/update/rejected')).toMatchObject({ code: 400, message: 'Invalid JSON' });
    await request('$aws/things/x/shadow/update', { clientToken: 'b' });
    expect(await response('/update/rejected')).toMatchObject({
      code: 400,
      message: 'Missing required node: state',
    });
    await request('$aws/things/x/shadow/update', { state: { reported: {} }, clientToken: 'c'.repeat(65) });
    expect(await response('/update/rejected')).toMatchObject({ code: 400, message: 'Invalid clientToken' });
  });

  it('answers 429 to the 11th request in flight on one connection', async () => {
    const s = await sim({ shadowLatencyMs: 500 });
    const { c } = await shadowClient(s);
    const batch: Packet[] = [];
    for (let i = 0; i < 11; i++) {
      batch.push({
        cmd: 'publish',
        topic: `$aws/things/t${i}/shadow/get`,
        payload: Buffer.from(JSON.stringify({ clientToken: `k${i}` })),
        qos: 1,
        messageId: 100 + i,
        retain: false,
        dup: false,
      });
    }
    c.send(...batch);
    const rejected = (await c.next(
      'publish',
      10_000,
      (p) => (p as IPublishPacket).topic === '$aws/things/t10/shadow/get/rejected',
    )) as IPublishPacket;
    expect(JSON.parse(rejected.payload.toString())).toMatchObject({ code: 429, clientToken: 'k10' });
    // The first ten are answered (404: no such shadows) once the service gets to them.
    await s.waitFor(() => c.packets.filter((p) => p.cmd === 'publish').length >= 10, 10_000, 'ten answers');
  });
});

describe('shadow merge and delta rules (§1.3 request and response documents)', () => {
  it('merges deeply, deletes nulls, replaces arrays; the delta keeps only differing desired leaves', () => {
    expect(mergeState({ a: { b: 1, c: 2 }, l: [1, 2] }, { a: { c: null, d: 3 }, l: [3] })).toEqual({
      a: { b: 1, d: 3 },
      l: [3],
    });
    expect(deltaOf({ a: { b: 1, c: 2 }, x: 1, l: [1] }, { a: { b: 1, c: 3 }, x: 1, y: 2, l: [2] })).toEqual({
      a: { c: 2 },
      l: [1],
    });
    expect(deltaOf({ x: 1 }, { x: 1 })).toBeUndefined();
  });

  it('refuses nesting deeper than the configured limit and documents over 8 KB', () => {
    const svc = createShadowService({ maxDepth: 2 });
    const [deep] = svc.handle(
      '$aws/things/t/shadow/update',
      Buffer.from(JSON.stringify({ state: { reported: { a: { b: { c: 1 } } } } })),
    );
    expect(deep!.body).toMatchObject({
      code: 400,
      message: 'JSON contains too many levels of nesting; maximum is 2',
    });
    const [big] = svc.handle(
      '$aws/things/t/shadow/update',
      Buffer.from(JSON.stringify({ state: { reported: { a: 'x'.repeat(9000) } } })),
    );
    expect(big!.body).toMatchObject({ code: 413 });
  });
});
