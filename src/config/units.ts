import { z } from 'zod';

/**
 * Parsers for the human units the config file accepts (durations, sizes and rates), and the zod
 * schemas every settings schema uses for them: durations come out as ms, sizes as bytes, rates
 * as messages per second.
 */

const DURATION_UNITS: Record<string, number> = {
  ms: 1,
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
  w: 604_800_000,
};

const SIZE_UNITS: Record<string, number> = {
  b: 1,
  kb: 1024,
  mb: 1024 ** 2,
  gb: 1024 ** 3,
  tb: 1024 ** 4,
};

const RATE_UNITS: Record<string, number> = { s: 1, m: 1 / 60, h: 1 / 3600 };

/** `500ms`, `30s`, `5m`, `2h`, `7d`, `1w`, or a bare number of milliseconds. */
export function parseDuration(input: string | number): number | undefined {
  if (typeof input === 'number') return Number.isFinite(input) && input >= 0 ? input : undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$/i.exec(input);
  if (!m) return undefined;
  const unit = DURATION_UNITS[m[2]!.toLowerCase()]!;
  return Math.round(Number(m[1]) * unit);
}

/** `512MB`, `256KB`, `1GB`, `100B`, or a bare number of bytes. Units are binary (1KB = 1024 B). */
export function parseSize(input: string | number): number | undefined {
  if (typeof input === 'number') return Number.isInteger(input) && input >= 0 ? input : undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)\s*$/i.exec(input);
  if (!m) return undefined;
  const unit = SIZE_UNITS[m[2]!.toLowerCase().replace('i', '')]!;
  return Math.round(Number(m[1]) * unit);
}

/** `100/s`, `6000/m`, `0` (unlimited) or a bare number per second. Returns messages per second. */
export function parseRate(input: string | number): number | undefined {
  if (typeof input === 'number') return Number.isFinite(input) && input >= 0 ? input : undefined;
  const m = /^\s*(\d+(?:\.\d+)?)\s*\/\s*(s|m|h)\s*$/i.exec(input);
  if (!m) return undefined;
  return Number(m[1]) * RATE_UNITS[m[2]!.toLowerCase()]!;
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${ms}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms % 1000 === 0 ? 0 : 1)}s`;
  if (ms < 3_600_000) return `${Math.round(ms / 60_000)}m`;
  if (ms < 86_400_000) return `${Math.round(ms / 3_600_000)}h`;
  return `${Math.round(ms / 86_400_000)}d`;
}

/** A value in a human unit, parsed by `parse`; a value it refuses is an issue saying how to write it. */
const unitSchema = (parse: (input: string | number) => number | undefined, what: string, examples: string) =>
  z.union([z.string(), z.number()]).transform((v, ctx) => {
    const value = parse(v);
    if (value === undefined) {
      ctx.addIssue({
        code: z.ZodIssueCode.custom,
        message: `"${v}" is not a ${what}; write e.g. ${examples}`,
      });
      return z.NEVER;
    }
    return value;
  });

/** A duration in ms: `500ms`, `30s`, `5m`, `7d` or a bare number of ms. */
export const durationSchema = () => unitSchema(parseDuration, 'duration', '500ms, 30s, 5m, 7d');
/** A size in bytes: `256KB`, `512MB`, `1GB` or a bare number of bytes. */
export const sizeSchema = () => unitSchema(parseSize, 'size', '256KB, 512MB, 1GB');
/** A rate in messages per second: `100/s`, `6000/m`; 0 = unlimited. */
export const rateSchema = () => unitSchema(parseRate, 'rate', '100/s or 6000/m (0 = unlimited)');
