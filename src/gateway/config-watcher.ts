import { watch, type FSWatcher } from 'node:fs';
import { basename, dirname } from 'node:path';
import type { Logger } from '../logger.js';

/**
 * Watches the config file for edits, whether editors write in place or write a temp file and
 * rename it over (so the directory is watched, not the inode). Bursts of events are debounced
 * into one reload.
 */
export function watchConfigFile(options: {
  file: string;
  logger: Logger;
  onChange: () => void;
  debounceMs?: number;
}): () => void {
  const name = basename(options.file);
  const debounceMs = options.debounceMs ?? 250;
  let timer: NodeJS.Timeout | undefined;
  let watcher: FSWatcher | undefined;
  try {
    watcher = watch(dirname(options.file), { persistent: false }, (_event, changed) => {
      if (changed !== null && changed !== name) return;
      clearTimeout(timer);
      timer = setTimeout(options.onChange, debounceMs);
    });
    watcher.on('error', (err) => options.logger.warn({ err }, 'config_watch_failed'));
  } catch (err) {
    options.logger.warn({ err, file: options.file }, 'config_watch_failed');
  }
  return () => {
    clearTimeout(timer);
    watcher?.close();
  };
}
