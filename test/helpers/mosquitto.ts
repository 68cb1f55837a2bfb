import { spawn } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connectAsync } from 'mqtt';
import { freePort } from './ports.js';

export interface PrivateMosquitto {
  port: number;
  dir: string;
  stop(): Promise<void>;
}

/**
 * A Mosquitto of the test's own on a free loopback port. By default its queues are unbounded
 * (`max_queued_messages 1000000`), so an observer can never lose messages to Mosquitto's default
 * 1,000-message per-client queue while a backlog drains into it. `lines` add config lines.
 */
export async function startMosquitto(lines: string[] = []): Promise<PrivateMosquitto> {
  const dir = mkdtempSync(join(tmpdir(), 'gw-mosq-'));
  chmodSync(dir, 0o755); // mosquitto drops privileges when started as root
  const port = await freePort();
  const conf = join(dir, 'mosquitto.conf');
  writeFileSync(
    conf,
    [
      `listener ${port} 127.0.0.1`,
      'allow_anonymous true',
      'persistence false',
      'max_queued_messages 1000000',
      'log_dest none',
      ...lines,
      '',
    ].join('\n'),
  );
  chmodSync(conf, 0o644);
  const proc = spawn('mosquitto', ['-c', conf], { stdio: 'ignore' });
  const stop = async () => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      await new Promise((r) => proc.once('exit', r));
    }
    rmSync(dir, { recursive: true, force: true });
  };
  for (let i = 0; i < 100; i++) {
    try {
      const c = await connectAsync(`mqtt://127.0.0.1:${port}`, { reconnectPeriod: 0, connectTimeout: 500 });
      await c.endAsync();
      return { port, dir, stop };
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  await stop();
  throw new Error('private mosquitto did not start');
}
