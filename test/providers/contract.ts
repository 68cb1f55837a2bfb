/**
 * The provider contract suite: what every provider promises the forwarder and the connection
 * supervisor (src/providers/provider.ts, SPEC §6). Every provider runs it against its cloud
 * (a simulator in test/sims/, Mosquitto, an in-test aedes) besides its own tests.
 *
 * How to use it, in test/providers/<cloud>.contract.test.ts:
 *
 *   import { describeProviderContract } from './contract.js';
 *
 *   describeProviderContract('aws-iot-core', async () => {
 *     const sim = await startAwsSim();                  // the cloud side, on port 0
 *     const provider = createAwsIotCoreProvider(context(sim));
 *     return {
 *       provider,                                       // fresh, not connected
 *       cloud: {
 *         received: () => sim.received.map((m) => m.payload.toString()),
 *         holdAcks: () => sim.holdAcks(),
 *         releaseAcks: () => sim.releaseAcks(),
 *         dropLink: () => sim.kickAll(),
 *         // optional knobs: stallConnects/releaseConnects, throttleNext, failDevice,
 *         // plannedReconnect; a test that needs a missing one is not run.
 *       },
 *       cleanup: () => sim.stop(),                      // the suite closes the provider itself
 *     };
 *   }, { throttles: true, deviceFailures: true });      // what the cloud can make it do
 *
 * The options (`throttles`, `deviceThrottles`, `deviceFailures`, `plannedReconnects`) add the
 * tests for what the cloud can make the provider do; each needs the matching ContractCloud knob.
 *
 * `setup` runs before every test and must return a provider that has not connected yet. The
 * suite publishes rows on `devices/{deviceId}/telemetry` (override with `topic`) whose payload is
 * the text `contract:<token>`; `received()` returns what reached the cloud as text that contains
 * that payload (decode it if the cloud wraps or encodes it).
 *
 * The shape of this file (ContractCloud, ContractSubject, describeProviderContract) stays stable;
 * tests may be added.
 */
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes, GatewayError } from '../../src/errors.js';
import { createBackoff } from '../../src/common/backoff.js';
import { createConnectionSupervisor } from '../../src/gateway/delivery/connection-supervisor.js';
import type { OutboundMessage, Provider } from '../../src/providers/provider.js';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';
import { rejection } from '../helpers/rejection.js';

/** The cloud side of a provider under test: what it received, and the faults it can make. */
export interface ContractCloud {
  /** Every message that reached the cloud, acknowledged or not, as text containing its payload. */
  received(): readonly string[];
  /** Withhold acknowledgements (PUBACK, HTTP response) until `releaseAcks`; messages still arrive. */
  holdAcks(): void;
  releaseAcks(): void;
  /** Ends the provider's link from the cloud side, as a network loss. */
  dropLink(): void | Promise<void>;
  /** Leave connection attempts unanswered (no CONNACK) until `releaseConnects`. */
  stallConnects?(): void;
  releaseConnects?(): void;
  /** Make the cloud throttle the next `n` publishes (link-wide, or one device's). */
  throttleNext?(n: number, retryAfterMs: number, deviceId?: string): void;
  /** Make one child device's cloud link fail until `restoreDevice`. */
  failDevice?(deviceId: string, retryAfterMs: number): void;
  restoreDevice?(deviceId: string): void;
  /** Make the provider replace its link on purpose (e.g. expire its credentials soon). */
  plannedReconnect?(): void;
}

export interface ContractSubject {
  /** A fresh provider, not connected yet; the suite closes it. */
  provider: Provider;
  cloud: ContractCloud;
  /** The local topic a test row of this device uses; `devices/{deviceId}/telemetry` by default. */
  topic?(deviceId: string): string;
  cleanup?(): void | Promise<void>;
}

export interface ContractOptions {
  /** Per-test timeout (ms); raise it for clouds with slow simulators. */
  timeoutMs?: number;
  /**
   * What the cloud can make the provider do; each adds its tests, which then need the matching
   * knob of ContractCloud (`throttleNext`, `failDevice`/`restoreDevice`, `plannedReconnect`).
   */
  throttles?: boolean;
  /** Throttles scoped to one device (`throttleNext(n, ms, deviceId)`). */
  deviceThrottles?: boolean;
  deviceFailures?: boolean;
  plannedReconnects?: boolean;
}

/** Registers the contract tests for one provider in a `describe` named after it. */
export function describeProviderContract(
  name: string,
  setup: () => Promise<ContractSubject>,
  options: ContractOptions = {},
): void {
  const timeout = options.timeoutMs ?? 30_000;

  describe(`provider contract: ${name}`, () => {
    let subject: ContractSubject | undefined;
    const cleanups: (() => unknown)[] = [];
    let seq = 0;

    afterEach(async () => {
      for (const fn of cleanups.splice(0).reverse()) await fn();
      if (subject) {
        await subject.provider.close();
        subject.cloud.releaseAcks();
        await subject.cleanup?.();
      }
      subject = undefined;
    });

    async function start(): Promise<ContractSubject> {
      subject = await setup();
      return subject;
    }

    function row(s: ContractSubject, deviceId = 'contract-dev'): OutboundMessage & { token: string } {
      const token = `contract:${randomUUID()}`;
      seq++;
      return {
        id: seq,
        deviceId,
        topic: s.topic?.(deviceId) ?? `devices/${deviceId}/telemetry`,
        payload: Buffer.from(token),
        qos: 1,
        retain: false,
        enqueuedAt: Date.now(),
        attempts: 0,
        token,
      };
    }

    const arrived = (s: ContractSubject, token: string) => s.cloud.received().some((r) => r.includes(token));

    /** A real activity log in a temporary store, for the supervisor. */
    function activityLog(): { activity: ActivityLog; logs: LogRecord[] } {
      const dir = mkdtempSync(join(tmpdir(), 'gw-contract-'));
      const logs: LogRecord[] = [];
      const logger = createCaptureLogger(logs);
      const store: Store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
      cleanups.push(() => {
        store.close();
        rmSync(dir, { recursive: true, force: true });
      });
      return { activity: createActivityLog({ db: store.db, gatewayId: 'gw-contract', logger }), logs };
    }

    it(
      'declares its window and payload ceiling, and refuses to publish before connect',
      async () => {
        const s = await start();
        expect(s.provider.maxInflight).toBeGreaterThanOrEqual(1);
        expect(s.provider.maxPayloadBytes).toBeGreaterThan(0);
        const err = await rejection(s.provider.publish(row(s)));
        expect(err.code).toBe(ErrorCodes.PROVIDER_NOT_CONNECTED);
        expect(err.retryable).toBe(true);
      },
      timeout,
    );

    it(
      'publish resolves only after the cloud acknowledged the message',
      async () => {
        const s = await start();
        await s.provider.connect(new AbortController().signal);
        const first = row(s);
        await s.provider.publish(first);
        expect(arrived(s, first.token)).toBe(true);

        s.cloud.holdAcks();
        const held = row(s);
        const publishing = settleState(s.provider.publish(held));
        await until(() => arrived(s, held.token));
        await turns();
        expect(publishing.state).toBe('pending');
        s.cloud.releaseAcks();
        await until(() => publishing.state !== 'pending');
        expect(publishing.state).toBe('resolved');
      },
      timeout,
    );

    it(
      'close fails pending publishes back with GW_ERR_PROVIDER_CLOSED (retryable) and reports no loss',
      async () => {
        const s = await start();
        const losses: Error[] = [];
        s.provider.onDisconnect((e) => losses.push(e));
        await s.provider.connect(new AbortController().signal);
        s.cloud.holdAcks();
        const pending = row(s);
        const failing = rejection(s.provider.publish(pending));
        await until(() => arrived(s, pending.token));
        await s.provider.close();
        const err = await failing;
        expect(err.code).toBe(ErrorCodes.PROVIDER_CLOSED);
        expect(err.retryable).toBe(true);
        const after = await rejection(s.provider.publish(row(s)));
        expect(after.code).toBe(ErrorCodes.PROVIDER_CLOSED);
        await turns();
        expect(losses).toEqual([]);
      },
      timeout,
    );

    it(
      'honours an abort of the connect attempt',
      async () => {
        const s = await start();
        const controller = new AbortController();
        controller.abort();
        const err = await rejection(s.provider.connect(controller.signal));
        expect(err.code).toBe(ErrorCodes.ABORTED);
        if (s.cloud.stallConnects && s.cloud.releaseConnects) {
          s.cloud.stallConnects();
          const midway = new AbortController();
          const connecting = settleState(s.provider.connect(midway.signal));
          await turns();
          expect(connecting.state).toBe('pending');
          midway.abort();
          await until(() => connecting.state !== 'pending');
          expect(connecting.state).toBe('rejected');
          expect((connecting.error as GatewayError).code).toBe(ErrorCodes.ABORTED);
          s.cloud.releaseConnects();
        }
        // The provider is still usable after aborted attempts.
        await s.provider.connect(new AbortController().signal);
        const next = row(s);
        await s.provider.publish(next);
        expect(arrived(s, next.token)).toBe(true);
      },
      timeout,
    );

    it(
      'a lost link fails pending publishes (retryable) and is reported once',
      async () => {
        const s = await start();
        const losses: Error[] = [];
        s.provider.onDisconnect((e) => losses.push(e));
        await s.provider.connect(new AbortController().signal);
        s.cloud.holdAcks();
        const pending = row(s);
        const failing = rejection(s.provider.publish(pending));
        await until(() => arrived(s, pending.token));
        await s.cloud.dropLink();
        const err = await failing;
        expect(err.code).toBe(ErrorCodes.PROVIDER_NOT_CONNECTED);
        expect(err.retryable).toBe(true);
        await until(() => losses.length > 0);
        const lostWhileDown = await rejection(s.provider.publish(row(s)));
        expect(lostWhileDown.retryable).toBe(true);
        // A new link works, and the old one's loss was reported exactly once.
        s.cloud.releaseAcks();
        await s.provider.connect(new AbortController().signal);
        const next = row(s);
        await s.provider.publish(next);
        expect(losses).toHaveLength(1);
        expect(isGatewayErrorWith(losses[0], true)).toBe(true);
      },
      timeout,
    );

    it(
      'reconnects through the connection supervisor after a loss and delivers again',
      async () => {
        const s = await start();
        const { activity, logs } = activityLog();
        const supervisor = createConnectionSupervisor({
          provider: s.provider,
          logger: createCaptureLogger(logs),
          activity,
          integrationId: randomUUID(),
          backoff: createBackoff({ baseMs: 50, maxMs: 200 }),
        });
        cleanups.push(() => supervisor.stop());
        supervisor.start();
        await until(() => supervisor.state === 'connected');
        await s.provider.publish(row(s));
        await s.cloud.dropLink();
        await until(() => supervisor.reconnects === 1 && supervisor.state === 'connected');
        const next = row(s);
        await s.provider.publish(next);
        expect(arrived(s, next.token)).toBe(true);
        expect(supervisor.lastError?.code).toBeDefined();
      },
      timeout,
    );

    if (options.throttles === true)
      it(
        'a throttled publish says so (GW_ERR_PROVIDER_THROTTLED, retryable, retryAfterMs) and the link stays up',
        async () => {
          const s = await start();
          const throttle = knob(s.cloud.throttleNext?.bind(s.cloud), 'throttleNext');
          const losses: Error[] = [];
          s.provider.onDisconnect((e) => losses.push(e));
          await s.provider.connect(new AbortController().signal);
          throttle(1, 250);
          const err = await rejection(s.provider.publish(row(s)));
          expect(err.code).toBe(ErrorCodes.PROVIDER_THROTTLED);
          expect(err.retryable).toBe(true);
          expect(err.details?.retryAfterMs).toBeTypeOf('number');
          // Throttling is not a failure of the link: the next publish goes through.
          const next = row(s);
          await s.provider.publish(next);
          expect(arrived(s, next.token)).toBe(true);
          expect(losses).toEqual([]);
        },
        timeout,
      );

    if (options.deviceThrottles === true)
      it(
        "a throttle of one device names it (details.deviceId); the other devices' publishes go through",
        async () => {
          const s = await start();
          const throttle = knob(s.cloud.throttleNext?.bind(s.cloud), 'throttleNext');
          await s.provider.connect(new AbortController().signal);
          throttle(1, 250, 'slow-dev');
          const other = row(s, 'fast-dev');
          await s.provider.publish(other);
          expect(arrived(s, other.token)).toBe(true);
          const scoped = await rejection(s.provider.publish(row(s, 'slow-dev')));
          expect(scoped.code).toBe(ErrorCodes.PROVIDER_THROTTLED);
          expect(scoped.retryable).toBe(true);
          expect(scoped.details?.deviceId).toBe('slow-dev');
          expect(scoped.details?.retryAfterMs).toBeTypeOf('number');
        },
        timeout,
      );

    if (options.deviceFailures === true)
      it(
        "one device's failure fails only that device's publishes (GW_ERR_PROVIDER_DEVICE_UNAVAILABLE)",
        async () => {
          const s = await start();
          const failDevice = knob(s.cloud.failDevice?.bind(s.cloud), 'failDevice');
          const restoreDevice = knob(s.cloud.restoreDevice?.bind(s.cloud), 'restoreDevice');
          await s.provider.connect(new AbortController().signal);
          failDevice('broken-dev', 300);
          const err = await rejection(s.provider.publish(row(s, 'broken-dev')));
          expect(err.code).toBe(ErrorCodes.PROVIDER_DEVICE_UNAVAILABLE);
          expect(err.retryable).toBe(true);
          expect(err.details).toMatchObject({ deviceId: 'broken-dev' });
          expect(err.details?.retryAfterMs).toBeTypeOf('number');
          const other = row(s, 'fine-dev');
          await s.provider.publish(other);
          expect(arrived(s, other.token)).toBe(true);
          restoreDevice('broken-dev');
          const back = row(s, 'broken-dev');
          await s.provider.publish(back);
          expect(arrived(s, back.token)).toBe(true);
        },
        timeout,
      );

    if (options.plannedReconnects === true)
      it(
        'a planned reconnect is no failure: the supervisor reconnects at once, no error row',
        async () => {
          const s = await start();
          const planned = knob(s.cloud.plannedReconnect?.bind(s.cloud), 'plannedReconnect');
          const { activity, logs } = activityLog();
          const integrationId = randomUUID();
          const supervisor = createConnectionSupervisor({
            provider: s.provider,
            logger: createCaptureLogger(logs),
            activity,
            integrationId,
            // A failure would wait up to a minute: reconnecting "at once" cannot hide behind it.
            backoff: createBackoff({ baseMs: 60_000, maxMs: 60_000, random: () => 1 }),
          });
          cleanups.push(() => supervisor.stop());
          supervisor.start();
          await until(() => supervisor.state === 'connected');
          s.cloud.holdAcks();
          const inflight = row(s);
          const publishing = settleState(s.provider.publish(inflight));
          await until(() => arrived(s, inflight.token));
          planned();
          s.cloud.releaseAcks();
          await until(() => publishing.state !== 'pending');
          if (publishing.state === 'rejected') {
            expect((publishing.error as GatewayError).code).toBe(ErrorCodes.PROVIDER_PLANNED_RECONNECT);
          }
          await until(() => supervisor.reconnects === 1 && supervisor.state === 'connected');
          const next = row(s);
          await s.provider.publish(next);
          expect(arrived(s, next.token)).toBe(true);
          const bad = activity
            .list({ integrationId })
            .filter((r) => r.status === 'failed' || r.status === 'error');
          expect(bad).toEqual([]);
          expect(supervisor.lastError).toBeNull();
        },
        timeout,
      );
  });
}

/** A knob the options promised; missing, the test fails and says which. */
function knob<T>(fn: T | undefined, name: string): T {
  if (fn === undefined)
    throw new Error(`the contract options promise ${name}, but the ContractCloud has none`);
  return fn;
}

function isGatewayErrorWith(err: unknown, retryable: boolean): boolean {
  return err instanceof GatewayError && err.retryable === retryable;
}

function settleState(promise: Promise<unknown>): {
  state: 'pending' | 'resolved' | 'rejected';
  error?: unknown;
} {
  const box: { state: 'pending' | 'resolved' | 'rejected'; error?: unknown } = { state: 'pending' };
  promise.then(
    () => (box.state = 'resolved'),
    (err: unknown) => {
      box.state = 'rejected';
      box.error = err;
    },
  );
  return box;
}

/** Gives a wrong implementation a chance to settle early: a few timer turns, never a wait to pass. */
async function turns(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, 10));
}

async function until(check: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 10));
  }
}
