/**
 * The Device Shadow service of the AWS IoT Core simulator (cloud-protocols.md §1.3): classic and
 * named shadows, versions, deep merge with null deletes, deltas, update/documents, 409
 * conflicts, clientToken echo and AWS's error bodies. Pure: it turns one request into the
 * response publications; the server sends them.
 */

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

/** One publication the service makes in answer to a request or a cloud-side change. */
export interface ShadowResponse {
  topic: string;
  body: JsonObject;
}

export interface ShadowServiceOptions {
  /** Nesting depth allowed in desired/reported ([CONFLICT] in the doc: 5, 6 or 8). */
  maxDepth?: number;
  /** State document size (metadata excluded), 8 KB. */
  maxDocumentBytes?: number;
  /** Epoch seconds; injectable. */
  now?: () => number;
}

interface Stored {
  desired: JsonObject | undefined;
  reported: JsonObject | undefined;
  metaDesired: JsonObject | undefined;
  metaReported: JsonObject | undefined;
  version: number;
  deleted: boolean;
}

export interface ShadowService {
  /** A publication to `$aws/things/<thing>/shadow[/name/<n>]/(get|update|delete)`. */
  handle(topic: string, payload: Buffer): ShadowResponse[];
  /** True when the topic is a shadow request topic the service answers. */
  isRequest(topic: string): boolean;
  /** The cloud (console, REST) changes a shadow: returns the delta/documents publications. */
  update(thing: string, shadowName: string | undefined, request: JsonObject): ShadowResponse[];
  /** The current document as `get/accepted` would show it, or undefined. */
  document(thing: string, shadowName?: string): JsonObject | undefined;
  /** An error body for a request refused before the service looked at it (429 in flight). */
  reject(topic: string, payload: Buffer, code: number, message: string): ShadowResponse[];
}

const REQUEST =
  /^\$aws\/things\/([a-zA-Z0-9:_-]{1,128})\/shadow(?:\/name\/([$a-zA-Z0-9:_-]{1,64}))?\/(get|update|delete)$/;

export function parseShadowTopic(
  topic: string,
): { thing: string; shadowName: string | undefined; operation: 'get' | 'update' | 'delete' } | undefined {
  const m = REQUEST.exec(topic);
  if (!m) return undefined;
  return { thing: m[1]!, shadowName: m[2], operation: m[3] as 'get' | 'update' | 'delete' };
}

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Only the fields present change; null deletes; arrays are values (§1.3 request document). */
export function mergeState(target: JsonObject | undefined, patch: JsonObject): JsonObject | undefined {
  const out: JsonObject = { ...(target ?? {}) };
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else if (isObject(v)) {
      const merged = mergeState(isObject(out[k]) ? (out[k] as JsonObject) : undefined, v);
      if (merged === undefined) delete out[k];
      else out[k] = merged;
    } else out[k] = v;
  }
  return Object.keys(out).length === 0 ? undefined : out;
}

function metadataOf(patch: JsonObject, timestamp: number): JsonObject {
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(patch)) {
    out[k] = isObject(v) ? metadataOf(v, timestamp) : { timestamp };
  }
  return out;
}

function equal(a: Json | undefined, b: Json | undefined): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** Desired fields that differ from reported; nested objects keep the path to differing leaves. */
export function deltaOf(
  desired: JsonObject | undefined,
  reported: JsonObject | undefined,
): JsonObject | undefined {
  if (desired === undefined) return undefined;
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(desired)) {
    const r = reported?.[k];
    if (isObject(v) && isObject(r)) {
      const inner = deltaOf(v, r);
      if (inner !== undefined) out[k] = inner;
    } else if (!equal(v, r)) out[k] = v;
  }
  return Object.keys(out).length === 0 ? undefined : out;
}

function pick(meta: JsonObject | undefined, shape: JsonObject): JsonObject {
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(shape)) {
    const m = meta?.[k];
    if (isObject(v) && isObject(m)) out[k] = pick(m, v);
    else if (m !== undefined) out[k] = m;
  }
  return out;
}

function depth(v: Json): number {
  if (!isObject(v)) return 0;
  let d = 0;
  for (const inner of Object.values(v)) d = Math.max(d, depth(inner));
  return d + 1;
}

function hasNullInArray(v: Json): boolean {
  if (Array.isArray(v)) return v.some((x) => x === null || hasNullInArray(x));
  if (isObject(v)) return Object.values(v).some(hasNullInArray);
  return false;
}

export function createShadowService(options: ShadowServiceOptions = {}): ShadowService {
  const maxDepth = options.maxDepth ?? 6;
  const maxBytes = options.maxDocumentBytes ?? 8 * 1024;
  const now = options.now ?? (() => Math.floor(Date.now() / 1000));
  const shadows = new Map<string, Stored>();
  const key = (thing: string, name: string | undefined) => `${thing}\u0000${name ?? ''}`;
  const prefix = (thing: string, name: string | undefined) =>
    `$aws/things/${thing}/shadow${name === undefined ? '' : `/name/${name}`}`;

  const error = (
    topic: string,
    code: number,
    message: string,
    clientToken: string | undefined,
  ): ShadowResponse => ({
    topic,
    body: { code, message, timestamp: now(), ...(clientToken === undefined ? {} : { clientToken }) },
  });

  function fullDocument(s: Stored): JsonObject {
    const state: JsonObject = {};
    const metadata: JsonObject = {};
    if (s.desired) state.desired = s.desired;
    if (s.reported) state.reported = s.reported;
    if (s.metaDesired) metadata.desired = s.metaDesired;
    if (s.metaReported) metadata.reported = s.metaReported;
    return { state, metadata, version: s.version };
  }

  function getDocument(s: Stored, clientToken: string | undefined): JsonObject {
    const doc = fullDocument(s);
    const delta = deltaOf(s.desired, s.reported);
    if (delta) {
      (doc.state as JsonObject).delta = delta;
      (doc.metadata as JsonObject).delta = pick(s.metaDesired, delta);
    }
    return { ...doc, timestamp: now(), ...(clientToken === undefined ? {} : { clientToken }) };
  }

  function applyUpdate(
    thing: string,
    name: string | undefined,
    body: JsonObject,
    clientToken: string | undefined,
  ): ShadowResponse[] {
    const p = prefix(thing, name);
    const reject = (code: number, message: string) => [
      error(`${p}/update/rejected`, code, message, clientToken),
    ];
    const state = body.state;
    if (state === undefined) return reject(400, 'Missing required node: state');
    if (!isObject(state)) return reject(400, 'State node must be an object');
    for (const k of Object.keys(state)) {
      if (k !== 'desired' && k !== 'reported') return reject(400, 'State contains an invalid node');
    }
    if (state.desired !== undefined && state.desired !== null && !isObject(state.desired)) {
      return reject(400, 'Desired node must be an object');
    }
    if (state.reported !== undefined && state.reported !== null && !isObject(state.reported)) {
      return reject(400, 'Reported node must be an object');
    }
    if (hasNullInArray(state)) return reject(400, 'State contains an invalid node');
    for (const section of [state.desired, state.reported]) {
      if (isObject(section) && depth(section) > maxDepth) {
        return reject(400, `JSON contains too many levels of nesting; maximum is ${maxDepth}`);
      }
    }
    if (body.version !== undefined && (typeof body.version !== 'number' || !Number.isInteger(body.version))) {
      return reject(400, 'Invalid version');
    }
    const k = key(thing, name);
    const existing = shadows.get(k);
    const live = existing !== undefined && !existing.deleted;
    const currentVersion = existing?.version ?? 0;
    if (body.version !== undefined && body.version !== (live ? currentVersion : 0)) {
      return reject(409, 'Version conflict');
    }
    const previous = live ? fullDocument(existing) : undefined;
    const ts = now();
    const next: Stored = {
      desired: live ? existing.desired : undefined,
      reported: live ? existing.reported : undefined,
      metaDesired: live ? existing.metaDesired : undefined,
      metaReported: live ? existing.metaReported : undefined,
      version: currentVersion + 1,
      deleted: false,
    };
    const meta: JsonObject = {};
    if (state.desired === null) {
      next.desired = undefined;
      next.metaDesired = undefined;
    } else if (isObject(state.desired)) {
      next.desired = mergeState(next.desired, state.desired);
      const m = metadataOf(state.desired, ts);
      next.metaDesired = mergeState(next.metaDesired, m);
      meta.desired = m;
    }
    if (state.reported === null) {
      next.reported = undefined;
      next.metaReported = undefined;
    } else if (isObject(state.reported)) {
      next.reported = mergeState(next.reported, state.reported);
      const m = metadataOf(state.reported, ts);
      next.metaReported = mergeState(next.metaReported, m);
      meta.reported = m;
    }
    const size = Buffer.byteLength(JSON.stringify({ desired: next.desired, reported: next.reported }));
    if (size > maxBytes) return reject(413, 'The payload exceeds the maximum size allowed');
    shadows.set(k, next);
    const token: JsonObject = clientToken === undefined ? {} : { clientToken };
    const out: ShadowResponse[] = [
      {
        topic: `${p}/update/accepted`,
        body: { state: state as JsonObject, metadata: meta, version: next.version, timestamp: ts, ...token },
      },
    ];
    const delta = deltaOf(next.desired, next.reported);
    if (delta) {
      out.push({
        topic: `${p}/update/delta`,
        body: {
          state: delta,
          metadata: pick(next.metaDesired, delta),
          version: next.version,
          timestamp: ts,
          ...token,
        },
      });
    }
    out.push({
      topic: `${p}/update/documents`,
      body: {
        previous: previous ?? null,
        current: fullDocument(next),
        timestamp: ts,
        ...token,
      },
    });
    return out;
  }

  function parseBody(
    topic: string,
    payload: Buffer,
    rejected: string,
    allowEmpty: boolean,
  ): { body: JsonObject; clientToken: string | undefined } | ShadowResponse[] {
    if (payload.length === 0 && allowEmpty) return { body: {}, clientToken: undefined };
    let parsed: unknown;
    try {
      parsed = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(payload));
    } catch (err) {
      const encoding = err instanceof TypeError;
      return [
        error(
          rejected,
          encoding ? 415 : 400,
          encoding ? 'Unsupported documented encoding; supported encoding is UTF-8' : 'Invalid JSON',
          undefined,
        ),
      ];
    }
    if (!isObject(parsed)) return [error(rejected, 400, 'Invalid JSON', undefined)];
    const token = parsed.clientToken;
    if (token !== undefined) {
      if (typeof token !== 'string' || Buffer.byteLength(token) > 64) {
        return [error(rejected, 400, 'Invalid clientToken', undefined)];
      }
    }
    return { body: parsed, clientToken: token as string | undefined };
  }

  return {
    isRequest(topic) {
      return parseShadowTopic(topic) !== undefined;
    },

    handle(topic, payload) {
      const parsed = parseShadowTopic(topic);
      if (!parsed) return [];
      const { thing, shadowName, operation } = parsed;
      const p = prefix(thing, shadowName);
      const rejected = `${p}/${operation}/rejected`;
      const body = parseBody(topic, payload, rejected, operation !== 'update');
      if (Array.isArray(body)) return body;
      const stored = shadows.get(key(thing, shadowName));
      const missing = stored === undefined || stored.deleted;
      const notFound = () => [
        error(rejected, 404, `No shadow exists with name: ${shadowName ?? thing}`, body.clientToken),
      ];
      if (operation === 'get') {
        if (missing) return notFound();
        return [{ topic: `${p}/get/accepted`, body: getDocument(stored, body.clientToken) }];
      }
      if (operation === 'delete') {
        if (missing) return notFound();
        // Deleting keeps the version sequence (§1.3 "Deletion and versions").
        stored.deleted = true;
        stored.desired = stored.reported = stored.metaDesired = stored.metaReported = undefined;
        return [
          {
            topic: `${p}/delete/accepted`,
            body: {
              version: stored.version,
              timestamp: now(),
              ...(body.clientToken === undefined ? {} : { clientToken: body.clientToken }),
            },
          },
        ];
      }
      return applyUpdate(thing, shadowName, body.body, body.clientToken);
    },

    update(thing, shadowName, request) {
      return applyUpdate(thing, shadowName, request, undefined).filter(
        (r) => !/\/update\/(accepted|rejected)$/.test(r.topic),
      );
    },

    document(thing, shadowName) {
      const stored = shadows.get(key(thing, shadowName));
      if (stored === undefined || stored.deleted) return undefined;
      return getDocument(stored, undefined);
    },

    reject(topic, payload, code, message) {
      const parsed = parseShadowTopic(topic);
      if (!parsed) return [];
      let clientToken: string | undefined;
      try {
        const body = JSON.parse(payload.toString('utf8')) as unknown;
        if (isObject(body) && typeof body.clientToken === 'string') clientToken = body.clientToken;
      } catch {
        // An unparsable body has no token to echo.
      }
      const p = prefix(parsed.thing, parsed.shadowName);
      return [error(`${p}/${parsed.operation}/rejected`, code, message, clientToken)];
    },
  };
}
