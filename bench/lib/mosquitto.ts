import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pin, waitForPort, type Child, type PinRole, type ProcessGroup } from './process.js';

export interface MosquittoInstance {
  readonly port: number;
  readonly child: Child;
  stop(): Promise<void>;
}

/**
 * Writes a mosquitto.conf for one loopback listener. `user root` because the bench may run as
 * root and mosquitto would otherwise switch to the `mosquitto` user, which cannot write the
 * temp directory.
 */
export async function writeMosquittoConf(
  dir: string,
  name: string,
  port: number,
  extra: readonly string[] = [],
) {
  const path = join(dir, `${name}.conf`);
  const lines = [
    'user root',
    'per_listener_settings false',
    'allow_anonymous true',
    `listener ${port} 127.0.0.1`,
    'log_dest stderr',
    'log_type error',
    'log_type warning',
    ...extra,
    '',
  ];
  await writeFile(path, lines.join('\n'));
  return path;
}

/** Starts `mosquitto -c confPath` (the Debian binary) and waits until its port accepts connections. */
export async function startMosquitto(
  group: ProcessGroup,
  name: string,
  confPath: string,
  port: number,
  /** 'system' for Mosquitto's bridge under test; the upstream is part of the load. */
  role: PinRole = 'load',
): Promise<MosquittoInstance> {
  const child = group.spawn(name, 'mosquitto', ['-c', confPath]);
  pin(child.pid, role);
  try {
    await waitForPort(port, 10_000);
  } catch (err) {
    await child.stop(1_000);
    throw new Error(`${name} did not start: ${(err as Error).message}\n${child.tail()}`);
  }
  return { port, child, stop: () => child.stop(5_000) };
}

/**
 * The shared upstream: a fresh mosquitto with unlimited in-flight and queue towards its
 * subscribers, so the bench's subscriber never becomes the bottleneck or loses messages
 * while it reconnects. `persistence` keeps the subscriber's session across a graceful restart
 * (outage bench).
 */
export function upstreamConfLines(dir: string, persistence: boolean): string[] {
  return [
    'set_tcp_nodelay true',
    'max_inflight_messages 0',
    'max_queued_messages 0',
    ...(persistence ? ['persistence true', `persistence_location ${dir}/`, 'autosave_interval 0'] : []),
  ];
}
