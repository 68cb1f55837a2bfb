import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { brokerPort, startDaemon, type DaemonHandle } from '../helpers/daemon.js';

/**
 * The Eclipse Paho MQTT 3.1.1 interoperability client tests (test/interop/paho/, vendored
 * unmodified; see its README.md), run by their own Python client against the gateway daemon.
 * They are the check: written by others, for any 3.1.1 server.
 */

const RUNNER = resolve('test/interop/run-paho.py');
const EXPECTED = [
  'testBasic',
  'test_dollar_topics',
  'test_keepalive',
  'test_offline_message_queueing',
  'test_overlapping_subscriptions',
  'test_redelivery_on_reconnect',
  'test_retained_messages',
  'test_subscribe_failure',
  'test_unsubscribe',
  'test_zero_length_clientid',
];
/** The suite sleeps about 40 s in all (15 s of it waiting for a keepalive to expire). */
const SUITE_TIMEOUT_MS = 240_000;

interface SuiteRun {
  code: number | null;
  output: string;
  results: Record<string, string> | null;
}

/** `-I -S`: no site-packages and no environment, so the suite proves it needs only the stdlib. */
function runSuite(port: number): Promise<SuiteRun> {
  return new Promise((done, fail) => {
    const child = spawn('python3', ['-I', '-S', '-B', RUNNER, '127.0.0.1', String(port)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
    const timer = setTimeout(() => child.kill('SIGKILL'), SUITE_TIMEOUT_MS);
    child.once('error', (err) => {
      clearTimeout(timer);
      fail(err);
    });
    child.once('close', (code) => {
      clearTimeout(timer);
      const line = output.split('\n').find((l) => l.startsWith('PAHO_RESULTS '));
      const results = line
        ? (JSON.parse(line.slice('PAHO_RESULTS '.length)) as { tests: Record<string, string> }).tests
        : null;
      done({ code, output, results });
    });
  });
}

describe('Eclipse Paho MQTT 3.1.1 interoperability client tests', () => {
  let daemon: DaemonHandle | undefined;
  const dir = mkdtempSync(join(tmpdir(), 'gw-paho-'));
  afterAll(async () => {
    await daemon?.stop('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  it(
    'passes all 10 against a listener with an open anonymous ACL and test/nosubscribe denied',
    { timeout: SUITE_TIMEOUT_MS + 60_000 },
    async () => {
      const file = join(dir, 'gateway.yaml');
      writeFileSync(
        file,
        [
          `gateway: { id: paho-gw, dataDir: ${JSON.stringify(join(dir, 'data'))} }`,
          'broker:',
          '  listeners: [{ type: tcp, host: 127.0.0.1, port: 0 }]',
          '  allowAnonymous: true',
          '  anonymousAcl: { publish: ["#"], subscribe: ["#"], deny: ["test/nosubscribe"] }',
          'http: { enabled: false }',
        ].join('\n'),
      );
      daemon = startDaemon(file);
      const port = brokerPort(await daemon.ready);

      const run = await runSuite(port);
      const verdicts = Object.fromEntries(EXPECTED.map((name) => [name, run.results?.[name] ?? 'missing']));
      expect(verdicts, run.output).toEqual(Object.fromEntries(EXPECTED.map((name) => [name, 'ok'])));
      expect(Object.keys(run.results ?? {}).sort(), run.output).toEqual([...EXPECTED].sort());
      expect(run.code, run.output).toBe(0);
      // The suite's `$` publish was acknowledged and discarded, not delivered and not fatal.
      expect(daemon.lines.some((l) => l.msg === 'publish_discarded' && l.topic === '$TopicA/B')).toBe(true);
      expect(await daemon.stop('SIGTERM')).toBe(0);
    },
  );
});
