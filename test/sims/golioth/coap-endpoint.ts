import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createSocket, type RemoteInfo, type Socket } from 'node:dgram';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

/**
 * The device side of the Golioth simulator (§3.2): CoAP over DTLS 1.2 PSK.
 *
 * No npm library serves DTLS-PSK, so the DTLS and CoAP server is a reference peer, Debian's
 * libcoap3-bin `coap-server-openssl` (OpenSSL's DTLS), with one PSK per identity (`-i`) and
 * dynamic resources (`-d`) so any `/.s/<path>` or `/.d/<path>` is answered 2.01/2.04. It logs
 * every PDU at `-v 7`; this wrapper reads those lines and tells the simulator which identity
 * posted what, where. In front of it sits a UDP relay the tests drive: it enforces the device
 * rate limit (20 requests/s per device, §3.2 Limits) by dropping what is over it — what Golioth
 * answers instead is [UNCONFIRMED]; a dropped confirmable request is retransmitted by the client —
 * and it blackholes everything during an outage. The relay reads only DTLS record headers
 * (content type 23 = application data), never plaintext.
 */

export interface CoapRequestRecord {
  identity: string | undefined;
  method: string;
  /** `/.s/sensors` */
  path: string;
  contentFormat: string | undefined;
  payload: string;
  /** The response code coap-server gave (`2.04`), once seen. */
  response?: string;
  at: number;
}

export interface CoapEndpoint {
  /** The port devices (the provider) connect to: the relay. */
  readonly port: number;
  readonly requests: readonly CoapRequestRecord[];
  /** Requests dropped by the rate limit, per client source. */
  readonly stats: { throttledDrops: number; datagramsIn: number; handshakesSeen: number };
  /** Replaces the identity → PSK table; restarts coap-server (its sessions end). */
  setCredentials(credentials: ReadonlyMap<string, string>): Promise<void>;
  /** true: every datagram is dropped both ways (the network path is down). */
  setOutage(down: boolean): void;
  /** true: server → device datagrams are held (requests still arrive); false: they go out now. */
  holdReplies(hold: boolean): void;
  /** Restarts coap-server with the same credentials: every DTLS session ends (close_notify). */
  restart(): Promise<void>;
  /** Requests per second and device; 0 turns the limit off. */
  setRateLimit(perSecond: number): void;
  onRequest(handler: (record: CoapRequestRecord) => void): void;
  close(): Promise<void>;
}

const PROGRAM = 'coap-server-openssl';

function portFree(port: number, kind: 'udp' | 'tcp'): Promise<boolean> {
  return new Promise((resolve) => {
    if (kind === 'tcp') {
      const s = createServer();
      s.once('error', () => resolve(false));
      s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
      return;
    }
    const s = createSocket('udp4');
    s.once('error', () => {
      s.close();
      resolve(false);
    });
    s.bind(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/** coap-server takes no port 0: find P with P and P+1 free for UDP and TCP (it opens all four). */
async function freePortPair(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    // Below the kernel's ephemeral range (32768+), where port-0 listeners of other tests land.
    const p = 20_000 + 2 * Math.floor(Math.random() * 6_000);
    const checks = await Promise.all([
      portFree(p, 'udp'),
      portFree(p + 1, 'udp'),
      portFree(p, 'tcp'),
      portFree(p + 1, 'tcp'),
    ]);
    if (checks.every(Boolean)) return p;
  }
  throw new Error('no free port pair for coap-server');
}

// A PDU as coap_show_pdu prints it; a binary payload follows on the next line as <<hex>>.
const PDU =
  /^v:1 t:(CON|NON|ACK|RST) c:(\S+) i:([0-9a-f]+) \{[0-9a-f]*\} \[(.*?)\](?: :: '(.*)'| :: (binary) data length \d+)?\s*$/;
const BINARY = /^<<([0-9a-f]+)>>$/;
const SESSION = /(?:\*{1,3}|\* ) ?127\.0\.0\.1:\d+ <-> 127\.0\.0\.1:(\d+) \(if\d+\)/;
const IDENTITY = /got psk_identity: '(.*)'$/;

/**
 * Starts a libcoap example server on `port` (UDP/TCP) and `port`+1 (DTLS/TLS) with `-v 7`;
 * `ready` resolves once all four endpoints exist and rejects when one could not be created.
 */
export function spawnCoapServer(
  program: string,
  port: number,
  args: readonly string[],
): { child: ChildProcess; ready: Promise<void> } {
  const child = spawn(
    'stdbuf',
    ['-oL', '-eL', program, '-A', '127.0.0.1', '-p', String(port), '-v', '7', ...args],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  const ready = new Promise<void>((resolve, reject) => {
    let text = '';
    const timer = setTimeout(() => reject(new Error(`${program} did not start`)), 10_000);
    const done = (err?: Error) => {
      clearTimeout(timer);
      child.stdout!.off('data', onData);
      if (err) reject(err);
      else resolve();
    };
    const onData = (chunk: Buffer) => {
      text += chunk.toString();
      if (/cannot create|Address already in use/.test(text))
        done(new Error(`${program}: port ${port} is taken`));
      // The TLS endpoint is the last one it creates (notls builds stop at TCP).
      else if (
        /created TLS {1,2}endpoint/.test(text) ||
        (program.endsWith('notls') && /created TCP {1,2}endpoint/.test(text))
      ) {
        done();
      }
    };
    child.stdout!.on('data', onData);
    child.once('exit', (code) =>
      done(new Error(`${program} exited with ${code}; is libcoap3-bin installed?`)),
    );
  });
  // The caller may stop it before it is ready.
  ready.catch(() => {});
  return { child, ready };
}

export { freePortPair };

export async function startCoapEndpoint(options: { rateLimit?: number } = {}): Promise<CoapEndpoint> {
  const dir = mkdtempSync(join(tmpdir(), 'golioth-coap-'));
  const idFile = join(dir, 'identities');
  writeFileSync(idFile, '', { mode: 0o600 });
  const requests: CoapRequestRecord[] = [];
  const handlers: ((r: CoapRequestRecord) => void)[] = [];
  const stats = { throttledDrops: 0, datagramsIn: 0, handshakesSeen: 0 };
  let rateLimit = options.rateLimit ?? 20;
  let outage = false;
  // While set, server → device datagrams (ACKs, responses) wait here: requests still arrive.
  let heldReplies: (() => void)[] | undefined;
  let serverPort = 0;
  let child: ChildProcess | undefined;
  let hasCredentials = false;

  // coap-server's view: the relay's upstream socket port → identity of the session on it.
  const identityByPort = new Map<number, string>();
  // Requests awaiting their response line, by message id.
  const pendingById = new Map<string, CoapRequestRecord>();

  let lastPort = 0;
  let awaitingBinary: CoapRequestRecord | undefined;
  const onLine = (line: string) => {
    const session = SESSION.exec(line);
    if (session) lastPort = Number(session[1]);
    const id = IDENTITY.exec(line);
    if (id) {
      identityByPort.set(lastPort, id[1]!);
      stats.handshakesSeen++;
      return;
    }
    const binary = BINARY.exec(line);
    if (binary && awaitingBinary !== undefined) {
      const record = awaitingBinary;
      awaitingBinary = undefined;
      record.payload = Buffer.from(binary[1]!, 'hex').toString('latin1');
      for (const h of handlers) h(record);
      return;
    }
    const pdu = PDU.exec(line);
    if (!pdu) return;
    const [, type, code, mid, optionText, payload, isBinary] = pdu;
    if (/^\d\.\d\d$/.test(code!)) {
      const req = pendingById.get(mid!);
      if (req !== undefined) {
        req.response = code!;
        pendingById.delete(mid!);
      }
      return;
    }
    if (type !== 'CON' && type !== 'NON') return;
    const opts = optionText!.split(',').map((o) => o.trim());
    const path = opts
      .filter((o) => o.startsWith('Uri-Path:'))
      .map((o) => o.slice('Uri-Path:'.length))
      .join('/');
    const cf = opts.find((o) => o.startsWith('Content-Format:'));
    const record: CoapRequestRecord = {
      identity: identityByPort.get(lastPort),
      method: code!,
      path: `/${path}`,
      contentFormat: cf?.slice('Content-Format:'.length),
      payload: payload ?? '',
      at: Date.now(),
    };
    requests.push(record);
    pendingById.set(mid!, record);
    if (isBinary !== undefined) awaitingBinary = record;
    else for (const h of handlers) h(record);
  };

  const startChild = async () => {
    // coap-server reports a port taken by someone else and carries on; try another pair.
    for (let attempt = 0; ; attempt++) {
      if (serverPort === 0) serverPort = await freePortPair();
      // A default key nobody knows: an identity missing from the table fails the handshake.
      const defaultKey = randomBytes(16).toString('hex');
      const proc = spawnCoapServer(PROGRAM, serverPort, [
        ...['-d', '1000000', '-k', defaultKey],
        // coap-server refuses an empty identity file.
        ...(hasCredentials ? ['-i', idFile] : []),
      ]);
      child = proc.child;
      createInterface({ input: proc.child.stdout! }).on('line', onLine);
      createInterface({ input: proc.child.stderr! }).on('line', onLine);
      try {
        await proc.ready;
        return;
      } catch (err) {
        await stopChild();
        serverPort = 0;
        if (attempt >= 4) throw err;
      }
    }
  };

  const stopChild = async () => {
    const proc = child;
    child = undefined;
    if (proc === undefined || proc.exitCode !== null) return;
    await new Promise<void>((resolve) => {
      proc.once('exit', () => resolve());
      proc.kill('SIGTERM');
    });
  };

  // --- the relay ---------------------------------------------------------------------------
  interface Flow {
    client: RemoteInfo;
    upstream: Socket;
    upstreamPort: number;
    appRecords: number[];
  }
  const flows = new Map<string, Flow>();
  const front = createSocket('udp4');
  front.on('error', () => {});
  front.on('message', (msg, rinfo) => {
    stats.datagramsIn++;
    if (outage) return;
    const key = `${rinfo.address}:${rinfo.port}`;
    let flow = flows.get(key);
    if (flow === undefined) {
      const upstream = createSocket('udp4');
      upstream.on('error', () => {});
      const f: Flow = { client: rinfo, upstream, upstreamPort: 0, appRecords: [] };
      upstream.on('message', (reply) => {
        if (outage) return;
        // Only application data (CoAP) is held; handshakes go through so sessions still open.
        if (heldReplies !== undefined && reply[0] === 23)
          heldReplies.push(() => front.send(reply, f.client.port, f.client.address));
        else front.send(reply, f.client.port, f.client.address);
      });
      upstream.bind(0, '127.0.0.1', () => {
        f.upstreamPort = upstream.address().port;
      });
      flows.set(key, f);
      flow = f;
    }
    // DTLS record header: content type 23 is application data, i.e. one CoAP message.
    if (msg[0] === 23 && rateLimit > 0) {
      const t = Date.now();
      flow.appRecords = flow.appRecords.filter((at) => t - at < 1000);
      if (flow.appRecords.length >= rateLimit) {
        stats.throttledDrops++;
        return;
      }
      flow.appRecords.push(t);
    }
    flow.upstream.send(msg, serverPort + 1, '127.0.0.1');
  });
  await new Promise<void>((resolve) => front.bind(0, '127.0.0.1', () => resolve()));
  await startChild();

  return {
    port: front.address().port,
    requests,
    stats,
    async setCredentials(credentials) {
      const lines = [...credentials].map(([identity, psk]) => {
        if (/[,\n]/.test(identity) || /[,\n]/.test(psk))
          throw new Error('identities and PSKs may not hold commas');
        return `,${identity},${psk}`;
      });
      writeFileSync(idFile, lines.join('\n') + '\n', { mode: 0o600 });
      hasCredentials = lines.length > 0;
      await stopChild();
      for (const f of flows.values()) f.upstream.close();
      flows.clear();
      identityByPort.clear();
      await startChild();
    },
    setOutage(down) {
      outage = down;
    },
    holdReplies(hold) {
      if (hold) {
        heldReplies ??= [];
        return;
      }
      const held = heldReplies ?? [];
      heldReplies = undefined;
      for (const send of held) send();
    },
    async restart() {
      // coap-server ends every DTLS session with close_notify as it stops.
      await stopChild();
      for (const f of flows.values()) f.upstream.close();
      flows.clear();
      identityByPort.clear();
      await startChild();
    },
    setRateLimit(perSecond) {
      rateLimit = perSecond;
    },
    onRequest(handler) {
      handlers.push(handler);
    },
    async close() {
      await stopChild();
      for (const f of flows.values()) f.upstream.close();
      flows.clear();
      await new Promise<void>((resolve) => front.close(() => resolve()));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
