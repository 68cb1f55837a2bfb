import { existsSync, readFileSync, statSync } from 'node:fs';
import { isAbsolute, resolve, dirname } from 'node:path';
import { isMap, isScalar, isSeq, LineCounter, parseDocument, type Document, type Node } from 'yaml';
import type { z } from 'zod';
import { ErrorCodes, GatewayError } from '../errors.js';
import { configSchema, knownKeys, type Config } from './schema.js';

export interface ConfigIssue {
  /** Dotted path with [i] for array items, e.g. `broker.devices[2].acl.publish[0]`. */
  path: string;
  message: string;
  line?: number;
}

export class ConfigError extends GatewayError {
  readonly issues: ConfigIssue[];
  readonly file: string;

  constructor(file: string, issues: ConfigIssue[]) {
    super(ErrorCodes.CONFIG_INVALID, `${file}: ${issues.map(formatIssue).join('; ')}`);
    this.name = 'ConfigError';
    this.file = file;
    this.issues = issues;
  }
}

export function formatIssue(issue: ConfigIssue): string {
  const path = issue.path === '' ? '(root)' : issue.path;
  return issue.line === undefined
    ? `${path}: ${issue.message}`
    : `${path}: ${issue.message} (line ${issue.line})`;
}

export interface LoadedConfig {
  config: Readonly<Config>;
  file: string;
  /** The text the config was parsed from, for change detection. */
  text: string;
}

/** Where the config lives when `-c` is not given (SPEC §2). */
export function defaultConfigPath(env: NodeJS.ProcessEnv = process.env): string {
  if (env.IOT_GATEWAY_CONFIG) return env.IOT_GATEWAY_CONFIG;
  if (existsSync('/etc/iot-gateway/gateway.yaml')) return '/etc/iot-gateway/gateway.yaml';
  return 'config/gateway.yaml';
}

export function loadConfigFile(file: string, env: NodeJS.ProcessEnv = process.env): LoadedConfig {
  const abs = resolve(file);
  let text: string;
  try {
    text = readFileSync(abs, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why =
      code === 'ENOENT'
        ? `config file ${abs} does not exist; copy config/gateway.example.yaml there or pass -c FILE`
        : `cannot read config file ${abs} (${code ?? String(err)}); check its permissions`;
    throw new GatewayError(ErrorCodes.CONFIG_NOT_FOUND, why, { cause: err });
  }
  return { config: parseConfigText(text, abs, env), file: abs, text };
}

/** Parses and validates config text. Throws ConfigError listing every problem with its line. */
export function parseConfigText(
  text: string,
  file: string,
  env: NodeJS.ProcessEnv = process.env,
): Readonly<Config> {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length > 0) {
    throw new ConfigError(
      file,
      doc.errors.map((e) => ({
        path: '',
        message: `YAML syntax: ${e.message.split('\n')[0]}`,
        line: e.linePos?.[0]?.line,
      })),
    );
  }
  const raw: unknown = doc.toJS() ?? {};
  const issues: ConfigIssue[] = [];
  const lineOf = (path: (string | number)[]) => lineOfPath(doc, lineCounter, path);
  const resolved = resolveSecrets(raw, [], env, dirname(file), issues, lineOf);
  if (issues.length > 0) throw new ConfigError(file, issues);

  const result = configSchema.safeParse(resolved);
  if (!result.success) {
    throw new ConfigError(file, zodIssues(result.error.issues, lineOf));
  }
  const config = result.data;
  config.gateway.dataDir = isAbsolute(config.gateway.dataDir)
    ? config.gateway.dataDir
    : resolve(config.gateway.dataDir);
  return deepFreeze(config);
}

function zodIssues(
  zIssues: z.ZodIssue[],
  lineOf: (p: (string | number)[]) => number | undefined,
): ConfigIssue[] {
  const known = knownKeys();
  const out: ConfigIssue[] = [];
  for (const issue of zIssues) {
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) {
        const path = [...issue.path, key];
        const guess = closest(key, known);
        out.push({
          path: formatPath(path),
          message: `unknown key "${key}"${guess ? `; did you mean "${guess}"?` : ''}`,
          line: lineOf(path),
        });
      }
      continue;
    }
    let message = issue.message;
    if (issue.code === 'invalid_type' && issue.received === 'undefined') message = 'is required';
    // `key:` followed by nothing or only comments is null in YAML: never read as "allow all".
    else if (issue.code === 'invalid_type' && issue.received === 'null')
      message = `is empty (${issue.expected} expected); give it a value, or remove the key to use the default`;
    if (issue.code === 'invalid_union_discriminator') message = `must be one of: ${issue.options.join(', ')}`;
    out.push({ path: formatPath(issue.path), message, line: lineOf(issue.path) });
  }
  return out;
}

export function formatPath(path: (string | number)[]): string {
  let s = '';
  for (const p of path) s += typeof p === 'number' ? `[${p}]` : s === '' ? p : `.${p}`;
  return s;
}

function lineOfPath(doc: Document, lc: LineCounter, path: (string | number)[]): number | undefined {
  // Walk down as far as the document goes: a missing key reports the line of its parent.
  let node: unknown = doc.contents;
  let best: number | undefined = rangeLine(node, lc);
  for (const key of path) {
    if (isMap(node)) {
      const pair = node.items.find((item) => isScalar(item.key) && String(item.key.value) === String(key));
      if (!pair) break;
      best = rangeLine(pair.key, lc) ?? best;
      node = pair.value;
    } else if (isSeq(node) && typeof key === 'number') {
      node = node.items[key];
      best = rangeLine(node, lc) ?? best;
    } else {
      break;
    }
  }
  return best;
}

function rangeLine(node: unknown, lc: LineCounter): number | undefined {
  const range = (node as Node | undefined)?.range;
  return range ? lc.linePos(range[0]).line : undefined;
}

const ENV_REF = /\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g;

/** Replaces `${ENV}` in strings and `{ file: path }` objects with the secret they name. */
function resolveSecrets(
  value: unknown,
  path: (string | number)[],
  env: NodeJS.ProcessEnv,
  baseDir: string,
  issues: ConfigIssue[],
  lineOf: (p: (string | number)[]) => number | undefined,
): unknown {
  if (typeof value === 'string') {
    return value.replace(ENV_REF, (_m, name: string) => {
      const v = env[name];
      if (v === undefined) {
        issues.push({
          path: formatPath(path),
          message: `environment variable ${name} is not set`,
          line: lineOf(path),
        });
        return '';
      }
      return v;
    });
  }
  if (Array.isArray(value))
    return value.map((v, i) => resolveSecrets(v, [...path, i], env, baseDir, issues, lineOf));
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>);
    if (entries.length === 1 && entries[0]![0] === 'file' && typeof entries[0]![1] === 'string') {
      // `{ file: "${CREDENTIALS_DIRECTORY}/pg-url" }`: the path itself may name environment variables.
      const file = resolve(
        baseDir,
        resolveSecrets(entries[0]![1], [...path, 'file'], env, baseDir, issues, lineOf) as string,
      );
      try {
        const st = statSync(file);
        if ((st.mode & 0o004) !== 0) {
          issues.push({
            path: formatPath(path),
            message: `secret file ${file} is world-readable; chmod 0600 or 0640 it`,
            line: lineOf(path),
          });
          return '';
        }
        return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
      } catch (err) {
        issues.push({
          path: formatPath(path),
          message: `cannot read secret file ${file} (${(err as NodeJS.ErrnoException).code ?? String(err)})`,
          line: lineOf(path),
        });
        return '';
      }
    }
    const out: Record<string, unknown> = Object.create(null) as Record<string, unknown>;
    for (const [k, v] of entries) out[k] = resolveSecrets(v, [...path, k], env, baseDir, issues, lineOf);
    return out;
  }
  return value;
}

function closest(word: string, candidates: Set<string>): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const c of candidates) {
    const d = levenshtein(word.toLowerCase(), c.toLowerCase());
    if (d < bestDistance) {
      bestDistance = d;
      best = c;
    }
  }
  return bestDistance <= Math.max(2, Math.floor(word.length / 3)) ? best : undefined;
}

function levenshtein(a: string, b: string): number {
  const prev = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    let diag = prev[0]!;
    prev[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = prev[j]!;
      prev[j] = Math.min(prev[j]! + 1, prev[j - 1]! + 1, diag + (a[i - 1] === b[j - 1] ? 0 : 1));
      diag = tmp;
    }
  }
  return prev[b.length]!;
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value as Record<string, unknown>)) deepFreeze(v);
  }
  return value;
}
