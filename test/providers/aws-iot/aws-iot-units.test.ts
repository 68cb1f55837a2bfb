import { describe, expect, it } from 'vitest';
import { configSchema } from '../../../src/config/schema.js';
import { ErrorCodes } from '../../../src/errors.js';
import { createPacer } from '../../../src/providers/aws-iot/pacer.js';
import { createShadowClient, holds } from '../../../src/providers/aws-iot/shadow.js';
import {
  createCommandRoute,
  createThingNames,
  parseLocalTopic,
  shadowFilters,
} from '../../../src/providers/aws-iot/topics.js';
import { createShadowService } from '../../sims/aws-iot/shadow-service.js';

describe('aws-iot pacer', () => {
  it('never lets more than 100 sends into any one-second window, and serves callers in order', async () => {
    // The grant times as the pacer took them: measuring after the promise settles would add
    // the event loop's delays to some grants and not to others.
    const times: number[] = [];
    const pacer = createPacer(100, { onSlot: (at) => times.push(at) });
    const order: number[] = [];
    await Promise.all(Array.from({ length: 250 }, (_, i) => pacer.slot().then(() => order.push(i))));
    let busiest = 0;
    for (let i = 0, j = 0; i < times.length; i++) {
      while (times[i]! - times[j]! >= 1000) j++;
      busiest = Math.max(busiest, i - j + 1);
    }
    expect(busiest).toBeLessThanOrEqual(100);
    expect(order).toEqual(Array.from({ length: 250 }, (_, i) => i));
  });

  it('cancel rejects the callers still waiting', async () => {
    const pacer = createPacer(1);
    await pacer.slot();
    const waiting = pacer.slot();
    pacer.cancel(new Error('link lost'));
    await expect(waiting).rejects.toThrow('link lost');
  });
});

describe('aws-iot topic mapping', () => {
  it('maps device ids to thing names through the template and back', () => {
    const names = createThingNames('{gatewayId}-{deviceId}', 'site-7');
    expect(names.thingName('pump-1')).toBe('site-7-pump-1');
    expect(names.deviceId('site-7-pump-1')).toBe('pump-1');
    expect(names.deviceId('other-pump-1')).toBeUndefined();
  });

  it('reads the canonical local topics', () => {
    expect(parseLocalTopic('devices/a/telemetry')).toEqual({
      kind: 'telemetry',
      deviceId: 'a',
      stream: undefined,
    });
    expect(parseLocalTopic('devices/a/telemetry/x/y')).toEqual({
      kind: 'telemetry',
      deviceId: 'a',
      stream: 'x/y',
    });
    expect(parseLocalTopic('devices/a/state')).toEqual({ kind: 'state', deviceId: 'a' });
    expect(parseLocalTopic('devices/a/commands/reboot/response')).toEqual({
      kind: 'response',
      deviceId: 'a',
      name: 'reboot',
    });
    expect(parseLocalTopic('devices/a/desired').kind).toBe('other');
  });

  it('subscribes to command topics with + and reads thing and command back', () => {
    const route = createCommandRoute(
      {
        topic: 'cmd/{gatewayId}/{thingName}/{name}',
        responseTopic: 'cmd/{gatewayId}/{thingName}/{name}/res',
      },
      'gw',
    );
    expect(route.filter).toBe('cmd/gw/+/+');
    expect(route.match('cmd/gw/pump-1/reboot')).toEqual({ thingName: 'pump-1', name: 'reboot' });
    expect(route.match('cmd/gw/pump-1/reboot/res')).toBeUndefined();
    expect(route.response('pump-1', 'reboot')).toBe('cmd/gw/pump-1/reboot/res');
    expect(shadowFilters('cfg')).toContain('$aws/things/+/shadow/name/cfg/update/delta');
  });

  it('refuses templates it cannot subscribe to or reverse, in the config', () => {
    const parse = (settings: Record<string, unknown>) =>
      configSchema.safeParse({
        gateway: { id: 'gw' },
        integrations: [
          {
            name: 'aws',
            id: '6f1c1d1e-8a4f-4a55-9a51-3f1c0e1b2a3c',
            type: 'aws-iot',
            settings: {
              endpoint: 'abc-ats.iot.eu-west-1.amazonaws.com',
              cert: 'c.pem',
              key: 'k.pem',
              ...settings,
            },
          },
        ],
      });
    const messages = (settings: Record<string, unknown>) => {
      const r = parse(settings);
      return r.success ? [] : r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`);
    };
    expect(messages({})).toEqual([]);
    expect(messages({ thingName: 'fixed' })).toEqual([
      'integrations.0.settings.thingName: "fixed" must contain {deviceId} exactly once',
    ]);
    expect(messages({ commands: [{ topic: 'cmd/x{thingName}/{name}' }] })[0]).toMatch(
      /must each be a whole topic level/,
    );
    expect(messages({ telemetryTopic: '$aws/x/{thingName}' })[0]).toMatch(/reserved by AWS/);
    expect(messages({ endpoint: 'mqtts://abc-ats.iot.eu-west-1.amazonaws.com' })[0]).toMatch(
      /bare host name/,
    );
  });
});

describe('aws-iot shadow client against the shadow service', () => {
  function wired(options: { maxConflictRetries?: number } = {}) {
    const service = createShadowService();
    const client = createShadowClient({
      shadowName: undefined,
      maxInflight: 10,
      timeoutMs: 5_000,
      maxConflictRetries: options.maxConflictRetries ?? 3,
      publish: (topic, payload) => {
        // The service answers asynchronously, as over the network.
        setImmediate(() => {
          for (const r of service.handle(topic, payload))
            client.onMessage(r.topic, Buffer.from(JSON.stringify(r.body)));
        });
        return Promise.resolve();
      },
    });
    return { service, client };
  }

  it('updates in order per thing, each with the version the last one made', async () => {
    const { service, client } = wired();
    const results = await Promise.all([1, 2, 3].map((n) => client.updateReported('t', { n })));
    expect(results.map((r) => [r.version, r.conflicts])).toEqual([
      [1, 0],
      [2, 0],
      [3, 0],
    ]);
    expect(service.document('t')).toMatchObject({ state: { reported: { n: 3 } } });
  });

  it('a 409 whose values are already in the shadow is merged without sending again', async () => {
    const { service, client } = wired();
    await client.updateReported('t', { a: 1 });
    service.update('t', undefined, { state: { reported: { a: 2 } } });
    service.update('t', undefined, { state: { reported: { a: 1, b: 1 } } });
    const outcome = await client.updateReported('t', { a: 1 });
    expect(outcome).toMatchObject({ conflicts: 1, alreadyApplied: true, version: 3 });
  });

  it('maps rejections to errors the forwarder branches on', async () => {
    const { client } = wired();
    await expect(client.updateReported('t', { x: 'y'.repeat(9000) })).rejects.toMatchObject({
      code: ErrorCodes.PROVIDER_REJECTED,
      retryable: false,
      message: expect.stringMatching(/413 The payload exceeds the maximum size allowed/),
    });
    expect(await client.get('nobody')).toMatchObject({ document: undefined });
    expect(holds({ a: { b: 1 }, c: 2 }, { a: { b: 1 }, d: null })).toBe(true);
    expect(holds({ a: { b: 1 } }, { a: { b: 2 } })).toBe(false);
  });
});
