import { execFile } from 'node:child_process';
import { request } from 'node:https';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { startGoliothSim, type GoliothSim } from './golioth-sim.js';

// The simulator tested with raw clients before the provider meets it: node:https for the REST
// API, libcoap's coap-client-openssl (a reference DTLS-PSK client) for the device side.

const run = promisify(execFile);

let pki: TestPki;
let sim: GoliothSim;

async function api(
  method: string,
  path: string,
  options: { key?: string; body?: unknown } = {},
): Promise<{ status: number; json: unknown; headers: Record<string, unknown> }> {
  const url = new URL(path, sim.restUrl);
  return new Promise((resolve, reject) => {
    const req = request(
      url,
      {
        method,
        ca: pki.ca,
        headers: {
          ...(options.key === undefined ? {} : { 'x-api-key': options.key }),
          'content-type': 'application/json',
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          resolve({
            status: res.statusCode ?? 0,
            json: text === '' ? undefined : JSON.parse(text),
            headers: res.headers,
          });
        });
      },
    );
    req.on('error', reject);
    if (options.body !== undefined) req.write(JSON.stringify(options.body));
    req.end();
  });
}

async function coapPost(identity: string, key: string, path: string, payload: string) {
  return run(
    'coap-client-openssl',
    [
      '-m',
      'post',
      '-u',
      identity,
      '-k',
      key,
      '-t',
      'json',
      '-B',
      '8',
      '-e',
      payload,
      `${sim.coapUrl}${path}`,
    ],
    { timeout: 20_000 },
  );
}

async function waitFor(check: () => boolean, ms = 15_000) {
  const until = Date.now() + ms;
  while (!check()) {
    if (Date.now() > until) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 25));
  }
}

beforeAll(async () => {
  pki = createTestPki();
  sim = await startGoliothSim(pki);
  sim.addProject('farm', 'key-farm');
  sim.addProject('other', 'key-other');
  sim.addDevice('farm', {
    name: 'pump-1',
    hardwareIds: ['hw-pump-1'],
    blueprintId: 'bp-pump',
    psk: { key: 'pump-secret' },
  });
  sim.addDevice('farm', { name: 'pump-2', hardwareIds: ['hw-pump-2'] });
  await sim.applyCredentials();
});

afterAll(async () => {
  await sim?.close();
  pki?.cleanup();
});

describe('golioth simulator: REST (§3.1)', () => {
  it('answers a project lookup in {data}, and 401 / 403 / 404 as {code,message,details}', async () => {
    const ok = await api('GET', '/v1/projects/farm', { key: 'key-farm' });
    expect(ok.status).toBe(200);
    expect(ok.json).toMatchObject({ data: { id: 'farm', name: 'farm' } });

    const noKey = await api('GET', '/v1/projects/farm', { key: 'wrong' });
    expect(noKey.status).toBe(401);
    expect(noKey.json).toMatchObject({ code: 16, message: expect.any(String), details: [] });
    const foreign = await api('GET', '/v1/projects/farm', { key: 'key-other' });
    expect(foreign.status).toBe(403);
    expect((foreign.json as { code: number }).code).toBe(7);
    const missing = await api('GET', '/v1/projects/nope', { key: 'key-farm' });
    expect(missing.status).toBe(404);
    expect((missing.json as { code: number }).code).toBe(5);
  });

  it('pages devices in {list,page,perPage,total} and includes LightDB State at statePath', async () => {
    sim.setState('farm', 'pump-1', 'desired', { speed: 3 });
    const page0 = await api('GET', '/v1/projects/farm/devices?perPage=1&page=0&statePath=desired', {
      key: 'key-farm',
    });
    expect(page0.json).toMatchObject({ page: 0, perPage: 1, total: 2 });
    const page1 = await api('GET', '/v1/projects/farm/devices?perPage=1&page=1&statePath=desired', {
      key: 'key-farm',
    });
    const names = [page0, page1].map((p) => (p.json as { list: { name: string }[] }).list[0]!.name);
    expect(names.sort()).toEqual(['pump-1', 'pump-2']);
    const pump1 = [page0, page1]
      .flatMap((p) => (p.json as { list: { name: string; data: unknown }[] }).list)
      .find((d) => d.name === 'pump-1');
    expect(pump1?.data).toEqual({ speed: 3 });
    const bad = await api('GET', '/v1/projects/farm/devices?perPage=101', { key: 'key-farm' });
    expect(bad.status).toBe(400);
    const byHw = await api('GET', '/v1/projects/farm/devices?hardwareId=hw-pump-2', { key: 'key-farm' });
    expect((byHw.json as { list: { name: string }[] }).list.map((d) => d.name)).toEqual(['pump-2']);
  });

  it('writes LightDB State at a path without touching siblings, and reads it back', async () => {
    const id = sim.device('farm', 'pump-2').id;
    await api('POST', `/v1/projects/farm/devices/${id}/data/reported/env`, {
      key: 'key-farm',
      body: { t: 21 },
    });
    await api('PUT', `/v1/projects/farm/devices/${id}/data/reported/mode`, { key: 'key-farm', body: 'eco' });
    const got = await api('GET', `/v1/projects/farm/devices/${id}/data/reported`, { key: 'key-farm' });
    expect(got.json).toEqual({ data: { env: { t: 21 }, mode: 'eco' } });
    const missing = await api('GET', `/v1/projects/farm/devices/${id}/data/nothing`, { key: 'key-farm' });
    expect(missing.status).toBe(404);
  });

  it('resolves settings device > blueprint > project', async () => {
    const created = await api('POST', '/v1/projects/farm/settings', {
      key: 'key-farm',
      body: { key: 'INTERVAL', dataType: 'integer', value: 60 },
    });
    expect(created.status).toBe(200);
    sim.addSetting('farm', { key: 'INTERVAL', dataType: 'integer', value: 30, blueprintId: 'bp-pump' });
    sim.addSetting('farm', { key: 'LABEL', dataType: 'string', value: 'project' });
    sim.addSetting('farm', { key: 'LABEL', dataType: 'string', value: 'mine', deviceName: 'pump-1' });
    const bad = await api('POST', '/v1/projects/farm/settings', {
      key: 'key-farm',
      body: { key: 'lower', dataType: 'integer', value: 1 },
    });
    expect(bad.status).toBe(400);
    const wrongType = await api('POST', '/v1/projects/farm/settings', {
      key: 'key-farm',
      body: { key: 'X', dataType: 'integer', value: 'one' },
    });
    expect(wrongType.status).toBe(400);

    const eff = async (name: string) => {
      const r = await api('GET', `/v1/projects/farm/devices/${sim.device('farm', name).id}/settings`, {
        key: 'key-farm',
      });
      return Object.fromEntries(
        (r.json as { list: { key: string; value: unknown }[] }).list.map((s) => [s.key, s.value]),
      );
    };
    expect(await eff('pump-1')).toEqual({ INTERVAL: 30, LABEL: 'mine' });
    expect(await eff('pump-2')).toEqual({ INTERVAL: 60, LABEL: 'project' });
  });

  it('answers 429 with Retry-After and 503 during an outage, when told to', async () => {
    sim.rest.faults.throttle = { remaining: 1, retryAfterSeconds: 2 };
    const throttled = await api('GET', '/v1/projects/farm', { key: 'key-farm' });
    expect(throttled.status).toBe(429);
    expect(throttled.headers['retry-after']).toBe('2');
    expect((await api('GET', '/v1/projects/farm', { key: 'key-farm' })).status).toBe(200);
    sim.rest.faults.outage = '503';
    expect((await api('GET', '/v1/projects/farm', { key: 'key-farm' })).status).toBe(503);
    sim.rest.faults.outage = 'refuse';
    await expect(api('GET', '/v1/projects/farm', { key: 'key-farm' })).rejects.toThrow();
    sim.rest.faults.outage = false;
    expect((await api('GET', '/v1/projects/farm', { key: 'key-farm' })).status).toBe(200);
  });
});

describe('golioth simulator: CoAP over DTLS-PSK (§3.2), with a reference client', () => {
  it('takes stream data posted to /.s/<path> by a device with its PSK, and REST stream queries find it', async () => {
    await coapPost('pump-1@farm', 'pump-secret', '/.s/env', '{"temp":20.5,"hum":40}');
    await coapPost('pump-1@farm', 'pump-secret', '/.s/env', '{"temp":22.5,"hum":41}');
    await waitFor(() => sim.stream('farm').length === 2);
    expect(sim.coap.requests.filter((r) => r.method === 'POST').map((r) => r.identity)).toEqual([
      'pump-1@farm',
      'pump-1@farm',
    ]);
    const id = sim.device('farm', 'pump-1').id;
    const rows = await api('POST', `/v1/projects/farm/devices/${id}/stream`, {
      key: 'key-farm',
      body: { query: { fields: [{ path: 'env.temp', alias: 't' }, { path: 'deviceId' }] }, perPage: 10 },
    });
    expect(rows.json).toMatchObject({
      total: 2,
      list: [
        { t: 20.5, deviceId: id },
        { t: 22.5, deviceId: id },
      ],
    });
    const avg = await api('POST', '/v1/projects/farm/stream', {
      key: 'key-farm',
      body: {
        query: {
          fields: [{ path: 'env.temp', alias: 'avg', agg: 'avg' }],
          filters: [{ path: 'env.hum', op: '>=', value: 40 }],
        },
      },
    });
    expect((avg.json as { list: { avg: number }[] }).list[0]!.avg).toBe(21.5);
  });

  it('refuses the handshake of a wrong PSK or an unknown identity: nothing is recorded', async () => {
    const before = sim.coap.requests.length;
    // coap-client exits 0 either way; it says it could not send.
    const wrongKey = await coapPost('pump-1@farm', 'wrong-secret', '/.s/env', '{"temp":1}');
    expect(wrongKey.stdout).toMatch(/cannot send CoAP pdu/);
    const ghost = await coapPost('ghost@farm', 'pump-secret', '/.s/env', '{"temp":1}');
    expect(ghost.stdout).toMatch(/cannot send CoAP pdu/);
    expect(sim.coap.requests.length).toBe(before);
  });
});
