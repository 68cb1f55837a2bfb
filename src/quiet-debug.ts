/**
 * Imported first by the CLI, before any MQTT package loads.
 *
 * mqtt-packet parses every packet of every device and of every upstream link, and it calls the
 * `debug` package about ten times per packet. A logger of `debug` that is turned off still
 * gathers its arguments into an array on every call. Under load that was 12 % of all the
 * gateway allocated (docs/benchmarks.md, issue 11 session 7), so more young-generation GC.
 *
 * Unless `DEBUG` is set, the packages get a `debug` whose loggers do nothing. `DEBUG=mqtt-packet*`
 * or `DEBUG=mqttjs*` brings their traces back, as the packages document.
 */
import { createRequire } from 'node:module';

if (!process.env.DEBUG) quietDebug();

function quietDebug(): void {
  const require = createRequire(import.meta.url);
  let path: string;
  try {
    // The copy mqtt-packet loads (npm may nest another one under a package).
    path = createRequire(require.resolve('mqtt-packet')).resolve('debug');
  } catch {
    return;
  }
  const real = require(path) as ((namespace: string) => unknown) & Record<string, unknown>;
  const cached = require.cache[path];
  if (cached === undefined) return;
  const silent = (namespace: string): unknown => {
    const logger = Object.assign(() => {}, {
      namespace,
      enabled: false,
      color: '',
      diff: 0,
      log: () => {},
      destroy: () => true,
      extend: (sub: string, delimiter = ':') => silent(`${namespace}${delimiter}${sub}`),
    });
    return logger;
  };
  // The package's own functions (enable, disable, enabled, formatters …) stay as they are.
  cached.exports = Object.assign(silent, real);
}
