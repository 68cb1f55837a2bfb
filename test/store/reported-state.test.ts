import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { openStore, type Store } from '../../src/store/database.js';
import { createReportedState, mergePatch } from '../../src/store/reported-state.js';
import { createCaptureLogger, type LogRecord } from '../helpers/capture-logger.js';

let dir: string | undefined;
let store: Store | undefined;
const logs: LogRecord[] = [];
const logger = createCaptureLogger(logs);
const open = () => openStore({ dataDir: dir!, logger, onCorrupt: 'refuse', lock: false });

afterEach(() => {
  store?.close();
  store = undefined;
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
});

describe('reported state', () => {
  it('merges state messages as JSON merge patches (RFC 7396)', () => {
    expect(mergePatch({ a: 'b', c: { d: 'e', f: 'g' } }, { a: 'z', c: { f: null } }, 0)).toEqual({
      a: 'z',
      c: { d: 'e' },
    });
    expect(mergePatch({ a: [1, 2] }, { a: [3], b: { x: null, y: 1 } }, 0)).toEqual({ a: [3], b: { y: 1 } });
    expect(mergePatch({ a: 1 }, { a: { b: 2 } }, 0)).toEqual({ a: { b: 2 } });
  });

  it('keeps the latest merged state of each device across a restart; refuses what is not a JSON object', () => {
    dir = mkdtempSync(join(tmpdir(), 'gw-state-'));
    store = open();
    const state = createReportedState({ db: store.db, logger });
    expect(state.merge('lamp', Buffer.from('{"on":true,"level":40,"color":{"r":1,"g":2}}'))).toBe(true);
    expect(state.merge('lamp', Buffer.from('{"level":80,"color":{"g":null},"on":null}'))).toBe(true);
    expect(state.merge('lamp', Buffer.from('not json'))).toBe(false);
    expect(state.merge('lamp', Buffer.from('[1,2]'))).toBe(false);
    expect(state.merge('fan', Buffer.from('{"rpm":900}'))).toBe(true);
    expect(state.get('lamp')).toEqual({ level: 80, color: { r: 1 } });
    state.close();
    store.close();

    store = open();
    const again = createReportedState({ db: store.db, logger });
    expect(Object.fromEntries(again.all())).toEqual({
      lamp: { level: 80, color: { r: 1 } },
      fan: { rpm: 900 },
    });
  });
});
