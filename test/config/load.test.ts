import { chmodSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfigFile, parseConfigText } from '../../src/config/load.js';
import { parseDuration, parseRate, parseSize } from '../../src/config/units.js';

const MINIMAL = `gateway:\n  id: gw-test\n`;

function issuesOf(text: string, env: NodeJS.ProcessEnv = {}) {
  try {
    parseConfigText(text, '/tmp/test.yaml', env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as ConfigError).issues;
  }
  throw new Error('expected the config to be refused');
}

describe('config units', () => {
  it('parses durations, sizes and rates', () => {
    expect(parseDuration('500ms')).toBe(500);
    expect(parseDuration('30s')).toBe(30_000);
    expect(parseDuration('5m')).toBe(300_000);
    expect(parseDuration('7d')).toBe(604_800_000);
    expect(parseDuration('7 days')).toBeUndefined();
    expect(parseSize('256KB')).toBe(262_144);
    expect(parseSize('512MB')).toBe(536_870_912);
    expect(parseSize('12 parsecs')).toBeUndefined();
    expect(parseRate('100/s')).toBe(100);
    expect(parseRate('600/m')).toBe(10);
  });
});

describe('config loading', () => {
  it('fills defaults and freezes the result', () => {
    const config = parseConfigText(MINIMAL, '/tmp/x.yaml', {});
    expect(config.broker.listeners).toEqual([{ type: 'tcp', host: '0.0.0.0', port: 1883 }]);
    expect(config.broker.maxPacketSize).toBe(256 * 1024);
    expect(config.broker.allowAnonymous).toBe(false);
    expect(config.retention.localUnreplicated).toBe(90 * 86_400_000);
    expect(Object.isFrozen(config.broker)).toBe(true);
  });

  it('names path and line for a wrong type', () => {
    const issues = issuesOf(`gateway:\n  id: gw\nbroker:\n  maxConnections: lots\n`);
    expect(issues).toEqual([expect.objectContaining({ path: 'broker.maxConnections', line: 4 })]);
  });

  it('refuses a key left empty or holding only comments (S20: fail closed), naming it', () => {
    const issues = issuesOf(
      [
        'gateway:',
        '  id: gw',
        'broker:',
        '  devices:',
        '    - id: d1',
        '      passwordHash: "$scrypt$16384$8$1$c2FsdA$aGFzaA"',
        '      acl:',
        '        # to be filled in',
        '    - id: d2',
        '      passwordHash: "$scrypt$16384$8$1$c2FsdA$aGFzaA"',
        '      acl:',
        '        publish:',
        '        deny: []',
        '',
      ].join('\n'),
    );
    expect(issues).toEqual([
      expect.objectContaining({
        path: 'broker.devices[0].acl',
        line: 7,
        message: expect.stringMatching(/^is empty/),
      }),
      expect.objectContaining({
        path: 'broker.devices[1].acl.publish',
        line: 12,
        message: expect.stringMatching(/remove the key to use the default/),
      }),
    ]);
  });

  it('refuses a crl on a TLS listener that does not ask for client certificates', () => {
    const issues = issuesOf(
      'gateway:\n  id: gw\nbroker:\n  listeners:\n    - { type: tls, port: 8883, cert: s.crt, key: s.key, crl: d.crl }\n',
    );
    expect(issues).toEqual([
      expect.objectContaining({
        path: 'broker.listeners[0].crl',
        message: expect.stringMatching(/set requireClientCert: true, or remove crl/),
      }),
    ]);
  });

  it('suggests the key that was meant', () => {
    const issues = issuesOf(`gateway:\n  id: gw\nbroker:\n  allowAnonymus: true\n`);
    expect(issues[0]!.path).toBe('broker.allowAnonymus');
    expect(issues[0]!.message).toContain('did you mean "allowAnonymous"');
    expect(issues[0]!.line).toBe(4);
  });

  it('reports YAML syntax errors with their line', () => {
    const issues = issuesOf(`gateway:\n  id: gw\nbroker: [\n`);
    expect(issues[0]!.message).toMatch(/YAML syntax/);
    expect(issues[0]!.line).toBeGreaterThanOrEqual(3);
  });

  it('refuses bad durations, sizes, cron and topic filters with clear messages', () => {
    const text = [
      'gateway: { id: gw }',
      'retention: { localReplicated: 7 days, schedule: "every night" }',
      'broker:',
      '  maxPacketSize: huge',
      '  devices:',
      '    - id: d1',
      '      passwordHash: "$scrypt$x"',
      '      acl: { publish: ["devices/#/x"] }',
    ].join('\n');
    const issues = issuesOf(text);
    const byPath = Object.fromEntries(issues.map((i) => [i.path, i]));
    expect(byPath['retention.localReplicated']?.message).toMatch(/not a duration/);
    expect(byPath['retention.schedule']?.message).toMatch(/cron/);
    expect(byPath['broker.maxPacketSize']?.message).toMatch(/not a size/);
    expect(byPath['broker.devices[0].acl.publish[0]']?.message).toMatch(/'#' must be the whole last level/);
    expect(byPath['broker.devices[0].acl.publish[0]']?.line).toBe(8);
  });

  it('refuses semantic mistakes: duplicate names, device without credentials', () => {
    const text = [
      'gateway: { id: gw }',
      'broker:',
      '  devices:',
      '    - id: d1',
      'integrations:',
      '  - { name: a, id: 0b7e6f2a-1c3d-4e5f-8a9b-7c6d5e4f3a21, type: mqtt, settings: { url: "mqtt://127.0.0.1:1883" } }',
      '  - { name: a, id: 1b7e6f2a-1c3d-4e5f-8a9b-7c6d5e4f3a21, type: mqtt, settings: { url: "mqtt://127.0.0.1:1883" } }',
    ].join('\n');
    const messages = issuesOf(text).map((i) => `${i.path}: ${i.message} (line ${i.line})`);
    expect(messages).toContainEqual(
      expect.stringMatching(/^integrations\[1\]\.name: duplicate integration name "a" .*\(line 7\)/),
    );
    expect(messages).toContainEqual(
      expect.stringMatching(/^broker\.devices\[0\]\.passwordHash: a device needs a passwordHash/),
    );
  });

  it('refuses unknown provider types; aws-iot is available and asks for its settings', () => {
    const text = [
      'gateway: { id: gw }',
      'integrations:',
      '  - { name: b, id: 2b7e6f2a-1c3d-4e5f-8a9b-7c6d5e4f3a21, type: kafka }',
      '  - { name: c, id: 3b7e6f2a-1c3d-4e5f-8a9b-7c6d5e4f3a21, type: aws-iot }',
    ].join('\n');
    const messages = issuesOf(text).map((i) => `${i.path}: ${i.message}`);
    expect(messages).toContainEqual(expect.stringMatching(/^integrations\[0\]\.type: .*mqtt/));
    expect(messages).toContainEqual(
      expect.stringMatching(/^integrations\[1\]\.settings\.endpoint: is required/),
    );
  });

  it('validates provider settings with their own paths', () => {
    const text = [
      'gateway: { id: gw }',
      'integrations:',
      '  - name: up',
      '    id: 0b7e6f2a-1c3d-4e5f-8a9b-7c6d5e4f3a21',
      '    type: mqtt',
      '    settings:',
      '      url: "http://example"',
      '      keepAlive: 30s',
    ].join('\n');
    const issues = issuesOf(text);
    const paths = issues.map((i) => i.path);
    expect(paths).toContain('integrations[0].settings.url');
    expect(paths).toContain('integrations[0].settings.keepAlive');
    expect(issues.find((i) => i.path === 'integrations[0].settings.keepAlive')?.message).toContain(
      'did you mean "keepalive"',
    );
    expect(issues.find((i) => i.path === 'integrations[0].settings.url')?.line).toBe(7);
  });

  it('resolves ${ENV} and { file } secrets, and names missing ones', () => {
    const dir = mkdtempSync(join(tmpdir(), 'gw-cfg-'));
    const secret = join(dir, 'pw');
    writeFileSync(secret, 's3cret\n', { mode: 0o600 });
    const text = [
      'gateway: { id: gw }',
      'integrations:',
      '  - name: up',
      '    id: 0b7e6f2a-1c3d-4e5f-8a9b-7c6d5e4f3a21',
      '    type: mqtt',
      '    settings:',
      '      url: "mqtt://${UP_HOST}:1883"',
      `      password: { file: ${secret} }`,
    ].join('\n');
    const config = parseConfigText(text, join(dir, 'gw.yaml'), { UP_HOST: '127.0.0.1' });
    expect(config.integrations[0]!.settings).toMatchObject({
      url: 'mqtt://127.0.0.1:1883',
      password: 's3cret',
    });

    expect(issuesOf(text, {})[0]).toMatchObject({
      path: 'integrations[0].settings.url',
      message: 'environment variable UP_HOST is not set',
      line: 7,
    });

    chmodSync(secret, 0o644);
    const issues = issuesOf(text, { UP_HOST: '127.0.0.1' });
    expect(issues[0]!.message).toMatch(/world-readable/);
  });

  it('explains a missing file', () => {
    expect(() => loadConfigFile('/nonexistent/gw.yaml')).toThrow(
      /does not exist; copy config\/gateway.example.yaml/,
    );
  });

  it('accepts the shipped example and quick-start configs', () => {
    const env = { UPSTREAM_PASSWORD: 'x', IOT_GATEWAY_PG_URL: 'postgres://u:p@127.0.0.1/db' };
    const example = loadConfigFile('config/gateway.example.yaml', env);
    expect(example.config.integrations[0]!.settings).toMatchObject({ password: 'x' });
    const quick = loadConfigFile('config/gateway.yaml', {});
    expect(quick.config.gateway.id).toBeTruthy();
  });
});

describe('mqtt provider settings', () => {
  it('refuse outbound and inbound mappings that cannot work', () => {
    const text = [
      'gateway: { id: gw }',
      'integrations:',
      '  - name: up',
      '    id: 0b7e6f2a-1c3d-4e5f-8a9b-7c6d5e4f3a21',
      '    type: mqtt',
      '    settings:',
      '      url: "mqtt://127.0.0.1:1883"',
      '      outbound: [{ local: "devices/+/telemetry", remote: "site/{1}/{2}" }]',
      '      inbound: [{ remote: "cmd/#/x", local: "devices/{1}" }]',
    ].join('\n');
    let issues: { path: string; message: string }[] = [];
    try {
      parseConfigText(text, '/tmp/x.yaml', {});
    } catch (err) {
      issues = (err as ConfigError).issues;
    }
    expect(issues).toContainEqual(
      expect.objectContaining({
        path: 'integrations[0].settings.outbound[0]',
        message: expect.stringMatching(/uses \{2\} but "devices\/\+\/telemetry" has 1 wildcard/),
      }),
    );
    expect(issues).toContainEqual(
      expect.objectContaining({
        path: 'integrations[0].settings.inbound[0]',
        message: expect.stringMatching(/'#' must be the whole last level/),
      }),
    );
  });
});
