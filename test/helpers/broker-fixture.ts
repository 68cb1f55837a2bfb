import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll } from 'vitest';
import { configSchema, type Config, type ConfigInput } from '../../src/config/schema.js';
import { hashPassword } from '../../src/gateway/broker/password-hash.js';
import type { Logger } from '../../src/logger.js';
import { createActivityLog, type ActivityLog } from '../../src/store/activity-log.js';
import { openStore, type Store } from '../../src/store/database.js';

/** The two devices the broker tests log in as. */
export const PASSWORDS = { 'sensor-1': 'secret-one', 'sensor-2': 'secret-two' } as const;
export type DeviceHashes = Record<keyof typeof PASSWORDS, string>;

export async function hashDevicePasswords(): Promise<DeviceHashes> {
  return {
    'sensor-1': await hashPassword(PASSWORDS['sensor-1']),
    'sensor-2': await hashPassword(PASSWORDS['sensor-2']),
  };
}

/** A validated broker section: one TCP listener on port 0 and both devices, plus overrides. */
export function twoDeviceBrokerConfig(
  gatewayId: string,
  dataDir: string,
  hashes: DeviceHashes,
  broker: Partial<NonNullable<ConfigInput['broker']>> = {},
): Config['broker'] {
  return configSchema.parse({
    gateway: { id: gatewayId, dataDir },
    broker: {
      listeners: [{ type: 'tcp', host: '127.0.0.1', port: 0 }],
      devices: [
        { id: 'sensor-1', passwordHash: hashes['sensor-1'] },
        { id: 'sensor-2', passwordHash: hashes['sensor-2'] },
      ],
      ...broker,
    },
  }).broker;
}

/** What a broker test file shares: the devices' hashes, a temp root, and what to close after each test. */
export interface BrokerTestWorld {
  hashes: DeviceHashes;
  root: string;
  running: { close(): Promise<void> | void }[];
  /** Stores opened so far (each gets its own directory). */
  stores: number;
}

/** Registers the hooks that build a BrokerTestWorld before the file's tests and tear it down after. */
export function useBrokerTestWorld(prefix: string): BrokerTestWorld {
  const world: BrokerTestWorld = {
    hashes: { 'sensor-1': '', 'sensor-2': '' },
    root: '',
    running: [],
    stores: 0,
  };
  beforeAll(async () => {
    world.hashes = await hashDevicePasswords();
    world.root = mkdtempSync(join(tmpdir(), prefix));
  });
  afterEach(async () => {
    while (world.running.length > 0) await world.running.pop()!.close();
  });
  afterAll(() => rmSync(world.root, { recursive: true, force: true }));
  return world;
}

/** A fresh store (and its activity log) under the world's root, closed after the test. */
export function openWorldStore(
  world: BrokerTestWorld,
  gatewayId: string,
  logger: Logger,
): { store: Store; activity: ActivityLog } {
  const store = openStore({
    dataDir: join(world.root, `store-${world.stores++}`),
    logger,
    onCorrupt: 'refuse',
    lock: false,
  });
  world.running.push({ close: () => store.close() });
  return { store, activity: createActivityLog({ db: store.db, gatewayId, logger }) };
}
