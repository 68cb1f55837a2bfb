import { spawnSync } from 'node:child_process';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';

// The daemon's first import, as dist/cli.js loads it; then mqtt-packet parses one packet.
const SCRIPT = `
import ${JSON.stringify(pathToFileURL(resolve('dist/quiet-debug.js')).href)};
import { createRequire } from 'node:module';
const require = createRequire(${JSON.stringify(pathToFileURL(resolve('package.json')).href)});
const mqtt = require('mqtt-packet');
const debug = createRequire(require.resolve('mqtt-packet'))('debug');
// Turning traces on now reaches the real package's loggers only: mqtt-packet's are silent.
debug.enable('mqtt-packet:*');
const p = mqtt.parser();
let parsed = 0;
p.on('packet', () => parsed++);
p.parse(mqtt.generate({ cmd: 'publish', topic: 'a/b', payload: Buffer.from('x'), qos: 1, messageId: 1, retain: false, dup: false }));
process.stdout.write(JSON.stringify({ parsed }));
`;

function run(env: NodeJS.ProcessEnv): { parsed: number; stderr: string } {
  const { DEBUG: _unset, ...rest } = process.env;
  const child = spawnSync(process.execPath, ['--input-type=module', '-e', SCRIPT], {
    env: { ...rest, ...env },
    encoding: 'utf8',
    timeout: 20_000,
  });
  expect(child.status, child.stderr).toBe(0);
  return { ...(JSON.parse(child.stdout) as { parsed: number }), stderr: child.stderr };
}

describe("quiet debug (the CLI's first import)", () => {
  it('gives mqtt-packet loggers that do nothing when DEBUG is not set', () => {
    const { parsed, stderr } = run({ DEBUG_COLORS: 'no' });
    expect(parsed).toBe(1);
    expect(stderr).toBe('');
  });

  it('keeps the real debug when DEBUG is set, so the packets are traced', () => {
    const { parsed, stderr } = run({ DEBUG: 'mqtt-packet:*', DEBUG_COLORS: 'no' });
    expect(parsed).toBe(1);
    expect(stderr).toMatch(/mqtt-packet:parser/);
  });
});
