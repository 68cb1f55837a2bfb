/**
 * The two packets of an upstream link's hot path, on the wire without mqtt.js or mqtt-packet:
 * the PUBLISH of a queued message (QoS 0 or 1, no properties) and the PUBACK that answers it.
 * Under load, mqtt-packet's generic generate and parse and mqtt.js's handling of each PUBACK
 * (parse, events, keepalive timer, its outgoing store) were a fifth of the gateway's CPU
 * (docs/benchmarks.md, issue 11). Everything else on the link stays with mqtt.js.
 *
 * Formats: MQTT 3.1.1 §3.3 and §3.4; MQTT 5.0 §3.3 and §3.4 (a property length after the
 * packet id of a PUBLISH; a PUBACK of remaining length 2 means reason 0x00, no properties).
 */

/** The largest remaining length the variable byte integer can say (MQTT 3.1.1 §2.2.3). */
const MAX_REMAINING_LENGTH = 268_435_455;
/** A PUBACK longer than this (MQTT 5 with a long reason string) goes to mqtt.js instead. */
const MAX_SPLIT_PUBACK = 1024;

export class PacketTooLargeError extends Error {}

/**
 * One PUBLISH packet in one buffer. `packetId` is ignored for QoS 0. Throws PacketTooLargeError
 * when the topic or the packet exceeds what MQTT can encode.
 */
export function encodePublish(
  topic: string,
  payload: Buffer | string,
  qos: 0 | 1,
  retain: boolean,
  packetId: number,
  protocolVersion: 4 | 5,
): Buffer {
  const topicBytes = Buffer.byteLength(topic);
  if (topicBytes > 0xffff)
    throw new PacketTooLargeError(`the topic is ${topicBytes} bytes; MQTT allows 65,535`);
  const payloadBytes = typeof payload === 'string' ? Buffer.byteLength(payload) : payload.length;
  const remaining = 2 + topicBytes + (qos === 1 ? 2 : 0) + (protocolVersion === 5 ? 1 : 0) + payloadBytes;
  if (remaining > MAX_REMAINING_LENGTH) {
    throw new PacketTooLargeError(`the packet is ${remaining} bytes; MQTT allows ${MAX_REMAINING_LENGTH}`);
  }
  const lengthBytes = remaining < 0x80 ? 1 : remaining < 0x4000 ? 2 : remaining < 0x200000 ? 3 : 4;
  const packet = Buffer.allocUnsafe(1 + lengthBytes + remaining);
  packet[0] = 0x30 | (qos << 1) | (retain ? 1 : 0);
  let at = 1;
  let rest = remaining;
  do {
    const digit = rest % 0x80;
    rest = Math.floor(rest / 0x80);
    packet[at++] = rest > 0 ? digit | 0x80 : digit;
  } while (rest > 0);
  packet.writeUInt16BE(topicBytes, at);
  at += 2;
  at += packet.write(topic, at, 'utf8');
  if (qos === 1) {
    packet.writeUInt16BE(packetId, at);
    at += 2;
  }
  if (protocolVersion === 5) packet[at++] = 0; // no properties
  if (typeof payload === 'string') packet.write(payload, at, 'utf8');
  else payload.copy(packet, at);
  return packet;
}

/**
 * Takes the PUBACKs that `claim` accepts out of a link's incoming bytes before mqtt.js parses
 * them. `split(chunk)` returns the bytes to hand on (whole packets, in order) or undefined when
 * nothing is left. `claim(packetId, reasonCode)` settles a publish and returns true, or returns
 * false for an id it does not know (mqtt.js's own publishes): that PUBACK is handed on.
 *
 * A packet is never held longer than its own bytes take to arrive. Only a PUBACK or a fixed
 * header cut by a chunk boundary is kept back (a few bytes); other packets, however large,
 * are handed on as their bytes arrive. Bytes that are not MQTT (a malformed length) end the
 * splitting: from then on everything is handed on and mqtt.js reports the error.
 */
export function createPubackSplitter(
  protocolVersion: 4 | 5,
  claim: (packetId: number, reasonCode: number | undefined) => boolean,
): (chunk: Buffer) => Buffer | undefined {
  /** Bytes of a packet that is handed on whole, still to come. */
  let passing = 0;
  /** The start of a packet whose header or PUBACK body has not all arrived. */
  let held: Buffer | undefined;
  let broken = false;

  return (chunk) => {
    if (broken) return chunk;
    let buf = chunk;
    let pos = 0;
    if (passing > 0) {
      if (passing >= chunk.length) {
        passing -= chunk.length;
        return chunk;
      }
      pos = passing;
      passing = 0;
    } else if (held !== undefined) {
      buf = Buffer.concat([held, chunk]);
      held = undefined;
    }
    /** Ranges of `buf` to hand on; `from` is the start of the current one. */
    let kept: Buffer[] | undefined;
    let from = 0;
    while (pos < buf.length) {
      const start = pos;
      let length = 0;
      let multiplier = 1;
      let at = start + 1;
      let complete = false;
      while (at < buf.length && at < start + 5) {
        const byte = buf[at++]!;
        length += (byte & 0x7f) * multiplier;
        multiplier *= 0x80;
        if ((byte & 0x80) === 0) {
          complete = true;
          break;
        }
      }
      if (!complete) {
        if (at >= start + 5) {
          broken = true;
          pos = buf.length;
          break;
        }
        held = buf.subarray(start);
        break;
      }
      const end = at + length;
      const isPuback = buf[start] === 0x40 && length >= 2 && length <= MAX_SPLIT_PUBACK;
      if (!isPuback) {
        if (end > buf.length) {
          passing = end - buf.length;
          pos = buf.length;
          break;
        }
        pos = end;
        continue;
      }
      if (end > buf.length) {
        held = buf.subarray(start);
        break;
      }
      const packetId = buf.readUInt16BE(at);
      const reasonCode = protocolVersion === 5 && length >= 3 ? buf[at + 2] : undefined;
      if (claim(packetId, reasonCode)) {
        if (start > from) (kept ??= []).push(buf.subarray(from, start));
        else kept ??= [];
        from = end;
      }
      pos = end;
    }
    const upTo = held === undefined ? buf.length : buf.length - held.length;
    if (kept === undefined) return upTo === 0 ? undefined : upTo === buf.length ? buf : buf.subarray(0, upTo);
    if (upTo > from) kept.push(buf.subarray(from, upTo));
    if (kept.length === 0) return undefined;
    return kept.length === 1 ? kept[0] : Buffer.concat(kept);
  };
}
