/** A message taken from an integration's durable queue, on its way to the cloud. */
export interface OutboundMessage {
  /** Queue row id: our own monotonic id, never an MQTT packet id. */
  id: number;
  deviceId: string;
  /** The canonical local topic (SPEC §4); the provider maps it to its cloud's idiom. */
  topic: string;
  payload: Buffer;
  qos: 0 | 1 | 2;
  retain: boolean;
  enqueuedAt: number;
  attempts: number;
}
