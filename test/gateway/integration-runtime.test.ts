import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { loadConfigFile } from '../../src/config/load.js';
import { createIntegrationRuntime, type IntegrationRuntime } from '../../src/gateway/integration-runtime.js';
import type { InboundMessage, Provider } from '../../src/providers/provider.js';
import { createActivityLog } from '../../src/store/activity-log.js';
import { openStore, type Store } from '../../src/store/database.js';
import { createOutbox } from '../../src/store/outbox.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';
import { FAKE_INTEGRATION_YAML } from '../helpers/fake-integration.js';

const DESIRED: InboundMessage = {
  topic: 'devices/d1/desired',
  payload: Buffer.from('{"state":{"rpm":900}}'),
  qos: 1,
  retain: true,
};

/** A provider whose import hands a desired state to the gateway and returns at once, as the real ones do. */
function importingProvider(): Provider {
  let command: ((message: InboundMessage) => void) | undefined;
  const none = { recordsProcessed: 0, recordsSucceeded: 0, recordsFailed: 0 };
  return {
    connect: async () => {},
    publish: async () => {},
    onCommand: (handler) => {
      command = handler;
    },
    onDisconnect: () => {},
    maxInflight: 10,
    maxPayloadBytes: 1024,
    testConnection: async () => ({ ok: true, latencyMs: 0, details: {} }),
    import: async () => {
      command?.(DESIRED);
      return { recordsProcessed: 1, recordsSucceeded: 1, recordsFailed: 0 };
    },
    export: async () => none,
    bidirectionalSync: async () => none,
    close: async () => {},
  };
}

describe('integration runtime: sync and the local broker', () => {
  let dir: string;
  let store: Store;
  let runtime: IntegrationRuntime | undefined;

  afterEach(async () => {
    await runtime?.stop();
    runtime = undefined;
    store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  function start(publishLocal: (message: InboundMessage) => Promise<void>, logs: LogRecord[]) {
    dir = mkdtempSync(join(tmpdir(), 'gw-runtime-'));
    const file = join(dir, 'gateway.yaml');
    writeFileSync(
      file,
      [
        `gateway: { id: runtime-gw, dataDir: ${JSON.stringify(join(dir, 'data'))} }`,
        ...FAKE_INTEGRATION_YAML,
        'http: { enabled: false }',
      ].join('\n'),
    );
    const { config } = loadConfigFile(file);
    const logger = createCaptureLogger(logs);
    store = openStore({ dataDir: join(dir, 'data'), logger, onCorrupt: 'refuse', lock: false });
    const activity = createActivityLog({ db: store.db, gatewayId: 'runtime-gw', logger });
    runtime = createIntegrationRuntime({
      integration: config.integrations[0]!,
      gatewayId: 'runtime-gw',
      providers: { mqtt: () => importingProvider() },
      outbox: createOutbox({ db: store.db, logger, activity }),
      activity,
      publishLocal,
      logger,
    });
    return runtime;
  }

  it('reports a sync done only after what its import handed to the local broker is published there', async () => {
    let release: (() => void) | undefined;
    const published: InboundMessage[] = [];
    const sync = start(
      (message) =>
        new Promise<void>((resolve) => {
          release = () => {
            published.push(message);
            resolve();
          };
        }),
      [],
    ).sync('import');
    let done = false;
    void sync.then(() => (done = true));
    for (let i = 0; i < 100 && release === undefined; i++) await new Promise((r) => setTimeout(r, 10));
    expect(release).toBeDefined();
    // The import returned long ago; the retained state is not stored yet, so the sync waits.
    await new Promise((r) => setTimeout(r, 100));
    expect(done).toBe(false);
    release!();
    expect(await sync).toMatchObject({ ok: true, recordsSucceeded: 1 });
    expect(published).toEqual([DESIRED]);
  });

  it('a local publish that fails is logged, and the sync still ends with what the cloud gave', async () => {
    const logs: LogRecord[] = [];
    const outcome = await start(() => Promise.reject(new Error('the broker is not running')), logs).sync(
      'import',
    );
    expect(outcome).toMatchObject({ ok: true, recordsSucceeded: 1 });
    expect(logs.filter((l) => l.msg === 'inbound_publish_failed')).toHaveLength(1);
  });
});
