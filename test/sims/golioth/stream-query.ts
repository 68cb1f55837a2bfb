import { parseDuration } from '../../../src/config/units.js';
import { flatten, type SimStreamRow } from './store.js';

/**
 * LightDB Stream queries over the simulator's rows (§3.1 LightDB Stream): time range, fields
 * with alias and aggregation (avg, count, max, min, sum), filters (=, <>, <, <=, >, >=, and/or),
 * timeBucket. Non-aggregated fields group the result. Rows come back flat, keyed by path or alias.
 */

export interface StreamField {
  path: string;
  alias?: string;
  agg?: 'avg' | 'count' | 'max' | 'min' | 'sum';
  type?: string;
}

export type StreamFilter =
  | { path: string; op: '=' | '<>' | '<' | '<=' | '>' | '>='; value: unknown }
  | { op: 'and' | 'or'; filters: StreamFilter[] };

export interface StreamQuery {
  start?: string;
  end?: string;
  fields?: StreamField[];
  filters?: StreamFilter[];
  timeBucket?: string;
}

export class StreamQueryError extends Error {}

function matches(row: Record<string, unknown>, filter: StreamFilter): boolean {
  if (filter.op === 'and' || filter.op === 'or') {
    const subs = (filter as { filters?: StreamFilter[] }).filters ?? [];
    return filter.op === 'and' ? subs.every((f) => matches(row, f)) : subs.some((f) => matches(row, f));
  }
  const { path, op, value } = filter as { path: string; op: string; value: unknown };
  const actual = row[path];
  switch (op) {
    case '=':
      return Array.isArray(value) ? value.includes(actual ?? null) : (actual ?? null) === value;
    case '<>':
      return Array.isArray(value) ? !value.includes(actual ?? null) : (actual ?? null) !== value;
    case '<':
    case '<=':
    case '>':
    case '>=': {
      if (typeof actual !== 'number' || typeof value !== 'number') return false;
      if (op === '<') return actual < value;
      if (op === '<=') return actual <= value;
      if (op === '>') return actual > value;
      return actual >= value;
    }
    default:
      throw new StreamQueryError(`unknown filter op "${op}"`);
  }
}

function aggregate(agg: NonNullable<StreamField['agg']>, values: unknown[]): number | null {
  const nums = values.filter((v): v is number => typeof v === 'number');
  if (agg === 'count') return values.filter((v) => v !== undefined && v !== null).length;
  if (nums.length === 0) return null;
  switch (agg) {
    case 'sum':
      return nums.reduce((a, b) => a + b, 0);
    case 'avg':
      return nums.reduce((a, b) => a + b, 0) / nums.length;
    case 'max':
      return Math.max(...nums);
    case 'min':
      return Math.min(...nums);
  }
}

export function runStreamQuery(rows: readonly SimStreamRow[], query: StreamQuery): Record<string, unknown>[] {
  const start = query.start === undefined ? -Infinity : Date.parse(query.start);
  const end = query.end === undefined ? Infinity : Date.parse(query.end);
  if (Number.isNaN(start) || Number.isNaN(end))
    throw new StreamQueryError('start and end must be RFC 3339 times');
  const bucketMs = query.timeBucket === undefined ? undefined : parseDuration(query.timeBucket);
  if (query.timeBucket !== undefined && (bucketMs === undefined || bucketMs <= 0)) {
    throw new StreamQueryError(`timeBucket "${query.timeBucket}" is not a duration`);
  }

  const flat = rows
    .filter((r) => {
      const t = Date.parse(r.time);
      return t >= start && t <= end;
    })
    .map((r) => ({ time: r.time, deviceId: r.deviceId, ...flatten(r.data) }) as Record<string, unknown>)
    .filter((r) => (query.filters ?? []).every((f) => matches(r, f)));

  const fields = query.fields ?? [];
  if (fields.length === 0) return flat;
  const name = (f: StreamField) => f.alias ?? f.path;
  const groupFields = fields.filter((f) => f.agg === undefined);
  const aggFields = fields.filter((f) => f.agg !== undefined);
  if (aggFields.length === 0) {
    return flat.map((r) => Object.fromEntries(fields.map((f) => [name(f), r[f.path] ?? null])));
  }

  const groups = new Map<string, { key: Record<string, unknown>; rows: Record<string, unknown>[] }>();
  for (const r of flat) {
    const key: Record<string, unknown> = {};
    for (const f of groupFields) {
      if (f.path === 'time' && bucketMs !== undefined) {
        key[name(f)] = new Date(Math.floor(Date.parse(String(r.time)) / bucketMs) * bucketMs).toISOString();
      } else {
        key[name(f)] = r[f.path] ?? null;
      }
    }
    const id = JSON.stringify(key);
    const group = groups.get(id) ?? { key, rows: [] };
    group.rows.push(r);
    groups.set(id, group);
  }
  return [...groups.values()].map(({ key, rows: groupRows }) => ({
    ...key,
    ...Object.fromEntries(
      aggFields.map((f) => [
        name(f),
        aggregate(
          f.agg!,
          groupRows.map((r) => r[f.path]),
        ),
      ]),
    ),
  }));
}
