import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI } from '../../helpers/daemon.js';
import { createTestPki, type TestPki } from '../../helpers/certs.js';
import { startGoliothSim, type GoliothSim } from '../../sims/golioth/golioth-sim.js';

// What a person sees from `iot-gateway check-config` and `test-connection` with bad Golioth
// settings: one clear sentence each (the compiled CLI, against the simulator).

let pki: TestPki;
let sim: GoliothSim;
let dir: string;

function cli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const proc = spawn(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, stdio: 'pipe' });
    let out = '';
    proc.stdout.on('data', (c: Buffer) => (out += c.toString()));
    proc.stderr.on('data', (c: Buffer) => (out += c.toString()));
    proc.on('exit', (code) => resolve({ code, out }));
  });
}

function writeConfig(name: string, settings: Record<string, unknown>, routes: unknown[] = []): string {
  const file = join(dir, `${name}.yaml`);
  const config = {
    gateway: { id: 'gw-cli', dataDir: join(dir, 'data') },
    broker: { listeners: [{ type: 'tcp', host: '127.0.0.1', port: 0 }], devices: [] },
    http: { enabled: false },
    integrations: [
      {
        name: 'golioth',
        id: randomUUID(),
        type: 'golioth',
        settings: { baseUrl: sim.restUrl, ca: pki.caCert, ...settings },
        routes,
      },
    ],
  };
  writeFileSync(file, JSON.stringify(config, null, 2));
  return file;
}

beforeAll(async () => {
  pki = createTestPki();
  sim = await startGoliothSim(pki);
  sim.addProject('vineyard', 'vineyard-key');
  sim.addProject('other', 'other-key');
  dir = mkdtempSync(join(tmpdir(), 'gw-golioth-cli-'));
});

afterAll(async () => {
  await sim?.close();
  pki?.cleanup();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('golioth at the command line', () => {
  it('check-config: a telemetry route without PSKs is a problem with its path and line', async () => {
    const file = writeConfig('no-psk', { projectId: 'vineyard', apiKey: 'k' }, [
      { from: 'devices/+/telemetry' },
    ]);
    const r = await cli(['check-config', '-c', file]);
    expect(r.code).toBe(1);
    expect(r.out).toMatch(
      /integrations\[0\]\.routes\[0\]\.from: this route sends telemetry to Golioth, which takes it only over CoAP with each device’s PSK: add settings\.devices\.<id>\.psk, or remove the route \(line \d+\)/,
    );
  });

  it('test-connection: ok with the right key; one sentence for a wrong key, another project’s key, an unknown project', async () => {
    const ok = await cli(
      ['test-connection', 'golioth', '-c', writeConfig('ok', { projectId: 'vineyard', apiKey: '${KEY}' })],
      { KEY: 'vineyard-key' },
    );
    expect(ok.code).toBe(0);

    const wrongKey = await cli([
      'test-connection',
      'golioth',
      '-c',
      writeConfig('wrong-key', { projectId: 'vineyard', apiKey: 'nope' }),
    ]);
    expect(wrongKey.code).toBe(1);
    expect(wrongKey.out).toMatch(/Golioth refused the API key \(401\): check settings\.apiKey/);
    expect(wrongKey.out).not.toMatch(/nope/);

    const foreign = await cli([
      'test-connection',
      'golioth',
      '-c',
      writeConfig('foreign', { projectId: 'vineyard', apiKey: 'other-key' }),
    ]);
    expect(foreign.out).toMatch(/the API key has no access to project vineyard \(403\)/);

    const unknown = await cli([
      'test-connection',
      'golioth',
      '-c',
      writeConfig('unknown', { projectId: 'no-such', apiKey: 'vineyard-key' }),
    ]);
    expect(unknown.code).toBe(1);
    expect(unknown.out).toMatch(/Golioth has no project no-such \(404\): check settings\.projectId/);
  });
});
