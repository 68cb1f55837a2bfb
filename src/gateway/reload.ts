import { readFileSync } from 'node:fs';
import { ConfigError, formatIssue, loadConfigFile } from '../config/load.js';
import type { Config, IntegrationConfig } from '../config/schema.js';
import { RESTART_REQUIRED_KEYS } from '../config/schema.js';
import { ErrorCodes, errorMessage, isGatewayError } from '../errors.js';
import type { Logger } from '../logger.js';
import type { ActivityLog } from '../store/activity-log.js';
import type { GatewayStatusSnapshot } from './http/status.js';
import type { IntegrationRuntime } from './integration-runtime.js';
import type { SystemdNotifier } from './systemd-notify.js';

export interface ReloadResult {
  ok: boolean;
  changed: string[];
  pendingRestart: string[];
  error?: string;
}

export interface ReloaderOptions {
  configFile: string;
  config: Readonly<Config>;
  logger: Logger;
  notifier: SystemdNotifier;
  now: () => number;
  activity(): ActivityLog | undefined;
  stopping(): boolean;
  /** Runs on every reload, also when the config file did not change (certificate rotation). */
  refreshFiles(): void;
  /**
   * Applies `next` (restart-only keys already keep their running values) to the running parts.
   * `changed` lists the dotted paths that differ from `prev`.
   */
  apply(next: Readonly<Config>, prev: Readonly<Config>, changed: string[]): Promise<void>;
}

/** Owns the running configuration and applies edits of the config file to it. */
export interface Reloader {
  readonly config: Readonly<Config>;
  /** The `config` part of the status snapshot. */
  state(): GatewayStatusSnapshot['config'];
  /** Re-reads the config file and applies the difference; reloads run one after the other. */
  reload(): Promise<ReloadResult>;
}

export function createReloader(options: ReloaderOptions): Reloader {
  const { configFile, logger, notifier, now } = options;
  let config = options.config;
  let configText = safeRead(configFile);
  let loadedAt = now();
  let lastError: GatewayStatusSnapshot['config']['lastError'] = null;
  let pendingRestart: string[] = [];
  let reloading: Promise<ReloadResult> | undefined;

  async function doReload(): Promise<ReloadResult> {
    // Certificate and CRL files are read again on every reload (SIGHUP), also when the config
    // itself did not change: replacing them and running `systemctl reload` is how they rotate.
    options.refreshFiles();
    const text = safeRead(configFile);
    if (text === configText) return { ok: true, changed: [], pendingRestart };
    notifier.reloading();
    try {
      const loaded = loadConfigFile(configFile);
      const prev = config;
      const next = loaded.config;
      const changed = diffPaths(prev, next);
      const restart = changed.filter((p) =>
        RESTART_REQUIRED_KEYS.some((k) => p === k || p.startsWith(`${k}.`) || p.startsWith(`${k}[`)),
      );
      // Keys that need a restart keep their running values; the rest applies now.
      config = withRunningValues(next, prev, RESTART_REQUIRED_KEYS);
      await options.apply(config, prev, changed);
      configText = loaded.text;
      loadedAt = now();
      lastError = null;
      pendingRestart = [...new Set([...pendingRestart, ...restart])];
      if (restart.length > 0) logger.warn({ keys: restart }, 'config_restart_required');
      logger.info({ changed }, 'config_reloaded');
      options.activity()?.record({
        activityType: 'config_reload',
        direction: 'internal',
        status: 'success',
        metadata: { changed: changed.slice(0, 50), restartRequired: restart },
      });
      return { ok: true, changed, pendingRestart };
    } catch (err) {
      // The running configuration stays in force; never fall back to defaults or open access.
      configText = text;
      const issues = err instanceof ConfigError ? err.issues : [];
      const message = err instanceof ConfigError ? err.issues.map(formatIssue).join('; ') : errorMessage(err);
      lastError = { message, issues, at: now() };
      logger.error({ file: configFile, issues, error: message }, 'config_reload_failed');
      options.activity()?.record({
        activityType: 'config_reload',
        direction: 'internal',
        status: 'failed',
        errorCode: isGatewayError(err) ? err.code : ErrorCodes.CONFIG_INVALID,
        errorMessage: message,
        metadata: { issues: issues.slice(0, 20) },
      });
      return { ok: false, changed: [], pendingRestart, error: message };
    } finally {
      notifier.reloaded();
    }
  }

  return {
    get config() {
      return config;
    },
    state: () => ({ file: configFile, loadedAt, lastError, pendingRestart }),
    reload() {
      if (options.stopping())
        return Promise.resolve({ ok: false, changed: [], pendingRestart, error: 'stopping' });
      // Serialise reloads: a burst of file events and a SIGHUP apply one after the other.
      const run = (reloading ?? Promise.resolve()).then(doReload, doReload);
      reloading = run;
      return run;
    },
  };
}

export interface IntegrationChanges {
  start(integration: IntegrationConfig): void;
  stop(runtime: IntegrationRuntime): Promise<void>;
}

/**
 * Brings the running integrations in line with `wanted`: removed or disabled ones stop, a changed
 * identity, type or settings restarts one, queue limits and schedules apply live, new ones start.
 */
export async function reconcileIntegrations(
  running: ReadonlyMap<string, IntegrationRuntime>,
  wanted: readonly IntegrationConfig[],
  changes: IntegrationChanges,
): Promise<void> {
  const wantedById = new Map(wanted.map((i) => [i.id, i]));
  for (const runtime of [...running.values()]) {
    const next = wantedById.get(runtime.config.id);
    if (!next || !next.enabled) {
      await changes.stop(runtime);
    } else if (integrationNeedsRestart(runtime.config, next)) {
      await changes.stop(runtime);
      changes.start(next);
    } else if (JSON.stringify(runtime.config) !== JSON.stringify(next)) {
      runtime.update(next);
    }
  }
  for (const integration of wanted) {
    if (integration.enabled && !running.has(integration.id)) changes.start(integration);
  }
}

/** Which parts of an integration restart it: its identity, type and provider settings. */
function integrationNeedsRestart(a: IntegrationConfig, b: IntegrationConfig): boolean {
  return a.type !== b.type || a.name !== b.name || JSON.stringify(a.settings) !== JSON.stringify(b.settings);
}

/** `next` with the values of `keys` (dotted paths) taken from `running`: they wait for a restart. */
function withRunningValues(
  next: Readonly<Config>,
  running: Readonly<Config>,
  keys: readonly string[],
): Readonly<Config> {
  const merged = structuredClone(next) as unknown as Record<string, unknown>;
  for (const key of keys) {
    const path = key.split('.');
    let from: unknown = running;
    let to: Record<string, unknown> = merged;
    for (let i = 0; i < path.length - 1; i++) {
      from = (from as Record<string, unknown>)[path[i]!];
      to = to[path[i]!] as Record<string, unknown>;
    }
    to[path[path.length - 1]!] = structuredClone((from as Record<string, unknown>)[path[path.length - 1]!]);
  }
  return Object.freeze(merged as unknown as Config);
}

/** Dotted paths of leaves that differ between two configs (arrays compared per item). */
export function diffPaths(a: unknown, b: unknown, path = ''): string[] {
  if (JSON.stringify(a) === JSON.stringify(b)) return [];
  const isObj = (v: unknown) => v !== null && typeof v === 'object' && !Array.isArray(v);
  if (Array.isArray(a) && Array.isArray(b)) {
    if (a.length !== b.length) return [path];
    return a.flatMap((v, i) => diffPaths(v, b[i], `${path}[${i}]`));
  }
  if (isObj(a) && isObj(b)) {
    const keys = new Set([...Object.keys(a as object), ...Object.keys(b as object)]);
    return [...keys].flatMap((k) =>
      diffPaths(
        (a as Record<string, unknown>)[k],
        (b as Record<string, unknown>)[k],
        path ? `${path}.${k}` : k,
      ),
    );
  }
  return [path];
}

function safeRead(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}
