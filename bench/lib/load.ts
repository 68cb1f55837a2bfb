import { benchDeviceId } from './credentials.js';
import { connectRaw, type RawClient } from './mqtt-raw.js';
import { sleep } from './process.js';

/**
 * Payload layout: [0] phase, [4..8) device index, [8..12) sequence, [16..24) send time
 * (performance.now() of this process; the subscriber runs in the same process, so end-to-end
 * latency needs no clock sync). The rest is padding up to the configured size.
 */
const HEADER_BYTES = 24;

export function makePayload(
  size: number,
  phase: number,
  device: number,
  seq: number,
  sentAt: number,
): Buffer {
  const buf = Buffer.alloc(Math.max(HEADER_BYTES, size));
  buf.writeUInt8(phase, 0);
  buf.writeUInt32BE(device, 4);
  buf.writeUInt32BE(seq, 8);
  buf.writeDoubleBE(sentAt, 16);
  return buf;
}

export const deviceTopic = (device: number) => `devices/d${device}/telemetry`;

/** Per-device bitmaps of sequence numbers: which were acknowledged, which arrived. */
export class SeqSet {
  readonly #bits: Uint8Array[];
  #count = 0;
  constructor(devices: number, perDevice: number) {
    this.#bits = Array.from({ length: devices }, () => new Uint8Array(perDevice));
  }
  /** True when newly added. */
  add(device: number, seq: number): boolean {
    const row = this.#bits[device];
    if (row === undefined || seq >= row.length || row[seq] === 1) return false;
    row[seq] = 1;
    this.#count++;
    return true;
  }
  has(device: number, seq: number): boolean {
    return this.#bits[device]?.[seq] === 1;
  }
  get size(): number {
    return this.#count;
  }
  /** How many members of this set are missing from `other`. */
  missingFrom(other: SeqSet): number {
    let missing = 0;
    this.#bits.forEach((row, device) => {
      for (let seq = 0; seq < row.length; seq++) if (row[seq] === 1 && !other.has(device, seq)) missing++;
    });
    return missing;
  }
}

/** The subscriber on the upstream: counts unique arrivals of one phase and their end-to-end latency. */
export interface Collector {
  expect(phase: number, devices: number, perDevice: number): void;
  readonly arrived: SeqSet;
  readonly duplicates: number;
  /** performance.now() of the last new arrival of the current phase. */
  readonly lastArrival: number;
  readonly e2eMs: number[];
  readonly connected: boolean;
  close(): Promise<void>;
}

/**
 * `persistent`: clean=false with a fixed client id, reconnecting every 100 ms after a loss,
 * so an upstream restarted from its persistence file hands over what arrived meanwhile.
 */
export async function createCollector(upstreamPort: number, persistent: boolean): Promise<Collector> {
  const clientId = `bench-collector-${process.pid}-${upstreamPort}`;
  let phase = -1;
  let arrived = new SeqSet(0, 0);
  let duplicates = 0;
  let lastArrival = 0;
  let e2eMs: number[] = [];
  let client: RawClient | undefined;
  let closing = false;

  const onMessage = (_topic: string, payload: Buffer) => {
    if (payload.length < HEADER_BYTES || payload.readUInt8(0) !== phase) return;
    const now = performance.now();
    if (arrived.add(payload.readUInt32BE(4), payload.readUInt32BE(8))) {
      lastArrival = now;
      e2eMs.push(now - payload.readDoubleBE(16));
    } else {
      duplicates++;
    }
  };
  const connectOnce = async () => {
    const c = await connectRaw({
      port: upstreamPort,
      clientId,
      clean: !persistent,
      keepalive: 60,
      timeoutMs: 2_000,
    });
    c.onMessage(onMessage);
    await c.subscribe('devices/#', 1);
    c.onClose(() => {
      if (!closing) void reconnect();
    });
    client = c;
  };
  const reconnect = async () => {
    client = undefined;
    // Bounded: stops when the collector closes; the benches bound the overall wait.
    while (!closing) {
      await sleep(100);
      try {
        await connectOnce();
        return;
      } catch {
        // upstream still down
      }
    }
  };
  await connectOnce();

  return {
    expect(p, devices, perDevice) {
      phase = p;
      arrived = new SeqSet(devices, perDevice);
      duplicates = 0;
      lastArrival = 0;
      e2eMs = [];
    },
    get arrived() {
      return arrived;
    },
    get duplicates() {
      return duplicates;
    },
    get lastArrival() {
      return lastArrival;
    },
    get e2eMs() {
      return e2eMs;
    },
    get connected() {
      return client?.connected ?? false;
    },
    async close() {
      closing = true;
      await client?.end();
    },
  };
}

/** Connects `count` raw device clients (anonymous, clean session), a few at a time. */
/**
 * Connects `count` raw devices. With `password`, device i logs in as `bench-d{i}` (client id
 * and username) with that password; without, anonymously as `{prefix}-{i}`.
 */
export async function connectDevices(
  port: number,
  count: number,
  prefix: string,
  password?: string,
): Promise<RawClient[]> {
  const clients: RawClient[] = [];
  try {
    for (let i = 0; i < count; i += 50) {
      const batch = Array.from({ length: Math.min(50, count - i) }, (_, j) =>
        connectRaw(
          password === undefined
            ? { port, clientId: `${prefix}-${i + j}`, keepalive: 600 }
            : {
                port,
                clientId: benchDeviceId(i + j),
                username: benchDeviceId(i + j),
                password,
                keepalive: 600,
              },
        ),
      );
      clients.push(...(await Promise.all(batch)));
    }
  } catch (err) {
    for (const c of clients) c.destroy();
    throw err;
  }
  return clients;
}

export interface BurstResult {
  total: number;
  acked: SeqSet;
  /** performance.now() at the first publish and at the last PUBACK. */
  start: number;
  lastAck: number;
  pubackMs: number[];
  /** Messages that could not be sent (no free packet id or connection gone). */
  unsent: number;
}

/** Closed loop: every device keeps `window` QoS 1 messages in flight until it sent perDevice. */
export async function closedLoopBurst(
  devices: readonly RawClient[],
  phase: number,
  perDevice: number,
  window: number,
  payloadSize: number,
  timeoutMs: number,
): Promise<BurstResult> {
  const total = devices.length * perDevice;
  const acked = new SeqSet(devices.length, perDevice);
  const result: BurstResult = { total, acked, start: performance.now(), lastAck: 0, pubackMs: [], unsent: 0 };
  const next = new Array<number>(devices.length).fill(0);
  let stalled = false;
  const pump = (d: number) => {
    const client = devices[d]!;
    while (client.inflight < window && next[d]! < perDevice) {
      const seq = next[d]!;
      const ok = client.publish(
        deviceTopic(d),
        makePayload(payloadSize, phase, d, seq, performance.now()),
        1,
        () => {
          const now = performance.now();
          acked.add(d, seq);
          result.lastAck = now;
          pump(d);
        },
      );
      if (!ok) {
        stalled = true;
        return;
      }
      next[d] = seq + 1;
    }
  };
  devices.forEach((_, d) => pump(d));
  const deadline = Date.now() + timeoutMs;
  while (acked.size < total && Date.now() < deadline && !stalled) await sleep(10);
  result.unsent = total - next.reduce((a, b) => a + b, 0);
  return result;
}

export interface PacedOptions {
  rate: number;
  total: number;
  payloadSize: number;
  /** Called every tick with the fraction of the burst sent so far (outage bench hooks in here). */
  onProgress?: (fraction: number) => void;
}

/** Open loop: `total` QoS 1 messages at a fixed `rate`, round-robin over the devices, not waiting for PUBACKs. */
export async function pacedBurst(
  devices: readonly RawClient[],
  phase: number,
  opts: PacedOptions,
): Promise<BurstResult> {
  const perDevice = Math.ceil(opts.total / devices.length);
  const acked = new SeqSet(devices.length, perDevice);
  const start = performance.now();
  const result: BurstResult = { total: opts.total, acked, start, lastAck: 0, pubackMs: [], unsent: 0 };
  let sent = 0;
  // Bounded by `total`: each tick sends what is due by now; at most total/rate + a little.
  while (sent < opts.total) {
    const due = Math.min(opts.total, Math.floor(((performance.now() - start) * opts.rate) / 1000));
    while (sent < due) {
      const d = sent % devices.length;
      const seq = Math.floor(sent / devices.length);
      const ok = devices[d]!.publish(
        deviceTopic(d),
        makePayload(opts.payloadSize, phase, d, seq, performance.now()),
        1,
        (sentAt) => {
          const now = performance.now();
          acked.add(d, seq);
          result.lastAck = now;
          result.pubackMs.push(now - sentAt);
        },
      );
      if (!ok) result.unsent++;
      sent++;
    }
    opts.onProgress?.(sent / opts.total);
    await sleep(1);
  }
  return result;
}

/** Waits until `done()` or the deadline; returns whether done() became true. */
export async function waitFor(done: () => boolean, timeoutMs: number, stepMs = 10): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) return false;
    await sleep(stepMs);
  }
  return true;
}

/**
 * Waits until `total` messages arrived upstream, or nothing new arrived for idleMs (a system
 * that dropped messages never completes), or maxMs passed. Returns whether all arrived.
 */
export async function waitForArrivals(
  collector: Collector,
  total: number,
  idleMs: number,
  maxMs: number,
): Promise<boolean> {
  const deadline = Date.now() + maxMs;
  let lastSize = collector.arrived.size;
  let lastChange = Date.now();
  while (collector.arrived.size < total) {
    const now = Date.now();
    if (now > deadline || now - lastChange > idleMs) return false;
    await sleep(10);
    if (collector.arrived.size !== lastSize) {
      lastSize = collector.arrived.size;
      lastChange = Date.now();
    }
  }
  return true;
}
