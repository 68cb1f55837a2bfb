import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../src/errors.js';
import { openMqttLink, type MqttLink, type MqttLinkOptions } from '../../src/providers/mqtt-link.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';
import { createTestPki, type TestPki } from '../helpers/certs.js';
import {
  startScriptedMqtt,
  type ScriptedMqttBehaviour,
  type ScriptedMqttServer,
} from '../helpers/scripted-mqtt.js';
import { waitUntil } from '../helpers/raw-mqtt.js';
import { rejection } from '../helpers/rejection.js';

const MOSQUITTO = 'mqtt://127.0.0.1:1883';

let logs: LogRecord[] = [];
let cleanups: (() => Promise<void> | void)[] = [];

afterEach(async () => {
  for (const fn of cleanups.reverse()) await fn();
  cleanups = [];
  logs = [];
});

const signal = () => new AbortController().signal;

async function server(behaviour: ScriptedMqttBehaviour = {}): Promise<ScriptedMqttServer> {
  const s = await startScriptedMqtt(behaviour);
  cleanups.push(() => s.close());
  return s;
}

async function open(options: Partial<MqttLinkOptions> & { url: string }, sig = signal()): Promise<MqttLink> {
  const link = await openMqttLink(
    {
      clientId: `link-${randomUUID().slice(0, 8)}`,
      protocolVersion: 4,
      logger: createCaptureLogger(logs),
      owner: 'integration test-upstream',
      ...options,
    },
    sig,
  );
  cleanups.push(() => link.close());
  return link;
}

describe('mqtt link', () => {
  let pki: TestPki;
  beforeAll(() => {
    pki = createTestPki();
  });
  afterAll(() => pki.cleanup());

  it('calls credentials() on every connect, so each CONNECT carries a fresh token', async () => {
    const s = await server();
    let issued = 0;
    const credentials = () => ({ username: 'gw-device', password: `token-${++issued}` });
    const first = await open({ url: `mqtt://127.0.0.1:${s.port}`, credentials });
    await first.close();
    await open({ url: `mqtt://127.0.0.1:${s.port}`, credentials });
    expect(s.connects.map((c) => [c.username, c.password?.toString()])).toEqual([
      ['gw-device', 'token-1'],
      ['gw-device', 'token-2'],
    ]);
    // One attempt per open: mqtt.js never reconnects by itself.
    expect(s.connects).toHaveLength(2);
    expect(JSON.stringify(logs)).not.toContain('token-');
  });

  it('a credentials() that throws is a GW_ERR_PROVIDER_AUTH naming the owner, before any connection', async () => {
    const s = await server();
    const err = await rejection(
      open({
        url: `mqtt://127.0.0.1:${s.port}`,
        credentials: () => {
          throw new Error('the device key is not base64');
        },
      }),
    );
    expect(err.code).toBe(ErrorCodes.PROVIDER_AUTH);
    expect(err.message).toContain('integration test-upstream');
    expect(s.connects).toHaveLength(0);
  });

  it('publishes to a real broker and resolves on PUBACK; messages reach the handler', async () => {
    const topic = `gwtest/link-${randomUUID().slice(0, 8)}/t`;
    const link = await open({ url: MOSQUITTO, protocolVersion: 5 });
    const got: string[] = [];
    link.onMessage((t, payload) => got.push(`${t}=${payload.toString()}`));
    expect(await link.subscribe({ [topic]: { qos: 1, nl: false } })).toEqual({ refused: [] });
    await link.publish(topic, Buffer.from('hello'), { qos: 1 });
    await waitUntil(() => got.length === 1);
    expect(got).toEqual([`${topic}=hello`]);
  });

  it('maps PUBACK reason codes: 0x97 throttled, 0x87/0x90/0x99 final, others retryable', async () => {
    const codes: Record<string, number> = {
      quota: 0x97,
      denied: 0x87,
      badtopic: 0x90,
      format: 0x99,
      unspecified: 0x80,
      idInUse: 0x91,
      ok: 0x00,
      nomatch: 0x10,
    };
    const s = await server({ puback: (p) => codes[p.topic] ?? 0 });
    const link = await open({
      url: `mqtt://127.0.0.1:${s.port}`,
      protocolVersion: 5,
      quotaRetryAfterMs: 1500,
    });
    const send = (topic: string) => link.publish(topic, Buffer.from('x'), { qos: 1 });

    const quota = await rejection(send('quota'));
    expect(quota.code).toBe(ErrorCodes.PROVIDER_THROTTLED);
    expect(quota.retryable).toBe(true);
    expect(quota.details).toMatchObject({ retryAfterMs: 1500 });
    for (const topic of ['denied', 'badtopic', 'format']) {
      const err = await rejection(send(topic));
      expect([topic, err.code, err.retryable]).toEqual([topic, ErrorCodes.PROVIDER_REJECTED, false]);
      expect(err.details).toMatchObject({ reasonCode: codes[topic] });
    }
    for (const topic of ['unspecified', 'idInUse']) {
      const err = await rejection(send(topic));
      expect([topic, err.code, err.retryable]).toEqual([topic, ErrorCodes.PROVIDER_REJECTED, true]);
    }
    // 0x10 "no matching subscribers" is a success.
    await send('ok');
    await send('nomatch');
    // Rejections are per message: the link is still up.
    expect(link.connected).toBe(true);
  });

  it('maps CONNACK refusals of 3.1.1 and 5 to PROVIDER_AUTH or PROVIDER_CONNECT with a sentence', async () => {
    const cases: [4 | 5, number, string, boolean, RegExp][] = [
      [4, 4, ErrorCodes.PROVIDER_AUTH, false, /bad user name or password.*check the user name/],
      [4, 5, ErrorCodes.PROVIDER_AUTH, false, /not authorized/],
      [4, 3, ErrorCodes.PROVIDER_CONNECT, true, /server unavailable/],
      [4, 1, ErrorCodes.PROVIDER_CONNECT, false, /unacceptable protocol version/],
      [5, 0x87, ErrorCodes.PROVIDER_AUTH, false, /not authorized.*integration test-upstream/],
      [5, 0x86, ErrorCodes.PROVIDER_AUTH, false, /bad user name or password/],
      [5, 0x88, ErrorCodes.PROVIDER_CONNECT, true, /server unavailable/],
      [5, 0x9f, ErrorCodes.PROVIDER_CONNECT, true, /connection rate exceeded/],
      [5, 0x85, ErrorCodes.PROVIDER_CONNECT, false, /client identifier not valid/],
    ];
    for (const [version, code, errorCode, retryable, text] of cases) {
      const s = await server({ connack: () => ({ code }) });
      const err = await rejection(open({ url: `mqtt://127.0.0.1:${s.port}`, protocolVersion: version }));
      expect([version, code, err.code, err.retryable]).toEqual([version, code, errorCode, retryable]);
      expect(err.message).toMatch(text);
      expect(err.details).toMatchObject({ connackCode: code });
    }
  });

  it('waits for CONNACK within connectTimeoutMs, and an abort ends the wait at once', async () => {
    const s = await server({ connack: () => null });
    const timedOut = await rejection(open({ url: `mqtt://127.0.0.1:${s.port}`, connectTimeoutMs: 300 }));
    expect(timedOut.code).toBe(ErrorCodes.PROVIDER_TIMEOUT);
    expect(timedOut.retryable).toBe(true);

    const controller = new AbortController();
    const pending = rejection(
      open({ url: `mqtt://127.0.0.1:${s.port}`, connectTimeoutMs: 60_000 }, controller.signal),
    );
    await waitUntil(() => s.connects.length === 2);
    controller.abort();
    expect((await pending).code).toBe(ErrorCodes.ABORTED);
    expect((await rejection(open({ url: `mqtt://127.0.0.1:${s.port}` }, controller.signal))).code).toBe(
      ErrorCodes.ABORTED,
    );
  });

  it('on loss rejects every pending publish once with the reason and reports the loss once', async () => {
    const s = await server({ puback: () => null });
    const link = await open({ url: `mqtt://127.0.0.1:${s.port}` });
    const losses: GatewayError[] = [];
    link.onLoss((e) => losses.push(e));
    const settled: string[] = [];
    const publishes = Array.from({ length: 5 }, (_, i) =>
      link.publish(`t/${i}`, Buffer.from('x'), { qos: 1 }).then(
        () => settled.push(`resolved ${i}`),
        (err: GatewayError) => {
          settled.push(`${err.code} ${i}`);
          return err;
        },
      ),
    );
    await waitUntil(() => s.publishes.length === 5);
    s.dropAll();
    const errors = await Promise.all(publishes);
    await waitUntil(() => losses.length === 1);
    expect(settled.sort()).toEqual([0, 1, 2, 3, 4].map((i) => `${ErrorCodes.PROVIDER_NOT_CONNECTED} ${i}`));
    for (const err of errors) {
      expect((err as GatewayError).retryable).toBe(true);
      expect((err as GatewayError).message).toMatch(/was lost/);
    }
    expect(losses[0]!.code).toBe(ErrorCodes.PROVIDER_CONNECT);
    expect(losses[0]!.retryable).toBe(true);
    expect(link.connected).toBe(false);
    // A handler set after the loss still hears of it, once.
    const late: GatewayError[] = [];
    link.onLoss((e) => late.push(e));
    await waitUntil(() => late.length === 1);
    await new Promise((r) => setTimeout(r, 100));
    expect([losses.length, late.length]).toEqual([1, 1]);
    expect((await rejection(link.publish('t/after', Buffer.from('x'), { qos: 1 }))).code).toBe(
      ErrorCodes.PROVIDER_NOT_CONNECTED,
    );
  });

  it('times out an unacknowledged publish, and close() rejects the rest with PROVIDER_CLOSED and reports no loss', async () => {
    const s = await server({ puback: (p) => (p.topic === 'slow' ? null : 0) });
    const link = await open({ url: `mqtt://127.0.0.1:${s.port}`, publishTimeoutMs: 300 });
    const losses: GatewayError[] = [];
    link.onLoss((e) => losses.push(e));
    const timedOut = await rejection(link.publish('slow', Buffer.from('x'), { qos: 1 }));
    expect([timedOut.code, timedOut.retryable]).toEqual([ErrorCodes.PROVIDER_TIMEOUT, true]);

    const link2 = await open({ url: `mqtt://127.0.0.1:${s.port}`, publishTimeoutMs: 60_000 });
    link2.onLoss((e) => losses.push(e));
    const pending = rejection(link2.publish('slow', Buffer.from('x'), { qos: 1 }));
    await waitUntil(() => s.publishes.length === 2);
    await link2.close();
    const closed = await pending;
    expect([closed.code, closed.retryable]).toEqual([ErrorCodes.PROVIDER_CLOSED, true]);
    await new Promise((r) => setTimeout(r, 100));
    expect(losses).toHaveLength(0);
  });

  it('subscribe returns the filters the server refused, the link stays up; no SUBACK is a timeout', async () => {
    const s = await server({
      suback: (sub) => sub.subscriptions.map((x) => (x.topic.startsWith('no/') ? 0x80 : 1)),
    });
    const link = await open({ url: `mqtt://127.0.0.1:${s.port}` });
    const got: string[] = [];
    link.onMessage((topic) => {
      got.push(topic);
      throw new Error('a handler bug must not break the link');
    });
    expect(await link.subscribe({ 'yes/a': { qos: 1 }, 'no/b': { qos: 1 } })).toEqual({ refused: ['no/b'] });
    s.publishToAll('yes/a', 'one');
    s.publishToAll('yes/a', 'two');
    await waitUntil(() => got.length === 2);
    expect(link.connected).toBe(true);
    expect(logs.some((l) => l.msg === 'message_handler_failed')).toBe(true);

    const silent = await server({ suback: () => null });
    const unanswered = await open({ url: `mqtt://127.0.0.1:${silent.port}`, publishTimeoutMs: 300 });
    const err = await rejection(unanswered.subscribe({ 'yes/a': { qos: 1 } }));
    expect([err.code, err.retryable]).toEqual([ErrorCodes.PROVIDER_TIMEOUT, true]);
  });

  it('offers ALPN and SNI and presents the client certificate from files; a missing file is named', async () => {
    const client = pki.issueClient('gw-thing-1');
    const dir = pki.dir;
    const certPath = `${dir}/link-client.crt`;
    const keyPath = `${dir}/link-client.key`;
    const { writeFileSync } = await import('node:fs');
    writeFileSync(certPath, client.cert);
    writeFileSync(keyPath, client.key);
    const s = await server({
      tls: {
        cert: readFileSync(pki.serverCert),
        key: readFileSync(pki.serverKey),
        ca: pki.ca,
        requestCert: true,
        rejectUnauthorized: true,
        ALPNProtocols: ['x-amzn-mqtt-ca'],
      },
    });
    const link = await open({
      url: `mqtts://127.0.0.1:${s.port}`,
      tls: {
        ca: pki.caCert,
        cert: certPath,
        key: keyPath,
        servername: 'localhost',
        alpnProtocols: ['x-amzn-mqtt-ca'],
      },
    });
    expect(link.connected).toBe(true);
    expect(s.hellos).toEqual([
      { servername: 'localhost', alpnProtocol: 'x-amzn-mqtt-ca', clientCn: 'gw-thing-1' },
    ]);

    const untrusted = await rejection(
      open({ url: `mqtts://127.0.0.1:${s.port}`, tls: { servername: 'localhost' } }),
    );
    expect(untrusted.code).toBe(ErrorCodes.PROVIDER_CONNECT);
    expect(untrusted.message).toMatch(/TLS/);

    const missing = await rejection(
      open({ url: `mqtts://127.0.0.1:${s.port}`, tls: { ca: `${dir}/nope.pem`, servername: 'localhost' } }),
    );
    expect(missing.code).toBe(ErrorCodes.PROVIDER_CONNECT);
    expect(missing.message).toMatch(/nope\.pem.*settings\.ca of integration test-upstream/);
  });
});
