import { ErrorCodes, GatewayError, errorMessage } from '../../errors.js';
import type { GatewayStatusSnapshot, IntegrationStatus } from './status.js';

export interface FormatStatusOptions {
  /** Connected devices listed by id; the rest are counted. */
  maxDevices?: number;
}

/** The daemon's state as a text block for a person (`iot-gateway status`). */
export function formatStatus(s: GatewayStatusSnapshot, options: FormatStatusOptions = {}): string {
  const maxDevices = options.maxDevices ?? 20;
  const now = s.now;
  const out: string[] = [];

  out.push(
    `Gateway ${s.gatewayId}  v${s.version}  pid ${s.pid}  up ${humanDuration(now - s.startedAt)}  ${s.ready ? 'READY' : 'NOT READY'}`,
  );
  out.push('');

  const listeners =
    s.broker.listeners.map((l) => `${l.type} ${hostPort(l.host, l.port)}`).join(', ') || 'none';
  const facts: [string, string][] = [
    ['Broker', `${s.broker.listening ? 'listening' : 'NOT LISTENING'} on ${listeners}`],
    [
      'Devices',
      `${count(s.broker.connections)} connected, ${count(s.broker.messagesIn)} messages in, ${count(s.broker.authFailures)} auth failures` +
        refusedText(s.broker.refused),
    ],
    [
      'Store',
      `${s.store.file}  ${s.store.writable ? 'writable' : 'NOT WRITABLE'}, WAL ${humanBytes(s.store.walBytes)}` +
        (s.store.walStarved ? ' (CHECKPOINT STARVED: another connection holds a read transaction)' : '') +
        (s.store.writeFailures > 0 ? `, ${count(s.store.writeFailures)} write failures` : ''),
    ],
    ['Config', `${s.config.file}  loaded ${ago(s.config.loadedAt, now)}`],
    ['Replication', replicationLine(s)],
  ];
  out.push(...alignFacts(facts));

  if (s.replication.lastError) {
    const e = s.replication.lastError;
    out.push(`${' '.repeat(13)}last error ${ago(e.at, now)}: ${e.code}: ${e.message}`);
  }
  if (s.config.lastError) {
    const e = s.config.lastError;
    out.push('');
    out.push(
      `Config reload REFUSED ${ago(e.at, now)} (the previous configuration stays in force): ${e.message}`,
    );
    for (const issue of e.issues) {
      out.push(`  ${issue.path}: ${issue.message}${issue.line === undefined ? '' : ` (line ${issue.line})`}`);
    }
  }
  if (s.config.pendingRestart.length > 0) {
    out.push('');
    out.push(`Changed keys that apply after a restart: ${s.config.pendingRestart.join(', ')}`);
  }

  out.push('');
  if (s.integrations.length === 0) {
    out.push('Integrations: none configured');
  } else {
    out.push('Integrations');
    out.push(
      ...table(
        [
          'NAME',
          'TYPE',
          'STATE',
          'QUEUE',
          'BYTES',
          'OLDEST',
          'INFLIGHT',
          'DELIVERED',
          'DROPPED',
          'DEAD',
          'LAST ACK',
        ],
        [false, false, false, true, true, true, true, true, true, true, true],
        s.integrations.map((i) => [
          i.name,
          i.type,
          i.state,
          count(i.queue.depth),
          humanBytes(i.queue.bytes),
          i.queue.oldestAgeMs === null ? '-' : humanDuration(i.queue.oldestAgeMs),
          count(i.inflight),
          count(i.delivered),
          count(droppedTotal(i)),
          count(i.queue.deadLetters),
          i.lastAckAt === null ? '-' : ago(i.lastAckAt, now),
        ]),
      ).map((line) => `  ${line}`),
    );
    const errors = s.integrations.filter((i) => i.lastError !== null);
    if (errors.length > 0) {
      out.push('');
      out.push('Last errors');
      for (const i of errors) {
        const e = i.lastError!;
        out.push(`  ${i.name}: ${e.code}: ${e.message} (${ago(e.at, now)})`);
      }
    }
    const waiting = s.integrations.filter((i) => i.parkedDevices.length > 0 || i.throttled > 0);
    if (waiting.length > 0) {
      out.push('');
      out.push('Waiting on the cloud');
      for (const i of waiting) {
        const parked = i.parkedDevices.slice(0, maxDevices).join(', ');
        const more =
          i.parkedDevices.length > maxDevices
            ? ` … and ${count(i.parkedDevices.length - maxDevices)} more`
            : '';
        out.push(
          `  ${i.name}: ${count(i.throttled)} throttled publishes; parked devices: ${parked || 'none'}${more}`,
        );
      }
    }
  }

  out.push('');
  if (s.broker.devices.length === 0) {
    out.push('Connected devices: none');
  } else {
    out.push(`Connected devices (${count(s.broker.devices.length)})`);
    const shown = s.broker.devices.slice(0, maxDevices);
    out.push(
      ...table(
        ['ID', 'ADDRESS', 'CONNECTED'],
        [false, false, true],
        shown.map((d) => [d.id, d.remoteAddress ?? '-', humanDuration(now - d.connectedAt)]),
      ).map((line) => `  ${line}`),
    );
    if (s.broker.devices.length > shown.length)
      out.push(`  … and ${count(s.broker.devices.length - shown.length)} more`);
  }
  return out.join('\n') + '\n';
}

function replicationLine(s: GatewayStatusSnapshot): string {
  const r = s.replication;
  if (!r.configured) return `not configured (${count(r.pendingRows)} rows kept locally)`;
  return (
    `${r.state}, lag ${humanDuration(r.oldestPendingAgeMs ?? 0)}, ${count(r.pendingRows)} rows pending, ` +
    `${count(r.replicatedRows)} replicated` +
    (r.rejectedRows > 0 ? `, ${count(r.rejectedRows)} rejected` : '') +
    `, last success ${r.lastSuccessAt === null ? 'never' : ago(r.lastSuccessAt, s.now)}`
  );
}

function droppedTotal(i: IntegrationStatus): number {
  return i.queue.dropped + i.queue.expired + i.queue.rejected + i.queue.deadLettered;
}

function alignFacts(facts: [string, string][]): string[] {
  const width = Math.max(...facts.map(([k]) => k.length)) + 2;
  return facts.map(([k, v]) => k.padEnd(width) + v);
}

/** Columns padded to their widest cell; numbers right-aligned. */
function table(header: string[], numeric: boolean[], rows: string[][]): string[] {
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => (r[c] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((cell, c) => (numeric[c] ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!)))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)];
}

function count(n: number): string {
  return n.toLocaleString('en-US');
}

function hostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

function ago(at: number, now: number): string {
  return `${humanDuration(now - at)} ago`;
}

/** `850ms`, `42s`, `3m 12s`, `5h 3m`, `2d 4h`: two units at most, for reading, not parsing. */
export function humanDuration(ms: number): string {
  const v = Math.max(0, Math.round(ms));
  if (v < 1000) return `${v}ms`;
  const s = Math.floor(v / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

/** Binary units, matching the config file's `512MB` = 512 MiB. */
export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

/**
 * The URL at which a CLI on the same machine reaches the daemon: a wildcard bind address
 * (0.0.0.0, ::) is reached over loopback.
 */
export function daemonUrl(host: string, port: number): string {
  const h = host === '0.0.0.0' || host === '' ? '127.0.0.1' : host === '::' ? '::1' : host;
  return `http://${hostPort(h, port)}`;
}

/** Asks the running daemon for its snapshot at `${url}/api/status`. */
export async function fetchStatus(url: string, timeoutMs: number): Promise<GatewayStatusSnapshot> {
  const base = url.replace(/\/+$/, '');
  const unreachable = (reason: string, cause?: unknown) =>
    new GatewayError(
      ErrorCodes.DAEMON_UNREACHABLE,
      `the gateway is not answering on ${base} (${reason}); is it running? (\`systemctl status iot-gateway\`)`,
      { retryable: true, cause, details: { url: base } },
    );
  let res: Response;
  try {
    res = await fetch(`${base}/api/status`, {
      headers: { accept: 'application/json' },
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    throw unreachable(fetchFailureReason(err, timeoutMs), err);
  }
  if (!res.ok) {
    await res.body?.cancel();
    throw new GatewayError(
      ErrorCodes.DAEMON_UNREACHABLE,
      `the gateway on ${base} answered HTTP ${res.status} for /api/status; check http.host and http.port in the config and the daemon's log`,
      { retryable: true, details: { url: base, status: res.status } },
    );
  }
  try {
    return (await res.json()) as GatewayStatusSnapshot;
  } catch (err) {
    throw new GatewayError(
      ErrorCodes.DAEMON_UNREACHABLE,
      `the program answering on ${base} did not send a gateway status (${errorMessage(err)}); is http.port another program's port?`,
      { retryable: true, cause: err, details: { url: base } },
    );
  }
}

function fetchFailureReason(err: unknown, timeoutMs: number): string {
  const name = (err as { name?: string }).name;
  if (name === 'TimeoutError' || name === 'AbortError') return `no answer within ${timeoutMs}ms`;
  // undici reports the socket error as the cause of a bare "fetch failed"
  const cause = (err as { cause?: { code?: string; message?: string } }).cause;
  return cause?.code ?? cause?.message ?? errorMessage(err);
}

/** The door's refusals, only those that happened: ", refused: 7 connect rate, 2 login backoff". */
function refusedText(refused: GatewayStatusSnapshot['broker']['refused']): string {
  const parts = (
    [
      [refused.maxConnections, 'connection cap'],
      [refused.connectRate, 'connect rate'],
      [refused.packetTooLarge, 'packet too large'],
      [refused.loginBackoff, 'login backoff'],
    ] as const
  )
    .filter(([n]) => n > 0)
    .map(([n, what]) => `${count(n)} ${what}`);
  return parts.length === 0 ? '' : `, refused: ${parts.join(', ')}`;
}
