import { mkdtempSync, rmSync } from 'node:fs';
import { createServer as createHttp } from 'node:http';
import { createServer as createTcp, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../../src/errors.js';
import { createHttpServer, type HttpServer } from '../../../src/gateway/http/http-server.js';
import { createMetrics } from '../../../src/gateway/http/metrics.js';
import {
  daemonUrl,
  fetchStatus,
  formatStatus,
  humanBytes,
  humanDuration,
} from '../../../src/gateway/http/status-format.js';
import { createSilentLogger } from '../../../src/logger.js';
import { createActivityLog } from '../../../src/store/activity-log.js';
import { openStore } from '../../../src/store/database.js';
import { buildIntegration, buildSnapshot } from '../../helpers/status-snapshot.js';

const logger = createSilentLogger();

describe('formatStatus', () => {
  it('prints the gateway, broker, store, replication and an aligned integrations table', () => {
    const text = formatStatus(buildSnapshot());
    const lines = text.split('\n');
    expect(lines[0]).toBe('Gateway site-a-gw1  v0.1.0  pid 4242  up 3h 12m  READY');
    expect(text).toContain('Broker       listening on tcp 0.0.0.0:1883');
    expect(text).toContain(
      'Devices      2 connected, 12,345 messages in, 3 auth failures, refused: 7 connect rate, 1 packet too large, 2 login backoff',
    );
    expect(text).toContain(
      'Replication  idle, lag 4s, 12 rows pending, 1,000 replicated, last success 5s ago',
    );

    const header = lines.findIndex((l) => l.trimStart().startsWith('NAME'));
    expect(header).toBeGreaterThan(0);
    const table = lines.slice(header, header + 3);
    expect(table[1]).toMatch(/^ {2}x +mqtt +connected +42 +4\.0 KiB +1s +2 +100 +10 +4 +1s ago$/);
    expect(table[2]).toMatch(/^ {2}aws-main +aws-iot +backoff +42 /);
    // right-aligned numbers end in the same column as their header
    const queueEnd = table[0]!.indexOf('QUEUE') + 'QUEUE'.length;
    expect(table[1]!.slice(0, queueEnd).endsWith('42')).toBe(true);
    expect(table[2]!.slice(0, queueEnd).endsWith('42')).toBe(true);
    expect(text).toContain('aws-main: GW_ERR_PROVIDER_CONNECT: connect ECONNREFUSED 10.1.1.1:8883 (30s ago)');
    expect(text).toContain('Waiting on the cloud');
    expect(text).toContain('  x: 5 throttled publishes; parked devices: child-3');
    expect(text).toContain('sensor-2');
    expect(text).toContain('writable, WAL 4.0 MiB');
  });

  it('says loudly when not ready, the store is not writable or a config edit was refused', () => {
    const base = buildSnapshot();
    const text = formatStatus({
      ...base,
      ready: false,
      broker: { ...base.broker, listening: false },
      store: {
        ...base.store,
        writable: false,
        writeFailures: 3,
        walBytes: 300 * 1024 * 1024,
        walStarved: true,
      },
      config: {
        ...base.config,
        lastError: {
          message: 'invalid configuration',
          issues: [{ path: 'integrations[1].type', message: 'unknown type "azur"', line: 17 }],
          at: base.now - 120_000,
        },
        pendingRestart: ['broker.listeners'],
      },
    });
    expect(text.split('\n')[0]).toMatch(/NOT READY$/);
    expect(text).toContain('Broker       NOT LISTENING');
    expect(text).toContain(
      'NOT WRITABLE, WAL 300 MiB (CHECKPOINT STARVED: another connection holds a read transaction), 3 write failures',
    );
    expect(text).toContain(
      'Config reload REFUSED 2m 0s ago (the previous configuration stays in force): invalid configuration',
    );
    expect(text).toContain('  integrations[1].type: unknown type "azur" (line 17)');
    expect(text).toContain('Changed keys that apply after a restart: broker.listeners');
  });

  it('counts devices past the limit instead of listing thousands', () => {
    const base = buildSnapshot();
    const devices = Array.from({ length: 25 }, (_, i) => ({
      id: `dev-${i}`,
      connectedAt: base.now - 1000,
      remoteAddress: null,
    }));
    const text = formatStatus({ ...base, broker: { ...base.broker, devices } }, { maxDevices: 5 });
    expect(text).toContain('Connected devices (25)');
    expect(text).toContain('dev-4');
    expect(text).not.toContain('dev-5 ');
    expect(text).toContain('… and 20 more');
  });

  it('handles no integrations and replication that is not configured', () => {
    const base = buildSnapshot();
    const text = formatStatus({
      ...base,
      integrations: [],
      replication: { ...base.replication, configured: false, state: 'disabled', pendingRows: 7 },
    });
    expect(text).toContain('Integrations: none configured');
    expect(text).toContain('Replication  not configured (7 rows kept locally)');
  });

  it('formats durations and sizes for people', () => {
    expect(humanDuration(850)).toBe('850ms');
    expect(humanDuration(42_000)).toBe('42s');
    expect(humanDuration(192_000)).toBe('3m 12s');
    expect(humanDuration(2 * 86_400_000 + 4 * 3_600_000)).toBe('2d 4h');
    expect(humanBytes(512)).toBe('512 B');
    expect(humanBytes(1536)).toBe('1.5 KiB');
    expect(humanBytes(512 * 1024 ** 2)).toBe('512 MiB');
    const i = buildIntegration({
      name: 'n',
      id: 'i',
      queue: { ...buildIntegration({ name: 'n', id: 'i' }).queue, oldestAgeMs: null },
    });
    expect(formatStatus({ ...buildSnapshot(), integrations: [i] })).toMatch(
      / n +mqtt +connected +42 +4\.0 KiB +- /,
    );
  });
});

describe('daemonUrl', () => {
  it('reaches a wildcard bind over loopback', () => {
    expect(daemonUrl('0.0.0.0', 9180)).toBe('http://127.0.0.1:9180');
    expect(daemonUrl('::', 9180)).toBe('http://[::1]:9180');
    expect(daemonUrl('127.0.0.1', 9180)).toBe('http://127.0.0.1:9180');
  });
});

describe('fetchStatus', () => {
  const cleanup: Array<() => Promise<void> | void> = [];
  afterEach(async () => {
    for (const fn of cleanup.splice(0).reverse()) await fn();
  });

  it('reads the snapshot from a running daemon', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'gw-status-'));
    const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
    cleanup.push(
      () => rmSync(dir, { recursive: true, force: true }),
      () => store.close(),
    );
    const snapshot = buildSnapshot({ gatewayId: 'gw-fetch' });
    const server: HttpServer = createHttpServer({
      host: '127.0.0.1',
      port: 0,
      logger,
      getStatus: () => snapshot,
      isReady: () => ({ ready: true, reasons: [] }),
      activity: createActivityLog({ db: store.db, gatewayId: 'gw-fetch', logger }),
      dashboard: false,
      metrics: createMetrics({ getStatus: () => snapshot, processMetrics: false }),
    });
    const { port } = await server.listen();
    cleanup.push(() => server.close());
    expect(await fetchStatus(`http://127.0.0.1:${port}/`, 5000)).toEqual(snapshot);
  });

  it('names the address and ECONNREFUSED when nothing listens', async () => {
    const port = await freePort();
    const err = await fetchStatus(`http://127.0.0.1:${port}`, 5000).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(GatewayError);
    expect((err as GatewayError).code).toBe(ErrorCodes.DAEMON_UNREACHABLE);
    expect((err as GatewayError).message).toBe(
      `the gateway is not answering on http://127.0.0.1:${port} (ECONNREFUSED); is it running? (\`systemctl status iot-gateway\`)`,
    );
  });

  it('gives up after the timeout when the port accepts but never answers', async () => {
    const sockets = new Set<Socket>();
    const silent = createTcp((s) => sockets.add(s));
    const port = await listenOn(silent);
    cleanup.push(
      () =>
        new Promise<void>((resolve) => {
          for (const s of sockets) s.destroy();
          silent.close(() => resolve());
        }),
    );
    const err = await fetchStatus(`http://127.0.0.1:${port}`, 300).catch((e: unknown) => e);
    expect((err as GatewayError).code).toBe(ErrorCodes.DAEMON_UNREACHABLE);
    expect((err as GatewayError).message).toContain('(no answer within 300ms)');
  });

  it('reports another program on the port that does not answer with a status', async () => {
    const other = createHttp((_req, res) => res.writeHead(404).end('not here'));
    const port = await listenOn(other);
    cleanup.push(() => new Promise<void>((resolve) => other.close(() => resolve())));
    const err = await fetchStatus(`http://127.0.0.1:${port}`, 5000).catch((e: unknown) => e);
    expect((err as GatewayError).code).toBe(ErrorCodes.DAEMON_UNREACHABLE);
    expect((err as GatewayError).message).toContain('answered HTTP 404');
  });
});

function listenOn(server: Server | ReturnType<typeof createHttp>): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const addr = server.address();
      resolve(typeof addr === 'object' && addr !== null ? addr.port : 0);
    });
  });
}

/** A port that was free a moment ago: bind to 0, note it, release it. */
async function freePort(): Promise<number> {
  const s = createTcp();
  const port = await listenOn(s);
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}
