import type { IntegrationConfig } from '../../config/schema.js';
import { errorMessage, isGatewayError } from '../../errors.js';
import type { Logger } from '../../logger.js';
import type { EnqueueTarget, IncomingMessage, Outbox } from '../../store/outbox-types.js';
import { createFloodReporter, latestEvent } from '../../common/flood-reporter.js';
import { matchTopic } from '../../common/topic-match.js';

export interface IngestOptions {
  outbox: Outbox;
  logger: Logger;
  integrations: readonly IntegrationConfig[];
  /** Merges `devices/{id}/state` messages into each device's reported state (before routing). */
  reportedState?: { merge(deviceId: string, payload: Buffer): boolean };
  now?: () => number;
}

export interface Ingest {
  /** Called from aedes' authorizePublish after the ACL check. Returns a promise that
   *  resolves after the message is committed to every matching enabled integration's queue,
   *  or null when nothing needs to be waited for (no route matches, or QoS 0 which is queued
   *  without holding anything up). */
  accept(message: IncomingMessage): Promise<void> | null;
  /** Live reload: new routes/limits apply to the next message. */
  setIntegrations(integrations: readonly IntegrationConfig[]): void;
  /** QoS 0 messages that could not be queued since start (logged, never thrown). */
  readonly qos0Failures: number;
}

interface RouteTable {
  integrationId: string;
  routes: readonly { from: string; qos: 0 | 1 | 2 }[];
  limits: EnqueueTarget['limits'];
}

const FAILURE_LOG_INTERVAL_MS = 1000;
/** Topics whose matching routes are remembered; the memo starts over when it is full. */
const ROUTE_MEMO_TOPICS = 10_000;

/**
 * The queues a topic goes to: one target list per QoS a device may publish with (the row's QoS
 * is the lower of the message's and the route's). Built once per topic; never changed after.
 */
type TopicTargets = readonly [readonly EnqueueTarget[], readonly EnqueueTarget[], readonly EnqueueTarget[]];

/** Route matching and the commit-before-PUBACK path (SPEC §5). */
export function createIngest(options: IngestOptions): Ingest {
  const { outbox, logger } = options;
  const now = options.now ?? Date.now;
  let table: readonly RouteTable[] = buildTable(options.integrations);
  // Devices publish to a few topics over and over: match each topic against the routes once.
  let memo = new Map<string, TopicTargets | null>();
  const targetsFor = (topic: string): TopicTargets | null => {
    let targets = memo.get(topic);
    if (targets !== undefined) return targets;
    const hits: { entry: RouteTable; routeQos: number }[] = [];
    for (const entry of table) {
      let routeQos = -1;
      for (const route of entry.routes) {
        if (route.qos > routeQos && matchTopic(route.from, topic) !== null) routeQos = route.qos;
      }
      if (routeQos >= 0) hits.push({ entry, routeQos });
    }
    const forQos = (qos: number): EnqueueTarget[] =>
      hits.map(({ entry, routeQos }) => ({
        integrationId: entry.integrationId,
        limits: entry.limits,
        qos: Math.min(qos, routeQos) as 0 | 1 | 2,
      }));
    targets = hits.length === 0 ? null : [forQos(0), forQos(1), forQos(2)];
    if (memo.size >= ROUTE_MEMO_TOPICS) memo = new Map();
    memo.set(topic, targets);
    return targets;
  };
  let qos0Failures = 0;
  // QoS 0 failures come in floods (disk full, queue full): one line per second with the count.
  const failures = createFloodReporter<{ err: unknown; message: IncomingMessage }>({
    windowMs: FAILURE_LOG_INTERVAL_MS,
    fold: latestEvent,
    now,
    report(_key, { err, message }, count) {
      logger.warn(
        {
          code: isGatewayError(err) ? err.code : undefined,
          error: errorMessage(err),
          count,
          total: qos0Failures,
          topic: message.topic,
          deviceId: message.deviceId,
        },
        'qos0_message_not_queued',
      );
    },
  });
  const noteQos0Failure = (err: unknown, message: IncomingMessage) => {
    qos0Failures++;
    failures.note('qos0', { err, message });
  };

  /** The device of `devices/{id}/state` (the topic names it; a gateway client may speak for children). */
  const noteState = (message: IncomingMessage) => {
    const parts = message.topic.split('/');
    if (parts.length !== 3 || parts[0] !== 'devices' || parts[2] !== 'state' || parts[1] === '') return;
    if (!options.reportedState!.merge(parts[1]!, message.payload)) {
      logger.debug({ topic: message.topic, deviceId: parts[1] }, 'state_not_json_object');
    }
  };

  return {
    get qos0Failures() {
      return qos0Failures;
    },

    accept(message) {
      if (options.reportedState && message.topic.endsWith('/state')) noteState(message);
      const targets = targetsFor(message.topic);
      if (targets === null) return null;
      const committed = outbox.enqueue(message, targets[message.qos]);
      if (message.qos === 0) {
        committed.catch((err: unknown) => noteQos0Failure(err, message));
        return null;
      }
      return committed;
    },

    setIntegrations(integrations) {
      table = buildTable(integrations);
      memo = new Map();
    },
  };
}

function buildTable(integrations: readonly IntegrationConfig[]): RouteTable[] {
  return integrations
    .filter((integration) => integration.enabled && integration.routes.length > 0)
    .map((integration) => ({
      integrationId: integration.id,
      routes: integration.routes.map((r) => ({ from: r.from, qos: r.qos })),
      limits: {
        maxMessages: integration.queue.maxMessages,
        maxBytes: integration.queue.maxBytes,
        onFull: integration.queue.onFull,
        ttlMs: integration.queue.ttl,
      },
    }));
}
