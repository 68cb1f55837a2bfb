import { describe, expect, it } from 'vitest';
import { generate, parser as mqttParser, type Packet } from 'mqtt-packet';
import { createPubackSplitter, encodePublish, PacketTooLargeError } from '../../src/providers/mqtt-wire.js';

/** A deterministic pseudo-random sequence, so a failure can be replayed. */
function lcg(seed: number): () => number {
  let x = seed;
  return () => {
    x = (x * 1_103_515_245 + 12_345) % 2 ** 31;
    return x / 2 ** 31;
  };
}

function parseAll(bytes: Buffer, protocolVersion: 4 | 5): Packet[] {
  const p = mqttParser({ protocolVersion });
  const out: Packet[] = [];
  p.on('packet', (packet) => out.push(packet));
  p.on('error', (err) => {
    throw err;
  });
  p.parse(bytes);
  return out;
}

describe('encodePublish', () => {
  const topics = ['t', 'devices/d-1/telemetry', 'ü/ß/€', 'x'.repeat(300)];
  // Remaining lengths around each boundary of the variable byte integer.
  const payloadSizes = [0, 1, 64, 100, 127, 128, 16_380, 16_384, 70_000, 2_097_200];

  for (const protocolVersion of [4, 5] as const) {
    it(`is byte for byte what mqtt-packet generates (MQTT ${protocolVersion === 4 ? '3.1.1' : '5'})`, () => {
      for (const topic of topics) {
        for (const size of payloadSizes) {
          for (const qos of [0, 1] as const) {
            for (const retain of [false, true]) {
              const payload = Buffer.alloc(size, 0xab);
              const messageId = qos === 1 ? 1 + (size % 65_535) : undefined;
              const ours = encodePublish(topic, payload, qos, retain, messageId ?? 0, protocolVersion);
              const theirs = generate(
                { cmd: 'publish', topic, payload, qos, retain, dup: false, messageId },
                { protocolVersion },
              );
              expect(ours.equals(theirs), `${topic.slice(0, 20)} ${size} qos ${qos} retain ${retain}`).toBe(
                true,
              );
            }
          }
        }
      }
    });
  }

  it('encodes a string payload as UTF-8', () => {
    const ours = encodePublish('a/b', 'héllo', 1, false, 7, 4);
    const [packet] = parseAll(ours, 4);
    expect(packet).toMatchObject({ cmd: 'publish', topic: 'a/b', qos: 1, messageId: 7 });
    expect((packet as { payload: Buffer }).payload.toString()).toBe('héllo');
  });

  it('refuses a topic MQTT cannot carry, naming the limit', () => {
    expect(() => encodePublish('t'.repeat(70_000), Buffer.alloc(1), 1, false, 1, 4)).toThrow(
      PacketTooLargeError,
    );
    expect(() => encodePublish('t'.repeat(70_000), Buffer.alloc(1), 1, false, 1, 4)).toThrow(/65,535/);
  });
});

interface Frame {
  bytes: Buffer;
  /** A PUBACK whose id the link is waiting for: the splitter must take it out. */
  claimed?: number;
  reasonCode?: number;
}

/** A stream as an upstream server sends it: PUBACKs (ours and mqtt.js's), PUBLISHes of every size, acks, pings. */
function serverStream(protocolVersion: 4 | 5, random: () => number, count: number): Frame[] {
  const frames: Frame[] = [];
  for (let i = 0; i < count; i++) {
    const r = random();
    const id = 1 + Math.floor(random() * 40_000);
    if (r < 0.55) {
      const reasonCode = protocolVersion === 5 && random() < 0.3 ? 0x97 : undefined;
      frames.push({
        bytes: generate({ cmd: 'puback', messageId: id, reasonCode }, { protocolVersion }),
        claimed: id,
        reasonCode,
      });
    } else if (r < 0.65) {
      // A PUBACK for one of mqtt.js's own publishes (ids apart from ours): handed on.
      const own = 40_001 + (id % 25_000);
      frames.push({ bytes: generate({ cmd: 'puback', messageId: own }, { protocolVersion }) });
    } else if (r < 0.85) {
      const size = random() < 0.1 ? 200_000 : Math.floor(random() * 300);
      frames.push({
        bytes: generate(
          {
            cmd: 'publish',
            topic: `cmd/${i}`,
            payload: Buffer.alloc(size, i & 0xff),
            qos: 1,
            retain: false,
            dup: false,
            messageId: id,
          },
          { protocolVersion },
        ),
      });
    } else if (r < 0.95) {
      frames.push({
        bytes: generate({ cmd: 'suback', messageId: id, granted: [1, 0x80] }, { protocolVersion }),
      });
    } else {
      frames.push({ bytes: generate({ cmd: 'pingresp' }, { protocolVersion }) });
    }
  }
  return frames;
}

/** Cuts `bytes` at random places: single bytes, headers split, many packets in one chunk. */
function chunked(bytes: Buffer, random: () => number): Buffer[] {
  const chunks: Buffer[] = [];
  let at = 0;
  while (at < bytes.length) {
    const r = random();
    const size = r < 0.2 ? 1 : r < 0.4 ? 1 + Math.floor(random() * 5) : 1 + Math.floor(random() * 70_000);
    chunks.push(bytes.subarray(at, Math.min(bytes.length, at + size)));
    at += size;
  }
  return chunks;
}

describe('createPubackSplitter', () => {
  for (const protocolVersion of [4, 5] as const) {
    it(`takes out exactly the PUBACKs it claims, in order, however the bytes are cut (MQTT ${protocolVersion === 4 ? '3.1.1' : '5'})`, () => {
      for (let seed = 1; seed <= 40; seed++) {
        const random = lcg(seed);
        const frames = serverStream(protocolVersion, random, 200);
        const waiting = new Set(frames.filter((f) => f.claimed !== undefined).map((f) => f.claimed!));
        const claims: { id: number; reasonCode: number | undefined }[] = [];
        const split = createPubackSplitter(protocolVersion, (id, reasonCode) => {
          if (!waiting.has(id)) return false;
          waiting.delete(id);
          // A success may come as no reason code (length 2) or as 0x00.
          claims.push({ id, reasonCode: reasonCode ?? 0 });
          return true;
        });
        const handed: Buffer[] = [];
        for (const chunk of chunked(Buffer.concat(frames.map((f) => f.bytes)), random)) {
          const rest = split(chunk);
          if (rest !== undefined) {
            expect(rest.length).toBeGreaterThan(0);
            handed.push(Buffer.from(rest));
          }
        }
        // The first PUBACK of an id is claimed; a repeat of the id is not ours any more.
        const seen = new Set<number>();
        const expectedClaims: { id: number; reasonCode: number | undefined }[] = [];
        const expectedRest: Buffer[] = [];
        for (const f of frames) {
          if (f.claimed !== undefined && !seen.has(f.claimed)) {
            seen.add(f.claimed);
            expectedClaims.push({ id: f.claimed, reasonCode: f.reasonCode ?? 0 });
          } else expectedRest.push(f.bytes);
        }
        expect(claims, `seed ${seed}`).toEqual(expectedClaims);
        expect(Buffer.concat(handed).equals(Buffer.concat(expectedRest)), `seed ${seed}`).toBe(true);
      }
    });
  }

  it('hands on every packet it does not claim, whole, for the parser behind it', () => {
    const split = createPubackSplitter(4, () => false);
    const bytes = Buffer.concat([
      generate({ cmd: 'puback', messageId: 9 }),
      generate({ cmd: 'publish', topic: 'a', payload: Buffer.from('x'), qos: 0, retain: false, dup: false }),
    ]);
    const out = [split(bytes.subarray(0, 3)), split(bytes.subarray(3))].filter((b) => b !== undefined);
    expect(parseAll(Buffer.concat(out), 4).map((p) => p.cmd)).toEqual(['puback', 'publish']);
  });

  it('stops splitting at bytes that are not MQTT and hands everything on, so the parser reports them', () => {
    const claimed: number[] = [];
    const split = createPubackSplitter(4, (id) => {
      claimed.push(id);
      return true;
    });
    const garbage = Buffer.from([0x40, 0xff, 0xff, 0xff, 0xff, 0x01]);
    expect(split(garbage)).toEqual(garbage);
    const puback = generate({ cmd: 'puback', messageId: 3 });
    expect(split(puback)).toEqual(puback);
    expect(claimed).toEqual([]);
  });
});
