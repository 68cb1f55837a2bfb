import { createHmac } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { decodePropertyBag, encodePropertyBag } from '../../../src/providers/azure-iot-hub/property-bag.js';
import { createSasToken, deviceResource, parseSasToken } from '../../../src/providers/azure-iot-hub/sas.js';
import {
  classifyLocalTopic,
  parseC2dTopic,
  parseDesiredPatchVersion,
  parseMethodRequest,
  parseTwinResponse,
  reportedPatchTopic,
} from '../../../src/providers/azure-iot-hub/topics.js';
import { mergeTwinPatch, withoutTwinMeta } from '../../../src/providers/azure-iot-hub/twin-merge.js';

describe('SAS tokens (cloud-protocols.md §2.2)', () => {
  const key = Buffer.from('0123456789abcdef0123456789abcdef').toString('base64');

  it('signs the encoded resource, a newline and the expiry with the base64-decoded key', () => {
    const token = createSasToken({
      resource: deviceResource('hub.azure-devices.net', 'dev 1'),
      key,
      expiresAt: 1_900_000_000,
    });
    const sr = 'hub.azure-devices.net%2Fdevices%2Fdev%201';
    const sig = createHmac('sha256', Buffer.from(key, 'base64')).update(`${sr}\n1900000000`).digest('base64');
    expect(token).toBe(`SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(sig)}&se=1900000000`);
  });

  it('adds skn for a policy key, and parses its own tokens back', () => {
    const token = createSasToken({ resource: 'hub/devices', key, expiresAt: 42, policyName: 'device' });
    expect(token.endsWith('&se=42&skn=device')).toBe(true);
    expect(parseSasToken(token)).toMatchObject({
      resource: 'hub/devices',
      expiresAt: 42,
      policyName: 'device',
    });
    expect(parseSasToken('Bearer x')).toBeUndefined();
    expect(parseSasToken('SharedAccessSignature sr=a&sig=b')).toBeUndefined();
  });

  it("encodes !'()* as the service does", () => {
    const token = createSasToken({ resource: "h/devices/a!'()*", key, expiresAt: 1 });
    expect(token).toContain('sr=h%2Fdevices%2Fa%21%27%28%29%2A&');
  });
});

describe('property bags (§2.3)', () => {
  it('round-trips null, empty and encoded values', () => {
    const bag = { '$.ct': 'application/json', empty: '', none: null, 'a b': 'x&y=z' };
    const text = encodePropertyBag(bag);
    expect(text).toBe('$.ct=application%2Fjson&empty=&none&a%20b=x%26y%3Dz');
    expect(decodePropertyBag(text)).toEqual(bag);
    expect(decodePropertyBag('$.mid=1&k=%zz')).toEqual({ '$.mid': '1', k: '%zz' });
  });
});

describe('topics (§2.3)', () => {
  it('parses twin responses, desired patches, method requests and C2D bags', () => {
    expect(parseTwinResponse('$iothub/twin/res/204/?$rid=7&$version=12')).toEqual({
      status: 204,
      rid: '7',
      version: 12,
    });
    expect(parseTwinResponse('$iothub/twin/res/200/?$rid=a%2Fb')).toEqual({
      status: 200,
      rid: 'a/b',
      version: undefined,
    });
    expect(parseTwinResponse('$iothub/twin/res/200/')).toBeUndefined();
    expect(parseDesiredPatchVersion('$iothub/twin/PATCH/properties/desired/?$version=9')).toBe(9);
    expect(parseMethodRequest('$iothub/methods/POST/reboot/?$rid=1f')).toEqual({ name: 'reboot', rid: '1f' });
    expect(parseC2dTopic('devices/d/messages/devicebound/$.mid=m1&name=led', 'd')).toEqual({
      '$.mid': 'm1',
      name: 'led',
    });
    expect(parseC2dTopic('devices/e/messages/devicebound/x', 'd')).toBeUndefined();
    expect(reportedPatchTopic('r 1')).toBe('$iothub/twin/PATCH/properties/reported/?$rid=r%201');
  });

  it('classifies the canonical local topics and takes the device id from them', () => {
    expect(classifyLocalTopic('devices/d/telemetry')).toEqual({
      kind: 'telemetry',
      deviceId: 'd',
      stream: undefined,
    });
    expect(classifyLocalTopic('devices/d/telemetry/temp/x')).toEqual({
      kind: 'telemetry',
      deviceId: 'd',
      stream: 'temp/x',
    });
    expect(classifyLocalTopic('devices/e/state')).toEqual({ kind: 'state', deviceId: 'e' });
    expect(classifyLocalTopic('devices/d/commands/reboot/response')).toEqual({
      kind: 'command-response',
      deviceId: 'd',
      name: 'reboot',
    });
    expect(classifyLocalTopic('devices/d/other')).toEqual({ kind: 'other' });
    expect(classifyLocalTopic('gateway/g/status')).toEqual({ kind: 'other' });
  });
});

describe('twin merge (§2.3)', () => {
  it('upserts, deletes on null, merges nested objects, and strips $version/$metadata', () => {
    const base = { a: 1, nested: { x: 1, y: 2 }, gone: true };
    expect(mergeTwinPatch(base, { a: 2, nested: { y: null, z: 3 }, gone: null })).toEqual({
      a: 2,
      nested: { x: 1, z: 3 },
    });
    expect(base).toEqual({ a: 1, nested: { x: 1, y: 2 }, gone: true });
    expect(withoutTwinMeta({ a: 1, $version: 4, $metadata: {} })).toEqual({ a: 1 });
  });
});
