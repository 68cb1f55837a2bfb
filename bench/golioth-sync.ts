/**
 * `npm run bench:golioth`: the golioth provider against the local Golioth simulator
 * (test/sims/golioth) on loopback — a sync of GOLIOTH_BENCH_DEVICES devices (default 1,000):
 * import (device list with LightDB State, effective settings per device), export (LightDB State
 * writes), both; REST requests made and seconds. Then telemetry over CoAP/DTLS-PSK from
 * GOLIOTH_BENCH_SENDERS devices (default 50), 40 messages each, under Golioth's 20 requests/s per
 * device. The simulator runs in this process, so its work is in the figures.
 */
import { randomUUID } from 'node:crypto';
import { Writable } from 'node:stream';
import { configSchema } from '../src/config/schema.js';
import { createLogger } from '../src/logger.js';
import { createGoliothProvider } from '../src/providers/golioth/golioth-provider.js';
import type { OutboundMessage, Provider } from '../src/providers/provider.js';
import { createTestPki } from '../test/helpers/certs.js';
import { startGoliothSim } from '../test/sims/golioth/golioth-sim.js';
import { fmt, markdownTable } from './lib/table.js';

const DEVICES = Number(process.env.GOLIOTH_BENCH_DEVICES ?? 1000);
const SENDERS = Number(process.env.GOLIOTH_BENCH_SENDERS ?? 50);
const PER_SENDER = 40;
const PROJECT = 'bench';

export async function runGoliothSyncBench(): Promise<string> {
  const pki = createTestPki();
  const sim = await startGoliothSim(pki, { rateLimit: 20 });
  try {
    sim.addProject(PROJECT, 'bench-key');
    const names = Array.from({ length: DEVICES }, (_, i) => `dev-${String(i).padStart(5, '0')}`);
    names.forEach((name, i) =>
      sim.addDevice(PROJECT, {
        name,
        blueprintId: i % 2 === 0 ? 'even' : '',
        ...(i < SENDERS ? { psk: { key: `${name}-psk` } } : {}),
      }),
    );
    for (const name of names) sim.setState(PROJECT, name, 'desired', { interval: 30, mode: 'auto' });
    sim.addSetting(PROJECT, { key: 'INTERVAL', dataType: 'integer', value: 60 });
    sim.addSetting(PROJECT, { key: 'INTERVAL', dataType: 'integer', value: 30, blueprintId: 'even' });
    for (const name of names.slice(0, 100)) {
      sim.addSetting(PROJECT, { key: 'LABEL', dataType: 'string', value: name, deviceName: name });
    }
    await sim.applyCredentials();

    const reported = new Map(names.map((n, i) => [n, { rpm: i, mode: 'auto' }] as const));
    const integration = configSchema.parse({
      gateway: { id: 'gw-bench' },
      integrations: [
        {
          name: 'golioth-bench',
          id: randomUUID(),
          type: 'golioth',
          settings: {
            projectId: PROJECT,
            apiKey: 'bench-key',
            baseUrl: sim.restUrl,
            ca: pki.caCert,
            coapHost: '127.0.0.1',
            coapPort: sim.coap.port,
            devices: Object.fromEntries(names.slice(0, SENDERS).map((n) => [n, { psk: `${n}-psk` }])),
          },
        },
      ],
    }).integrations[0]!;
    const logger = createLogger({
      level: 'warn',
      gatewayId: 'gw-bench',
      destination: new Writable({ write: (_c, _e, cb) => cb() }),
    });
    const provider: Provider = createGoliothProvider({
      gatewayId: 'gw-bench',
      integration,
      logger,
      knownDevices: () => names,
      reportedState: () => reported,
    });
    let desired = 0;
    provider.onCommand(() => desired++);
    await provider.connect(new AbortController().signal);

    const rows: string[][] = [];
    const measure = async (label: string, run: () => Promise<{ recordsSucceeded: number }>) => {
      const before = sim.rest.requests.length;
      const started = performance.now();
      const result = await run();
      const seconds = (performance.now() - started) / 1000;
      const requests = sim.rest.requests.length - before;
      rows.push([
        label,
        fmt(result.recordsSucceeded),
        fmt(requests),
        seconds.toFixed(2),
        fmt(requests / seconds),
      ]);
      console.error(
        `golioth bench: ${label} ${result.recordsSucceeded} records, ${requests} requests, ${seconds.toFixed(2)} s`,
      );
    };
    const signal = () => AbortSignal.timeout(600_000);
    await measure(`import (${DEVICES} devices)`, () => provider.import(signal()));
    await measure(`export (${DEVICES} devices)`, () => provider.export(signal()));
    await measure(`both (${DEVICES} devices)`, () => provider.bidirectionalSync(signal()));
    if (desired !== DEVICES * 2) throw new Error(`expected ${DEVICES * 2} desired messages, got ${desired}`);

    // Telemetry: each sender's rows in order (one at a time per device, as the forwarder does),
    // all senders at once.
    let id = 0;
    const streamBefore = sim.stream(PROJECT).length;
    const started = performance.now();
    let throttledWaits = 0;
    await Promise.all(
      names.slice(0, SENDERS).map(async (name) => {
        for (let n = 0; n < PER_SENDER; n++) {
          const message: OutboundMessage = {
            id: ++id,
            deviceId: name,
            topic: `devices/${name}/telemetry`,
            payload: Buffer.from(JSON.stringify({ n, t: 20.5 })),
            qos: 1,
            retain: false,
            enqueuedAt: Date.now(),
            attempts: 0,
          };
          for (;;) {
            try {
              await provider.publish(message);
              break;
            } catch (err) {
              const retryAfterMs = (err as { details?: { retryAfterMs?: number } }).details?.retryAfterMs;
              if (retryAfterMs === undefined) throw err;
              throttledWaits++;
              await new Promise((r) => setTimeout(r, retryAfterMs));
            }
          }
        }
      }),
    );
    const seconds = (performance.now() - started) / 1000;
    const total = SENDERS * PER_SENDER;
    const until = Date.now() + 30_000;
    while (sim.stream(PROJECT).length < streamBefore + total && Date.now() < until) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const arrived = sim.stream(PROJECT).length - streamBefore;
    await provider.close();

    return [
      '### Golioth (simulator on loopback)',
      '',
      markdownTable(['sync', 'records', 'REST requests', 'seconds', 'requests/s'], rows),
      '',
      markdownTable(
        [
          'telemetry over CoAP/DTLS-PSK',
          'messages',
          'arrived',
          'seconds',
          'messages/s',
          'waits for 20/s',
          'relay drops',
        ],
        [
          [
            `${SENDERS} devices × ${PER_SENDER}`,
            fmt(total),
            fmt(arrived),
            seconds.toFixed(2),
            fmt(total / seconds),
            fmt(throttledWaits),
            fmt(sim.coap.stats.throttledDrops),
          ],
        ],
      ),
    ].join('\n');
  } finally {
    await sim.close();
    pki.cleanup();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  runGoliothSyncBench().then(
    (table) => {
      console.log(table);
    },
    (err: unknown) => {
      console.error(err);
      process.exitCode = 1;
    },
  );
}
