import { randomBytes } from 'node:crypto';
import { ErrorCodes, GatewayError } from '../../errors.js';
import { throttled } from '../provider.js';
import { createRequestTracker } from '../request-tracker.js';
import { parseShadowTopic, shadowPrefix } from './topics.js';

/**
 * The Device Shadow side of the `aws-iot` provider (cloud-protocols.md §1.3): reported-state
 * updates correlated by `clientToken`, optimistic versions with a bounded fetch-merge-retry on
 * 409, gets, and the desired state that deltas and get/accepted carry. At most `maxInflight`
 * requests wait for an answer at once (AWS answers the 11th with 429). The transport is a
 * function, so this module is tested without a network.
 */

export type JsonObject = { [key: string]: unknown };

export interface ShadowDocument {
  desired: JsonObject | undefined;
  reported: JsonObject | undefined;
  version: number;
}

export interface UpdateOutcome {
  version: number;
  /** Requests sent: 1 without conflicts. */
  attempts: number;
  conflicts: number;
  clientToken: string;
  /** The shadow already held the reported values after a conflict: nothing was sent again. */
  alreadyApplied: boolean;
}

export interface GetOutcome {
  /** Undefined when the shadow does not exist (404). */
  document: ShadowDocument | undefined;
  clientToken: string;
  latencyMs: number;
}

/** Desired state for `devices/{id}/desired`, from a delta or a get/accepted. */
export interface DesiredUpdate {
  thingName: string;
  desired: JsonObject;
  version: number | undefined;
  source: 'delta' | 'get';
  /** The answer to a get this client made (its caller delivers it); others' gets are broadcast to us too. */
  ours: boolean;
}

export interface ShadowClientOptions {
  shadowName: string | undefined;
  /** Publishes a request (QoS 1); resolves at PUBACK. */
  publish(topic: string, payload: Buffer): Promise<void>;
  maxInflight: number;
  timeoutMs: number;
  maxConflictRetries: number;
  /** Called for each conflict resolved or given up, with timings; never throws. */
  onConflict?(event: {
    thingName: string;
    clientToken: string;
    outcome: 'retried' | 'merged' | 'gave_up';
  }): void;
}

export interface ShadowClient {
  updateReported(thingName: string, patch: JsonObject): Promise<UpdateOutcome>;
  get(thingName: string): Promise<GetOutcome>;
  /** A message on a shadow topic: settles the request it answers; returns desired state to deliver. */
  onMessage(topic: string, payload: Buffer): DesiredUpdate | undefined;
  /** Rejects every request waiting or in flight (the link went away). */
  failAll(err: GatewayError): void;
  readonly inflight: number;
}

interface Answer {
  outcome: 'accepted' | 'rejected';
  body: JsonObject;
}

const VERSION_MEMO = 10_000;

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** True when `reported` already holds every value of `patch` (null = absent). */
export function holds(reported: JsonObject | undefined, patch: JsonObject): boolean {
  for (const [k, v] of Object.entries(patch)) {
    const r = reported?.[k];
    if (v === null) {
      if (r !== undefined) return false;
    } else if (isObject(v)) {
      if (!isObject(r) || !holds(r, v)) return false;
    } else if (JSON.stringify(v) !== JSON.stringify(r)) return false;
  }
  return true;
}

/** The GatewayError for a rejected shadow request (§1.3 error codes). */
export function rejectionError(thingName: string, operation: string, body: JsonObject): GatewayError {
  const code = typeof body.code === 'number' ? body.code : 0;
  const message = typeof body.message === 'string' ? body.message : 'no message';
  const details = { thingName, operation, shadowCode: code, clientToken: body.clientToken };
  if (code === 429) {
    return throttled(`AWS IoT throttled the shadow ${operation} of ${thingName} (429 ${message})`, 1000);
  }
  // 5xx: the service's trouble, try again; 4xx: this document or this policy will not do.
  const retryable = code >= 500 || code === 0;
  return new GatewayError(
    code === 401 || code === 403 ? ErrorCodes.PROVIDER_AUTH : ErrorCodes.PROVIDER_REJECTED,
    `AWS IoT rejected the shadow ${operation} of ${thingName}: ${code} ${message}`,
    { retryable, details },
  );
}

export function createShadowClient(options: ShadowClientOptions): ShadowClient {
  const tokenPrefix = randomBytes(6).toString('hex');
  let sequence = 0;
  // Correlation by clientToken, at most `maxInflight` outstanding, the rest queued in order.
  const tracker = createRequestTracker<Answer>({
    maxInFlight: options.maxInflight,
    timeoutMs: options.timeoutMs,
    token: () => `${tokenPrefix}-${++sequence}`,
    name: 'shadow',
  });
  let versions = new Map<string, number>();
  /** Updates of one thing go one after another, so each carries the version the last one made. */
  const chains = new Map<string, Promise<unknown>>();

  const noteVersion = (thingName: string, version: unknown) => {
    if (typeof version !== 'number') return;
    const known = versions.get(thingName);
    if (known !== undefined && known >= version) return;
    if (versions.size >= VERSION_MEMO) versions = new Map();
    versions.set(thingName, version);
  };

  /** One request: publish with a fresh clientToken, wait for accepted or rejected. */
  async function request(
    thingName: string,
    operation: 'update' | 'get',
    body: JsonObject,
  ): Promise<Answer & { clientToken: string }> {
    let clientToken = '';
    const topic = `${shadowPrefix(thingName, options.shadowName)}/${operation}`;
    const answer = await tracker.request((token) => {
      clientToken = token;
      return options.publish(topic, Buffer.from(JSON.stringify({ ...body, clientToken: token })));
    });
    return { ...answer, clientToken };
  }

  async function get(thingName: string): Promise<GetOutcome> {
    const started = performance.now();
    const answer = await request(thingName, 'get', {});
    const latencyMs = Math.round(performance.now() - started);
    if (answer.outcome === 'rejected') {
      if (answer.body.code === 404)
        return { document: undefined, clientToken: answer.clientToken, latencyMs };
      throw rejectionError(thingName, 'get', answer.body);
    }
    const state = isObject(answer.body.state) ? answer.body.state : {};
    const version = typeof answer.body.version === 'number' ? answer.body.version : 0;
    noteVersion(thingName, version);
    return {
      document: {
        desired: isObject(state.desired) ? state.desired : undefined,
        reported: isObject(state.reported) ? state.reported : undefined,
        version,
      },
      clientToken: answer.clientToken,
      latencyMs,
    };
  }

  async function update(thingName: string, patch: JsonObject): Promise<UpdateOutcome> {
    let conflicts = 0;
    for (let attempt = 1; ; attempt++) {
      const version = versions.get(thingName);
      const answer = await request(thingName, 'update', {
        state: { reported: patch },
        ...(version === undefined ? {} : { version }),
      });
      if (answer.outcome === 'accepted') {
        noteVersion(thingName, answer.body.version);
        return {
          version: Number(answer.body.version),
          attempts: attempt,
          conflicts,
          clientToken: answer.clientToken,
          alreadyApplied: false,
        };
      }
      if (answer.body.code !== 409) throw rejectionError(thingName, 'update', answer.body);
      // 409: someone changed the shadow since the version we knew. Fetch it, merge, retry (bounded).
      conflicts++;
      if (conflicts > options.maxConflictRetries) {
        options.onConflict?.({ thingName, clientToken: answer.clientToken, outcome: 'gave_up' });
        throw new GatewayError(
          ErrorCodes.PROVIDER_REJECTED,
          `the shadow of ${thingName} kept changing: ${conflicts} version conflicts in a row; the update is tried again later`,
          { retryable: true, details: { thingName, conflicts } },
        );
      }
      versions.delete(thingName);
      const fetched = await get(thingName);
      if (fetched.document && holds(fetched.document.reported, patch)) {
        options.onConflict?.({ thingName, clientToken: answer.clientToken, outcome: 'merged' });
        return {
          version: fetched.document.version,
          attempts: attempt,
          conflicts,
          clientToken: answer.clientToken,
          alreadyApplied: true,
        };
      }
      options.onConflict?.({ thingName, clientToken: answer.clientToken, outcome: 'retried' });
    }
  }

  return {
    get inflight() {
      return tracker.stats.inFlight;
    },

    updateReported(thingName, patch) {
      const previous = chains.get(thingName) ?? Promise.resolve();
      const next = previous.catch(() => undefined).then(() => update(thingName, patch));
      chains.set(thingName, next);
      const forget = () => {
        if (chains.get(thingName) === next) chains.delete(thingName);
      };
      next.then(forget, forget);
      return next;
    },

    get,

    onMessage(topic, payload) {
      const parsed = parseShadowTopic(topic, options.shadowName);
      if (!parsed) return undefined;
      let body: unknown;
      try {
        body = JSON.parse(payload.toString('utf8'));
      } catch {
        return undefined;
      }
      if (!isObject(body)) return undefined;
      const token = typeof body.clientToken === 'string' ? body.clientToken : undefined;
      if ((parsed.outcome === 'accepted' || parsed.outcome === 'rejected') && token !== undefined) {
        tracker.settle(token, { outcome: parsed.outcome, body });
      }
      if (parsed.outcome === 'accepted' && parsed.operation === 'update')
        noteVersion(parsed.thingName, body.version);
      if (parsed.outcome === 'delta' && isObject(body.state)) {
        noteVersion(parsed.thingName, body.version);
        return {
          thingName: parsed.thingName,
          desired: body.state,
          version: typeof body.version === 'number' ? body.version : undefined,
          source: 'delta',
          ours: false,
        };
      }
      if (parsed.operation === 'get' && parsed.outcome === 'accepted') {
        const state = isObject(body.state) ? body.state : {};
        if (!isObject(state.desired)) return undefined;
        return {
          thingName: parsed.thingName,
          desired: state.desired,
          version: typeof body.version === 'number' ? body.version : undefined,
          source: 'get',
          ours: token !== undefined && token.startsWith(`${tokenPrefix}-`),
        };
      }
      return undefined;
    },

    failAll(err) {
      tracker.rejectAll(err);
    },
  };
}
