import { createHmac, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { request } from 'node:https';
import type { IConnackPacket, IPublishPacket, ISubackPacket } from 'mqtt-packet';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { createAzureHubSim, type AzureHubSim } from './azure-iot-hub-sim.js';
import { connectRawTls, type RawTlsMqtt } from './raw-tls-mqtt.js';

// The simulator is tested on its own, with tokens signed here (not by the provider), so that the
// provider's tests can trust it (cloud-protocols.md §2).
const HOST = 'localhost';
const deviceKey = randomBytes(32).toString('base64');
const policyKey = randomBytes(32).toString('base64');
const registryKey = randomBytes(32).toString('base64');

/** Signs like the Python SDK (quote_plus: lower-case resource, `%2f`) or the Node SDK (`%2F`). */
function token(
  resource: string,
  key: string,
  ttlS = 3600,
  opts: { skn?: string; lower?: boolean; se?: number } = {},
) {
  const se = opts.se ?? Math.floor(Date.now() / 1000) + ttlS;
  let sr = encodeURIComponent(resource);
  if (opts.lower) sr = sr.replace(/%[0-9A-F]{2}/g, (m) => m.toLowerCase());
  const sig = createHmac('sha256', Buffer.from(key, 'base64')).update(`${sr}\n${se}`).digest('base64');
  return `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=${se}${opts.skn ? `&skn=${opts.skn}` : ''}`;
}

let pki: TestPki;
let sim: AzureHubSim;
const open: RawTlsMqtt[] = [];

beforeAll(async () => {
  pki = createTestPki();
  sim = await createAzureHubSim({
    tls: { cert: readFileSync(pki.serverCert), key: readFileSync(pki.serverKey), ca: pki.ca },
    hostName: HOST,
  });
  for (const id of ['dev1', 'dev10', 'dev2', 'dev3']) sim.addDevice(id, { primaryKey: deviceKey });
  sim.addDevice('cert-dev', { x509: 'ca' });
  sim.addPolicy('device', policyKey, ['DeviceConnect']);
  sim.addPolicy('registryRead', registryKey, ['RegistryRead']);
  sim.addPolicy('noconnect', policyKey, ['RegistryRead']);
});

afterEach(() => {
  for (const c of open.splice(0)) c.close();
});

afterAll(async () => {
  await sim.close();
  pki.cleanup();
});

async function connectAs(
  deviceId: string,
  password: string | undefined,
  extra: Record<string, unknown> = {},
  tlsExtra: { cert?: Buffer; key?: Buffer } = {},
): Promise<{ client: RawTlsMqtt; connack: IConnackPacket }> {
  const client = await connectRawTls(sim.port, { ca: pki.ca, ...tlsExtra });
  open.push(client);
  client.send({
    cmd: 'connect',
    protocolId: 'MQTT',
    protocolVersion: 4,
    clean: true,
    clientId: deviceId,
    keepalive: 60,
    username: `${HOST}/${deviceId}/?api-version=2021-04-12`,
    ...(password === undefined ? {} : { password: Buffer.from(password) }),
    ...extra,
  } as never);
  const connack = (await client.next('connack')) as IConnackPacket;
  return { client, connack };
}

async function online(deviceId: string, filters: string[] = []): Promise<RawTlsMqtt> {
  const { client, connack } = await connectAs(deviceId, token(`${HOST}/devices/${deviceId}`, deviceKey));
  expect(connack.returnCode).toBe(0);
  if (filters.length > 0) {
    client.send({
      cmd: 'subscribe',
      messageId: 1,
      subscriptions: filters.map((topic) => ({ topic, qos: 1 })),
    });
    await client.next('suback');
  }
  return client;
}

describe('SAS verification (§2.2)', () => {
  it('accepts device-key tokens with upper- and lower-case escapes, and a DeviceConnect policy token', async () => {
    expect((await connectAs('dev1', token(`${HOST}/devices/dev1`, deviceKey))).connack.returnCode).toBe(0);
    expect(
      (await connectAs('dev2', token(`${HOST}/devices/dev2`, deviceKey, 3600, { lower: true }))).connack
        .returnCode,
    ).toBe(0);
    // A protocol gateway scopes one policy token to every device (`{host}/devices`).
    expect(
      (await connectAs('dev3', token(`${HOST}/devices`, policyKey, 3600, { skn: 'device' }))).connack
        .returnCode,
    ).toBe(0);
  });

  it('answers CONNACK 5 to a wrong key, an expired token, another device, a segment prefix and a policy without DeviceConnect', async () => {
    const wrongKey = randomBytes(32).toString('base64');
    const cases: [string, string][] = [
      ['dev1', token(`${HOST}/devices/dev1`, wrongKey)],
      ['dev1', token(`${HOST}/devices/dev1`, deviceKey, 0, { se: Math.floor(Date.now() / 1000) - 5 })],
      ['dev2', token(`${HOST}/devices/dev1`, deviceKey)],
      // `/devices/dev1` covers `/devices/dev1/…`, not `/devices/dev10`.
      ['dev10', token(`${HOST}/devices/dev1`, policyKey, 3600, { skn: 'device' })],
      ['dev1', token(`${HOST}/devices`, policyKey, 3600, { skn: 'noconnect' })],
      ['dev1', 'not-a-token'],
      ['nobody', token(`${HOST}/devices/nobody`, deviceKey)],
    ];
    for (const [id, password] of cases) {
      const { client, connack } = await connectAs(id, password);
      expect(connack.returnCode, `${id} ${password.slice(0, 60)}`).toBe(5);
      await client.closed;
    }
    expect(sim.connectedDevices()).not.toContain('nobody');
  });

  it('refuses MQTT 5 and the bridge bit with CONNACK 1, and a wrong host in the username with 5', async () => {
    const v5 = await connectAs('dev1', token(`${HOST}/devices/dev1`, deviceKey), { protocolVersion: 5 });
    expect(v5.connack.returnCode).not.toBe(0);
    const bridge = await connectAs('dev1', token(`${HOST}/devices/dev1`, deviceKey), { bridgeMode: true });
    expect(bridge.connack.returnCode).toBe(1);
    const host = await connectAs('dev1', token(`${HOST}/devices/dev1`, deviceKey), {
      username: 'other.azure-devices.net/dev1/?api-version=2021-04-12',
    });
    expect(host.connack.returnCode).toBe(5);
  });

  it('closes the connection when the token expires', async () => {
    const { client, connack } = await connectAs('dev1', token(`${HOST}/devices/dev1`, deviceKey, 2));
    expect(connack.returnCode).toBe(0);
    await client.closed;
    expect(sim.events.some((e) => e.type === 'token_expired' && e.deviceId === 'dev1')).toBe(true);
  });

  it('takes an X.509 client certificate whose CN is the device id, and refuses another CN', async () => {
    const good = pki.issueClient('cert-dev');
    expect((await connectAs('cert-dev', undefined, {}, good)).connack.returnCode).toBe(0);
    const other = pki.issueClient('someone-else');
    expect((await connectAs('cert-dev', undefined, {}, other)).connack.returnCode).toBe(5);
  });
});

describe('topics (§2.3)', () => {
  it('acknowledges telemetry and keeps its property bag; RETAIN becomes mqtt-retain', async () => {
    const c = await online('dev1');
    const before = sim.telemetry.length;
    c.send({
      cmd: 'publish',
      topic: 'devices/dev1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&stream=temp',
      payload: Buffer.from('{"t":21}'),
      qos: 1,
      messageId: 7,
      retain: true,
      dup: false,
    });
    expect(((await c.next('puback')) as { messageId: number }).messageId).toBe(7);
    const got = sim.telemetry.slice(before);
    expect(got).toHaveLength(1);
    expect(got[0]!.properties).toEqual({
      '$.ct': 'application/json',
      '$.ce': 'utf-8',
      stream: 'temp',
      'mqtt-retain': 'true',
    });
  });

  it('closes the connection on a QoS 2 publish, an undocumented topic and an undocumented filter', async () => {
    const a = await online('dev1');
    a.send({
      cmd: 'publish',
      topic: 'devices/dev1/messages/events/',
      payload: Buffer.from('x'),
      qos: 2,
      messageId: 1,
      retain: false,
      dup: false,
    });
    await a.closed;
    const b = await online('dev1');
    b.send({
      cmd: 'publish',
      topic: 'devices/dev1/telemetry',
      payload: Buffer.from('x'),
      qos: 1,
      messageId: 1,
      retain: false,
      dup: false,
    });
    await b.closed;
    const c = await online('dev1');
    c.send({ cmd: 'subscribe', messageId: 2, subscriptions: [{ topic: 'devices/dev1/#', qos: 1 }] });
    await c.closed;
    const types = sim.events.map((e) => e.type);
    expect(types).toEqual(expect.arrayContaining(['closed_qos2', 'closed_topic', 'closed_subscription']));
  });

  it('grants QoS 1 for a QoS 2 subscription', async () => {
    const c = await online('dev1');
    c.send({ cmd: 'subscribe', messageId: 3, subscriptions: [{ topic: '$iothub/twin/res/#', qos: 2 }] });
    expect(((await c.next('suback')) as ISubackPacket).granted).toEqual([1]);
  });

  it('keeps desired and reported versions apart, deletes on null, answers 204 with $version', async () => {
    const c = await online('dev2', ['$iothub/twin/res/#', '$iothub/twin/PATCH/properties/desired/#']);
    const reportedBefore = sim.twin('dev2').reportedVersion;
    const desiredBefore = sim.twin('dev2').desiredVersion;
    c.send({
      cmd: 'publish',
      topic: '$iothub/twin/PATCH/properties/reported/?$rid=r1',
      payload: Buffer.from('{"fw":"1.0","temp":{"unit":"C","max":30}}'),
      qos: 0,
      retain: false,
      dup: false,
    });
    let res = (await c.next('publish')) as IPublishPacket;
    expect(res.topic).toBe(`$iothub/twin/res/204/?$rid=r1&$version=${reportedBefore + 1}`);
    c.send({
      cmd: 'publish',
      topic: '$iothub/twin/PATCH/properties/reported/?$rid=r2',
      payload: Buffer.from('{"fw":null,"temp":{"max":null}}'),
      qos: 0,
      retain: false,
      dup: false,
    });
    res = (await c.next('publish')) as IPublishPacket;
    expect(res.topic).toBe(`$iothub/twin/res/204/?$rid=r2&$version=${reportedBefore + 2}`);
    expect(sim.twin('dev2').reported).toEqual({ temp: { unit: 'C' } });
    c.send({
      cmd: 'publish',
      topic: '$iothub/twin/PATCH/properties/reported/?$rid=r3',
      payload: Buffer.from('{nope'),
      qos: 0,
      retain: false,
      dup: false,
    });
    expect(((await c.next('publish')) as IPublishPacket).topic).toBe('$iothub/twin/res/400/?$rid=r3');

    const v = sim.updateDesired('dev2', { interval: 5 });
    expect(v).toBe(desiredBefore + 1);
    const patch = (await c.next('publish')) as IPublishPacket;
    expect(patch.topic).toBe(`$iothub/twin/PATCH/properties/desired/?$version=${v}`);
    expect(JSON.parse(patch.payload.toString())).toEqual({ interval: 5, $version: v });

    c.send({
      cmd: 'publish',
      topic: '$iothub/twin/GET/?$rid=g1',
      payload: Buffer.alloc(0),
      qos: 0,
      retain: false,
      dup: false,
    });
    const get = (await c.next('publish')) as IPublishPacket;
    expect(get.topic).toBe('$iothub/twin/res/200/?$rid=g1');
    expect(JSON.parse(get.payload.toString())).toEqual({
      desired: { interval: 5, $version: v },
      reported: { temp: { unit: 'C' }, $version: reportedBefore + 2 },
    });
  });

  it('delivers C2D with its property bag, and again after a drop until PUBACK', async () => {
    const filter = 'devices/dev3/messages/devicebound/#';
    const a = await online('dev3', [filter]);
    sim.sendC2d('dev3', '{"on":true}', { name: 'led', empty: '', nothing: null });
    const first = (await a.next('publish')) as IPublishPacket;
    expect(first.qos).toBe(1);
    expect(first.topic).toMatch(
      /^devices\/dev3\/messages\/devicebound\/\$\.mid=c2d-\d+&\$\.to=%2Fdevices%2Fdev3%2Fmessages%2FdeviceBound&name=led&empty=&nothing$/,
    );
    a.close();
    await a.closed;
    const b = await online('dev3', [filter]);
    const again = (await b.next('publish')) as IPublishPacket;
    expect(again.payload.toString()).toBe('{"on":true}');
    b.send({ cmd: 'puback', messageId: again.messageId! });
    await sim.waitFor(() => sim.pendingC2d('dev3') === 0, 5000, 'C2D completed');
  });

  it('invokes a method and takes the response by $rid; 404 when the device is not subscribed', async () => {
    await expect(sim.invokeMethod('dev10', 'reboot', {})).rejects.toMatchObject({ status: 404 });
    const c = await online('dev10', ['$iothub/methods/POST/#']);
    const result = sim.invokeMethod('dev10', 'reboot', { delay: 1 }, { timeoutMs: 10_000 });
    const req = (await c.next('publish')) as IPublishPacket;
    const m = /^\$iothub\/methods\/POST\/reboot\/\?\$rid=(.+)$/.exec(req.topic);
    expect(m).not.toBeNull();
    expect(JSON.parse(req.payload.toString())).toEqual({ delay: 1 });
    c.send({
      cmd: 'publish',
      topic: `$iothub/methods/res/202/?$rid=${m![1]}`,
      payload: Buffer.from('{"ok":1}'),
      qos: 0,
      retain: false,
      dup: false,
    });
    await expect(result).resolves.toEqual({ status: 202, payload: { ok: 1 } });
  });
});

describe('faults', () => {
  it('a second connection of the same device kicks the first (400027)', async () => {
    const a = await online('dev1');
    const b = await online('dev1');
    await a.closed;
    expect(b.isClosed).toBe(false);
    expect(sim.events.some((e) => e.type === 'kicked' && e.code === 400027)).toBe(true);
  });

  it('throttles one device: telemetry closes its link with 429002, twin requests get 429, others flow', async () => {
    const a = await online('dev1', ['$iothub/twin/res/#']);
    const b = await online('dev2');
    sim.throttle('dev1', { publishes: 1 });
    a.send({
      cmd: 'publish',
      topic: '$iothub/twin/GET/?$rid=t1',
      payload: Buffer.alloc(0),
      qos: 0,
      retain: false,
      dup: false,
    });
    expect(((await a.next('publish')) as IPublishPacket).topic).toBe('$iothub/twin/res/429/?$rid=t1');
    a.send({
      cmd: 'publish',
      topic: 'devices/dev1/messages/events/',
      payload: Buffer.from('x'),
      qos: 1,
      messageId: 9,
      retain: false,
      dup: false,
    });
    await a.closed;
    expect(a.packets.some((p) => p.cmd === 'puback')).toBe(false);
    b.send({
      cmd: 'publish',
      topic: 'devices/dev2/messages/events/',
      payload: Buffer.from('y'),
      qos: 1,
      messageId: 4,
      retain: false,
      dup: false,
    });
    await b.next('puback');
    expect(sim.events.some((e) => e.type === 'throttled' && e.deviceId === 'dev1' && e.code === 429002)).toBe(
      true,
    );
    // The count is used up: the device publishes again.
    const again = await online('dev1');
    again.send({
      cmd: 'publish',
      topic: 'devices/dev1/messages/events/',
      payload: Buffer.from('z'),
      qos: 1,
      messageId: 5,
      retain: false,
      dup: false,
    });
    await again.next('puback');
  });

  it('an outage closes every connection and refuses new ones until it ends', async () => {
    const a = await online('dev1');
    sim.outage(true);
    await a.closed;
    await expect(connectAs('dev1', token(`${HOST}/devices/dev1`, deviceKey))).rejects.toThrow();
    sim.outage(false);
    await online('dev1');
  });
});

describe('service REST API (§2.5)', () => {
  function post(path: string, body: unknown, headers: Record<string, string>) {
    return new Promise<{ status: number; headers: Record<string, unknown>; body: unknown }>(
      (resolve, reject) => {
        const req = request(
          {
            host: '127.0.0.1',
            port: sim.servicePort,
            path,
            method: 'POST',
            ca: pki.ca,
            servername: 'localhost',
            headers: { 'content-type': 'application/json', ...headers },
          },
          (res) => {
            const chunks: Buffer[] = [];
            res.on('data', (c: Buffer) => chunks.push(c));
            res.on('end', () =>
              resolve({
                status: res.statusCode ?? 0,
                headers: res.headers,
                body: JSON.parse(Buffer.concat(chunks).toString() || 'null'),
              }),
            );
          },
        );
        req.on('error', reject);
        req.end(JSON.stringify(body));
      },
    );
  }

  it('pages the twin query with x-ms-continuation and refuses a wrong key', async () => {
    const auth = token(HOST, registryKey, 3600, { skn: 'registryRead' });
    const ids: string[] = [];
    let continuation: string | undefined;
    let pages = 0;
    do {
      const res = await post(
        '/devices/query?api-version=2021-04-12',
        { query: 'SELECT * FROM devices' },
        {
          authorization: auth,
          'x-ms-max-item-count': '2',
          ...(continuation ? { 'x-ms-continuation': continuation } : {}),
        },
      );
      expect(res.status).toBe(200);
      ids.push(...(res.body as { deviceId: string }[]).map((t) => t.deviceId));
      continuation = res.headers['x-ms-continuation'] as string | undefined;
      pages++;
    } while (continuation !== undefined && pages < 10);
    expect(ids.sort()).toEqual(['cert-dev', 'dev1', 'dev10', 'dev2', 'dev3']);
    expect(pages).toBe(3);
    const bad = await post(
      '/devices/query?api-version=2021-04-12',
      { query: 'SELECT * FROM devices' },
      {
        authorization: token(HOST, deviceKey, 3600, { skn: 'registryRead' }),
      },
    );
    expect(bad.status).toBe(401);
  });
});
