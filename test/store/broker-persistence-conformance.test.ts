import assert from 'node:assert';
import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { createLogger } from '../../src/logger.js';
import { createBrokerPersistence } from '../../src/store/broker-persistence.js';
import { openStore, type Store } from '../../src/store/database.js';

/**
 * aedes-persistence's own conformance suite (abstract.js, written by aedes' authors for every
 * persistence) run against ours on a real SQLite file per test. The suite is written for
 * node:test; the shim below gives each of its tests a vitest test and the part of node:test's
 * TestContext it uses (plan, assert, diagnostic), and checks the plan count as node:test does.
 */

const require = createRequire(import.meta.url);
const abstractSuite = require('aedes-persistence/abstract.js') as (opts: {
  test: (name: string, fn: (t: SuiteContext) => Promise<void>) => void;
  persistence: () => unknown;
  testAsync?: boolean;
}) => void;

/** node:test's t.assert: the node:assert functions, counted against t.plan. */
const ASSERTIONS = [
  'deepEqual',
  'deepStrictEqual',
  'equal',
  'notEqual',
  'notDeepEqual',
  'ok',
  'strictEqual',
] as const;

interface SuiteContext {
  plan(count: number): void;
  diagnostic(message: string): void;
  assert: Record<(typeof ASSERTIONS)[number], (...args: unknown[]) => void>;
}

const dirs: string[] = [];
let stores: Store[] = [];
const logger = createLogger({ level: 'silent', gatewayId: 'gw-conformance' });
let registered = 0;

function persistence() {
  const dir = mkdtempSync(join(tmpdir(), 'broker-persistence-'));
  dirs.push(dir);
  const store = openStore({ dataDir: dir, logger, onCorrupt: 'refuse', lock: false });
  stores.push(store);
  return createBrokerPersistence({
    db: store.db,
    syncWal: store.syncWal,
    logger,
    limits: {
      maxQueuedMessages: 10_000,
      maxQueuedBytes: 64 * 1024 * 1024,
      maxRetainedPerDevice: 10_000,
      sessionExpiryMs: 0,
    },
  });
}

describe('aedes-persistence abstract suite (abstract.js) against the SQLite persistence', () => {
  afterEach(() => {
    for (const store of stores) store.close();
    stores = [];
  });
  afterAll(() => {
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  abstractSuite({
    // aedes 1 calls the promise flavour directly (no callback wrapper), as the suite's testAsync mode does.
    testAsync: true,
    persistence,
    test(name, fn) {
      registered++;
      it(
        name,
        async () => {
          let planned: number | undefined;
          let count = 0;
          const counted = Object.fromEntries(
            ASSERTIONS.map((method) => [
              method,
              (...args: unknown[]) => {
                count++;
                (assert[method] as (...a: unknown[]) => void)(...args);
              },
            ]),
          ) as SuiteContext['assert'];
          await fn({
            plan(n) {
              planned = n;
            },
            diagnostic() {},
            assert: counted,
          });
          if (planned !== undefined) expect(count, 'assertions run against t.plan').toBe(planned);
        },
        60_000,
      );
    },
  });

  it('registers every test of the suite', () => {
    // abstract.js of aedes-persistence 11.0.0 has 50 tests; fewer would mean the shim lost some.
    expect(registered).toBe(50);
  });
});
