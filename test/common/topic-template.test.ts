import { describe, expect, it } from 'vitest';
import { ErrorCodes } from '../../src/errors.js';
import { matchTopic } from '../../src/common/topic-match.js';
import { expandTemplate } from '../../src/common/topic-template.js';

describe('expandTemplate', () => {
  const vars = {
    topic: 'devices/s1/telemetry/temp',
    deviceId: 's1',
    gatewayId: 'gw1',
    captures: ['s1', 'temp'],
  };

  it('fills topic, device, gateway and numbered captures', () => {
    expect(expandTemplate('{topic}', vars)).toBe('devices/s1/telemetry/temp');
    expect(expandTemplate('site/{gatewayId}/{deviceId}/{2}/{1}', vars)).toBe('site/gw1/s1/temp/s1');
    expect(expandTemplate('fixed/topic', vars)).toBe('fixed/topic');
    expect(expandTemplate('{1}{1}', vars)).toBe('s1s1');
  });

  it('leaves braces that are not placeholders alone', () => {
    expect(expandTemplate('a/{name}/{}/{topic', vars)).toBe('a/{name}/{}/{topic');
  });

  it('does not expand placeholders inside substituted values', () => {
    expect(expandTemplate('x/{1}', { topic: 't', captures: ['{topic}'] })).toBe('x/{topic}');
  });

  it('throws a config error for a placeholder without a value instead of publishing to a wrong topic', () => {
    expect(() => expandTemplate('out/{3}', vars)).toThrowError(
      expect.objectContaining({ code: ErrorCodes.CONFIG_INVALID }),
    );
    expect(() => expandTemplate('out/{0}', vars)).toThrowError(
      expect.objectContaining({ code: ErrorCodes.CONFIG_INVALID }),
    );
    expect(() => expandTemplate('out/{deviceId}', { topic: 't', captures: [] })).toThrowError(
      expect.objectContaining({ code: ErrorCodes.CONFIG_INVALID }),
    );
  });

  it('round-trips with matchTopic captures', () => {
    const captures = matchTopic('devices/+/telemetry/#', 'devices/s9/telemetry/a/b')!;
    expect(expandTemplate('cloud/{1}/{2}', { topic: 'devices/s9/telemetry/a/b', captures })).toBe(
      'cloud/s9/a/b',
    );
  });
});
